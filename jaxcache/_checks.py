"""Argument checks shared by the core: clear errors, raised before anything is compiled."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["check_arrays", "check_int", "check_number", "is_concrete"]

_SHOWN = 120  # characters of a path or type shown in a message, so messages stay short


def check_arrays(tree: Any, name: str) -> None:
    """Raises a TypeError unless every leaf of ``tree`` is an array (has a shape and a dtype).

    A parameter given as a Python list or number would fail later inside the program with a
    message about tracers (or one that prints the whole list); this names the first such leaf by
    its path, in a message of bounded length.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            where = jax.tree_util.keystr(path)[:_SHOWN]
            raise TypeError(
                f"{name}{where} is a {type(leaf).__name__[:_SHOWN]}, not an array: parameters "
                "must be arrays (a list of numbers is a pytree of Python floats); convert it "
                "with jnp.asarray"
            )


def check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an int ``>= minimum``.

    Bools are refused (``True`` is not a step count).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def is_concrete(value: Any) -> bool:
    """Whether ``value`` is a known number (not a tracer, not a placeholder of a tree operation)."""
    if isinstance(value, jax.core.Tracer):
        return False
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def check_number(
    value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None
) -> None:
    """Raises a ValueError naming ``name`` if a concrete ``value`` lies outside the bounds.

    Traced values pass unchecked: policy settings are traced inside the compiled program, and
    were checked when the policy was built from Python numbers.
    """
    if not is_concrete(value):
        return
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and np.any(array < minimum):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and np.any(array > maximum):
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
