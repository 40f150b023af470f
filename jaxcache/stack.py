"""Running a range of stacked layers: the one place a layer stack is scanned.

A stack holds ``L`` identical layers whose parameters are stacked on a leading axis. The plan,
the sampler, :class:`~jaxcache.Network` and the reference models all run stacks through
:func:`run_layers`, a ``lax.scan`` over that axis, so a program holds one layer whatever the
depth.

A stack may instead be a :class:`LayerList`: the same layers with each layer's parameters in
arrays of their own (what :meth:`jaxcache.CachePlan.split` makes for a network with
``layer_unroll=True``). :func:`run_layers` then runs them in straight-line code.
That costs compile time in proportion to the depth, and saves a copy of every layer's weights
per run of the stack: inside a loop, XLA's GPU backend materialises each slice of a stacked
weight as a new buffer before the matrix product reads it (a FLUX-size block copies 680 MB of
weights per step this way; see BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
LayerFn = Callable[[PyTree, PyTree, PyTree], PyTree]
Observer = Callable[[PyTree, jax.Array, PyTree], PyTree]

__all__ = ["LayerList", "layer_at", "run_layers", "stack_length"]


@jax.tree_util.register_pytree_node_class
class LayerList:
    """A layer stack kept as one parameter pytree per layer (no stacked axis).

    Attributes:
      layers: the layers' parameter pytrees, in order.
    """

    def __init__(self, layers):
        self.layers = tuple(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"LayerList({len(self.layers)} layers)"

    def tree_flatten(self):
        return self.layers, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(children)


def stack_length(stacked_params: PyTree) -> int:
    """The number of layers in a stack (the leading axis of its leaves; 0 for an empty tree)."""
    if isinstance(stacked_params, LayerList):
        return len(stacked_params)
    leaves = jax.tree.leaves(stacked_params)
    return int(leaves[0].shape[0]) if leaves else 0


def layer_at(stack: PyTree, index: int) -> PyTree:
    """The parameters of layer ``index`` of a stack (stacked or a :class:`LayerList`)."""
    if isinstance(stack, LayerList):
        return stack.layers[index]
    return jax.tree.map(lambda a: a[index], stack)


def run_layers(
    layer: LayerFn,
    stacked_params: PyTree,
    h: PyTree,
    ctx: PyTree,
    *,
    observe: Observer | None = None,
    state: PyTree = None,
    unroll: int | bool = 1,
) -> PyTree | tuple[PyTree, PyTree]:
    """Runs a stack of layers in order with ``lax.scan``.

    Args:
      layer: ``layer(layer_params, h, ctx) -> h``, one layer.
      stacked_params: the layers' parameters stacked on a leading axis (may be empty: then
        ``h`` comes back unchanged and nothing is traced), or a :class:`LayerList`, which runs
        in straight-line code whatever ``unroll`` says.
      h: the hidden state (an array or a pytree such as ``(image, text)``).
      ctx: what every layer reads (the timestep conditioning vector).
      observe: optional ``observe(state, index, h) -> state``, called after each layer with
        the layer's index in the stack (an int32 scalar) and its output; it threads ``state``
        through the scan (e.g. to write each output into a cache slot in place).
      state: the initial observer state.
      unroll: layers per iteration of the scan (``lax.scan``'s ``unroll``; ``True``: the whole
        stack, no loop). See :attr:`jaxcache.Network.layer_unroll`.

    Returns:
      ``h`` after the stack, or ``(h, state)`` when ``observe`` is given.
    """
    length = stack_length(stacked_params)
    if length == 0:
        return h if observe is None else (h, state)
    if isinstance(stacked_params, LayerList):
        for index, layer_params in enumerate(stacked_params.layers):
            h = layer(layer_params, h, ctx)
            if observe is not None:
                state = observe(state, jnp.int32(index), h)
        return h if observe is None else (h, state)
    if observe is None:

        def plain(h, layer_params):
            return layer(layer_params, h, ctx), None

        h, _ = jax.lax.scan(plain, h, stacked_params, unroll=unroll)
        return h

    def observed(carry, xs):
        h, state = carry
        index, layer_params = xs
        h = layer(layer_params, h, ctx)
        return (h, observe(state, index, h)), None

    indices = jnp.arange(length, dtype=jnp.int32)
    (h, state), _ = jax.lax.scan(observed, (h, state), (indices, stacked_params), unroll=unroll)
    return h, state
