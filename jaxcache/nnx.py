"""A Flax NNX diffusion transformer as a :class:`~jaxcache.Network`: :func:`from_nnx`.

Two ways in. A model that follows the four-piece protocol (the reference models in
:mod:`jaxcache.models`: ``condition_encoder``, ``embedder``, one ``nnx.vmap``-stacked block
module, ``final_layer``) is split by submodule, each piece a pure function of its own state.
A model as written (a list of blocks, the rest inline in ``__call__``) gives its blocks'
attribute and small functions for the inline parts; the blocks' parameters are stacked. Either
way, models of the same structure get the same Network (one compiled sampling program).

The Linen counterpart is :mod:`jaxcache.linen`; what the two share is in
:mod:`jaxcache._adapters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxcache._adapters import (
    Blocks,
    NetworkCache,
    as_block_lists,
    block_constant,
    check_time,
    default_layer,
    glued_network,
    hashable_key,
    layer_field,
    stacked_layers,
)
from jaxcache.network import Network, NetworkParams, TimeConvention, stack_trees
from jaxcache.stack import BlockKind

PyTree = Any

__all__ = ["from_nnx"]


def _apply(graphdef: nnx.GraphDef, method: str = "__call__") -> Callable[..., Any]:
    """A pure ``apply(state, *args, **kwargs)`` that rebuilds the module from ``graphdef`` and
    calls it."""

    def apply(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return apply


_PROTOCOL_CACHE = NetworkCache()


def _network_for(
    graphdefs: tuple[nnx.GraphDef, ...],
    block_defs: tuple[nnx.GraphDef, ...],
    block_types: tuple[type, ...],
    dual_stream: bool,
    has_modulated_input: bool,
    time: TimeConvention | None = None,
    has_layer_constant: tuple[bool, ...] = (),
) -> Network:
    # One Network per model structure: the sampler compiles once per Network object, so models
    # of the same structure (a reloaded checkpoint, new weights) reuse the compiled program.
    def build():
        condition, embed, final = (_apply(g) for g in graphdefs)
        kinds = tuple(
            BlockKind(_apply(g), getattr(cls, "enter", None), getattr(cls, "leave", None),
                      cls.__name__,
                      layer_constant=_apply(g, "layer_constant") if constant else None)
            for g, cls, constant in zip(block_defs, block_types, has_layer_constant)
        )
        modulated = _apply(block_defs[0], "modulated_input") if has_modulated_input else None
        return Network(
            condition, embed, layer_field(kinds), final,
            dual_stream=dual_stream, modulated_input=modulated, time=time,
        )

    key = hashable_key((graphdefs, block_defs, block_types, dual_stream, has_modulated_input,
                        time, has_layer_constant))
    return _PROTOCOL_CACHE.get(key, build)


def _stack_problem(state: PyTree) -> str | None:
    """Why ``state`` is not a stack of layers (no common leading axis), or None."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if not leaves:
        return "it holds no parameters"
    sizes = {np.shape(a)[0] if np.ndim(a) else None for _, a in leaves}
    if len(sizes) == 1 and None not in sizes:
        return None
    shown = ", ".join(f"{jax.tree_util.keystr(p)} {np.shape(a)}" for p, a in leaves[:4])
    return f"its parameters share no leading layer axis ({shown})"


def _how_to_stack(owner: str) -> str:
    return (
        "Either build the blocks stacked, with nnx.vmap over the block constructor (see "
        "jaxcache.models.layers.stack_blocks), or keep them as they are and describe the "
        f"inline parts: from_nnx(model, blocks={owner!r}, embed=..., final=..., time=...)"
    )


def from_nnx(
    model: nnx.Module,
    *,
    blocks: str | Sequence[str] | Blocks | Sequence[Blocks] | None = None,
    embed: Callable[..., tuple[PyTree, PyTree]] | None = None,
    final: Callable[..., jax.Array] | None = None,
    condition: Callable[..., PyTree] | None = None,
    layer: Callable[..., PyTree] | None = None,
    modulated_input: Callable[..., jax.Array] | None = None,
    time: TimeConvention | None = None,
    dual_stream: bool | None = None,
    layer_constant: str | Callable[..., PyTree] | None = None,
) -> tuple[Network, NetworkParams]:
    """Turns a Flax NNX diffusion transformer into a :class:`Network` and its parameters.

    Two ways. **The four-piece protocol** (``from_nnx(model)``; the reference models in
    :mod:`jaxcache.models` follow it): the model exposes

    * ``model.condition_encoder(cond) -> constant``
    * ``model.embedder(x, t, constant) -> (h, ctx)``
    * ``model.blocks(h, ctx) -> h``: one block whose parameters carry a leading layer axis
      (built with ``nnx.vmap`` over the block constructor); called on one slice at a time.
    * ``model.final_layer(h, ctx) -> prediction``

    and a boolean attribute ``dual_stream`` when ``h`` is an ``(image, text)`` pair. A block
    that defines ``modulated_input(h, ctx)`` (its timestep-modulated input) supports TeaCache.
    A block that defines ``layer_constant(constant) -> pytree of arrays`` (what it computes
    from the condition path's output alone: a cross-attention block's text keys and values)
    has it computed for every layer once per sampling run, before the loop, and is called as
    ``block(h, ctx, layer_constant=...)`` with its own (:attr:`Network.layer_constant`;
    :class:`jaxcache.models.Wan`).

    **A model as written** (``from_nnx(model, blocks=..., embed=..., final=..., time=...)``):
    the blocks are a list (``nnx.List``, a list attribute, an ``nnx.Sequential``, or attributes
    named in ``blocks``) or one ``nnx.vmap`` stack, and the rest lives inline in ``__call__``.
    Paths may be dotted (``"transformer.double_blocks"``; ``"blocks.layers"`` reaches the list
    inside an ``nnx.Sequential``, which ``"blocks"`` alone also does). A model with several
    lists of blocks of different kinds (FLUX: ``double_blocks`` then ``single_blocks``) gives
    one :class:`Blocks` per list, each with its own ``layer`` and, where its blocks work on
    another form of ``h``, ``enter`` / ``leave``; layer indices then run across the lists.
    Small functions say what ``__call__`` does around the blocks; each receives the model
    itself (rebuilt from its parameters, blocks left out), so it reads submodules, parameters
    and settings by name:

    * ``embed(model, x, t, constant) -> (h, ctx)``: e.g. patch embedding plus position
      embedding, and the timestep vector plus ``constant``.
    * ``final(model, h, ctx) -> prediction``: e.g. the final layer and the unpatchify.
    * ``condition(model, cond) -> constant``: step-independent work (a label or caption
      embedding); default: ``constant = cond``.
    * ``layer(block, h, ctx) -> h``: how ``__call__`` calls one block; default ``block(h, ctx)``.
      With ``layer_constant`` it also receives ``layer_constant=`` (the default passes it on:
      ``block(h, ctx, layer_constant=...)``).
    * ``modulated_input(block, h, ctx) -> array``: optional, for TeaCache.
    * ``layer_constant``: optional, what each block computes from the condition path's output
      alone, once per sampling run (text keys and values of a cross-attention): the name of a
      block method, ``block.<name>(constant)``, or ``(block, constant) -> pytree of arrays``.
      A :class:`Blocks` may give its own.

    The blocks' parameters are stacked on a leading axis (a copy: drop the model to free the
    originals).

    Args:
      model: the NNX model.
      blocks: the attribute holding the blocks (a list, an ``nnx.Sequential`` or a stacked
        module; a dotted path reaches inside submodules), or a list of attribute names, one
        block each, in layer order; or a list of :class:`Blocks`, one per kind of block.
      embed: see above (with ``blocks``).
      final: see above (with ``blocks``).
      condition: see above (with ``blocks``).
      layer: see above (with ``blocks``).
      modulated_input: see above (with ``blocks``).
      time: the model's :class:`TimeConvention`; required with ``blocks``; default continuous
        for the protocol.
      dual_stream: whether ``h`` is an ``(image, text)`` pair; default: the model's
        ``dual_stream`` attribute, else False.
      layer_constant: see above (with ``blocks``; the protocol finds the block method).

    Returns:
      ``(network, params)``. The parameters are the model's current state, so call this again
      after training to pick up new weights. Models of the same structure (and the same
      functions) get the same ``network``, so they share compiled sampling programs.

    Raises:
      TypeError: if a piece is missing, or the protocol's ``blocks`` is a list or one unstacked
        block (the message says how to stack, or how to pass the list).
      ValueError: if ``blocks`` names nothing, or the blocks differ in structure or shape.
    """
    if dual_stream is None:
        dual_stream = bool(getattr(model, "dual_stream", False))
    given = {"embed": embed, "final": final, "condition": condition, "layer": layer,
             "modulated_input": modulated_input, "layer_constant": layer_constant}
    if blocks is not None:
        return _from_nnx_parts(
            model, blocks, given, check_time(time, "from_nnx(model, blocks=...)"), dual_stream
        )
    extra = sorted(k for k, v in given.items() if v is not None)
    if extra:
        raise TypeError(f"from_nnx: {extra} describe a model as written and need blocks=")
    if time is not None and not isinstance(time, TimeConvention):
        raise TypeError(f"time must be a jaxcache.TimeConvention, got {time!r}")
    pieces = ("condition_encoder", "embedder", "final_layer")
    name = type(model).__name__
    stacks = tuple(getattr(model, "block_stacks", ("blocks",)))
    for attribute in stacks:
        if isinstance(getattr(model, attribute, None), (nnx.List, list, tuple)):
            value = getattr(model, attribute)
            raise TypeError(
                f"{name}.{attribute} is a list of {len(value)} blocks; from_nnx(model) needs one "
                "block module whose parameters are stacked on a leading layer axis. "
                + _how_to_stack(attribute)
            )
    wanted = ("condition_encoder", "embedder", *stacks, "final_layer")
    missing = [p for p in wanted if not isinstance(getattr(model, p, None), nnx.Module)]
    if missing:
        raise TypeError(
            f"from_nnx needs the NNX submodules {wanted}; {name} lacks {missing} "
            "(or pass blocks=, embed=, final= and time= for a model whose other parts live in "
            "__call__)"
        )
    graphdefs, states = zip(*(nnx.split(getattr(model, p)) for p in pieces))
    block_defs, block_states = zip(*(nnx.split(getattr(model, p)) for p in stacks))
    for attribute, state in zip(stacks, block_states):
        problem = _stack_problem(state)
        if problem is not None:
            raise TypeError(
                f"{name}.{attribute} is not a stack of blocks: {problem}. "
                + _how_to_stack(attribute)
            )
    first_blocks = getattr(model, stacks[0])
    network = _network_for(
        tuple(graphdefs),
        tuple(block_defs),
        tuple(type(getattr(model, p)) for p in stacks),
        dual_stream,
        callable(getattr(first_blocks, "modulated_input", None)),
        time,
        tuple(callable(getattr(getattr(model, p), "layer_constant", None)) for p in stacks),
    )
    condition, embed, final = states
    return network, NetworkParams(condition, embed, stacked_layers(block_states), final)


# ------------------------------------------------------------------ an NNX model as written
_PARTS_CACHE = NetworkCache()


def _attribute(model: nnx.Module, dotted: str):
    value = model
    for part in dotted.split("."):
        if isinstance(value, (nnx.List, list, tuple)) and part.isdigit():
            value = value[int(part)]
            continue
        if not hasattr(value, part):
            raise ValueError(
                f"blocks={dotted!r}: {type(model).__name__} has no attribute {dotted!r} "
                f"(its submodules: {_submodule_names(model)})"
            )
        value = getattr(value, part)
    return value


def _path_of(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _submodule_names(model: nnx.Module) -> list[str]:
    return sorted(k for k, v in vars(model).items() if isinstance(v, (nnx.Module, list, tuple)))


def _nnx_blocks(model: nnx.Module, blocks: str | Sequence[str]):
    """``(paths, modules, stacked)``: the blocks' state paths and modules, in layer order."""
    if isinstance(blocks, str):
        value = _attribute(model, blocks)
        prefix = _path_of(blocks)
        if isinstance(value, nnx.Sequential):  # its blocks are the list value.layers
            value, prefix = value.layers, (*prefix, "layers")
        if isinstance(value, (nnx.List, list, tuple)):
            if not len(value):
                raise ValueError(f"blocks={blocks!r} is an empty list")
            paths = [(*prefix, i) for i in range(len(value))]
            return paths, list(value), False
        if isinstance(value, nnx.Module):
            return [prefix], [value], True
        raise ValueError(
            f"blocks={blocks!r} is a {type(value).__name__}, not a list of NNX blocks, an "
            "nnx.Sequential or a stacked (nnx.vmap) block module"
        )
    names = list(blocks)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"blocks must be an attribute name or a list of names, got {blocks!r}")
    modules = [_attribute(model, n) for n in names]
    return [_path_of(n) for n in names], modules, False


def _nnx_group(model, group: Blocks):
    """One list of blocks: ``(paths, block graphdef, stacked parameters)``."""
    paths, modules, stacked = _nnx_blocks(model, group.path)
    labels = [".".join(str(p) for p in path) for path in paths]
    splits = [nnx.split(m) for m in modules]
    block_def = splits[0][0]
    for label, (graphdef, _) in zip(labels[1:], splits[1:]):
        if graphdef != block_def:
            raise ValueError(
                f"blocks {labels[0]} and {label} differ in structure or settings; only blocks "
                "of one kind can share a list (the body scans one block over all of them). "
                "For a model with several kinds of block, give one jaxcache.Blocks per list: "
                "blocks=[Blocks('double_blocks'), Blocks('single_blocks', ...)]"
            )
    if stacked:
        layers = splits[0][1]
        problem = _stack_problem(layers)
        if problem is not None:
            raise TypeError(
                f"{labels[0]} is one block, not a stack: {problem}. Pass the attribute holding "
                "the list of blocks (a list, nnx.List or nnx.Sequential), or a stack built "
                "with nnx.vmap"
            )
    else:
        layers = stack_trees([state for _, state in splits], labels)
    return paths, block_def, layers


def _from_nnx_parts(model, blocks, given, time, dual_stream):
    if given["embed"] is None or given["final"] is None:
        raise TypeError(
            "from_nnx(model, blocks=...) needs embed=(model, x, t, constant) -> (h, ctx) and "
            "final=(model, h, ctx) -> prediction: the parts of __call__ around the blocks"
        )
    block_constant(given["layer_constant"], "from_nnx's layer_constant")  # checked now
    groups = as_block_lists(blocks, "from_nnx") or [Blocks(blocks)]
    found = [_nnx_group(model, group) for group in groups]
    all_paths = [path for paths, _, _ in found for path in paths]

    def is_block(path, value):
        return any(tuple(path[: len(p)]) == p for p in all_paths)

    graphdef, block_state, rest = nnx.split(model, is_block, ...)
    signature = tuple(
        (jax.tree_util.keystr(k), np.shape(a), str(a.dtype))
        for k, a in jax.tree_util.tree_flatten_with_path(block_state)[0]
    )
    block_defs = tuple(block_def for _, block_def, _ in found)
    fns = tuple(given[k] for k in ("embed", "final", "condition", "layer", "modulated_input",
                                   "layer_constant"))
    key = hashable_key((graphdef, block_defs, signature, fns, tuple(groups), time, dual_stream))

    def build():
        placeholder = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                   block_state)
        return _nnx_parts_network(graphdef, placeholder, block_defs, groups, *fns, time,
                                  dual_stream)

    network = _PARTS_CACHE.get(key, build)
    layers = stacked_layers([layers for _, _, layers in found])
    return network, NetworkParams(rest, rest, layers, rest)


def _nnx_parts_network(graphdef, placeholder, block_defs, groups, embed, final, condition,
                       layer, modulated_input, layer_constant, time, dual_stream) -> Network:
    def model_of(rest):
        # The blocks' slots hold shapes only: the pieces around the blocks never read them.
        return nnx.merge(graphdef, placeholder, rest)

    def kind(block_def, group):
        call = group.layer or layer or default_layer
        compute = block_constant(group.layer_constant or layer_constant)

        def run(layer_state, h, ctx, **extras):
            return call(nnx.merge(block_def, layer_state), h, ctx, **extras)

        hook = None
        if compute is not None:

            def hook(layer_state, constant):
                return compute(nnx.merge(block_def, layer_state), constant)

        return BlockKind(run, group.enter, group.leave, group.label, layer_constant=hook,
                         layer_index=group.layer_index)

    kinds = tuple(kind(d, g) for d, g in zip(block_defs, groups))
    modulated = None
    if modulated_input is not None:

        def modulated(layer_state, h, ctx):
            return modulated_input(nnx.merge(block_defs[0], layer_state), h, ctx)

    return glued_network(model_of, kinds, modulated, embed, final, condition, time, dual_stream)
