"""Output reuse (the reference): a skipped step uses the body's output from the last refresh."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxcache._dataclass import settings_dataclass
from jaxcache.reuse.base import Position, ReuseMode
from jaxcache.step_cache import StepCache, _SlotSpec, _Stream

PyTree = Any

__all__ = ["OutputReuse"]


@settings_dataclass(static=("all_layers",))
class OutputReuse(ReuseMode):
    """Reuse the cached body's stored output, as the reference did. The state is a
    :class:`~jaxcache.StepCache` (caption constant in its constant slot).

    Attributes:
      all_layers: False (default): keep one slot, the body's output, which is all a skipped
        step reads (slot 0 of each stream). True: keep every body layer's output in its own
        slot, as the reference's models did (slot ``i`` holds body layer ``i``); ``n`` times the
        memory, the same samples.
    """

    all_layers: bool = False

    @property
    def records_layers(self) -> bool:  # type: ignore[override]
        return self.all_layers

    def init(self, plan, body, constant):
        image, text = plan.streams(body)
        slots = plan.cached_layers if self.all_layers else 1
        cache = StepCache.create(slots, layer=image, layer2=text, constant=constant)
        return cache.set_constant(constant)

    def record(self, state, index, h, rows):
        return _write_slot(state, index, *_streams(state, h), rows)

    def store(self, state, body_in, body_out, position, rows):
        if not self.all_layers:  # all_layers: every slot was written as the layers ran
            state = _write_slot(state, 0, *_streams(state, body_out), rows)
        stored = jnp.ones((), bool) if rows is None else jnp.any(rows)
        return _mark_filled(state, stored)

    def reuse(self, state, body_in, position: Position):
        last = state.num_layers - 1
        value = state.get(last)
        return value if state.stream2 is None else (value, state.get2(last))

    def rows(self, state: StepCache, start: int, stop: int) -> StepCache:
        """The cache of rows ``[start, stop)`` (one guidance branch's).

        The slot streams are batch-major by construction (``[slots, rows, ...]``) and are cut.
        The constant slot holds whatever the network's ``condition`` returned, which need not
        be batch-major (a RoPE table ``[tokens, dim]`` is shared by every sample): a constant
        leaf is cut only when its leading axis equals the number of rows of the sampling batch
        (``2 * batch`` with guidance, ``batch`` without), read from the slot streams, not
        guessed from the constant. Every other leaf (a different leading size, or a scalar) is
        shared and kept whole in each branch's cache.

        The rule cannot tell a shared leaf whose leading size happens to equal the row count
        from a per-sample one: such a leaf is cut. Give a shared table a leading axis of 1
        (``[1, tokens, dim]``, which broadcasts) to keep it whole at any batch size.
        """
        total = _row_count(state)

        def cut(tree, axis):
            return jax.tree.map(lambda a: jax.lax.slice_in_dim(a, start, stop, axis=axis), tree)

        def cut_constant(a):
            per_row = jnp.ndim(a) > 0 and jnp.shape(a)[0] == total
            return jax.lax.slice_in_dim(a, start, stop, axis=0) if per_row else a

        def spec(tree):  # one slot's structure: drop the slot axis
            return _SlotSpec(
                jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
            )

        s1 = cut(state.stream1.slots, 1)
        s2 = None if state.stream2 is None else cut(state.stream2.slots, 1)
        constant = jax.tree.map(cut_constant, state.constant_value)
        return dataclasses.replace(
            state,
            stream1=_Stream(s1, state.stream1.filled),
            stream2=None if s2 is None else _Stream(s2, state.stream2.filled),
            constant_value=constant,
            layer_spec=spec(s1),
            layer2_spec=None if s2 is None else spec(s2),
            constant_spec=_SlotSpec(constant),
        )


def _row_count(cache: StepCache) -> int:
    """The sampling batch's rows: the second axis of the slot streams (``[slots, rows, ...]``)."""
    return jax.tree.leaves(cache.stream1.slots)[0].shape[1]


def _streams(cache: StepCache, h: PyTree) -> tuple[PyTree, PyTree]:
    return (h, None) if cache.stream2 is None else h


def _write_slot(
    cache: StepCache, index, value: PyTree, value2: PyTree, rows: jax.Array | None
) -> StepCache:
    """Writes slot ``index`` of both streams in place, for the rows in ``rows``.

    Inside a loop a ``dynamic_update_slice`` of a carried buffer is done in place; rows outside
    ``rows`` keep their old value. The filled mask is left alone (see :func:`_mark_filled`).
    """

    def write(slots, new):
        def one(buf, v):
            if rows is not None:
                old = jax.lax.dynamic_index_in_dim(buf, index, 0, keepdims=False)
                v = jnp.where(rows.reshape((-1,) + (1,) * (v.ndim - 1)), v, old)
            return jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), index, 0)

        return jax.tree.map(one, slots, new)

    out = dataclasses.replace(
        cache, stream1=_Stream(write(cache.stream1.slots, value), cache.stream1.filled)
    )
    if cache.stream2 is not None:
        out = dataclasses.replace(
            out, stream2=_Stream(write(cache.stream2.slots, value2), cache.stream2.filled)
        )
    return out


def _mark_filled(cache: StepCache, flag: jax.Array) -> StepCache:
    """Marks every slot of both streams filled where ``flag`` is True (else unchanged)."""

    def mark(stream):
        return None if stream is None else _Stream(stream.slots, stream.filled | flag)

    return dataclasses.replace(cache, stream1=mark(cache.stream1), stream2=mark(cache.stream2))
