"""Per-row measures of change that signal-driven policies compare against a threshold."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["relative_l1"]

# A floor for the denominator: a signal that is exactly zero (a block that does nothing) must
# read as "no change", never as 0 / 0 = NaN, which compares False with every threshold and
# would silently disable caching.
_TINY = 1e-12


def relative_l1(current: jax.Array, previous: jax.Array) -> jax.Array:
    """``mean|current - previous| / mean|previous|`` per row (axis 0), in float32.

    The earlier value is the denominator, as in First-Block Cache, TeaCache and DBCache; the
    means run over every axis but the row axis, so each sample is measured on its own (the
    anchors pool the whole batch, so one sample's change decides for its batch-mates).

    Args:
      current: ``[rows, ...]``.
      previous: ``[rows, ...]``, the value at the earlier step.

    Returns:
      ``[rows]`` float32.
    """
    current = current.astype(jnp.float32)
    previous = previous.astype(jnp.float32)
    change = _row_mean(jnp.abs(current - previous))
    scale = _row_mean(jnp.abs(previous))
    return change / jnp.maximum(scale, _TINY)


def _row_mean(x: jax.Array) -> jax.Array:
    """The mean over every axis but the first, in two stages (last axis, then the rest).

    A single reduction of ``[rows, many]`` gives a GPU one block per row, a few rows for a whole
    chip; reducing the feature axis first spreads the work over every token.
    """
    if x.ndim > 2:
        x = jnp.mean(x, axis=-1)
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)
