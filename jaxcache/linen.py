"""A Flax Linen diffusion transformer as a :class:`~jaxcache.Network`, without rewriting it.

Public Linen ports of DiT and FLUX build everything in one ``nn.compact`` ``__call__``: the
patch, time and label embedders, the blocks (``DiTBlock_0 .. DiTBlock_{N-1}``) and the final
layer are created inline, so ``apply(..., method=...)`` cannot reach them one at a time.
:func:`from_linen` traces ``__call__`` once (shapes only), records every submodule it creates
with its settings, stacks the blocks' parameters by name, and builds the four pieces from small
functions that say what ``__call__`` does around the blocks.

jaxcache imports no Linen (the core is NNX; ``tests/test_layout.py`` keeps it so): this module
works on the Linen that the user's model has already loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxcache.network import (
    Network,
    NetworkParams,
    TimeConvention,
    _check_time,
    _default_layer,
    _identity_condition,
    stack_trees,
)

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


def _submodules(model: LinenModule, variables, inputs, kwargs) -> dict[str, LinenModule]:
    """Every direct submodule ``model.__call__`` creates, unbound, with its settings."""
    found: dict[str, LinenModule] = {}

    def record(next_fun, args, call_kwargs, context):
        module = context.module
        scope = getattr(module, "scope", None)
        path = tuple(scope.path) if scope is not None else ()
        if len(path) == 1 and path[0] not in found:
            found[path[0]] = module.clone(parent=None)
        return next_fun(*args, **call_kwargs)

    try:
        with _linen(model).intercept_methods(record):
            jax.eval_shape(lambda v, a: model.apply(v, *a, **kwargs), variables, tuple(inputs))
    except Exception as error:  # noqa: BLE001 (re-raised with what was being done)
        raise ValueError(
            f"from_linen traces {type(model).__name__}.apply(variables, *inputs) to find the "
            f"submodules its __call__ creates; that call failed: {error}"
        ) from error
    return found


def _block_names(blocks: str | Sequence[str], names: Sequence[str], model: LinenModule
                 ) -> list[str]:
    """The blocks' submodule names, in layer order (numeric suffixes sorted as numbers)."""
    if isinstance(blocks, str):
        pattern = re.compile(re.escape(blocks.rstrip("_")) + r"_?(\d+)$")
        numbered = [(int(m.group(1)), n) for n in names if (m := pattern.match(n))]
        if not numbered:
            raise ValueError(
                f"blocks={blocks!r} matches no submodule of {type(model).__name__}; expected "
                f"names such as {blocks.rstrip('_')}_0, {blocks.rstrip('_')}_1, ...; its "
                f"submodules are {sorted(names)}"
            )
        return [n for _, n in sorted(numbered)]
    chosen = list(blocks)
    if not chosen or not all(isinstance(n, str) for n in chosen):
        raise ValueError(f"blocks must be a name prefix or a list of names, got {blocks!r}")
    missing = [n for n in chosen if n not in names]
    if missing:
        raise ValueError(
            f"blocks {missing} are not submodules of {type(model).__name__}; its submodules "
            f"are {sorted(names)}"
        )
    return chosen


_CACHE: dict[tuple, Network] = {}


def from_linen(
    model: LinenModule,
    variables: Mapping[str, Any],
    inputs: Sequence[Any],
    *,
    blocks: str | Sequence[str],
    embed: Callable[..., tuple[PyTree, PyTree]],
    final: Callable[..., jax.Array],
    time: TimeConvention,
    condition: Callable[..., PyTree] | None = None,
    layer: Callable[..., PyTree] | None = None,
    modulated_input: Callable[..., jax.Array] | None = None,
    dual_stream: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
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
      ``block(h, ctx)``.
    * ``modulated_input(block, h, ctx) -> array``: optional, for TeaCache.

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

    Build it once and keep it: the sampler compiles once per network, and calls with the same
    model, names and functions (defined once, not as new lambdas per call) return the same one.

    Args:
      model: the Linen model (unbound).
      variables: its variables, ``{"params": ...}`` (other collections are split alike).
      inputs: positional arguments of one forward call, e.g. ``(x, t, y)``: ``__call__`` is
        traced with them (shapes only) to find the submodules it creates.
      blocks: the blocks' name prefix (``"DiTBlock"`` matches ``DiTBlock_0``,
        ``DiTBlock_1``, ... in numeric order) or the list of their names in layer order.
      embed: see above.
      final: see above.
      time: the :class:`~jaxcache.TimeConvention` the model's time embedding reads (required:
        a wrong one runs without error and gives wrong images).
      condition: see above.
      layer: see above.
      modulated_input: see above.
      dual_stream: whether ``h`` is an ``(image, text)`` pair.
      call_kwargs: keyword arguments of the traced call (e.g. ``{"train": False}``).

    Returns:
      ``(network, params)``; ``params.layers`` is a stacked copy of the blocks' parameters.

    Raises:
      TypeError: if ``time`` is missing.
      ValueError: if ``blocks`` matches nothing, the blocks differ in settings or parameter
        shapes, or the traced call fails.
    """
    time = _check_time(time, "from_linen")
    _linen(model)
    if "params" not in variables:
        raise ValueError(
            f"variables must be the model's variable dict {{'params': ...}}, got keys "
            f"{sorted(variables)}"
        )
    definitions = _submodules(model, variables, inputs, dict(call_kwargs or {}))
    names = _block_names(blocks, sorted(set(definitions) | set(variables["params"])), model)
    uncalled = [n for n in names if n not in definitions]
    if uncalled:
        raise ValueError(
            f"blocks {uncalled} hold parameters but {type(model).__name__}.__call__ did not call "
            "them with these inputs"
        )
    block_def = definitions[names[0]].clone(name=None)
    for name in names[1:]:
        if definitions[name].clone(name=None) != block_def:
            raise ValueError(
                f"blocks {names[0]} and {name} differ in their settings ({block_def!r} vs "
                f"{definitions[name].clone(name=None)!r}); only blocks of one kind share a stack"
            )
    stacked = {
        collection: stack_trees([tree[n] for n in names], names)
        for collection, tree in variables.items()
        if all(n in tree for n in names)
    }
    rest = {
        collection: {k: v for k, v in tree.items() if k not in names}
        for collection, tree in variables.items()
    }
    others = {n: d for n, d in definitions.items() if n not in names}
    fns = (embed, final, condition, layer, modulated_input)
    try:
        key = (model, tuple(sorted(others.items())), block_def, fns, time, dual_stream)
        hash(key)
    except TypeError:  # a setting that cannot be hashed: no sharing, a network per call
        key = None
    network = _CACHE.get(key) if key is not None else None
    if network is None:
        network = _linen_network(model, others, block_def, *fns, time, dual_stream)
        if key is not None:
            if len(_CACHE) >= 128:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = network
    return network, NetworkParams(rest, rest, stacked, rest)


def _linen_network(model, others, block_def, embed, final, condition, layer, modulated_input,
                   time, dual_stream) -> Network:
    condition = condition or _identity_condition
    layer = layer or _default_layer

    def parts(rest):
        return LinenParts(model, others, rest)

    modulated = None
    if modulated_input is not None:

        def modulated(layer_vars, h, ctx):
            return modulated_input(_Bound(block_def, layer_vars), h, ctx)

    return Network(
        condition=lambda rest, cond: condition(parts(rest), cond),
        embed=lambda rest, x, t, constant: embed(parts(rest), x, t, constant),
        layer=lambda layer_vars, h, ctx: layer(_Bound(block_def, layer_vars), h, ctx),
        final=lambda rest, h, ctx: final(parts(rest), h, ctx),
        dual_stream=dual_stream,
        modulated_input=modulated,
        time=time,
    )
