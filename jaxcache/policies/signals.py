"""Per-row measures of change that signal-driven policies compare against a threshold."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxcache.stack import layer_at

__all__ = ["relative_l1", "signal_function"]

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


def signal_function(kind: str | None, plan, params) -> Callable | None:
    """``signal(embedded, h, ctx) -> [rows, ...]`` for a policy's ``signal_kind`` (or None).

    Args:
      kind: the policy's ``signal_kind``.
      plan: the :class:`~jaxcache.CachePlan`.
      params: its split parameters.

    Returns:
      A function of the embedding's output, the head's output and the step context; None when
      the policy reads no signal.
    """
    if kind is None:
        return None
    if kind == "head_residual":

        def head_residual(embedded, h, ctx):
            after, before = plan.streams(h)[0], plan.streams(embedded)[0]
            return after.astype(jnp.float32) - before.astype(jnp.float32)

        return head_residual
    if kind == "modulated_input":
        first = params.head if plan.first_layers else params.body
        layer0 = layer_at(first, 0)

        def modulated_input(embedded, h, ctx):
            return plan.network.modulated_input(layer0, embedded, ctx)

        return modulated_input
    raise ValueError(f"unknown signal_kind {kind!r}")
