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

A kind may ask for more than its parameters (:class:`BlockKind`'s ``layer_constant`` and
``layer_index``): values computed once per sampling run from each layer's parameters and the
condition path's output (a cross-attention block's text keys and values), and the layer's index.
:func:`bind_layers` pairs them with the parameters as :class:`LayerInputs`, before any step runs,
so they ride through every split, scan and slice of the stack as the parameters do.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LayerFn = Callable[[PyTree, PyTree, PyTree], PyTree]
Observer = Callable[[PyTree, jax.Array, PyTree], PyTree]

__all__ = [
    "BlockKind", "LayerInputs", "LayerList", "Segments", "as_kinds", "bind_layers", "layer_at",
    "run_layers", "stack_length",
]


class LayerInputs(NamedTuple):
    """A layer's parameters with what is computed for it once per sampling run.

    A stack of layers whose kind has a ``layer_constant`` or ``layer_index``
    (:class:`BlockKind`) runs on these instead of its bare parameters; :func:`bind_layers`
    makes them. Stacked, every field has the stack's leading layer axis, so slicing a stack,
    scanning it or reading one layer by index treats them as it treats the parameters.

    Attributes:
      params: the layer's parameters (stacked ``[L, ...]`` for a stack).
      constant: ``layer_constant(params, constant)`` (stacked for a stack), or None.
      index: the layer's index in the network (int32; ``[L]`` for a stack), counted across
        every kind of block, or None.
    """

    params: PyTree
    constant: PyTree = None
    index: jax.Array | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class BlockKind:
    """One kind of block of a network's layer stack, and how the hidden state enters it.

    Attributes:
      layer: ``layer(layer_params, state, ctx) -> state``: one block, on this kind's own form
        of the hidden state. With ``layer_constant`` it is called with the layer's constant as
        a keyword, ``layer(layer_params, state, ctx, layer_constant=c)``; with ``layer_index``,
        ``layer(..., layer_index=i)`` (both when both are set). After construction this
        attribute then takes the layer's :class:`LayerInputs` in place of ``layer_params``
        and passes them on as these keywords.
      enter: optional ``enter(h, ctx) -> state``: the network's hidden state ``h`` (its form
        between pieces) in this kind's form, e.g. FLUX's single-stream blocks concatenate the
        ``(image, text)`` pair into one token sequence. None: the same form.
      leave: optional ``leave(state, h, ctx) -> h``: back to the network's form; ``h`` is the
        value the piece entered with (for shapes, e.g. where to split the tokens). Required
        with ``enter``.
      name: a label for messages and reports (e.g. ``"double"``).
      layer_constant: optional ``layer_constant(layer_params, constant) -> pytree of arrays``:
        what one layer computes from its own parameters and the condition path's output alone,
        so once per sampling run instead of at every step (a cross-attention block's keys and
        values of the text: Wan-style video models). It sees no timestep and no hidden state,
        so what it returns cannot depend on the step. It is computed for every layer of a
        stack in one vectorised call before the loop (:func:`bind_layers`), so its output has
        one structure and shape for every layer of a stack.
      layer_index: pass each layer its index in the network (an int32 scalar, counted across
        every kind of block: FLUX's single-stream blocks start at 19) as ``layer_index=``.

    A kind compares by identity: build the kinds of a network once.
    """

    layer: LayerFn
    enter: Callable[[PyTree, PyTree], PyTree] | None = None
    leave: Callable[[PyTree, PyTree, PyTree], PyTree] | None = None
    name: str = ""
    layer_constant: Callable[[PyTree, PyTree], PyTree] | None = None
    layer_index: bool = False

    def __post_init__(self):
        if not callable(self.layer):
            raise TypeError(f"BlockKind.layer must be callable, got {self.layer!r}")
        for field in ("enter", "leave", "layer_constant"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"BlockKind.{field} must be callable or None, got {value!r}")
        if (self.enter is None) != (self.leave is None):
            raise ValueError(
                f"BlockKind {self.name!r}: give enter and leave together (enter puts the "
                "network's hidden state into this kind's form, leave takes it back)"
            )
        if not isinstance(self.layer_index, bool):
            raise TypeError(f"BlockKind.layer_index must be a bool, got {self.layer_index!r}")
        # A kind rebuilt from another (dataclasses.replace) wraps the function it was given once.
        function = getattr(self.layer, "jaxcache_unbound", self.layer)
        if self.binds:
            _check_keywords(function, self.keywords, self.name)
            object.__setattr__(self, "layer", _bound_layer(function, self))
        else:
            object.__setattr__(self, "layer", function)

    @property
    def binds(self) -> bool:
        """Whether this kind's layers run on :class:`LayerInputs` (a constant or an index)."""
        return self.layer_constant is not None or self.layer_index

    @property
    def keywords(self) -> tuple[str, ...]:
        """The keywords the layer function receives besides ``(params, state, ctx)``."""
        return (("layer_constant",) if self.layer_constant is not None else ()) + (
            ("layer_index",) if self.layer_index else ()
        )


def _label(kind: BlockKind) -> str:
    return repr(kind.name) if kind.name else getattr(kind.layer, "__name__", repr(kind.layer))


def _check_keywords(function: Callable, keywords: tuple[str, ...], name: str) -> None:
    """The layer function accepts the keywords its kind passes (checked when the kind is made)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return
    try:
        signature.bind(None, None, None, **dict.fromkeys(keywords))
    except TypeError as error:
        given = ", ".join(f"{k}=..." for k in keywords)
        raise TypeError(
            f"BlockKind {name!r}: its layer function is called as layer(layer_params, h, ctx, "
            f"{given}) because the kind sets {' and '.join(keywords)}, but "
            f"{getattr(function, '__name__', function)}{signature} cannot take that ({error})"
        ) from None


def _bound_layer(function: LayerFn, kind: BlockKind) -> LayerFn:
    """``function`` called on a layer's :class:`LayerInputs`, its extras passed as keywords."""
    wants_constant, wants_index = kind.layer_constant is not None, kind.layer_index

    def layer(inputs, state, ctx):
        if not isinstance(inputs, LayerInputs):
            raise ValueError(
                f"block kind {_label(kind)} takes {' and '.join(kind.keywords)} with each "
                "layer's parameters, bound to them once before the layers run, but it was "
                f"given bare parameters ({type(inputs).__name__}). jaxcache.sample binds them; "
                "to run the layers yourself, bind first: plan.bind_layers(split_params, "
                "constant), network.bind_layers(params.layers, constant) or "
                "jaxcache.stack.bind_layers(kinds, stack, constant, offset=first_layer)"
            )
        extras = {}
        if wants_constant:
            extras["layer_constant"] = inputs.constant
        if wants_index:
            extras["layer_index"] = inputs.index
        return function(inputs.params, state, ctx, **extras)

    layer.jaxcache_unbound = function
    return layer


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


def bind_layers(
    layer: LayerFn | BlockKind | Sequence[BlockKind],
    stacked_params: PyTree,
    constant: PyTree,
    *,
    offset: int = 0,
) -> PyTree:
    """A stack with each layer's constant and index computed and paired with its parameters.

    Every piece whose kind has a ``layer_constant`` or ``layer_index`` becomes a
    :class:`LayerInputs`: the constants of a stacked piece are computed in one vectorised call
    (``jax.vmap`` of ``layer_constant`` over the piece's layers); a :class:`LayerList` gets
    one call per layer, in straight-line code. Pieces of other kinds, and pieces already bound,
    come back as they are (so binding twice is binding once), and a stack of kinds that bind
    nothing is returned itself.

    Call it once per sampling run, before the loop (:meth:`jaxcache.CachePlan.bind_layers`
    does, for the head, body and tail; :func:`jaxcache.sample` calls that): then the loop
    reads the constants and computes none.

    Args:
      layer: the network's block kinds (or a layer function: nothing to bind).
      stacked_params: the stack (stacked, a :class:`LayerList` or a :class:`Segments`).
      constant: the condition path's output (``network.condition(params.condition, cond)``).
      offset: the network's index of the stack's first layer (a plan's body starts at
        ``first_layers``).

    Returns:
      The stack, its binding pieces as :class:`LayerInputs`.

    Raises:
      ValueError: if a ``layer_constant`` returns a leaf that is not an array, or, for a
        :class:`LayerList`, constants of another structure, shape or dtype than the first
        layer's (one kind's layers must agree, or the same network scanned would not run).
    """
    kinds = as_kinds(layer)
    if not any(isinstance(k, BlockKind) and k.binds for k in kinds):
        return stacked_params
    if isinstance(stacked_params, Segments):
        pieces, at = [], offset
        for piece, k in zip(stacked_params.pieces, stacked_params.kinds):
            pieces.append(_bind_piece(kinds[k], piece, constant, at))
            at += stack_length(piece)
        return Segments(pieces, stacked_params.kinds)
    return _bind_piece(kinds[0], stacked_params, constant, offset)


def _bind_piece(kind: BlockKind, piece: PyTree, constant: PyTree, offset: int) -> PyTree:
    """One kind's piece as :class:`LayerInputs` (unchanged if the kind binds nothing)."""
    length = stack_length(piece)
    if not kind.binds or not length or isinstance(piece, LayerInputs):
        return piece
    hook = None if kind.layer_constant is None else _checked_constant(kind)
    if isinstance(piece, LayerList):
        if all(isinstance(p, LayerInputs) for p in piece.layers):
            return piece
        items = [
            LayerInputs(
                p,
                None if hook is None else hook(p, constant),
                jnp.int32(offset + i) if kind.layer_index else None,
            )
            for i, p in enumerate(piece.layers)
        ]
        _check_constants_agree(kind, items, offset)
        return LayerList(items)
    # One call for the whole piece: every layer's constants at once, outside any loop.
    constants = None if hook is None else jax.vmap(hook, in_axes=(0, None))(piece, constant)
    index = jnp.arange(offset, offset + length, dtype=jnp.int32) if kind.layer_index else None
    return LayerInputs(piece, constants, index)


def _checked_constant(kind: BlockKind) -> Callable[[PyTree, PyTree], PyTree]:
    """``kind.layer_constant``, refusing a result with a leaf that is not an array."""

    def hook(layer_params, constant):
        out = kind.layer_constant(layer_params, constant)
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            if not isinstance(leaf, (jax.Array, np.ndarray)):
                raise ValueError(
                    f"block kind {_label(kind)}: layer_constant returned a "
                    f"{type(leaf).__name__} at {jax.tree_util.keystr(path) or 'its top'}; it "
                    "must return a pytree of arrays computed from the layer's parameters and "
                    "the condition path's output (e.g. the text keys and values)"
                )
        return out

    return hook


def _check_constants_agree(kind: BlockKind, items: list[LayerInputs], offset: int) -> None:
    """A :class:`LayerList`'s constants share the first layer's structure, shapes and dtypes."""

    def form(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(tuple(jnp.shape(a)), jnp.result_type(a)) for a in leaves]

    first = form(items[0].constant)
    for i, item in enumerate(items[1:], start=1):
        other = form(item.constant)
        if other != first:
            raise ValueError(
                f"block kind {_label(kind)}: layer_constant gives layer {offset + i} "
                f"{other[1]} ({other[0]}) but layer {offset} {first[1]} ({first[0]}); the "
                "layers of one stack must get constants of one structure, shape and dtype "
                "(a scanned stack computes them in one vectorised call and reads one layer's "
                "at a time). Give layers of another form a BlockKind of their own"
            )


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
        A kind with a ``layer_constant`` or ``layer_index`` needs its pieces bound first
        (:func:`bind_layers`).
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
