"""Settings objects (policies, reuse modes) as frozen dataclasses that are also pytrees.

Fields named ``static`` are structure (an interval, a mask, a forecast order): they live in the
pytree's tree definition, so changing one compiles a new program. Every other field is a number
(a threshold, a coefficient): a pytree leaf, traced inside the program, so a new value reuses
the compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import jax

__all__ = ["settings_dataclass"]

T = TypeVar("T", bound=type)


def settings_dataclass(*, static: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Makes ``cls`` a frozen dataclass registered as a pytree (``static`` fields are metadata).

    ``__post_init__`` also runs when JAX rebuilds the object from traced leaves, so checks of
    numeric fields must let tracers pass (see :func:`jaxcache._checks.check_number`).
    """

    def wrap(cls: T) -> T:
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(static) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__}: static fields {sorted(unknown)} are not fields")
        return jax.tree_util.register_dataclass(
            cls,
            data_fields=[n for n in names if n not in static],
            meta_fields=[n for n in names if n in static],
        )

    return wrap
