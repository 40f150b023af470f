"""A diffusion transformer as four pure functions, the shape a cache plan can split.

jaxcache never calls a model's ``__call__``. It needs the forward pass cut where caching
happens: a step-independent condition path, a per-step embedding, a stack of identical layers
(the part that is cached), and a final projection. ``Network`` holds those four pure functions;
``NetworkParams`` holds their parameters, with the layers' parameters stacked on a leading axis.

A Flax NNX model becomes a ``Network`` through :func:`from_nnx` (its four pieces as submodules,
or its blocks as a list plus small functions for the inline parts); a Linen model through
:func:`jaxcache.from_linen`; any pure JAX code builds a ``Network`` directly. :func:`check_parity`
compares a glued network with the model's own forward.

Time: solvers work in ``t`` in ``[0, 1]`` (1 is noise). A model trained on another time scale
declares it once with :class:`TimeConvention` (``Network.time``); the network converts ``t``
before its ``embed`` sees it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcache._checks import check_int
from jaxcache.stack import run_layers, stack_length

PyTree = Any

__all__ = [
    "Network",
    "NetworkParams",
    "ParityError",
    "TimeConvention",
    "check_parity",
    "from_nnx",
    "num_layers",
    "stack_trees",
]

_TIME_KINDS = ("continuous", "index", "scaled")


@dataclasses.dataclass(frozen=True)
class TimeConvention:
    """How a model reads time, and how the solver's ``t`` in ``[0, 1]`` is converted for it.

    Build one with a constructor:

    * :meth:`continuous`: the model reads ``t`` in ``[0, 1]`` as the solvers give it (the
      default; the reference models, rectified-flow models trained on ``t``).
    * :meth:`index`: the model reads the integer index ``k`` of a discrete training schedule of
      ``T`` steps (DDPM-trained models: DiT, ADM): ``k = round(t * T)``, as float32. The
      solver's times must be ``k / T`` for integers ``0 <= k < T`` (the DDIM / DDPM family with
      ``num_train_steps=T``); the sampler checks this before compiling.
    * :meth:`scaled`: the model reads ``factor * t`` without rounding (FLUX, SD3: ``1000 t``).

    Attributes:
      kind: ``"continuous"``, ``"index"`` or ``"scaled"``.
      scale: ``T`` for ``index``, the factor for ``scaled``, 1 for ``continuous``.
    """

    kind: str = "continuous"
    scale: float = 1.0

    def __post_init__(self):
        if self.kind not in _TIME_KINDS:
            raise ValueError(f"TimeConvention.kind must be one of {_TIME_KINDS}, got {self.kind!r}")
        if self.kind == "index":
            check_int(self.scale, "TimeConvention.index's num_train_steps")
        elif not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"TimeConvention.scale must be finite and > 0, got {self.scale!r}")
        if self.kind == "continuous" and self.scale != 1.0:
            raise ValueError("TimeConvention.continuous() has scale 1")

    @classmethod
    def continuous(cls) -> TimeConvention:
        """The model reads the solver's ``t`` in ``[0, 1]`` unchanged."""
        return cls("continuous", 1.0)

    @classmethod
    def index(cls, num_train_steps: int = 1000) -> TimeConvention:
        """The model reads the training-step index ``round(t * num_train_steps)``."""
        return cls("index", check_int(num_train_steps, "num_train_steps"))

    @classmethod
    def scaled(cls, factor: float = 1000.0) -> TimeConvention:
        """The model reads ``factor * t`` (continuous, not rounded)."""
        return cls("scaled", float(factor))

    def to_model(self, t: jax.Array) -> jax.Array:
        """The solver's ``t`` as the model reads it (same dtype)."""
        if self.kind == "continuous":
            return t
        scaled = t * jnp.asarray(self.scale, t.dtype)
        return jnp.round(scaled) if self.kind == "index" else scaled

    def to_solver(self, t_model: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_model`: a model time as the solver's ``t`` (float32)."""
        t_model = jnp.asarray(t_model, jnp.float32)
        if self.kind == "continuous":
            return t_model
        return t_model / jnp.float32(self.scale)

    def check_times(self, times: np.ndarray, solver: Any) -> None:
        """Raises a ValueError unless the model can read ``solver``'s evaluation times.

        Args:
          times: the solver's times (``solver.times(num_steps)[0]``).
          solver: the solver (named in the message; its ``num_train_steps`` is compared with an
            index convention's ``T``).
        """
        if self.kind != "index":
            return
        name, T = type(solver).__name__, int(self.scale)
        own = getattr(solver, "num_train_steps", None)
        if own is not None and own != T:
            raise ValueError(
                f"the network reads training-step indices of a {T}-step schedule "
                f"(TimeConvention.index({T})), but {name} has num_train_steps={own}; build the "
                f"solver with num_train_steps={T}"
            )
        k = np.asarray(times, np.float64) * T
        bad = (np.abs(k - np.round(k)) > 1e-3) | (np.round(k) < 0) | (np.round(k) > T - 1)
        if np.any(bad):
            first = float(np.asarray(times)[np.argmax(bad)])
            raise ValueError(
                f"the network reads integer training-step indices 0..{T - 1} "
                f"(TimeConvention.index({T})), but {name} evaluates at t={first:.6g}, which is "
                f"{first * T:.6g} steps, not an index of that schedule. Use a discrete-schedule "
                f"solver (DDIM, DDPM, EulerAncestral, DPMSolverPP2M) with num_train_steps={T}, "
                "or TimeConvention.scaled(...) for a model trained on scaled continuous time"
            )


def _timed(embed: Callable, time: TimeConvention) -> Callable:
    """``embed`` taking the solver's ``t``: converted by ``time`` first (remembered for reuse)."""
    if time.kind == "continuous":
        return embed

    def embed_at(params, x, t, constant):
        return embed(params, x, time.to_model(t), constant)

    embed_at.jaxcache_time = (embed, time)
    return embed_at


class NetworkParams(NamedTuple):
    """Parameters of a :class:`Network`, one entry per piece.

    Attributes:
      condition: parameters of the condition path (caption / text encoder head).
      embed: parameters of the per-step embedding (patches, timestep).
      layers: parameters of the layer stack; every leaf has a leading axis of length
        ``num_layers``.
      final: parameters of the final projection.
    """

    condition: PyTree
    embed: PyTree
    layers: PyTree
    final: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A diffusion transformer cut into the pieces a cache plan needs.

    All four functions are pure. A hidden state ``h`` is one array for a single-stream model, or
    a pair ``(image, text)`` for a dual-stream model (the pair goes to the two slot streams of a
    :class:`~jaxcache.StepCache`).

    Attributes:
      condition: ``condition(params.condition, cond) -> constant``. Step-independent (a caption
        or class embedding after its refiners); computed once per guidance branch and kept in the
        cache's constant slot.
      embed: ``embed(params.embed, x, t, constant) -> (h, ctx)``. Runs every step; ``t`` is a
        ``[batch]`` float32 array in the model's time convention (``time``): the solver's ``t``
        in ``[0, 1]`` by default. ``ctx`` carries what every layer reads (the timestep
        conditioning vector, masks). After construction this attribute takes the solver's ``t``
        and converts it (so the plan and any loop call it with solver times).
      layer: ``layer(layer_params, h, ctx) -> h``. One block; ``layer_params`` is one slice of
        ``params.layers`` along its leading axis.
      final: ``final(params.final, h, ctx) -> prediction`` with the shape of ``x``.
      dual_stream: whether ``h`` is an ``(image, text)`` pair (cached in slot streams 1 and 2).
      modulated_input: optional ``modulated_input(layer_params, h, ctx) -> array``: a layer's
        input after its timestep modulation (adaLN shift and scale of the attention branch, on
        the image stream). TeaCache reads it from the first layer; networks without it cannot
        use TeaCache.
      time: the :class:`TimeConvention` the model reads; None: continuous ``t`` in ``[0, 1]``,
        or, for an ``embed`` taken from another Network, that network's convention. Set it once
        here (or in :func:`from_nnx` / :func:`jaxcache.from_linen`); the sampler checks the
        solver's times against it.

      layer_unroll: how many layers one iteration of the layer scan runs (``lax.scan``'s
        ``unroll``). ``True``: no scan at all; :meth:`~jaxcache.CachePlan.split` then keeps
        each layer's parameters in arrays of their own (a :class:`~jaxcache.stack.LayerList`),
        so the program never slices a stacked weight: on a GPU a scan copies every layer's
        weights out of the stack each step (a third of the time of a FLUX-size block), and each
        iteration reads its predicate back to the host. Compile time then grows with the depth.
        Default 1 (one layer in the program whatever the depth). Change it with
        ``dataclasses.replace(network, layer_unroll=True)``.
      compiler_options: XLA options by name for this network's sampling programs only (not
        process-wide like ``XLA_FLAGS``), e.g. ``{"xla_gpu_enable_triton_gemm": False}``:
        cuBLAS instead of XLA's Triton GEMMs, which on an H200 compiled the FLUX-size model with
        ``layer_unroll=True`` in 7.3 s instead of 11.5 s and ran 1.5% faster (BENCHMARKS.md).
        Stored as a sorted tuple of ``(name, value)`` pairs. Default: none.

    A Network compares by identity and the sampler compiles once per Network object: build it
    once and reuse it (:func:`from_nnx` and :func:`jaxcache.from_linen` return the same object
    for models of the same structure).
    """

    condition: Callable[[PyTree, PyTree], PyTree]
    embed: Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple[PyTree, PyTree]]
    layer: Callable[[PyTree, PyTree, PyTree], PyTree]
    final: Callable[[PyTree, PyTree, PyTree], jax.Array]
    dual_stream: bool = False
    modulated_input: Callable[[PyTree, PyTree, PyTree], jax.Array] | None = None
    time: TimeConvention | None = None
    layer_unroll: int | bool = 1
    compiler_options: Mapping[str, bool | int | float | str] | tuple = ()

    def __post_init__(self):
        unroll = self.layer_unroll
        if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
            raise ValueError(
                f"Network.layer_unroll must be True, False or an int >= 1, got {unroll!r}"
            )
        object.__setattr__(self, "compiler_options", _option_pairs(self.compiler_options))
        # An embed that already converts (from another Network) is unwrapped, so a rebuilt or
        # replaced Network converts exactly once.
        raw, inherited = getattr(self.embed, "jaxcache_time", (self.embed, None))
        time = self.time if self.time is not None else inherited or TimeConvention()
        if not isinstance(time, TimeConvention):
            raise TypeError(
                "Network.time must be a jaxcache.TimeConvention (TimeConvention.continuous(), "
                f".index(T) or .scaled(factor)), got {time!r}"
            )
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "embed", _timed(raw, time))

    def __call__(self, params: NetworkParams, x: jax.Array, t: jax.Array, cond: PyTree):
        """The plain, uncached forward pass (for checks and training)."""
        constant = self.condition(params.condition, cond)
        h, ctx = self.embed(params.embed, x, t, constant)
        h = run_layers(self.layer, params.layers, h, ctx, unroll=self.layer_unroll)
        return self.final(params.final, h, ctx)


def _option_pairs(options) -> tuple[tuple[str, bool | int | float | str], ...]:
    """``Network.compiler_options`` as sorted, hashable ``(name, value)`` pairs."""
    pairs = tuple(options.items()) if isinstance(options, Mapping) else tuple(options or ())
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], (bool, int, float, str))):
            raise TypeError(
                "Network.compiler_options must map XLA option names to a bool, int, float or "
                f"str (e.g. {{'xla_gpu_enable_triton_gemm': False}}), got {options!r}"
            )
    return tuple(sorted(pairs))


def num_layers(params: NetworkParams) -> int:
    """The number of stacked layers in ``params`` (the leading axis of ``params.layers``)."""
    if not jax.tree.leaves(params.layers):
        raise ValueError("params.layers holds no arrays; a network needs at least one layer")
    return stack_length(params.layers)


class ParityError(AssertionError):
    """A glued :class:`Network` disagrees with the model's own forward pass."""


def check_parity(
    network: Network,
    params: NetworkParams,
    forward: Callable[[jax.Array, jax.Array, PyTree], jax.Array],
    x: jax.Array,
    t: jax.Array,
    cond: PyTree,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    jit_forward: bool = True,
) -> float:
    """Compares a network with the model's own forward on given inputs; raises if they differ.

    Run it once after gluing a model (:func:`from_nnx`, :func:`jaxcache.from_linen`, a
    hand-built :class:`Network`): it catches a missed piece of inline code, a wrong block order
    and a wrong time convention for the model's own forward.

    Args:
      network: the network.
      params: its parameters.
      forward: the model's own forward pass, ``forward(x, t_model, cond) -> prediction``, e.g.
        ``lambda x, t, y: model.apply(variables, x, t, y)``. It receives ``t`` converted to the
        network's :class:`TimeConvention` (integer steps for ``index``), as the model's own
        sampling loop would pass it.
      x: a batch of inputs ``[batch, ...]`` (noise is fine).
      t: solver times in ``[0, 1]``, ``[batch]`` or a scalar (for an ``index`` convention,
        multiples of ``1 / T``).
      cond: the condition, batch-major.
      rtol: relative tolerance (against the model's output).
      atol: absolute tolerance.
      jit_forward: compile ``forward`` with ``jax.jit`` (one program instead of every operation
        dispatched on its own, which is slow for a Linen ``apply``); ``False`` for a forward
        JAX cannot trace.

    Returns:
      The largest absolute difference.

    On a GPU, float32 matrix products default to TF32: run the check under
    ``jax.default_matmul_precision("float32")``, or loosen ``rtol``.

    Raises:
      ParityError: if shapes differ or any element differs by more than
        ``atol + rtol * |model output|``; the message gives the largest difference.

    Warns:
      UserWarning: when the model's output is identically zero (an untrained DiT zero-initialises
        its output and adaLN modulation layers). Then parity, and cached against uncached
        sampling, agree trivially: check with trained or randomised weights.
    """
    x = jnp.asarray(x)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    run_forward = jax.jit(forward) if jit_forward else forward
    want = np.asarray(jax.device_get(run_forward(x, network.time.to_model(t), cond)),
                      np.float64)
    got = np.asarray(jax.device_get(jax.jit(network.__call__)(params, x, t, cond)), np.float64)
    if got.shape != want.shape:
        raise ParityError(
            f"the network's prediction has shape {got.shape}, the model's forward {want.shape}"
        )
    if not np.any(want):
        warnings.warn(
            "the model's output is identically zero (an untrained DiT zero-initialises its output "
            "and adaLN modulation layers), so parity and cached-vs-uncached comparisons pass "
            "trivially; check with trained weights, or randomise them first",
            UserWarning,
            stacklevel=2,
        )
    diff = np.abs(got - want)
    largest = float(np.max(diff)) if diff.size else 0.0
    if not np.all(np.isfinite(got)) or np.any(diff > atol + rtol * np.abs(want)):
        where = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        raise ParityError(
            f"the network disagrees with the model's forward: max |difference| = {largest:.4g} "
            f"at index {tuple(int(i) for i in where)} (atol={atol}, rtol={rtol}; model output "
            f"scale {float(np.max(np.abs(want))) if want.size else 0.0:.4g}). Check the inline "
            "parts (position embedding, time + condition embedding, unpatchify), the block "
            "order and the time convention"
        )
    return largest


def stack_trees(trees: Sequence[PyTree], names: Sequence[str]) -> PyTree:
    """Stacks per-block parameter trees on a new leading axis, checking they agree.

    Args:
      trees: one parameter tree per block, in layer order.
      names: the blocks' names (for messages).

    Returns:
      One tree whose leaves are ``[len(trees), ...]``.

    Raises:
      ValueError: if the trees differ in structure, shape or dtype (the message names both
        blocks and the first parameter that differs).
    """
    if not trees:
        raise ValueError("no blocks to stack")
    first, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    for name, tree in zip(names[1:], trees[1:]):
        leaves, other = jax.tree_util.tree_flatten_with_path(tree)
        if other != treedef:
            raise ValueError(
                f"blocks {names[0]} and {name} hold different parameters "
                f"({sorted(_paths(first))} vs {sorted(_paths(leaves))}); only blocks of one "
                "structure can share a stack (the body scans one block over all of them)"
            )
        for (path, a), (_, b) in zip(first, leaves):
            if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
                raise ValueError(
                    f"blocks {names[0]} and {name} differ in parameter "
                    f"{jax.tree_util.keystr(path)}: {np.shape(b)} {b.dtype} in {name}, "
                    f"{np.shape(a)} {a.dtype} in {names[0]}; only blocks of equal parameter "
                    "shapes can share a stack"
                )
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _paths(leaves) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in leaves]


def _check_time(time: Any, where: str) -> TimeConvention:
    if time is None:
        raise TypeError(
            f"{where} needs time=: say which time the model's embedding reads, "
            "jaxcache.TimeConvention.continuous() (t in [0, 1]), .index(1000) (the integer "
            "training step of a 1000-step DDPM schedule: DiT, ADM) or .scaled(1000.0) "
            "(1000 t: FLUX, SD3); a wrong choice runs without error and gives wrong images"
        )
    if not isinstance(time, TimeConvention):
        raise TypeError(f"time must be a jaxcache.TimeConvention, got {time!r}")
    return time


def _identity_condition(model, cond):
    return cond


def _default_layer(block, h, ctx):
    return block(h, ctx)


def _apply(graphdef: nnx.GraphDef, method: str = "__call__") -> Callable[..., Any]:
    """A pure ``apply(state, *args)`` that rebuilds the module from ``graphdef`` and calls it."""

    def apply(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return apply


@functools.lru_cache(maxsize=128)
def _network_for(
    graphdefs: tuple[nnx.GraphDef, ...],
    dual_stream: bool,
    has_modulated_input: bool,
    time: TimeConvention | None = None,
) -> "Network":
    # One Network per model structure: the sampler compiles once per Network object, so models
    # of the same structure (a reloaded checkpoint, new weights) reuse the compiled program.
    condition, embed, layer, final = (_apply(g) for g in graphdefs)
    modulated = _apply(graphdefs[2], "modulated_input") if has_modulated_input else None
    return Network(
        condition, embed, layer, final, dual_stream=dual_stream, modulated_input=modulated,
        time=time,
    )


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
    blocks: str | Sequence[str] | None = None,
    embed: Callable[..., tuple[PyTree, PyTree]] | None = None,
    final: Callable[..., jax.Array] | None = None,
    condition: Callable[..., PyTree] | None = None,
    layer: Callable[..., PyTree] | None = None,
    modulated_input: Callable[..., jax.Array] | None = None,
    time: TimeConvention | None = None,
    dual_stream: bool | None = None,
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

    **A model as written** (``from_nnx(model, blocks=..., embed=..., final=..., time=...)``):
    the blocks are a list (``nnx.List``, a list attribute, or attributes named in ``blocks``)
    or one ``nnx.vmap`` stack, and the rest lives inline in ``__call__``. Small functions say
    what ``__call__`` does around the blocks; each receives the model itself (rebuilt from its
    parameters, blocks left out), so it reads submodules, parameters and settings by name:

    * ``embed(model, x, t, constant) -> (h, ctx)``: e.g. patch embedding plus position
      embedding, and the timestep vector plus ``constant``.
    * ``final(model, h, ctx) -> prediction``: e.g. the final layer and the unpatchify.
    * ``condition(model, cond) -> constant``: step-independent work (a label or caption
      embedding); default: ``constant = cond``.
    * ``layer(block, h, ctx) -> h``: how ``__call__`` calls one block; default ``block(h, ctx)``.
    * ``modulated_input(block, h, ctx) -> array``: optional, for TeaCache.

    The blocks' parameters are stacked on a leading axis (a copy: drop the model to free the
    originals).

    Args:
      model: the NNX model.
      blocks: the attribute holding the blocks (a list, or a stacked module), or a list of
        attribute names, one block each, in layer order.
      embed: see above (with ``blocks``).
      final: see above (with ``blocks``).
      condition: see above (with ``blocks``).
      layer: see above (with ``blocks``).
      modulated_input: see above (with ``blocks``).
      time: the model's :class:`TimeConvention`; required with ``blocks``; default continuous
        for the protocol.
      dual_stream: whether ``h`` is an ``(image, text)`` pair; default: the model's
        ``dual_stream`` attribute, else False.

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
             "modulated_input": modulated_input}
    if blocks is not None:
        return _from_nnx_parts(
            model, blocks, given, _check_time(time, "from_nnx(model, blocks=...)"), dual_stream
        )
    extra = sorted(k for k, v in given.items() if v is not None)
    if extra:
        raise TypeError(f"from_nnx: {extra} describe a model as written and need blocks=")
    if time is not None and not isinstance(time, TimeConvention):
        raise TypeError(f"time must be a jaxcache.TimeConvention, got {time!r}")
    pieces = ("condition_encoder", "embedder", "blocks", "final_layer")
    name = type(model).__name__
    if isinstance(getattr(model, "blocks", None), (nnx.List, list, tuple)):
        raise TypeError(
            f"{name}.blocks is a list of {len(model.blocks)} blocks; from_nnx(model) needs one "
            "block module whose parameters are stacked on a leading layer axis. "
            + _how_to_stack("blocks")
        )
    missing = [p for p in pieces if not isinstance(getattr(model, p, None), nnx.Module)]
    if missing:
        raise TypeError(
            f"from_nnx needs the NNX submodules {pieces}; {name} lacks {missing} (or pass "
            "blocks=, embed=, final= and time= for a model whose other parts live in __call__)"
        )
    graphdefs, states = zip(*(nnx.split(getattr(model, p)) for p in pieces))
    problem = _stack_problem(states[2])
    if problem is not None:
        raise TypeError(
            f"{name}.blocks is not a stack of blocks: {problem}. " + _how_to_stack("blocks")
        )
    network = _network_for(
        tuple(graphdefs),
        dual_stream,
        callable(getattr(model.blocks, "modulated_input", None)),
        time,
    )
    params = NetworkParams(*states)
    return network, params


# ----------------------------------------------------------------- an NNX model as written
_PARTS_CACHE: dict[tuple, Network] = {}


def _attribute(model: nnx.Module, dotted: str):
    value = model
    for part in dotted.split("."):
        if not hasattr(value, part):
            raise ValueError(
                f"blocks={dotted!r}: {type(model).__name__} has no attribute {dotted!r} "
                f"(its submodules: {_submodule_names(model)})"
            )
        value = getattr(value, part)
    return value


def _submodule_names(model: nnx.Module) -> list[str]:
    return sorted(k for k, v in vars(model).items() if isinstance(v, (nnx.Module, list, tuple)))


def _nnx_blocks(model: nnx.Module, blocks: str | Sequence[str]):
    """``(paths, modules, stacked)``: the blocks' state paths and modules, in layer order."""
    if isinstance(blocks, str):
        value = _attribute(model, blocks)
        prefix = tuple(blocks.split("."))
        if isinstance(value, (nnx.List, list, tuple)):
            if not len(value):
                raise ValueError(f"blocks={blocks!r} is an empty list")
            paths = [(*prefix, i) for i in range(len(value))]
            return paths, list(value), False
        if isinstance(value, nnx.Module):
            return [prefix], [value], True
        raise ValueError(
            f"blocks={blocks!r} is a {type(value).__name__}, not a list of NNX blocks or a "
            "stacked block module"
        )
    names = list(blocks)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"blocks must be an attribute name or a list of names, got {blocks!r}")
    modules = [_attribute(model, n) for n in names]
    return [tuple(n.split(".")) for n in names], modules, False


def _from_nnx_parts(model, blocks, given, time, dual_stream):
    if given["embed"] is None or given["final"] is None:
        raise TypeError(
            "from_nnx(model, blocks=...) needs embed=(model, x, t, constant) -> (h, ctx) and "
            "final=(model, h, ctx) -> prediction: the parts of __call__ around the blocks"
        )
    paths, modules, stacked = _nnx_blocks(model, blocks)
    labels = [".".join(str(p) for p in path) for path in paths]
    splits = [nnx.split(m) for m in modules]
    block_def = splits[0][0]
    for label, (graphdef, _) in zip(labels[1:], splits[1:]):
        if graphdef != block_def:
            raise ValueError(
                f"blocks {labels[0]} and {label} differ in structure or settings; only blocks "
                "of one kind can share a stack (the body scans one block over all of them)"
            )
    if stacked:
        layers = splits[0][1]
        problem = _stack_problem(layers)
        if problem is not None:
            raise TypeError(f"{labels[0]} is one block, not a stack: {problem}. Pass a list")
    else:
        layers = stack_trees([state for _, state in splits], labels)

    def is_block(path, value):
        return any(tuple(path[: len(p)]) == p for p in paths)

    graphdef, block_state, rest = nnx.split(model, is_block, ...)
    signature = tuple(
        (jax.tree_util.keystr(k), np.shape(a), str(a.dtype))
        for k, a in jax.tree_util.tree_flatten_with_path(block_state)[0]
    )
    fns = tuple(given[k] for k in ("embed", "final", "condition", "layer", "modulated_input"))
    key = (graphdef, block_def, signature, fns, time, dual_stream)
    network = _PARTS_CACHE.get(key)
    if network is None:
        placeholder = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                   block_state)
        network = _nnx_parts_network(graphdef, placeholder, block_def, *fns, time, dual_stream)
        if len(_PARTS_CACHE) >= 128:
            _PARTS_CACHE.pop(next(iter(_PARTS_CACHE)))
        _PARTS_CACHE[key] = network
    return network, NetworkParams(rest, rest, layers, rest)


def _nnx_parts_network(graphdef, placeholder, block_def, embed, final, condition, layer,
                       modulated_input, time, dual_stream) -> Network:
    condition = condition or _identity_condition
    layer = layer or _default_layer

    def model_of(rest):
        # The blocks' slots hold shapes only: the pieces around the blocks never read them.
        return nnx.merge(graphdef, placeholder, rest)

    def block_of(layer_state):
        return nnx.merge(block_def, layer_state)

    modulated = None
    if modulated_input is not None:

        def modulated(layer_state, h, ctx):
            return modulated_input(block_of(layer_state), h, ctx)

    return Network(
        condition=lambda rest, cond: condition(model_of(rest), cond),
        embed=lambda rest, x, t, constant: embed(model_of(rest), x, t, constant),
        layer=lambda layer_state, h, ctx: layer(block_of(layer_state), h, ctx),
        final=lambda rest, h, ctx: final(model_of(rest), h, ctx),
        dual_stream=dual_stream,
        modulated_input=modulated,
        time=time,
    )
