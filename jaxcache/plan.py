"""The cache plan: one network step cut into head, cached body and tail.

Per denoising step the plan runs

* ``head``: the per-step embedding (always runs; later policies read their signal here),
* ``body``: layers ``[0, n)``, the cached segment (run, or its stored output reused),
* ``tail``: layers ``[n, N)`` and the final projection (always run, with the current ``t``).

This is the reference's layout (Z-Image caches its first 15 of 30 layers). Parameters are split
per segment once, before the loop (:meth:`CachePlan.split`): slicing a stacked parameter array
inside the loop body would copy weights every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from jaxcache.network import Network, NetworkParams, num_layers

PyTree = Any

__all__ = ["CachePlan", "SegmentParams"]


class SegmentParams(NamedTuple):
    """Network parameters split per segment of a :class:`CachePlan`.

    Attributes:
      condition: the condition path's parameters.
      embed: the embedding's parameters (head).
      body: the cached layers' parameters, stacked ``[n, ...]``.
      tail: the remaining layers' parameters, stacked ``[N - n, ...]``.
      final: the final projection's parameters.
    """

    condition: PyTree
    embed: PyTree
    body: PyTree
    tail: PyTree
    final: PyTree


def _stack_length(tree: PyTree) -> int:
    leaves = jax.tree.leaves(tree)
    return int(leaves[0].shape[0]) if leaves else 0


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Which layers of a :class:`~jaxcache.Network` are cached.

    Attributes:
      network: the network.
      cached_layers: ``n``; layers ``[0, n)`` form the cached body. ``0`` caches nothing.

    Example:
      >>> plan = CachePlan(network, cached_layers=14)        # doctest: +SKIP
      >>> seg = plan.split(params)                           # once, outside the loop
    """

    network: Network
    cached_layers: int

    def __post_init__(self):
        n = self.cached_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"cached_layers must be a non-negative int, got {n!r}")

    def split(self, params: NetworkParams, *, donate: bool = False) -> SegmentParams:
        """Splits stacked layer parameters into body ``[0, n)`` and tail ``[n, N)``.

        Call it once, eagerly, and pass the result to the sampler.

        Args:
          params: the network's parameters.
          donate: delete each stacked layer array as soon as it is split, so peak memory is the
            parameters plus one array rather than twice the layers (for models that fill the
            device). ``params.layers`` (and any model sharing its arrays) is unusable after.

        Raises:
          ValueError: if ``cached_layers`` exceeds the network's number of layers.
        """
        total = num_layers(params)
        n = self.cached_layers
        if n > total:
            raise ValueError(f"cached_layers={n} exceeds the network's {total} layers")
        leaves, treedef = jax.tree.flatten(params.layers)
        body, tail = [], []
        for leaf in leaves:
            body.append(leaf[:n])
            tail.append(leaf[n:])
            if donate and isinstance(leaf, jax.Array):
                leaf.delete()
        return SegmentParams(
            condition=params.condition,
            embed=params.embed,
            body=jax.tree.unflatten(treedef, body),
            tail=jax.tree.unflatten(treedef, tail),
            final=params.final,
        )

    @staticmethod
    def total_layers(params: SegmentParams) -> int:
        """``N``, the number of layers across body and tail."""
        return _stack_length(params.body) + _stack_length(params.tail)

    def check(self, params: SegmentParams) -> None:
        """Raises a ValueError unless ``params`` was split by a plan with the same ``n``."""
        if not isinstance(params, SegmentParams):
            raise TypeError(
                f"params must be SegmentParams (from CachePlan.split), got {type(params).__name__}"
            )
        body = _stack_length(params.body)
        if body != self.cached_layers:
            raise ValueError(
                f"params were split with {body} cached layers, but the plan caches "
                f"{self.cached_layers}; call plan.split(params) with this plan"
            )

    # ------------------------------------------------------------------------ segments
    def run_layers(self, stacked_params: PyTree, h: PyTree, ctx: PyTree) -> PyTree:
        """Runs a stack of layers with ``lax.scan``.

        Args:
          stacked_params: layer parameters stacked on a leading axis (possibly empty).
          h: the hidden state (an array, or an ``(image, text)`` pair).
          ctx: per-step context every layer reads.

        Returns:
          ``h`` after the stack.
        """
        if _stack_length(stacked_params) == 0:
            return h
        layer = self.network.layer

        def body(h, layer_params):
            return layer(layer_params, h, ctx), None

        h, _ = jax.lax.scan(body, h, stacked_params)
        return h

    def streams(self, h: PyTree) -> tuple[PyTree, PyTree]:
        """``h`` as (stream-1 value, stream-2 value or None)."""
        if self.network.dual_stream:
            image, text = h
            return image, text
        return h, None

    def join(self, value1: PyTree, value2: PyTree) -> PyTree:
        """The inverse of :meth:`streams`."""
        return (value1, value2) if self.network.dual_stream else value1
