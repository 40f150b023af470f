"""A Flax Linen diffusion transformer as a :class:`~jaxcache.Network`, without rewriting it.

Public Linen ports of DiT and FLUX build everything in one ``nn.compact`` ``__call__``: the
patch, time and label embedders, the blocks (``DiTBlock_0 .. DiTBlock_{N-1}``) and the final
layer are created inline, so ``apply(..., method=...)`` cannot reach them one at a time.
:func:`from_linen` traces ``__call__`` once (shapes only), records every submodule it creates
with its settings, stacks the blocks' parameters by name, and builds the four pieces from small
functions that say what ``__call__`` does around the blocks. A model with several kinds of
block (FLUX: double-stream, then single-stream blocks) gives one :class:`~jaxcache.Blocks` per
list; blocks stacked with ``nn.scan`` are read by the stack's name, their parameters as stored.

jaxcache imports no Linen (the core is NNX; ``tests/test_layout.py`` keeps it so): this module
works on the Linen that the user's model has already loaded. The NNX counterpart is
:mod:`jaxcache.nnx`; what the two share is in :mod:`jaxcache._adapters`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxcache._adapters import (
    Blocks,
    NetworkCache,
    as_block_lists,
    block_constant,
    check_time,
    default_layer,
    glued_network,
    hashable_key,
    stacked_layers,
)
from jaxcache.network import Network, NetworkParams, TimeConvention, stack_trees
from jaxcache.stack import BlockKind

PyTree = Any
LinenModule = Any  # a flax.linen.Module

__all__ = ["LinenParts", "from_linen"]


def _linen(model: Any):
    """``flax.linen`` as the model loaded it; a TypeError unless ``model`` is a Linen Module."""
    linen = sys.modules.get("flax.linen")
    if linen is None or not isinstance(model, linen.Module):
        raise TypeError(f"from_linen needs a flax.linen Module, got {type(model).__name__}")
    return linen


class _Bound:
    """One Linen submodule and its variables: call it, or call its methods, by name."""

    def __init__(self, definition: LinenModule, variables: Mapping[str, Any]):
        self._definition = definition
        self._variables = variables

    def __call__(self, *args, **kwargs):
        return self._definition.apply(self._variables, *args, **kwargs)

    @property
    def params(self) -> PyTree:
        """The submodule's parameters."""
        return self._variables.get("params", {})

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if _is_method(self._definition, name):
            return functools.partial(self._definition.apply, self._variables, method=name)
        return getattr(self._definition, name)


def _is_method(module: LinenModule, name: str) -> bool:
    """Whether ``name`` is a method of the module's class (not a setting, even a callable one)."""
    if name in {f.name for f in dataclasses.fields(module)}:
        return False
    return callable(getattr(type(module), name, None))


class LinenParts:
    """What the small functions of :func:`from_linen` receive: the model, bound to parameters.

    * ``parts.PatchEmbed_0(x)``: calls the submodule ``__call__`` created under that name
      (``parts.TimestepEmbedder_0.timestep_embedding(t)`` calls another of its methods).
    * ``parts.params["pos_embed"]``: the model's own parameters (``self.param(...)`` in
      ``__call__``), and every submodule's.
    * ``parts.patch_size``: the model's settings; ``parts.unpatchify(x)`` calls a method of the
      model itself.
    """

    def __init__(self, model: LinenModule, definitions: Mapping[str, LinenModule],
                 variables: Mapping[str, Any]):
        self._model = model
        self._definitions = definitions
        self._variables = variables

    @property
    def params(self) -> PyTree:
        """The model's parameters, blocks left out."""
        return self._variables.get("params", {})

    @property
    def variables(self) -> Mapping[str, Any]:
        """Every variable collection of the model, blocks left out."""
        return self._variables

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        definition = self._definitions.get(name)
        if definition is not None:
            own = {c: tree[name] for c, tree in self._variables.items() if name in tree}
            return _Bound(definition, own)
        if _is_method(self._model, name):
            return functools.partial(self._model.apply, self._variables, method=name)
        try:
            return getattr(self._model, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self._model).__name__} has no submodule, method or setting {name!r}; "
                f"its submodules: {sorted(self._definitions)}"
            ) from None


class _Trace(NamedTuple):
    """What one shapes-only call of the model showed."""

    definitions: dict[str, LinenModule]  # every direct submodule, unbound, with its settings
    inner: dict[str, dict[str, dict[str, tuple]]]  # name -> collection -> leaf -> shape it read
    lifted: dict[str, tuple[str, type, dict]]  # name -> nn.scan / nn.vmap class's settings


def _lift_info(cls: type) -> tuple[str, type, dict] | None:
    """``(transform, target class, settings)`` for a class a Linen lifting transform made.

    ``nn.scan(Block, length=N, ...)`` returns a new class ``ScanBlock``, a subclass of
    ``Block`` whose ``__call__`` wraps ``Block.__call__``; Flax (0.12) keeps the target class
    and the transform's arguments in that wrapper's closure (``module_class``,
    ``trafo_kwargs``, ``transform``). Read only for messages and checks: None when absent.
    """
    call = cls.__dict__.get("__call__")
    code = getattr(call, "__code__", None)
    if code is None or not call.__closure__:
        return None
    cells = dict(zip(code.co_freevars, call.__closure__))
    try:
        transform = cells["transform"].cell_contents
        target = cells["module_class"].cell_contents
        settings = dict(cells["trafo_kwargs"].cell_contents)
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(target, type):
        return None
    return getattr(transform, "__name__", "?"), target, settings


def _shapes(tree: PyTree) -> dict[str, tuple]:
    """Every leaf's shape by its path (``"['Dense_0']['kernel']"``)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(a)) for path, a in leaves}


def _trace(model: LinenModule, variables, inputs, kwargs, groups) -> _Trace:
    """Calls ``model`` once (shapes only), recording the direct submodules it creates.

    For each it keeps the first call's module (unbound, with its settings) and the shapes of
    the variables that call read: a block inside an ``nn.scan`` reads one layer's slice of
    parameters whose stored leaves carry a leading layer axis.
    """
    found: dict[str, LinenModule] = {}
    inner: dict[str, dict] = {}
    lifted: dict[str, tuple] = {}

    def record(next_fun, args, call_kwargs, context):
        module = context.module
        name = getattr(module, "name", None)
        if isinstance(name, str) and name not in lifted:
            info = _lift_info(type(module))
            if info is not None:
                lifted[name] = info
        scope = getattr(module, "scope", None)
        path = tuple(scope.path) if scope is not None else ()
        if len(path) == 1 and path[0] not in found:
            found[path[0]] = module.clone(parent=None)
            try:
                inner[path[0]] = {c: _shapes(tree) for c, tree in module.variables.items()}
            except Exception:  # noqa: BLE001 (only a check reads it)
                pass
        return next_fun(*args, **call_kwargs)

    try:
        with _linen(model).intercept_methods(record):
            jax.eval_shape(lambda v, a: model.apply(v, *a, **kwargs), variables, tuple(inputs))
    except Exception as error:  # noqa: BLE001 (re-raised with what was being done)
        problem = _scan_length_problem(groups, variables, lifted, model)
        if problem is not None:
            raise ValueError(problem) from error
        raise ValueError(
            f"from_linen traces {type(model).__name__}.apply(variables, *inputs) to find the "
            f"submodules its __call__ creates; that call failed: {error}"
        ) from error
    return _Trace(found, inner, lifted)


def _numbered(prefix: str, names: Sequence[str]) -> list[str]:
    """The names ``prefix_0, prefix_1, ...`` (or ``prefix0, ...``) in numeric order."""
    pattern = re.compile(re.escape(prefix.rstrip("_")) + r"_?(\d+)$")
    numbered = [(int(m.group(1)), n) for n in names if (m := pattern.match(n))]
    return [n for _, n in sorted(numbered)]


def _block_names(blocks: str | Sequence[str], names: Sequence[str], model: LinenModule
                 ) -> list[str]:
    """The blocks' submodule names, in layer order (numeric suffixes sorted as numbers)."""
    if isinstance(blocks, str):
        found = _numbered(blocks, names)
        if not found:
            raise ValueError(
                f"blocks={blocks!r} matches no submodule of {type(model).__name__}; expected "
                f"names such as {blocks.rstrip('_')}_0, {blocks.rstrip('_')}_1, ..., or the "
                f"name of an nn.scan stack; its submodules are {sorted(names)}"
            )
        return found
    chosen = list(blocks)
    missing = [n for n in chosen if n not in names]
    if missing:
        raise ValueError(
            f"blocks {missing} are not submodules of {type(model).__name__}; its submodules "
            f"are {sorted(names)}"
        )
    return chosen


def _stack_candidate(path: Any, variables: Mapping[str, Any]) -> bool:
    """Whether a list's path is one name whose parameters may be an ``nn.scan`` stack."""
    if not isinstance(path, str):
        return False
    params = variables["params"]
    if not isinstance(params.get(path), Mapping):
        return False
    return not _numbered(path, [n for n in params if n != path])


def _collections_of(name: str, variables: Mapping[str, Any]) -> dict[str, PyTree]:
    return {c: tree[name] for c, tree in variables.items()
            if isinstance(tree, Mapping) and name in tree}


def _leading_axis(name: str, variables: Mapping[str, Any]) -> tuple[int | None, str]:
    """``(N, "")`` when every variable of ``name`` has leading axis ``N``; else ``(None, why)``."""
    shapes = {f"{c}{k}": s for c, tree in _collections_of(name, variables).items()
              for k, s in _shapes(tree).items()}
    sizes = [s[0] if s else None for s in shapes.values()]
    if len(set(sizes)) == 1 and None not in sizes:
        return sizes[0], ""
    if not shapes:
        return None, "no parameters"
    common = max(set(sizes), key=sizes.count)
    odd = [f"{k} {s}" for k, s in shapes.items() if (s[0] if s else None) != common]
    return None, f"{', '.join(odd[:4])}, where the others have leading axis {common}"


def _check_named_stacks(groups, variables, model) -> None:
    """Before tracing: a list given as one name (an ``nn.scan`` stack) shares a leading axis."""
    for group in groups:
        if not _stack_candidate(group.path, variables):
            continue
        size, shown = _leading_axis(group.path, variables)
        if size is None:
            raise ValueError(
                f"blocks={group.path!r} names one submodule of {type(model).__name__}, read as "
                "an nn.scan stack (variable_axes={'params': 0}: every layer's parameters on "
                "one leading axis), but its parameters share no leading layer axis: "
                f"{shown}. Expected leaves [num_layers, ...]; or give the blocks' name prefix "
                "(Block matches Block_0, Block_1, ...) or a list of their names"
            )


def _scan_length_problem(groups, variables, lifted, model) -> str | None:
    """Why the trace failed, when an ``nn.scan`` stack's length disagrees with its parameters."""
    for group in groups:
        path = group.path
        info = lifted.get(path) if isinstance(path, str) else None
        if info is None or info[0] != "scan" or info[2].get("length") is None:
            continue
        size, _ = _leading_axis(path, variables)
        length = info[2]["length"]
        if size is not None and size != length:
            return (
                f"blocks={path!r} is an nn.scan stack of {info[1].__name__} with length="
                f"{length} in {type(model).__name__}, but its parameters hold {size} layers "
                f"(leading axis {size}); expected leaves [{length}, ...]: these variables are "
                "not this model's"
            )
    return None


def _scan_stack(name: str, trace: _Trace, variables, model) -> int | None:
    """The number of layers of ``name`` if it is an ``nn.scan`` stack, else None.

    A stack's stored variables are the shapes its block reads in one call, with one more
    leading axis, the same for every leaf.
    """
    inner = trace.inner.get(name)
    if name not in trace.definitions or not inner or not inner.get("params"):
        return None
    outer = {c: _shapes(tree) for c, tree in _collections_of(name, variables).items()}
    if all(outer.get(c) == shapes for c, shapes in inner.items()):
        return None  # one block: it reads the shapes it stores
    size, shown = _leading_axis(name, variables)
    mismatched = [
        f"{c}{k}: stored {outer.get(c, {}).get(k)}, read {s}"
        for c, shapes in inner.items() for k, s in shapes.items()
        if outer.get(c, {}).get(k) != (size, *s)
    ]
    if size is None or mismatched:
        raise ValueError(
            f"{name!r} of {type(model).__name__} stores parameters of other shapes than its "
            f"block reads ({'; '.join(mismatched[:3]) or shown}); an nn.scan stack stores "
            "each leaf as [num_layers, *the shape one layer reads]"
        )
    info = trace.lifted.get(name)
    if info is not None and info[0] != "scan":
        raise ValueError(
            f"{name!r} of {type(model).__name__} is an nn.{info[0]} of {info[1].__name__}: its "
            f"{size} blocks run side by side, not one after another; only nn.scan stacks and "
            "lists of blocks are layer stacks"
        )
    if info is not None and info[2].get("length") not in (None, size):
        raise ValueError(
            f"{name!r} is an nn.scan stack of {info[1].__name__} with length="
            f"{info[2]['length']}, but its parameters hold {size} layers"
        )
    return size


def _group_blocks(group: Blocks, trace: _Trace, variables, model, names: Sequence[str]):
    """One list of blocks: ``(names, block definition, stacked variables, scanned)``."""
    path = group.path
    if _stack_candidate(path, variables):
        if path not in trace.definitions:
            raise ValueError(
                f"blocks={path!r} holds parameters but {type(model).__name__}.__call__ did not "
                "call it with these inputs"
            )
        if _scan_stack(path, trace, variables, model) is not None:
            block_def = trace.definitions[path].clone(name=None)
            return [path], block_def, _collections_of(path, variables), True
        raise ValueError(
            f"blocks={path!r} is one block of {type(model).__name__} (its parameters have the "
            "shapes its __call__ reads, no layer axis), not a stack; expected the name of an "
            "nn.scan stack (nn.scan(Block, variable_axes={'params': 0}, ...)), the blocks' "
            f"name prefix ({path}_0, {path}_1, ...) or a list of their names"
        )
    chosen = _block_names(path if isinstance(path, str) else list(path), names, model)
    uncalled = [n for n in chosen if n not in trace.definitions]
    if uncalled:
        raise ValueError(
            f"blocks {uncalled} hold parameters but {type(model).__name__}.__call__ did not call "
            "them with these inputs"
        )
    for name in chosen:
        size = _scan_stack(name, trace, variables, model)
        if size is not None:
            raise ValueError(
                f"blocks {chosen}: {name!r} is an nn.scan stack of {size} blocks, not one "
                f"block; give its name alone, blocks={name!r} or jaxcache.Blocks({name!r}), "
                "as a list of its own"
            )
    block_def = trace.definitions[chosen[0]].clone(name=None)
    for name in chosen[1:]:
        if trace.definitions[name].clone(name=None) != block_def:
            raise ValueError(
                f"blocks {chosen[0]} and {name} differ in their settings ({block_def!r} vs "
                f"{trace.definitions[name].clone(name=None)!r}); only blocks of one kind share "
                "a stack (for several kinds, give one jaxcache.Blocks per list)"
            )
    stacked = {
        collection: stack_trees([tree[n] for n in chosen], chosen)
        for collection, tree in variables.items()
        if all(n in tree for n in chosen)
    }
    return chosen, block_def, stacked, False


def _as_groups(blocks: Any) -> list[Blocks]:
    """``blocks=`` as one :class:`~jaxcache.Blocks` per list of blocks."""
    groups = as_block_lists(blocks, "from_linen")
    if groups is not None:
        return groups
    if isinstance(blocks, str) and blocks:
        return [Blocks(blocks)]
    if (isinstance(blocks, (list, tuple)) and blocks
            and all(isinstance(n, str) for n in blocks)):
        return [Blocks(tuple(blocks))]
    raise ValueError(
        "blocks must be a name prefix, the name of an nn.scan stack, a list of names or a list "
        f"of jaxcache.Blocks, got {blocks!r}"
    )


_NETWORKS = NetworkCache()


def from_linen(
    model: LinenModule,
    variables: Mapping[str, Any],
    inputs: Sequence[Any],
    *,
    blocks: str | Sequence[str] | Blocks | Sequence[Blocks],
    embed: Callable[..., tuple[PyTree, PyTree]],
    final: Callable[..., jax.Array],
    time: TimeConvention,
    condition: Callable[..., PyTree] | None = None,
    layer: Callable[..., PyTree] | None = None,
    modulated_input: Callable[..., jax.Array] | None = None,
    dual_stream: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
    layer_constant: str | Callable[..., PyTree] | None = None,
) -> tuple[Network, NetworkParams]:
    """Turns a Flax Linen diffusion transformer into a :class:`~jaxcache.Network`, as written.

    The blocks are found by name and their parameters stacked; what ``__call__`` does around
    them is given as small functions of a :class:`LinenParts` ``m`` (the model's submodules,
    parameters and settings, by name):

    * ``embed(m, x, t, constant) -> (h, ctx)``: what runs before the blocks every step, e.g.
      ``(m.PatchEmbed_0(x) + m.params["pos_embed"], m.TimestepEmbedder_0(t) + constant)``.
      ``t`` arrives in the model's convention (``time``).
    * ``final(m, h, ctx) -> prediction``: what runs after them, e.g. the final layer and the
      unpatchify.
    * ``condition(m, cond) -> constant``: the step-independent part, e.g.
      ``m.LabelEmbedder_0(y, False)``; default: ``constant = cond``.
    * ``layer(block, h, ctx) -> h``: how ``__call__`` calls one block; default
      ``block(h, ctx)`` (``block(h, ctx)[0]`` for an ``nn.scan`` stack, below).
    * ``modulated_input(block, h, ctx) -> array``: optional, for TeaCache (the first list's
      blocks).
    * ``layer_constant``: optional, what each block computes from the condition path's output
      alone (a cross-attention block's text keys and values), once per sampling run instead of
      at every step: the name of a block method (``"text_kv"`` calls ``block.text_kv(constant)``)
      or ``(block, constant) -> pytree of arrays``. ``layer`` then also receives
      ``layer_constant=`` (the default passes it on: ``block(h, ctx, layer_constant=...)``).
      A :class:`~jaxcache.Blocks` may give its own.

    Example (a DiT port with blocks ``DiTBlock_0..27``)::

        network, params = jaxcache.from_linen(
            model, variables, (x, t, y), blocks="DiTBlock",
            condition=lambda m, y: m.LabelEmbedder_0(y, False),
            embed=lambda m, x, t, c: (m.PatchEmbed_0(x) + m.params["pos_embed"],
                                      m.TimestepEmbedder_0(t) + c),
            final=lambda m, h, c: m.unpatchify(m.FinalLayer_0(h, c)),
            time=jaxcache.TimeConvention.index(1000))
        jaxcache.check_parity(network, params, lambda x, t, y: model.apply(variables, x, t, y),
                              x, t_solver, y)

    **Several kinds of block** (FLUX: double-stream blocks, then single-stream blocks on the
    concatenated tokens): give one :class:`~jaxcache.Blocks` per list, in the order
    ``__call__`` runs them, each with its own ``layer`` and, where its blocks read another form
    of ``h``, ``enter(h, ctx) -> state`` and ``leave(state, h, ctx) -> h``::

        blocks=[jaxcache.Blocks("DoubleBlock"),
                jaxcache.Blocks("SingleBlock", layer=single, enter=join, leave=split)]

    Layer indices run across the lists (a cache plan may span the boundary) and
    ``params.layers`` is a :class:`~jaxcache.Segments`, one stacked piece per list. Blocks of
    one list must share their settings; lists may differ. A list's ``layer`` defaults to
    ``layer=``, then to ``block(state, ctx)``.

    **``nn.scan`` stacks**: a list may be the name of a submodule built with
    ``nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=N, ...)``
    (an attribute set in ``setup`` or a name given inline in ``nn.compact``). Its parameters
    are already stacked (leaves ``[N, ...]``) and are used as they are; N comes from them and is
    checked against the shapes one layer reads and the scan's ``length``. The trace records the
    unscanned ``Block`` that Flax runs inside the scan (same settings), and ``layer`` receives
    it bound to one layer's parameters. Its ``__call__`` is then the scan body,
    ``(carry, *xs) -> (carry, y)``: the default ``layer`` is ``block(h, ctx)[0]``, for a scan
    called as ``stack(h, ctx)`` with ``in_axes=nn.broadcast``; for another call pass ``layer``
    (e.g. ``lambda block, h, ctx: block(h, *ctx)[0]`` for several broadcast arguments). Inputs
    scanned per layer (``in_axes=0`` on a real array) are not supported. The functional form
    (``nn.scan(fn, ...)(block, ...)``) reads the same way, with ``layer`` saying what ``fn``
    does. An ``nn.vmap`` stack (blocks side by side) is refused.

    Build it once and keep it: the sampler compiles once per network, and calls with the same
    model, names and functions (defined once, not as new lambdas per call) return the same one
    (a model with an unhashable setting gets a new network per call).

    Args:
      model: the Linen model (unbound).
      variables: its variables, ``{"params": ...}`` (other collections are split alike).
      inputs: positional arguments of one forward call, e.g. ``(x, t, y)``: ``__call__`` is
        traced with them (shapes only) to find the submodules it creates.
      blocks: the blocks' name prefix (``"DiTBlock"`` matches ``DiTBlock_0``,
        ``DiTBlock_1``, ... in numeric order), the name of an ``nn.scan`` stack, or the list of
        the blocks' names in layer order; or a list of :class:`~jaxcache.Blocks`, one per kind
        of block, each ``path`` one of these.
      embed: see above.
      final: see above.
      time: the :class:`~jaxcache.TimeConvention` the model's time embedding reads (required:
        a wrong one runs without error and gives wrong images).
      condition: see above.
      layer: see above; the default for every list without its own ``Blocks.layer``.
      modulated_input: see above.
      dual_stream: whether ``h`` is an ``(image, text)`` pair.
      call_kwargs: keyword arguments of the traced call (e.g. ``{"train": False}``).
      layer_constant: see above; the default for every list without its own
        ``Blocks.layer_constant``.

    Returns:
      ``(network, params)``; ``params.layers`` holds the blocks' parameters stacked (a copy for
      named blocks; an ``nn.scan`` stack's own arrays): one stacked dict for one list, a
      :class:`~jaxcache.Segments` for several.

    Raises:
      TypeError: if ``time`` is missing, or ``blocks`` mixes :class:`~jaxcache.Blocks` with
        plain names.
      ValueError: if ``blocks`` matches nothing, the blocks of a list differ in settings or
        parameter shapes, a name in a list of names is an ``nn.scan`` stack, a stack's
        parameters share no leading axis or disagree with its ``length``, or the traced call
        fails. A list's ``layer`` that returns the hidden state in another form than it
        received, or a ``leave`` that does not restore the network's form, raises a ValueError
        when the network is first traced.
    """
    time = check_time(time, "from_linen")
    _linen(model)
    if "params" not in variables:
        raise ValueError(
            f"variables must be the model's variable dict {{'params': ...}}, got keys "
            f"{sorted(variables)}"
        )
    block_constant(layer_constant, "from_linen's layer_constant")  # checked now
    groups = _as_groups(blocks)
    _check_named_stacks(groups, variables, model)
    trace = _trace(model, variables, inputs, dict(call_kwargs or {}), groups)
    names = sorted(set(trace.definitions) | set(variables["params"]))
    found = [_group_blocks(g, trace, variables, model, names) for g in groups]
    seen: dict[str, str] = {}
    for group, (chosen, _, _, _) in zip(groups, found):
        for name in chosen:
            if name in seen:
                raise ValueError(
                    f"block {name!r} is in two lists ({seen[name]!r} and {group.label!r}); "
                    "each block belongs to one list"
                )
            seen[name] = group.label
    rest = {
        collection: {k: v for k, v in tree.items() if k not in seen}
        for collection, tree in variables.items()
    }
    others = {n: d for n, d in trace.definitions.items() if n not in seen}
    block_defs = tuple(block_def for _, block_def, _, _ in found)
    scanned = tuple(flag for *_, flag in found)
    fns = (embed, final, condition, layer, modulated_input, layer_constant)
    key = hashable_key((model, tuple(sorted(others.items())), block_defs, scanned,
                        tuple(groups), fns, time, dual_stream))
    network = _NETWORKS.get(key, lambda: _linen_network(
        model, others, block_defs, tuple(groups), scanned, *fns, time, dual_stream))
    layers = stacked_layers([stacked for _, _, stacked, _ in found])
    return network, NetworkParams(rest, rest, layers, rest)


def _scan_layer(block, h, ctx, **extras):
    """One layer of an ``nn.scan`` stack: its body ``(carry, x) -> (carry, y)``, the carry."""
    return block(h, ctx, **extras)[0]


def _form(tree: PyTree) -> str:
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), tree)
    kind = f"a {type(tree).__name__} of " if isinstance(tree, (tuple, list)) else ""
    return f"{kind}{shapes}"


def _same_form(a: PyTree, b: PyTree) -> bool:
    """Whether two hidden states have one tree structure and equal leaf shapes."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.shape(x) == np.shape(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _linen_kind(block_def, group: Blocks, scanned: bool, layer, layer_constant, index: int,
                count: int) -> BlockKind:
    """One list's :class:`~jaxcache.BlockKind`; its layer checks the state's form.

    (``run_layers`` checks that ``leave`` restores the network's form.)
    """
    given = group.layer or layer
    call = given or (_scan_layer if scanned else default_layer)
    where = f"blocks {group.label!r}" + (f" (list {index + 1} of {count})" if count > 1 else "")
    hint = ""
    if index > 0 and group.enter is None:
        hint = (" This list gets the hidden state in the form the previous list left it; if "
                "its blocks read another form (single-stream blocks: the (image, text) pair "
                "concatenated), give jaxcache.Blocks(..., enter=, leave=).")
    if scanned and given is None:
        hint += (" Its blocks come from an nn.scan stack, called as block(h, ctx)[0]; pass "
                 "layer= for another signature of the scan body.")

    def run(layer_vars, state, ctx, **extras):
        try:
            out = call(_Bound(block_def, layer_vars), state, ctx, **extras)
        except Exception as error:  # noqa: BLE001 (re-raised with what was expected)
            if not hint:
                raise
            raise ValueError(
                f"{where}: layer(block, state, ctx) failed on a state of {_form(state)}: "
                f"{type(error).__name__}: {error}.{hint}"
            ) from error
        if not _same_form(out, state):
            scan_pair = (isinstance(out, tuple) and len(out) == 2
                         and _same_form(out[0], state))
            raise ValueError(
                f"{where}: layer(block, state, ctx) returned {_form(out)}, but the state came "
                f"in as {_form(state)}; a layer returns the state in the form it received."
                + (" The block returns a (carry, y) pair, as a block written for nn.scan does: "
                   "pass layer=lambda block, h, ctx: block(h, ctx)[0]." if scan_pair else hint)
            )
        return out

    compute = block_constant(group.layer_constant or layer_constant)
    hook = None
    if compute is not None:

        def hook(layer_vars, constant):
            return compute(_Bound(block_def, layer_vars), constant)

    return BlockKind(run, group.enter, group.leave, group.label, layer_constant=hook,
                     layer_index=group.layer_index)


def _linen_network(model, others, block_defs, groups, scanned, embed, final, condition, layer,
                   modulated_input, layer_constant, time, dual_stream) -> Network:
    def parts(rest):
        return LinenParts(model, others, rest)

    kinds = tuple(
        _linen_kind(d, g, s, layer, layer_constant, i, len(groups))
        for i, (d, g, s) in enumerate(zip(block_defs, groups, scanned))
    )
    modulated = None
    if modulated_input is not None:

        def modulated(layer_vars, h, ctx):
            return modulated_input(_Bound(block_defs[0], layer_vars), h, ctx)

    return glued_network(parts, kinds, modulated, embed, final, condition, time, dual_stream)
