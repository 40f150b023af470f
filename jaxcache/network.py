"""A diffusion transformer as four pure functions, the shape a cache plan can split.

jaxcache never calls a model's ``__call__``. It needs the forward pass cut where caching
happens: a step-independent condition path, a per-step embedding, a stack of identical layers
(the part that is cached), and a final projection. ``Network`` holds those four pure functions;
``NetworkParams`` holds their parameters, with the layers' parameters stacked on a leading axis.
:func:`check_parity` compares a network with the model's own forward; :func:`stack_trees`
stacks per-block parameters; :func:`default_layer_unroll` and :func:`default_compiler_options`
say what a Network's ``"auto"`` settings mean on the default backend. :class:`Static` carries a
value known while tracing (the input's shape, for a final layer that unpatchifies a video) in
``ctx``.

This module is the abstraction only: any pure JAX code builds a ``Network`` directly, and the
adapters build one from a model as written, :func:`jaxcache.from_nnx` (:mod:`jaxcache.nnx`) for
Flax NNX and :func:`jaxcache.from_linen` (:mod:`jaxcache.linen`) for Linen. Neither is
imported here: the adapters stand above the abstraction.

Time: solvers work in ``t`` in ``[0, 1]`` (1 is noise). A model trained on another time scale
declares it once with :class:`TimeConvention` (``Network.time``); the network converts ``t``
before its ``embed`` sees it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int
from jaxcache.stack import (
    BlockKind,
    LayerInputs,
    Segments,
    as_kinds,
    bind_layers,
    run_layers,
    stack_length,
)

PyTree = Any

__all__ = [
    "Network",
    "NetworkParams",
    "ParityError",
    "Static",
    "TimeConvention",
    "check_parity",
    "num_layers",
    "stack_trees",
]


_TIME_KINDS = ("continuous", "index", "scaled", "truncated")


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
    * :meth:`scaled`: the model reads ``factor * t`` without rounding: its own sampling loop
      passes ``1000 t`` to an embedding that does not scale it (SD3 as diffusers runs it).
      FLUX's JAX ports take ``t`` in ``[0, 1]`` and multiply by 1000 inside their timestep
      embedding: they are ``continuous``. To find out, look where the model multiplies ``t``.
    * :meth:`truncated`: the model reads the integer ``int(factor * t)``, truncated: its own
      loop passes the scheduler's integer timesteps, ``sigma * 1000`` cast to an integer (the
      Wan 2.1 pipelines: diffusers' UniPC with flow sigmas, and its JAX ports, which write
      ``int32(1000 * sigma)``). As float32, computed in float32 as the JAX ports compute it.

    Attributes:
      kind: ``"continuous"``, ``"index"``, ``"scaled"`` or ``"truncated"``.
      scale: ``T`` for ``index``, the factor for ``scaled`` and ``truncated``, 1 for
        ``continuous``.
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

    @classmethod
    def truncated(cls, factor: float = 1000.0) -> TimeConvention:
        """The model reads the integer ``int(factor * t)``, truncated towards zero.

        Example::

            time = TimeConvention.truncated(1000)  # Wan 2.1: int32(1000 * sigma)
        """
        return cls("truncated", float(factor))

    def to_model(self, t: jax.Array) -> jax.Array:
        """The solver's ``t`` as the model reads it (same dtype)."""
        if self.kind == "continuous":
            return t
        scaled = t * jnp.asarray(self.scale, t.dtype)
        if self.kind == "index":
            return jnp.round(scaled)
        return jnp.trunc(scaled) if self.kind == "truncated" else scaled

    def to_solver(self, t_model: jax.Array) -> jax.Array:
        """The inverse of :meth:`to_model`: a model time as the solver's ``t`` (float32).

        For ``truncated``, whose integer ``k`` stands for every ``t`` in
        ``[k / factor, (k + 1) / factor)``, the middle of that range (so it truncates back to
        ``k``).
        """
        t_model = jnp.asarray(t_model, jnp.float32)
        if self.kind == "continuous":
            return t_model
        if self.kind == "truncated":
            t_model = t_model + 0.5
        return t_model / jnp.float32(self.scale)

    def check_times(self, times: np.ndarray, solver: Any) -> None:
        """Raises a ValueError unless the model can read ``solver``'s evaluation times.

        An ``index`` convention needs training-step indices: a flow-matching solver
        (``time_kind == "continuous"``) is refused, and any other solver's times must be
        ``k / T``. A ``truncated`` convention refuses a discrete-schedule solver
        (``time_kind == "index"``), whose integer steps it would not reproduce.

        Args:
          times: the solver's times (``solver.times(num_steps)[0]``).
          solver: the solver (named in the message; its ``num_train_steps`` is compared with an
            index convention's ``T``).
        """
        name = type(solver).__name__
        time_kind = getattr(solver, "time_kind", None)
        if self.kind == "truncated" and time_kind == "index":
            factor = f"{self.scale:g}"
            raise ValueError(
                f"the network reads int({factor} t) (TimeConvention.truncated({factor})), but "
                f"{name} evaluates at training-step indices k / T, and truncating the float32 "
                "product can land one step short of k (5 of 1000 steps do). A model that reads "
                "the integer training step is TimeConvention.index(T); truncated(...) is for "
                "flow-matching solvers (FlowMatchEuler, UniPC) whose pipeline casts 1000 sigma "
                "to an integer"
            )
        if self.kind != "index":
            return
        T = int(self.scale)
        if time_kind == "continuous":
            first = float(np.asarray(times)[0]) if np.size(times) else 0.0
            raise ValueError(
                f"the network reads integer training-step indices 0..{T - 1} "
                f"(TimeConvention.index({T})), but {name} evaluates at continuous flow-matching "
                f"times (t={first:.6g} is {first * T:.6g} steps), which no index expresses. A "
                f"model whose own loop casts {T} sigma to an integer reads "
                f"TimeConvention.truncated({T}) (the Wan 2.1 pipelines); one that reads {T} t "
                f"unrounded, TimeConvention.scaled({T}); one trained on training-step indices "
                "needs a discrete-schedule solver (DDIM, DDPM, EulerAncestral, DPMSolverPP2M)"
            )
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
                "TimeConvention.scaled(...) for a model trained on scaled continuous time, or "
                "TimeConvention.truncated(...) for one that reads int(1000 t)"
            )


def _timed(embed: Callable, time: TimeConvention) -> Callable:
    """``embed`` taking the solver's ``t``: converted by ``time`` first (remembered for reuse)."""
    if time.kind == "continuous":
        return embed

    def embed_at(params, x, t, constant):
        return embed(params, x, time.to_model(t), constant)

    embed_at.jaxcache_time = (embed, time)
    return embed_at


@jax.tree_util.register_pytree_node_class
class Static:
    """A value known while tracing (a shape, a setting), carried in a pytree without leaves.

    ``embed`` sees the sample ``x``; ``final`` sees only ``(h, ctx)``. A model whose final
    layer needs the input's shape (a video model unpatchifies ``[B, F*H*W/4, D]`` tokens back
    to ``[B, F, H, W, C]``) puts it in ``ctx`` as a ``Static``::

        def embed(p, x, t, constant):
            return tokens, (modulation, jaxcache.Static(x.shape))

        def final(p, h, ctx):
            batch, frames, height, width, channels = ctx[1].value
            ...

    A plain Python int in ``ctx`` would be a leaf, and turn into an abstract array wherever
    the pieces are traced on shapes (the FLOP count of a run, a program's structure); a
    ``Static`` holds its value as the pytree's structure, so every scan, loop and shape-only
    trace hands it on unchanged.

    Attributes:
      value: the value (hashable: a tuple of ints, a string, a number).
    """

    def __init__(self, value: Any):
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"Static holds a hashable value (a shape tuple, a number, a string), got "
                f"{type(value).__name__}"
            ) from None
        self.value = value

    def __repr__(self) -> str:
        return f"Static({self.value!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and self.value == other.value

    def __hash__(self) -> int:
        return hash((Static, self.value))

    def tree_flatten(self):
        return (), self.value

    @classmethod
    def tree_unflatten(cls, value, children):
        del children
        return cls(value)


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
        ``params.layers`` along its leading axis. With ``layer_constant`` it is called as
        ``layer(layer_params, h, ctx, layer_constant=c)``, with ``layer_index`` as
        ``layer(..., layer_index=i)``. For a network of several kinds of block
        (FLUX: double-stream then single-stream blocks), a tuple of
        :class:`~jaxcache.BlockKind`, one per kind, each with its own layer function and the
        conversion of ``h`` into and out of its blocks' form; ``params.layers`` is then a
        :class:`~jaxcache.Segments` saying which layers are of which kind. After construction,
        :attr:`kinds` holds the kinds either way.
      final: ``final(params.final, h, ctx) -> prediction`` with the shape of ``x``. It does
        not see ``x``: where it needs the input's shape (to unpatchify a video), ``embed``
        puts it in ``ctx`` as a :class:`Static`.
      dual_stream: whether ``h`` is an ``(image, text)`` pair (cached in slot streams 1 and 2).
      modulated_input: optional ``modulated_input(layer_params, h, ctx) -> array``: a layer's
        input after its timestep modulation (adaLN shift and scale of the attention branch, on
        the image stream). TeaCache reads it from the first layer (``h`` is the embedding's
        output, ``layer_params`` the first layer's, of the first kind); networks without it
        cannot use TeaCache.
      time: the :class:`TimeConvention` the model reads; None: continuous ``t`` in ``[0, 1]``,
        or, for an ``embed`` taken from another Network, that network's convention. Set it once
        here (or in :func:`jaxcache.from_nnx` / :func:`jaxcache.from_linen`); the sampler checks the
        solver's times against it.

      layer_unroll: how many layers one iteration of the layer scan runs (``lax.scan``'s
        ``unroll``). ``"auto"`` (the default): the fastest measured setting for the default
        backend (:func:`default_layer_unroll`: ``True`` on a GPU, ``1`` elsewhere), resolved
        when the Network is built. ``True``: no scan at all; :meth:`~jaxcache.CachePlan.split`
        then keeps each layer's parameters in arrays of their own (a
        :class:`~jaxcache.stack.LayerList`), so the program never slices a stacked weight: on a
        GPU a scan copies every layer's weights out of the stack each step (a third of the time
        of a FLUX-size block), and each iteration reads its predicate back to the host. Compile
        time then grows with the depth. ``1``: one layer in the program whatever the depth.
        Change it with ``dataclasses.replace(network, layer_unroll=True)``.
      compiler_options: XLA options by name for this network's sampling programs only (not
        process-wide like ``XLA_FLAGS``), e.g. ``{"xla_gpu_enable_triton_gemm": False}``:
        cuBLAS instead of XLA's Triton GEMMs, which on an H200 compiled the FLUX-size model with
        ``layer_unroll=True`` in 7.3 s instead of 11.5 s and ran 1.5% faster (BENCHMARKS.md).
        Stored as a sorted tuple of ``(name, value)`` pairs. ``"auto"`` (the default): the
        options measured fastest for the default backend (:func:`default_compiler_options`:
        cuBLAS GEMMs on a GPU, none elsewhere); ``{}``: none.
      layer_constant: optional ``layer_constant(layer_params, constant) -> pytree of arrays``:
        what a layer computes from its own parameters and the condition path's output only,
        e.g. a cross-attention block's text keys and values (Wan-style video models). The
        sampler computes it for every layer once per run, before the loop (one vectorised
        call per stack: :meth:`~jaxcache.CachePlan.bind_layers`), and ``layer`` receives each
        layer's own as ``layer_constant=``. It sees no timestep and no hidden state, so it
        cannot depend on the step: anything that does belongs in ``layer``. For a network of
        several kinds of block, set it per :class:`~jaxcache.BlockKind` instead.
      layer_index: pass ``layer`` each layer's index in the network as ``layer_index=`` (an
        int32 scalar, traced inside a scanned stack). For several kinds of block, set it per
        :class:`~jaxcache.BlockKind` (the index runs across the kinds).

    A Network compares by identity and the sampler compiles once per Network object: build it
    once and reuse it (:func:`jaxcache.from_nnx` and :func:`jaxcache.from_linen` return the same
    object for models of the same structure).
    """

    condition: Callable[[PyTree, PyTree], PyTree]
    embed: Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple[PyTree, PyTree]]
    layer: Callable[[PyTree, PyTree, PyTree], PyTree] | tuple[BlockKind, ...]
    final: Callable[[PyTree, PyTree, PyTree], jax.Array]
    dual_stream: bool = False
    modulated_input: Callable[[PyTree, PyTree, PyTree], jax.Array] | None = None
    time: TimeConvention | None = None
    layer_unroll: int | bool | str = "auto"
    compiler_options: Mapping[str, bool | int | float | str] | tuple | str = "auto"
    layer_constant: Callable[[PyTree, PyTree], PyTree] | None = None
    layer_index: bool = False

    def __post_init__(self):
        unroll = self.layer_unroll
        if unroll == "auto":
            unroll = default_layer_unroll()
            object.__setattr__(self, "layer_unroll", unroll)
        if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
            raise ValueError(
                f"Network.layer_unroll must be 'auto', True, False or an int >= 1, got {unroll!r}"
            )
        options = self.compiler_options
        if isinstance(options, str) and options == "auto":
            options = default_compiler_options()
        object.__setattr__(self, "compiler_options", _option_pairs(options))
        if isinstance(self.layer, (list, tuple, BlockKind)):
            kinds = as_kinds(self.layer)
            if not kinds or not all(isinstance(k, BlockKind) for k in kinds):
                raise TypeError(
                    "Network.layer must be a layer function or a non-empty tuple of "
                    f"jaxcache.BlockKind (one per kind of block), got {self.layer!r}"
                )
            if self.layer_constant is not None or self.layer_index:
                raise TypeError(
                    "Network.layer_constant and Network.layer_index go with a layer function; "
                    "with jaxcache.BlockKind layers set them on each kind that takes them, "
                    "BlockKind(layer, layer_constant=..., layer_index=True)"
                )
            object.__setattr__(self, "layer", kinds)
            object.__setattr__(self, "_kinds", kinds)
        elif callable(self.layer):
            if self.layer_constant is not None and not callable(self.layer_constant):
                raise TypeError(
                    f"Network.layer_constant must be callable or None, got {self.layer_constant!r}"
                )
            kind = BlockKind(self.layer, layer_constant=self.layer_constant,
                             layer_index=self.layer_index)
            object.__setattr__(self, "_kinds", (kind,))
        else:
            raise TypeError(f"Network.layer must be callable, got {self.layer!r}")
        # TeaCache's modulated input reads the first layer's parameters; a binding kind's layers
        # are LayerInputs by then, so it gets their parameters (wrapped once, even when replaced).
        modulated = getattr(self.modulated_input, "jaxcache_unbound", self.modulated_input)
        if modulated is not None and any(k.binds for k in self._kinds):
            modulated = _unbinding(modulated)
        object.__setattr__(self, "modulated_input", modulated)
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

    @property
    def kinds(self) -> tuple[BlockKind, ...]:
        """The network's kinds of block (one for a uniform stack)."""
        return self._kinds

    def check_layers(self, layers: PyTree) -> None:
        """Raises a ValueError unless ``layers`` fits the network's kinds of block.

        A network of one kind takes one stack (or a :class:`~jaxcache.Segments` of kind 0);
        a network of several kinds takes a :class:`~jaxcache.Segments` whose kind indices
        are its own.
        """
        count = len(self.kinds)
        if isinstance(layers, Segments):
            bad = [k for k in layers.kinds if not 0 <= k < count]
            if bad:
                raise ValueError(
                    f"params.layers has pieces of block kinds {bad}, but the network has "
                    f"{count} kind(s), numbered 0..{count - 1}"
                )
        elif count > 1:
            raise ValueError(
                f"the network has {count} kinds of block, so params.layers must be a "
                "jaxcache.Segments (one stacked piece per run of one kind, with its kind "
                f"index), got {type(layers).__name__}"
            )

    def bind_layers(self, layers: PyTree, constant: PyTree) -> PyTree:
        """``params.layers`` with each layer's constant and index bound (see
        :func:`jaxcache.stack.bind_layers`); itself when no kind takes either."""
        return bind_layers(self.kinds, layers, constant)

    def __call__(self, params: NetworkParams, x: jax.Array, t: jax.Array, cond: PyTree):
        """The plain, uncached forward pass (for checks and training)."""
        self.check_layers(params.layers)
        constant = self.condition(params.condition, cond)
        h, ctx = self.embed(params.embed, x, t, constant)
        layers = self.bind_layers(params.layers, constant)
        h = run_layers(self.kinds, layers, h, ctx, unroll=self.layer_unroll)
        return self.final(params.final, h, ctx)


def _unbinding(modulated_input: Callable) -> Callable:
    """``modulated_input`` reading a layer's parameters out of its :class:`LayerInputs`."""

    def read(layer_params, h, ctx):
        if isinstance(layer_params, LayerInputs):
            layer_params = layer_params.params
        return modulated_input(layer_params, h, ctx)

    read.jaxcache_unbound = modulated_input
    return read


#: What ``"auto"`` means on each backend (BENCHMARKS.md has the measurements behind it).
_GPU_UNROLL: int | bool = True
_GPU_OPTIONS: dict[str, bool | int | float | str] = {"xla_gpu_enable_triton_gemm": False}


def default_layer_unroll() -> int | bool:
    """``Network.layer_unroll="auto"`` on the default backend.

    On a GPU, one array per layer (``True``): a scanned stack copies every layer's weights out
    of the stack at each step. Elsewhere the scanned stack (``1``): one layer in the program,
    compile time independent of the depth.
    """
    return _GPU_UNROLL if jax.default_backend() == "gpu" else 1


def default_compiler_options() -> dict[str, bool | int | float | str]:
    """``Network.compiler_options="auto"`` on the default backend.

    On a GPU, cuBLAS GEMMs instead of XLA's Triton GEMMs (faster to compile, and as fast or
    faster to run on the models measured); elsewhere none.
    """
    return dict(_GPU_OPTIONS) if jax.default_backend() == "gpu" else {}


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

    Run it once after gluing a model (:func:`jaxcache.from_nnx`, :func:`jaxcache.from_linen`, a
    hand-built :class:`Network`). It checks that the network's pieces compose to the model's
    own forward: it catches a missed piece of inline code (a position embedding, an
    unpatchify), a wrong block order, a wrong layer function or kind conversion. It does
    **not** check the time convention: both sides receive the same converted time, so a wrong
    :class:`TimeConvention` passes here and samples wrongly. Check that against the model's own
    sampling loop (where it multiplies ``t``; docs/bring-your-own-model.md, "Which time the
    model reads").

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
        JAX cannot trace. An NNX model given as ``forward`` is split into its graph and state
        and rebuilt inside the program. A function closing over an NNX model whose call runs
        NNX transforms (``nnx.scan`` over ``nnx.vmap``-stacked blocks, as the Wan ports do)
        cannot be compiled: those transforms refuse, inside ``jax.jit``, variables created
        outside it ("Cannot extract graph node from different trace level"). Such a forward
        runs as written, outside any transform.

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
    run_forward = _compiled_forward(forward) if jit_forward else forward
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


def _compiled_forward(forward: Callable) -> Callable:
    """``forward`` compiled for :func:`check_parity`, or as written where NNX state forbids it."""
    nnx = sys.modules.get("flax.nnx")  # only a program that built an NNX model has loaded it
    if nnx is not None and isinstance(forward, nnx.Module):
        # The state goes in as an argument and the module is rebuilt inside the program, so the
        # model's own NNX transforms see variables of their trace (and its weights are not
        # baked into the program as constants).
        graphdef, state = nnx.split(forward)
        apply = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
        return functools.partial(apply, state)
    compiled = jax.jit(forward)

    def run(*args):
        try:
            return compiled(*args)
        except Exception as error:
            # A closure over an NNX model whose call runs nnx.scan / nnx.vmap: inside jax.jit
            # those transforms refuse the closed-over variables, which belong to the trace
            # outside. No transform can take them, so the forward runs as written.
            if "different trace level" not in str(error):
                raise
            return forward(*args)

    return run


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

