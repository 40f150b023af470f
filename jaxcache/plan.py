"""The cache plan: one network step cut into head, cached body and tail.

Per denoising step the plan runs three segments, each a range of the network's stacked layers:

* ``head``: the per-step embedding, then layers ``[0, F)`` (always run; policies read their
  signal here: the first block's residual, the first ``F`` blocks' residual);
* ``body``: layers ``[F, F + n)``, the cached segment (run, or replaced by the reuse mode);
* ``tail``: layers ``[F + n, N)`` and the final projection (always run, with the current ``t``).

The reference (Z-Image caches its first 15 of 30 layers) is ``F = 0``; DBCache's ``F8B0`` on a
57-layer FLUX is ``F = 8, n = 49``; First-Block Cache is ``F = 1, n = N - 1``. Parameters are
split per segment once, before the loop (:meth:`CachePlan.split`): slicing a stacked parameter
array inside the loop body would copy weights every step.

Layer indices run across a network's kinds of block (FLUX's 19 double-stream blocks are layers
0-18, its 38 single-stream blocks 19-56), so First-Block Cache on FLUX is ``F = 1, n = 56``
and any segment may span the boundary between kinds.

A network whose layers take a per-layer constant or their index
(:attr:`~jaxcache.Network.layer_constant`, :class:`~jaxcache.BlockKind`) gets them bound to the
split parameters once per sampling run (:meth:`CachePlan.bind_layers`), before the loop: the
head, body and tail then carry them as they carry the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from jaxcache._checks import check_arrays, check_int
from jaxcache.network import Network, NetworkParams, num_layers
from jaxcache.stack import LayerList, Observer, Segments, bind_layers, run_layers, stack_length

PyTree = Any

__all__ = ["CachePlan", "SegmentParams"]


class SegmentParams(NamedTuple):
    """Network parameters split per segment of a :class:`CachePlan`.

    Attributes:
      condition: the condition path's parameters.
      embed: the embedding's parameters.
      body: the cached layers' parameters, stacked ``[n, ...]``.
      tail: the layers after the body, stacked ``[N - F - n, ...]``.
      final: the final projection's parameters.
      head: the layers before the body, stacked ``[F, ...]`` (empty for the reference layout).
    """

    condition: PyTree
    embed: PyTree
    body: PyTree
    tail: PyTree
    final: PyTree
    head: PyTree = None


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Which layers of a :class:`~jaxcache.Network` are cached.

    Attributes:
      network: the network.
      cached_layers: ``n``, the length of the cached body. ``0`` caches nothing.
      first_layers: ``F``, the layers that always run before the body (DBCache's ``Fn``;
        1 for First-Block Cache). The body is layers ``[F, F + n)``; every layer after it runs
        every step (DBCache's ``Bn``).

    Example:
      >>> plan = CachePlan(network, cached_layers=14)        # doctest: +SKIP
      >>> seg = plan.split(params)                           # once, outside the loop
    """

    network: Network
    cached_layers: int
    first_layers: int = 0

    def __post_init__(self):
        if isinstance(self.cached_layers, Network):
            raise TypeError("CachePlan(network, cached_layers, first_layers): network first")
        if not isinstance(self.network, Network):
            got = (f"the class {self.network.__name__}" if isinstance(self.network, type)
                   else type(self.network).__name__)
            raise TypeError(
                f"network must be a jaxcache Network, got {got} (jaxcache.from_nnx(model), "
                "jaxcache.from_linen(...) or jaxcache.Network(...) build one)"
            )
        # The plan does not know the depth: sample, lower and split check that
        # first_layers + cached_layers does not exceed it (CachePlan.around checks it here).
        check_int(self.cached_layers, "cached_layers", minimum=0)
        check_int(self.first_layers, "first_layers", minimum=0)

    @classmethod
    def around(cls, network: Network, depth: int, *, first: int, last: int = 0) -> CachePlan:
        """A plan whose body is everything but the first ``first`` and last ``last`` layers.

        DBCache's ``F<first>B<last>``; First-Block Cache is ``first=1, last=0``.

        Args:
          network: the network.
          depth: its number of layers ``N``.
          first: layers that always run before the body (``Fn``).
          last: layers that always run after it (``Bn``).

        Raises:
          ValueError: if ``first + last`` leaves no layer to cache.
        """
        depth = check_int(depth, "depth")
        first = check_int(first, "first", minimum=0)
        last = check_int(last, "last", minimum=0)
        if first + last >= depth:
            raise ValueError(
                f"first={first} + last={last} layers always run, which leaves nothing to cache "
                f"in a network of depth {depth}; the sum must stay below the depth"
            )
        return cls(network, cached_layers=depth - first - last, first_layers=first)

    @property
    def body_start(self) -> int:
        """The first layer of the body."""
        return self.first_layers

    @property
    def body_stop(self) -> int:
        """One past the last layer of the body."""
        return self.first_layers + self.cached_layers

    def split(self, params: NetworkParams, *, donate: bool = False) -> SegmentParams:
        """Splits stacked layer parameters into head ``[0, F)``, body and tail.

        Call it once, eagerly, and pass the result to the sampler. With
        ``network.layer_unroll=True`` each segment is a :class:`~jaxcache.stack.LayerList`
        (one array per layer, run in straight-line code): no weight slicing inside the program.
        For a network of several kinds of block each segment is a :class:`~jaxcache.Segments`
        of the pieces it covers (a segment may span the boundary between kinds).

        Args:
          params: the network's parameters.
          donate: delete each stacked layer array as soon as it is split, so peak memory is the
            parameters plus one array rather than twice the layers (for models that fill the
            device). ``params.layers`` (and any model sharing its arrays) is unusable after.

        Raises:
          ValueError: if the head and body need more layers than the network has, or the
            layers do not fit the network's kinds of block.
        """
        if not isinstance(params, NetworkParams):
            raise TypeError(
                f"plan.split takes the network's NetworkParams, got {type(params).__name__}"
            )
        check_arrays(params, "params")
        self.network.check_layers(params.layers)
        total = num_layers(params)
        start, stop = self.body_start, self.body_stop
        if stop > total:
            raise ValueError(
                f"first_layers={start} + cached_layers={self.cached_layers} exceeds the "
                f"network's {total} layers"
            )
        ranges = ((0, start), (start, stop), (stop, total))
        unstacked = self.network.layer_unroll is True
        if isinstance(params.layers, Segments):
            segments = params.layers
            head, body, tail = (
                segments.slice(a, b, lambda piece, lo, hi: _cut(piece, lo, hi, unstacked))
                for a, b in ranges
            )
            if donate:
                kept = {id(x) for part in (head, body, tail) for x in jax.tree.leaves(part)}
                for leaf in jax.tree.leaves(segments):
                    if isinstance(leaf, jax.Array) and id(leaf) not in kept:
                        leaf.delete()
        else:
            head, body, tail = (_cut(params.layers, a, b, unstacked) for a, b in ranges)
            if donate:
                kept = {id(x) for part in (head, body, tail) for x in jax.tree.leaves(part)}
                for leaf in jax.tree.leaves(params.layers):
                    # A slice that spans the whole stack may be the stack itself: keep it then.
                    if isinstance(leaf, jax.Array) and id(leaf) not in kept:
                        leaf.delete()
        return SegmentParams(
            condition=params.condition,
            embed=params.embed,
            body=body,
            tail=tail,
            final=params.final,
            head=head,
        )

    def bind_layers(self, params: SegmentParams, constant: PyTree) -> SegmentParams:
        """``params`` with each layer's constant and index bound to its parameters.

        For a network whose kinds of block take a ``layer_constant`` or a ``layer_index``
        (:class:`~jaxcache.BlockKind`), the head's, body's and tail's layers become
        :class:`~jaxcache.stack.LayerInputs`: each stack's constants are computed in one
        vectorised call, and each layer's index is its index in the network (the body's first
        is ``first_layers``). :func:`jaxcache.sample` calls it once per run, right after the
        condition path, so the loop computes no constant. Networks whose kinds take neither get
        ``params`` back as it is; binding twice binds once.

        Args:
          params: the split parameters (:meth:`split`).
          constant: the condition path's output for the rows being sampled
            (``network.condition(params.condition, cond)``).

        Returns:
          The split parameters, bound.
        """
        kinds = self.network.kinds
        if not any(kind.binds for kind in kinds):
            return params
        start = stack_length(params.head)
        stop = start + stack_length(params.body)
        return params._replace(
            head=bind_layers(kinds, params.head, constant, offset=0),
            body=bind_layers(kinds, params.body, constant, offset=start),
            tail=bind_layers(kinds, params.tail, constant, offset=stop),
        )

    @staticmethod
    def total_layers(params: SegmentParams) -> int:
        """``N``, the number of layers across head, body and tail."""
        return sum(stack_length(p) for p in (params.head, params.body, params.tail))

    def check(self, params: SegmentParams) -> None:
        """Raises unless ``params`` was split by a plan with the same head and body."""
        if not isinstance(params, SegmentParams):
            raise TypeError(
                f"params must be SegmentParams (from CachePlan.split), got {type(params).__name__}"
            )
        head, body = stack_length(params.head), stack_length(params.body)
        total = head + body + stack_length(params.tail)
        if self.body_stop > total:  # the plan cannot know the depth; the split params do
            raise ValueError(
                f"first_layers={self.first_layers} + cached_layers={self.cached_layers} exceeds "
                f"the network's {total} layers (the split params hold {total}); the body is "
                f"layers [first_layers, first_layers + cached_layers), so at most "
                f"{max(total - self.first_layers, 0)} can be cached after {self.first_layers} "
                "first layers (CachePlan.around(network, depth, first=..., last=...) builds a "
                "plan from the depth)"
            )
        if (head, body) != (self.first_layers, self.cached_layers):
            raise ValueError(
                f"params were split with first_layers={head}, cached_layers={body}, but the "
                f"plan has first_layers={self.first_layers}, cached_layers={self.cached_layers}; "
                "call plan.split(params) with this plan"
            )

    # ------------------------------------------------------------------------ segments
    def run_head(
        self, params: SegmentParams, x: jax.Array, t: jax.Array, constant: PyTree
    ) -> tuple[PyTree, PyTree, PyTree]:
        """The embedding, then the head layers.

        Args:
          params: the split parameters.
          x: the solver's sample rows.
          t: ``[rows]`` times.
          constant: the condition path's output.

        Returns:
          ``(embedded, h, ctx)``: the embedding's hidden state, the hidden state after the head
          layers (the body's input) and the per-step context.
        """
        embedded, ctx = self.network.embed(params.embed, x, t, constant)
        h = run_layers(self.network.kinds, params.head, embedded, ctx,
                       unroll=self.network.layer_unroll)
        return embedded, h, ctx

    def run_body(
        self,
        params: SegmentParams,
        h: PyTree,
        ctx: PyTree,
        *,
        observe: Observer | None = None,
        state: PyTree = None,
    ) -> PyTree:
        """The body's layers (see :func:`jaxcache.stack.run_layers` for ``observe``)."""
        return run_layers(
            self.network.kinds, params.body, h, ctx, observe=observe, state=state,
            unroll=self.network.layer_unroll,
        )

    def run_tail(self, params: SegmentParams, h: PyTree, ctx: PyTree) -> jax.Array:
        """The tail layers and the final projection: the network's prediction."""
        h = run_layers(self.network.kinds, params.tail, h, ctx, unroll=self.network.layer_unroll)
        return self.network.final(params.final, h, ctx)

    def streams(self, h: PyTree) -> tuple[PyTree, PyTree]:
        """``h`` as (stream-1 value, stream-2 value or None)."""
        if self.network.dual_stream:
            image, text = h
            return image, text
        return h, None

    def join(self, value1: PyTree, value2: PyTree) -> PyTree:
        """The inverse of :meth:`streams`."""
        return (value1, value2) if self.network.dual_stream else value1


def _cut(stack: PyTree, start: int, stop: int, unstacked: bool) -> PyTree:
    """Layers ``[start, stop)`` of one kind's stack; one array per layer when ``unstacked``."""
    if isinstance(stack, LayerList):
        return LayerList(stack.layers[start:stop])
    leaves, treedef = jax.tree.flatten(stack)
    parts = [leaf[start:stop] for leaf in leaves]
    if not unstacked:
        return jax.tree.unflatten(treedef, parts)
    return LayerList(
        jax.tree.unflatten(treedef, [part[i] for part in parts]) for i in range(stop - start)
    )
