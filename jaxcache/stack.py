"""Running a range of stacked layers: the one place a layer stack is scanned.

A stack holds ``L`` identical layers whose parameters are stacked on a leading axis. The plan,
the sampler, :class:`~jaxcache.Network` and the reference models all run stacks through
:func:`run_layers`, a ``lax.scan`` over that axis, so a program holds one layer whatever the
depth.

Real layouts mix kinds of block (FLUX: 19 double-stream blocks, then 38 single-stream ones). A
network then describes each kind with a :class:`BlockKind` and its stack is a
:class:`Segments`: consecutive pieces, each a stack of one kind. Layer indices run across the
pieces, so a range of layers (a plan's head, body or tail) may span a boundary. Between pieces
the hidden state has one form, the network's (FLUX: the pair ``(image, text)``); a kind whose
blocks work on another form (the concatenated tokens) converts on entering its piece and back on
leaving it, once per piece rather than once per block.

A stack may instead be a :class:`LayerList`: the same layers with each layer's parameters in
arrays of their own (what :meth:`jaxcache.CachePlan.split` makes for a network with
``layer_unroll=True``). :func:`run_layers` then runs them in straight-line code.
That costs compile time in proportion to the depth, and saves a copy of every layer's weights
per run of the stack: inside a loop, XLA's GPU backend materialises each slice of a stacked
weight as a new buffer before the matrix product reads it (a FLUX-size block copies 680 MB of
weights per step this way; see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
LayerFn = Callable[[PyTree, PyTree, PyTree], PyTree]
Observer = Callable[[PyTree, jax.Array, PyTree], PyTree]

__all__ = [
    "BlockKind", "LayerList", "Segments", "as_kinds", "layer_at", "run_layers", "stack_length",
]


@dataclasses.dataclass(frozen=True, eq=False)
class BlockKind:
    """One kind of block of a network's layer stack, and how the hidden state enters it.

    Attributes:
      layer: ``layer(layer_params, state, ctx) -> state``: one block, on this kind's own form
        of the hidden state.
      enter: optional ``enter(h, ctx) -> state``: the network's hidden state ``h`` (its form
        between pieces) in this kind's form, e.g. FLUX's single-stream blocks concatenate the
        ``(image, text)`` pair into one token sequence. None: the same form.
      leave: optional ``leave(state, h, ctx) -> h``: back to the network's form; ``h`` is the
        value the piece entered with (for shapes, e.g. where to split the tokens). Required
        with ``enter``.
      name: a label for messages and reports (e.g. ``"double"``).

    A kind compares by identity: build the kinds of a network once.
    """

    layer: LayerFn
    enter: Callable[[PyTree, PyTree], PyTree] | None = None
    leave: Callable[[PyTree, PyTree, PyTree], PyTree] | None = None
    name: str = ""

    def __post_init__(self):
        if not callable(self.layer):
            raise TypeError(f"BlockKind.layer must be callable, got {self.layer!r}")
        for field in ("enter", "leave"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"BlockKind.{field} must be callable or None, got {value!r}")
        if (self.enter is None) != (self.leave is None):
            raise ValueError(
                f"BlockKind {self.name!r}: give enter and leave together (enter puts the "
                "network's hidden state into this kind's form, leave takes it back)"
            )


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


@jax.tree_util.register_pytree_node_class
class Segments:
    """A layer stack of several block kinds: consecutive pieces, each a stack of one kind.

    Attributes:
      pieces: each piece's parameters, stacked on a leading axis (or a :class:`LayerList`), in
        layer order.
      kinds: for each piece, the index of its :class:`BlockKind` in the network's ``kinds``
        (static).
    """

    def __init__(self, pieces: Sequence[PyTree], kinds: Sequence[int]):
        self.pieces = tuple(pieces)
        self.kinds = tuple(int(k) for k in kinds)
        if len(self.pieces) != len(self.kinds):
            raise ValueError(
                f"Segments needs one kind index per piece, got {len(self.pieces)} pieces and "
                f"kinds {self.kinds}"
            )

    def __repr__(self) -> str:
        shown = ", ".join(f"kind {k}: {stack_length(p)}" for p, k in zip(self.pieces, self.kinds))
        return f"Segments({shown})"

    def lengths(self) -> tuple[int, ...]:
        """The number of layers of each piece."""
        return tuple(stack_length(p) for p in self.pieces)

    def kind_of_layers(self) -> tuple[int, ...]:
        """The kind index of every layer, in order."""
        return tuple(k for p, k in zip(self.pieces, self.kinds) for _ in range(stack_length(p)))

    def slice(self, start: int, stop: int, cut: Callable[[PyTree, int, int], PyTree]) -> Segments:
        """Layers ``[start, stop)`` across the pieces; ``cut(piece, a, b)`` slices one piece.

        Pieces left empty are dropped (an empty range gives ``Segments((), ())``).
        """
        pieces, kinds, offset = [], [], 0
        for piece, kind in zip(self.pieces, self.kinds):
            length = stack_length(piece)
            a, b = max(start - offset, 0), min(stop - offset, length)
            if a < b:
                pieces.append(cut(piece, a, b))
                kinds.append(kind)
            offset += length
        return Segments(pieces, kinds)

    def tree_flatten(self):
        return self.pieces, self.kinds

    @classmethod
    def tree_unflatten(cls, kinds, pieces):
        return cls(pieces, kinds)


def stack_length(stacked_params: PyTree) -> int:
    """The number of layers in a stack (the leading axis of its leaves; 0 for an empty tree)."""
    if isinstance(stacked_params, LayerList):
        return len(stacked_params)
    if isinstance(stacked_params, Segments):
        return sum(stacked_params.lengths())
    leaves = jax.tree.leaves(stacked_params)
    return int(leaves[0].shape[0]) if leaves else 0


def layer_at(stack: PyTree, index: int) -> PyTree:
    """The parameters of layer ``index`` of a stack (stacked, a :class:`LayerList` or
    :class:`Segments`)."""
    if isinstance(stack, Segments):
        for piece in stack.pieces:
            length = stack_length(piece)
            if index < length:
                return layer_at(piece, index)
            index -= length
        raise IndexError("layer index past the end of the stack")
    if isinstance(stack, LayerList):
        return stack.layers[index]
    return jax.tree.map(lambda a: a[index], stack)


def as_kinds(layer: LayerFn | BlockKind | Sequence[BlockKind]) -> tuple[BlockKind, ...]:
    """A layer function, one kind or several, as a tuple of :class:`BlockKind`."""
    if isinstance(layer, BlockKind):
        return (layer,)
    if isinstance(layer, (tuple, list)):
        return tuple(layer)
    return (BlockKind(layer),)


def run_layers(
    layer: LayerFn | BlockKind | Sequence[BlockKind],
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
      layer: ``layer(layer_params, h, ctx) -> h``, one layer; or the network's block kinds (a
        :class:`BlockKind` or a tuple of them), which a :class:`Segments` stack indexes.
      stacked_params: the layers' parameters stacked on a leading axis (may be empty: then
        ``h`` comes back unchanged and nothing is traced), a :class:`LayerList`, which runs
        in straight-line code whatever ``unroll`` says, or a :class:`Segments` of several
        kinds, each piece run as one of these between its kind's ``enter`` and ``leave``.
      h: the hidden state (an array or a pytree such as ``(image, text)``).
      ctx: what every layer reads (the timestep conditioning vector).
      observe: optional ``observe(state, index, h) -> state``, called after each layer with
        the layer's index in the stack (an int32 scalar, counted across pieces) and its output
        in the network's form; it threads ``state`` through the scan (e.g. to write each
        output into a cache slot in place).
      state: the initial observer state.
      unroll: layers per iteration of the scan (``lax.scan``'s ``unroll``; ``True``: the whole
        stack, no loop). See :attr:`jaxcache.Network.layer_unroll`.

    Returns:
      ``h`` after the stack, or ``(h, state)`` when ``observe`` is given.
    """
    kinds = as_kinds(layer)
    if isinstance(stacked_params, Segments):
        offset = 0
        for piece, k in zip(stacked_params.pieces, stacked_params.kinds):
            if k >= len(kinds):
                raise ValueError(
                    f"the stack has a piece of block kind {k}, but the network has "
                    f"{len(kinds)} kinds"
                )
            h, state = _run_piece(kinds[k], piece, h, ctx, observe, state, unroll, offset)
            offset += stack_length(piece)
        return h if observe is None else (h, state)
    if len(kinds) != 1 and stack_length(stacked_params):
        raise ValueError(
            f"a network of {len(kinds)} block kinds needs its layers as jaxcache.stack.Segments "
            "(one piece per run of one kind)"
        )
    h, state = _run_piece(kinds[0], stacked_params, h, ctx, observe, state, unroll, 0)
    return h if observe is None else (h, state)


def _run_piece(kind: BlockKind, stacked_params, h, ctx, observe, state, unroll, offset):
    """One kind's stack between its ``enter`` and ``leave``: ``(h, state)``."""
    if stack_length(stacked_params) == 0:
        return h, state
    if kind.enter is None:
        return _run_stack(kind.layer, stacked_params, h, ctx, observe, state, unroll, offset)
    entered = h
    if observe is not None:  # the observer sees each output in the network's form
        inner = observe

        def observe(s, i, native):  # noqa: F811 (the converting observer)
            return inner(s, i, kind.leave(native, entered, ctx))

    native, state = _run_stack(kind.layer, stacked_params, kind.enter(h, ctx), ctx, observe,
                               state, unroll, offset)
    left = kind.leave(native, entered, ctx)
    _check_form(kind, entered, left)
    return left, state


def _check_form(kind: BlockKind, entered: PyTree, left: PyTree) -> None:
    """A kind's ``leave`` must give back the network's form of ``h`` (checked while tracing)."""

    def form(tree):
        return jax.tree.structure(tree), [jnp.shape(a) for a in jax.tree.leaves(tree)]

    if form(entered) != form(left):
        raise ValueError(
            f"block kind {kind.name or kind.layer!r}: its leave returned a hidden state of "
            f"shapes {form(left)[1]} ({form(left)[0]}) where its blocks entered with "
            f"{form(entered)[1]} ({form(entered)[0]}); enter and leave must convert between "
            "the network's form of h and this kind's, and leave must restore the former"
        )


def _run_stack(layer, stacked_params, h, ctx, observe, state, unroll, offset):
    """One kind's layers in order (a scan, or straight-line code for a :class:`LayerList`)."""
    length = stack_length(stacked_params)
    if isinstance(stacked_params, LayerList):
        for index, layer_params in enumerate(stacked_params.layers):
            h = layer(layer_params, h, ctx)
            if observe is not None:
                state = observe(state, jnp.int32(offset + index), h)
        return h, state
    if observe is None:

        def plain(h, layer_params):
            return layer(layer_params, h, ctx), None

        h, _ = jax.lax.scan(plain, h, stacked_params, unroll=unroll)
        return h, state

    def observed(carry, xs):
        h, state = carry
        index, layer_params = xs
        h = layer(layer_params, h, ctx)
        return (h, observe(state, index, h)), None

    indices = jnp.arange(offset, offset + length, dtype=jnp.int32)
    (h, state), _ = jax.lax.scan(observed, (h, state), (indices, stacked_params), unroll=unroll)
    return h, state
