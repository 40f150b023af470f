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
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcache._checks import check_int
from jaxcache.stack import BlockKind, Segments, as_kinds, run_layers, stack_length

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
    * :meth:`scaled`: the model reads ``factor * t`` without rounding: its own sampling loop
      passes ``1000 t`` to an embedding that does not scale it (SD3 as diffusers runs it).
      FLUX's JAX ports take ``t`` in ``[0, 1]`` and multiply by 1000 inside their timestep
      embedding: they are ``continuous``. To find out, look where the model multiplies ``t``.

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


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One list of blocks of a model as written, for a model with several kinds of block.

    FLUX is 19 double-stream blocks then 38 single-stream blocks; its port keeps them in two
    lists. Give :func:`from_nnx` / :func:`jaxcache.from_linen` one ``Blocks`` per list, in
    the order ``__call__`` runs them::

        blocks=[jaxcache.Blocks("double_blocks"),
                jaxcache.Blocks("single_blocks", layer=single, enter=join, leave=split)]

    Layer indices then run across the lists (double blocks 0-18, single blocks 19-56), and a
    cache plan may span the boundary.

    Attributes:
      path: where the blocks are. NNX: an attribute or dotted path (``"double_blocks"``,
        ``"transformer.blocks"``) holding a list, an ``nnx.Sequential`` or one stacked
        (``nnx.vmap``) module; or a list of such paths, one block each. Linen: the blocks'
        name prefix (``"DoubleBlock"`` matches ``DoubleBlock_0, DoubleBlock_1, ...``), the
        name of an ``nn.scan`` stack, or a list of names.
      layer: ``layer(block, state, ctx) -> state``: how ``__call__`` calls one block of this
        list; default the ``layer=`` given to the adapter, else ``block(state, ctx)``.
      enter: ``enter(h, ctx) -> state``: the hidden state as the previous list left it, in
        this list's form (FLUX's single blocks: the ``(image, text)`` pair concatenated into
        one token sequence). None: the same form.
      leave: ``leave(state, h, ctx) -> h``: back to the first list's form (split the tokens
        again; ``h`` is the value the list entered with, for its shapes). Required with
        ``enter``.
      name: a label for messages (default: the path).
    """

    path: str | tuple[str, ...]
    layer: Callable[..., PyTree] | None = None
    enter: Callable[[PyTree, PyTree], PyTree] | None = None
    leave: Callable[[PyTree, PyTree, PyTree], PyTree] | None = None
    name: str = ""

    def __post_init__(self):
        path = self.path
        if isinstance(path, (list, tuple)):
            if not path or not all(isinstance(p, str) for p in path):
                raise ValueError(f"Blocks.path must be a name or a list of names, got {path!r}")
            object.__setattr__(self, "path", tuple(path))
        elif not isinstance(path, str) or not path:
            raise ValueError(f"Blocks.path must be a name or a list of names, got {path!r}")
        BlockKind(_default_layer, self.enter, self.leave, self.label)  # checks enter/leave

    @property
    def label(self) -> str:
        """The name in messages."""
        if self.name:
            return self.name
        return self.path if isinstance(self.path, str) else f"{self.path[0]}..."


def as_block_lists(blocks: Any, where: str) -> list[Blocks] | None:
    """``blocks`` as a list of :class:`Blocks` when it names several kinds, else None."""
    if isinstance(blocks, Blocks):
        return [blocks]
    if isinstance(blocks, (list, tuple)) and blocks and any(isinstance(b, Blocks) for b in blocks):
        if not all(isinstance(b, Blocks) for b in blocks):
            raise TypeError(
                f"{where}: blocks= mixes jaxcache.Blocks with plain names; give every list of "
                "blocks as a Blocks (e.g. [Blocks('double_blocks'), Blocks('single_blocks', "
                "...)])"
            )
        return list(blocks)
    return None


def _layer_field(kinds: tuple[BlockKind, ...]):
    """What ``Network.layer`` takes: a plain function for one kind that needs no conversion."""
    if len(kinds) == 1 and kinds[0].enter is None:
        return kinds[0].layer
    return kinds


def hashable_key(key: tuple) -> tuple | None:
    """``key`` if it can be hashed (to share one Network between equal models), else None.

    A model may keep unhashable settings (a list of RoPE axes, a config object): it then gets
    a Network of its own per call, and the sampler compiles once per Network.
    """
    try:
        hash(key)
    except TypeError:
        return None
    return key


class NetworkCache:
    """A small memo of Networks by model structure (oldest dropped past ``size``)."""

    def __init__(self, size: int = 128):
        self._entries: dict[tuple, Network] = {}
        self._size = size

    def get(self, key: tuple | None, build: Callable[[], Network]) -> Network:
        """The Network stored under ``key``, built and stored if missing (``None``: not kept)."""
        if key is None:
            return build()
        network = self._entries.get(key)
        if network is None:
            network = build()
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = network
        return network


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
        ``params.layers`` along its leading axis. For a network of several kinds of block
        (FLUX: double-stream then single-stream blocks), a tuple of
        :class:`~jaxcache.BlockKind`, one per kind, each with its own layer function and the
        conversion of ``h`` into and out of its blocks' form; ``params.layers`` is then a
        :class:`~jaxcache.Segments` saying which layers are of which kind. After construction,
        :attr:`kinds` holds the kinds either way.
      final: ``final(params.final, h, ctx) -> prediction`` with the shape of ``x``.
      dual_stream: whether ``h`` is an ``(image, text)`` pair (cached in slot streams 1 and 2).
      modulated_input: optional ``modulated_input(layer_params, h, ctx) -> array``: a layer's
        input after its timestep modulation (adaLN shift and scale of the attention branch, on
        the image stream). TeaCache reads it from the first layer (``h`` is the embedding's
        output, ``layer_params`` the first layer's, of the first kind); networks without it
        cannot use TeaCache.
      time: the :class:`TimeConvention` the model reads; None: continuous ``t`` in ``[0, 1]``,
        or, for an ``embed`` taken from another Network, that network's convention. Set it once
        here (or in :func:`from_nnx` / :func:`jaxcache.from_linen`); the sampler checks the
        solver's times against it.

      layer_unroll: how many layers one iteration of the layer scan runs (``lax.scan``'s
        ``unroll``). ``"auto"`` (the default): the fastest measured setting for the default
        backend (:func:`default_layer_unroll`: ``True`` on a GPU, ``1`` elsewhere), resolved
        when the Network is built. ``True``: no scan at all; :meth:`~jaxcache.CachePlan.split` then keeps
        each layer's parameters in arrays of their own (a :class:`~jaxcache.stack.LayerList`),
        so the program never slices a stacked weight: on a GPU a scan copies every layer's
        weights out of the stack each step (a third of the time of a FLUX-size block), and each
        iteration reads its predicate back to the host. Compile time then grows with the depth.
        ``1``: one layer in the program whatever the depth. Change it with
        ``dataclasses.replace(network, layer_unroll=True)``.
      compiler_options: XLA options by name for this network's sampling programs only (not
        process-wide like ``XLA_FLAGS``), e.g. ``{"xla_gpu_enable_triton_gemm": False}``:
        cuBLAS instead of XLA's Triton GEMMs, which on an H200 compiled the FLUX-size model with
        ``layer_unroll=True`` in 7.3 s instead of 11.5 s and ran 1.5% faster (BENCHMARKS.md).
        Stored as a sorted tuple of ``(name, value)`` pairs. ``"auto"`` (the default): the
        options measured fastest for the default backend (:func:`default_compiler_options`:
        cuBLAS GEMMs on a GPU, none elsewhere); ``{}``: none.

    A Network compares by identity and the sampler compiles once per Network object: build it
    once and reuse it (:func:`from_nnx` and :func:`jaxcache.from_linen` return the same object
    for models of the same structure).
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
            object.__setattr__(self, "layer", kinds)
            object.__setattr__(self, "_kinds", kinds)
        elif callable(self.layer):
            object.__setattr__(self, "_kinds", (BlockKind(self.layer),))
        else:
            raise TypeError(f"Network.layer must be callable, got {self.layer!r}")
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

    def __call__(self, params: NetworkParams, x: jax.Array, t: jax.Array, cond: PyTree):
        """The plain, uncached forward pass (for checks and training)."""
        self.check_layers(params.layers)
        constant = self.condition(params.condition, cond)
        h, ctx = self.embed(params.embed, x, t, constant)
        h = run_layers(self.kinds, params.layers, h, ctx, unroll=self.layer_unroll)
        return self.final(params.final, h, ctx)


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

    Run it once after gluing a model (:func:`from_nnx`, :func:`jaxcache.from_linen`, a
    hand-built :class:`Network`). It checks that the network's pieces compose to the model's
    own forward: it catches a missed piece of inline code (a position embedding, an
    unpatchify), a wrong block order, a wrong layer function or kind conversion. It does
    **not** check the time convention: both sides receive the same converted time, so a wrong
    :class:`TimeConvention` passes here and samples wrongly. Check that against the model's own
    sampling loop (where it multiplies ``t``; docs/bring-your-own-model.md, "Which time the model reads").

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
            "(the model's own loop passes 1000 t). Look where the model multiplies t: FLUX's "
            "JAX ports scale t in [0, 1] inside their embedding, so they are continuous(). A "
            "wrong choice runs without error and gives wrong images"
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


_PROTOCOL_CACHE = NetworkCache()


def _network_for(
    graphdefs: tuple[nnx.GraphDef, ...],
    block_defs: tuple[nnx.GraphDef, ...],
    block_types: tuple[type, ...],
    dual_stream: bool,
    has_modulated_input: bool,
    time: TimeConvention | None = None,
) -> "Network":
    # One Network per model structure: the sampler compiles once per Network object, so models
    # of the same structure (a reloaded checkpoint, new weights) reuse the compiled program.
    def build():
        condition, embed, final = (_apply(g) for g in graphdefs)
        kinds = tuple(
            BlockKind(_apply(g), getattr(cls, "enter", None), getattr(cls, "leave", None),
                      cls.__name__)
            for g, cls in zip(block_defs, block_types)
        )
        modulated = _apply(block_defs[0], "modulated_input") if has_modulated_input else None
        return Network(
            condition, embed, _layer_field(kinds), final,
            dual_stream=dual_stream, modulated_input=modulated, time=time,
        )

    key = hashable_key((graphdefs, block_defs, block_types, dual_stream, has_modulated_input,
                        time))
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
    the blocks are a list (``nnx.List``, a list attribute, an ``nnx.Sequential``, or attributes
    named in ``blocks``) or one ``nnx.vmap`` stack, and the rest lives inline in ``__call__``.
    Paths may be dotted (``"transformer.double_blocks"``; ``"blocks.layers"`` reaches the list
    inside an ``nnx.Sequential``, which ``"blocks"`` alone also does). A model with several
    lists of blocks of different kinds (FLUX: ``double_blocks`` then ``single_blocks``) gives
    one :class:`Blocks` per list, each with its own ``layer`` and, where its blocks work on
    another form of ``h``, ``enter`` / ``leave``; layer indices then run across the lists. Small functions say
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
    )
    layers = block_states[0] if len(stacks) == 1 else Segments(block_states, range(len(stacks)))
    condition, embed, final = states
    return network, NetworkParams(condition, embed, layers, final)


# ----------------------------------------------------------------- an NNX model as written
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
    fns = tuple(given[k] for k in ("embed", "final", "condition", "layer", "modulated_input"))
    key = hashable_key((graphdef, block_defs, signature, fns, tuple(groups), time, dual_stream))

    def build():
        placeholder = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                   block_state)
        return _nnx_parts_network(graphdef, placeholder, block_defs, groups, *fns, time,
                                  dual_stream)

    network = _PARTS_CACHE.get(key, build)
    stacks = [layers for _, _, layers in found]
    layers = stacks[0] if len(stacks) == 1 else Segments(stacks, range(len(stacks)))
    return network, NetworkParams(rest, rest, layers, rest)


def _nnx_parts_network(graphdef, placeholder, block_defs, groups, embed, final, condition,
                       layer, modulated_input, time, dual_stream) -> Network:
    condition = condition or _identity_condition

    def model_of(rest):
        # The blocks' slots hold shapes only: the pieces around the blocks never read them.
        return nnx.merge(graphdef, placeholder, rest)

    def kind(block_def, group):
        call = group.layer or layer or _default_layer

        def run(layer_state, h, ctx):
            return call(nnx.merge(block_def, layer_state), h, ctx)

        return BlockKind(run, group.enter, group.leave, group.label)

    kinds = tuple(kind(d, g) for d, g in zip(block_defs, groups))
    modulated = None
    if modulated_input is not None:

        def modulated(layer_state, h, ctx):
            return modulated_input(nnx.merge(block_defs[0], layer_state), h, ctx)

    return Network(
        condition=lambda rest, cond: condition(model_of(rest), cond),
        embed=lambda rest, x, t, constant: embed(model_of(rest), x, t, constant),
        layer=_layer_field(kinds),
        final=lambda rest, h, ctx: final(model_of(rest), h, ctx),
        dual_stream=dual_stream,
        modulated_input=modulated,
        time=time,
    )
