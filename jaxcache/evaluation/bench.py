"""Cached sampling against what a user would otherwise run, timed in one run.

Usage::

    python -m jaxcache.evaluation.bench       # small DiT on whatever device JAX sees
    python -m jaxcache.evaluation.bench --model mmdit --size flux --steps 50 --cached-layers 25 \\
        --interval 3 --batch 1 --dtype bfloat16 --json
    python -m jaxcache.evaluation.bench --policy first-block --threshold 0.1 --reuse residual \\
        --host-loop
    python -m jaxcache.evaluation.bench --model wan --size tiny --steps 4 --batch 1 --guidance 5 \\
        --policy none --cfg-cache 2 --host-loop --constants-per-step

Programs timed, on the same model, noise and condition:

* ``uncached``: :func:`jaxcache.sample` with no policy (every layer, every step);
* ``hand loop``: a jitted, unrolled Python loop over the model's forward and the solver step,
  what a user already has (``--no-hand-loop`` skips it: it compiles one copy per step);
* ``cached``: :func:`jaxcache.sample` with the policy and reuse mode;
* ``host loop`` (``--host-loop``): the same rule decided on the host, as the anchors decide it:
  a Python loop of jitted pieces that reads each step's decision back with ``bool()``.

Every program is compiled first (compile time reported on its own), warmed up, then timed over
``--repeats`` interleaved runs and the medians compared. ``ideal_speedup`` is the compute ratio
from the matrix FLOPs of each piece and the layer evaluations the cached run made;
``efficiency`` is measured speedup over ideal speedup.

The JAX peer's caches, on the same footing:

* ``--model wan`` (sizes ``tiny``, ``small``, ``wan-1.3b``): the Wan 2.1-style text-to-video
  model on video latents ``[batch, frames, height, width, channels]`` of its config (``wan-1.3b``:
  21 x 60 x 104 latents, Wan 2.1's 81 frames at 480p, 32760 tokens; ``--frames`` sets another
  length) and float text states ``[batch, text_len, text_dim]`` (zero text for the negative
  prompt). ``--solver unipc --shift 3`` samples as the Wan pipelines do at 480p.
* ``--cfg-cache K`` (with ``--guidance`` above 1): :class:`jaxcache.CFGCache`, both guidance
  branches every ``K``-th evaluation after ``--cfg-warmup`` full ones, the conditional branch
  alone elsewhere; on top of any policy but SenCache, or alone with ``--policy none`` (no layer
  cache). ``uncached`` is then full guidance at every step; ``ideal_speedup`` counts a cache
  step's half batch (:attr:`jaxcache.SampleResult.flops`). With ``--host-loop``: the peer's way,
  a Python loop over separately jitted step functions (a full step storing the gap, a cache
  step estimating the unconditional branch with ``CFGCache.estimate``), both schedules known on
  the host, no read-back.
* ``--policy sencache``: :class:`jaxcache.SenCachePolicy`, which skips the whole network
  (``--threshold`` is its tolerance; ``--refresh-target`` searches it). With ``--host-loop``: its
  decision read back with ``bool()`` every step and the network run only when a row needs it.
* ``--constants-per-step`` (a network whose layers have per-layer constants: Wan's text keys and
  values): also times the same cached program on the network glued as a port without
  ``layer_constant`` is, every layer call projecting the text again
  (:func:`~jaxcache.evaluation.loops.constants_per_step_network`): ``per_step_constants_s``
  beside ``cached_s``. The loops other than ``sample`` live in :mod:`jaxcache.evaluation.loops`.

A known schedule (the interval, MagCache, planned) in the host loop is read off the host, as the
anchors and the peer do: no decision runs on the device and none is read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxcache as jc
from jaxcache.evaluation import loops, named
from jaxcache.evaluation.named import (
    PLANNED,
    named_plan,
    named_policy,
    staggered_layer_mask,
)
from jaxcache.models import ARCHS, SIZES, WAN_SIZES, WanConfig, create_model, get_config
from jaxcache.policies.sencache import is_whole_network
from jaxcache.tuning import threshold_for

__all__ = [
    "MODELS",
    "POLICIES",
    "REUSE_MODES",
    "BenchSettings",
    "main",
    "run_benchmark",
]

_SOLVERS = {"euler": jc.FlowMatchEuler, "ddim": jc.DDIM, "unipc": jc.UniPC}
_SHIFTED = ("euler", "unipc")  # the flow solvers, which take a shift
REUSE_MODES = ("output", "residual", "taylor", "hermite", "fitted")
#: The bench's policies: the named ones (:data:`jaxcache.evaluation.named.POLICIES`) and
#: ``"none"``, no layer cache (uncached sampling, with CFG-Cache where ``cfg_cache`` is set).
POLICIES = (*named.POLICIES, "none")
#: The architectures the bench builds: the reference image models and the Wan video model.
MODELS = (*ARCHS, "wan")
_SIZES = tuple(dict.fromkeys((*SIZES, *WAN_SIZES)))  # every named size, for the command line
_DEFAULT_THRESHOLDS = {"first-block": 0.1, "teacache": 0.3, "dbcache": 0.1, "sencache": 0.05}
_SIGNAL = ("first-block", "teacache", "dbcache", "sencache")  # searched by threshold_for


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """One benchmark run: the model, the sampling, the cache setting and what else to time.

    The command line's options, one field each (``python -m jaxcache.evaluation.bench --help``
    says what each means); :func:`run_benchmark` takes one. ``dataclasses.replace`` derives a
    variant (another policy, another reuse mode) from a shared base.

    Attributes:
      model: architecture (:data:`jaxcache.models.ARCHS`).
      size: named size.
      steps: solver steps.
      interval: refresh interval of ``policy="interval"``.
      cached_layers: interval: the first layers cached (None: half the depth).
      batch: samples per batch.
      dtype: parameter and activation dtype (``"float32"``, ``"bfloat16"``).
      solver: ``"euler"`` (FlowMatchEuler), ``"ddim"`` or ``"unipc"`` (UniPC, the Wan
        pipelines' solver).
      guidance: classifier-free guidance scale (None: off).
      decide: interval only: ``"static"`` (no decision in the loop) or ``"device"``.
      repeats: timed runs of each program.
      seed: seed of the noise and the conditions (and the model's weights when built here).
      policy: a :data:`POLICIES` name (``"none"``: no layer cache, for CFG-Cache alone).
      threshold: signal-driven policies' threshold, SenCache's tolerance (None: the policy's
        bench default).
      reuse: a :data:`REUSE_MODES` name (None: output for the interval, the layer mask and
        SenCache, whose output is the network's prediction; residual otherwise).
      order: forecast order of taylor / hermite / fitted.
      first: dbcache's ``Fn``.
      last: dbcache's ``Bn``.
      warmup: dbcache's warm-up steps.
      hand_loop: also time a jitted, unrolled hand-written loop.
      host_loop: also time the same rule decided on the host.
      refresh_target: signal-driven policies: search the threshold that refreshes this
        fraction of the steps (replaces ``threshold``).
      forecast_dtype: dtype of a forecast's stored differences (None: the activations').
      overrides: model config fields changed (``{"depth": 19}``); a model passed to
        :func:`run_benchmark` as ``built`` must have been built with them.
      layer_unroll: ``Network.layer_unroll`` for every program (``True``: one array per layer;
        ``1`` or ``False``: the scanned stack; ``"auto"`` or None: the backend's default).
      compiler_options: ``Network.compiler_options`` for every program (XLA options by name;
        ``"auto"`` or None: the backend's default).
      shift: the flow solvers' (euler, unipc) timestep shift (None: the solver's default, 1).
      cfg_cache: :class:`~jaxcache.CFGCache`'s full-step interval (None: off); needs
        ``guidance`` above 1. Composes with every policy but SenCache.
      cfg_warmup: CFG-Cache's evaluations run in full from the start.
      constants_per_step: also time the cached program on the network glued without its
        per-layer constants (:func:`~jaxcache.evaluation.loops.constants_per_step_network`:
        every layer call computes them, as a port without the hook does); for networks that
        have them (Wan).
    """

    model: str = "dit"
    size: str = "small"
    steps: int = 30
    interval: int = 3
    cached_layers: int | None = None
    batch: int = 4
    dtype: str = "float32"
    solver: str = "euler"
    guidance: float | None = None
    decide: str = "static"
    repeats: int = 5
    seed: int = 0
    policy: str = "interval"
    threshold: float | None = None
    reuse: str | None = None
    order: int = 1
    first: int = 1
    last: int = 0
    warmup: int = 2
    hand_loop: bool = True
    host_loop: bool = False
    refresh_target: float | None = None
    forecast_dtype: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    layer_unroll: bool | int | str | None = None
    compiler_options: dict[str, Any] | str | None = None
    shift: float | None = None
    cfg_cache: int | None = None
    cfg_warmup: int = 1
    constants_per_step: bool = False

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        get_config(self.model, self.size)  # a size the model has (ValueError naming them)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.reuse is not None and self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {list(REUSE_MODES)}, got {self.reuse!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {self.solver!r}")
        if self.decide not in ("static", "device"):
            raise ValueError(f"decide must be 'static' or 'device', got {self.decide!r}")
        if self.shift is not None and self.solver not in _SHIFTED:
            raise ValueError(f"shift applies to the flow solvers {list(_SHIFTED)}, not "
                             f"{self.solver!r}")
        self._check_peer()

    def _check_peer(self):
        """The JAX peer's options: CFG-Cache, SenCache, the host loops, per-step constants."""
        policy = self.policy
        if self.cfg_cache is not None:
            if isinstance(self.cfg_cache, bool) or not isinstance(self.cfg_cache, int) or (
                    self.cfg_cache < 1):
                raise ValueError(f"cfg_cache must be an int >= 1 (CFG-Cache's full-step "
                                 f"interval), got {self.cfg_cache!r}")
            if self.guidance is None or not self.guidance > 1:
                raise ValueError(
                    "cfg_cache (CFG-Cache) estimates the unconditional branch of classifier-free "
                    f"guidance, so it needs guidance above 1 (--guidance 5), got guidance="
                    f"{self.guidance!r}"
                )
            if policy == "sencache":
                raise ValueError(
                    "sencache skips the whole network for both guidance branches and CFG-Cache "
                    "runs the conditional branch alone on its cache steps; the sampler does not "
                    "combine them: drop cfg_cache or choose another policy"
                )
            if self.refresh_target is not None and policy in _SIGNAL:
                raise ValueError(
                    "refresh_target with cfg_cache: jaxcache.tuning.threshold_for searches "
                    "without CFG-Cache (another trajectory), so give the threshold instead"
                )
            if self.host_loop and policy not in ("none", "interval", "magcache", "planned"):
                raise ValueError(
                    f"host_loop with cfg_cache runs schedules known on the host (CFG-Cache's "
                    f"and the layer cache's): policy none, interval, magcache or planned, not "
                    f"{policy!r}"
                )
            if self.host_loop and policy == "interval" and self.decide != "static":
                raise ValueError("host_loop with cfg_cache reads the interval's schedule on the "
                                 "host: decide='static'")
        if isinstance(self.cfg_warmup, bool) or not isinstance(self.cfg_warmup, int) or (
                self.cfg_warmup < 1):
            raise ValueError(f"cfg_warmup must be an int >= 1 (step 0 runs in full), got "
                             f"{self.cfg_warmup!r}")
        if policy == "none" and self.host_loop and self.cfg_cache is None:
            raise ValueError("host_loop with policy none times CFG-Cache's host loop: set "
                             "cfg_cache (with nothing cached nothing is decided)")
        if policy == "none" and self.refresh_target is not None:
            raise ValueError("refresh_target applies to the signal-driven and planned policies, "
                             "not to policy none")
        if policy == "layer-mask" and self.host_loop:
            raise ValueError("host_loop: a per-layer plan (layer-mask) has no host loop here")


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be an integer, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"--{name} must be positive, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    class Help(argparse.ArgumentDefaultsHelpFormatter):
        """Every default shown, but None's (those options say what unset means) and flags'."""

        def _get_help_string(self, action):
            if action.default is None or isinstance(action.default, bool):
                return action.help
            return super()._get_help_string(action)

    p = argparse.ArgumentParser(
        prog="python -m jaxcache.evaluation.bench",
        description="Time cached sampling against uncached, a hand-written loop and (optionally) "
        "the same rule decided on the host, on a reference diffusion transformer (dit, mmdit) "
        "or the Wan-style video model (wan: video latents and float text states; sizes tiny, "
        "small, wan-1.3b: Wan 2.1's 1.3B at 81 frames of 480p, 32760 tokens). The JAX peer's "
        "caches: --cfg-cache (CFG-Cache, with --guidance above 1; alone with --policy none), "
        "--policy sencache, and --constants-per-step (Wan's text keys and values recomputed at "
        "every layer call).",
        formatter_class=Help,
    )
    p.add_argument("--model", choices=MODELS, default="dit", help="architecture")
    p.add_argument("--size", choices=_SIZES, default="small", help="named size")
    p.add_argument("--frames", type=_positive("frames"), default=None,
                   help="wan: latent frames of the video (default: the size's; 21 for "
                   "wan-1.3b, 81 frames)")
    p.add_argument("--depth", type=_positive("depth"), default=None,
                   help="override the size's number of blocks (default: the size's)")
    p.add_argument("--single-depth", type=int, default=None,
                   help="mmdit: single-stream blocks after the double-stream ones (default: the "
                   "size's; 38 for flux, 0 elsewhere)")
    p.add_argument("--attn", choices=["auto", "xla", "cudnn"], default=None,
                   help="attention implementation (cudnn: GPU, bfloat16; default: the model's)")
    p.add_argument("--steps", type=_positive("steps"), default=30, help="denoising steps")
    p.add_argument("--policy", choices=POLICIES, default="interval",
                   help="refresh policy (magcache, planned: fitted to the bench's model by one "
                   "full-compute calibration run; layer-mask: a per-(step, layer) plan; "
                   "sencache: SenCache, skips the whole network; none: no layer cache, for "
                   "--cfg-cache alone)")
    p.add_argument("--interval", type=_positive("interval"), default=3,
                   help="refresh interval of --policy interval (and of planned: one refresh in "
                   "--interval steps; layer-mask: each layer's, staggered)")
    p.add_argument("--threshold", type=float, default=None,
                   help="threshold of a signal-driven policy, sencache's tolerance (default: "
                   "first-block 0.1, teacache 0.3, dbcache 0.1, sencache 0.05)")
    p.add_argument("--reuse", choices=REUSE_MODES, default=None,
                   help="what a skipped step uses (default: output for interval, layer-mask "
                   "and sencache (its last prediction), residual for the others)")
    p.add_argument("--order", type=int, default=1,
                   help="forecast order of taylor / hermite / fitted (fitted: gains of one)")
    p.add_argument("--forecast-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of a forecast's stored differences (default: the activations')")
    p.add_argument(
        "--cached-layers", type=int, default=None,
        help="interval: how many of the first layers are cached (default: half the depth)",
    )
    p.add_argument("--first", type=int, default=1,
                   help="dbcache: Fn, the layers that always run first")
    p.add_argument("--last", type=int, default=0,
                   help="dbcache: Bn, the layers that always run last")
    p.add_argument("--warmup", type=int, default=2,
                   help="dbcache: warm-up steps that always compute")
    p.add_argument("--batch", type=_positive("batch"), default=4, help="samples per batch")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameter and activation dtype")
    p.add_argument("--solver", choices=sorted(_SOLVERS), default="euler",
                   help="euler: FlowMatchEuler; ddim: DDIM; unipc: UniPC (the Wan pipelines')")
    p.add_argument("--shift", type=float, default=None,
                   help="euler, unipc: the flow shift (default 1; Wan 2.1 at 480p: 3)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (off by default)")
    p.add_argument("--cfg-cache", type=_positive("cfg-cache"), default=None,
                   help="CFG-Cache (FasterCache): both guidance branches every N-th evaluation "
                   "after the warm-up, the conditional one alone elsewhere (needs --guidance "
                   "above 1; not with sencache). Ideal speedup counts a cache step's half batch; "
                   "with --host-loop, the peer's Python loop over a jitted full step and a "
                   "jitted cache step (default: off)")
    p.add_argument("--cfg-warmup", type=_positive("cfg-warmup"), default=1,
                   help="CFG-Cache: evaluations run in full from the start (FasterCache: about "
                   "a third)")
    p.add_argument("--constants-per-step", action="store_true",
                   help="also time the cached program with each layer's constants (wan: the "
                   "text keys and values) recomputed at every layer call, as a port without "
                   "the layer_constant hook runs; networks without per-layer constants refuse")
    p.add_argument(
        "--decide", choices=["static", "device"], default="static",
        help="interval only. static: the schedule compiles to a loop with no decision in it; "
        "device: decide every step on the device, as signal-driven policies must",
    )
    p.add_argument("--layer-stack", choices=["auto", "scan", "unroll"], default="auto",
                   help="how the layer stack compiles (Network.layer_unroll): auto: the default "
                   "for the backend (unroll on a GPU, scan elsewhere); scan: one layer in the "
                   "program, a lax.scan over stacked weights; unroll: straight-line code with "
                   "one weight array per layer (no per-step weight copies on a GPU, compile "
                   "time grows with the depth)")
    p.add_argument("--unroll-layers", action="store_true",
                   help="the same as --layer-stack unroll")
    p.add_argument("--compiler-options", type=_compiler_options, default=None,
                   help='XLA options for every program of the run (Network.compiler_options), '
                   'as JSON: \'{"xla_gpu_enable_triton_gemm": false}\' (cuBLAS GEMMs on a GPU; '
                   "default: the network's, 'auto')")
    p.add_argument("--no-hand-loop", action="store_true",
                   help="skip the hand-written loop (it compiles one copy of the model per step)")
    p.add_argument("--host-loop", action="store_true",
                   help="also time the same rule decided on the host (a read-back per step; a "
                   "known schedule read off the host; sencache: its decision read back, the "
                   "network run when a row needs it; with --cfg-cache: a jitted full step and a "
                   "jitted cache step in a Python loop)")
    p.add_argument("--refresh-target", type=float, default=None,
                   help="signal-driven policies (sencache: its tolerance) and magcache: search "
                   "the threshold that "
                   "refreshes this fraction of the steps (replaces --threshold); planned: "
                   "refresh this fraction of the steps (default: off)")
    p.add_argument("--repeats", type=_positive("repeats"), default=5, help="timed runs each")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the conditions")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command line changes."""
    overrides: dict[str, Any] = {}
    if args.depth is not None:
        overrides["depth"] = args.depth
    if args.single_depth is not None:
        overrides["single_depth"] = args.single_depth
    if args.attn is not None:
        overrides["attn_implementation"] = args.attn
    if args.frames is not None:
        overrides["frames"] = args.frames
    return overrides


def _layer_unroll(args: argparse.Namespace) -> bool | int | None:
    """``Network.layer_unroll`` for ``--layer-stack`` / ``--unroll-layers`` (None: auto)."""
    if args.unroll_layers or args.layer_stack == "unroll":
        return True
    return 1 if args.layer_stack == "scan" else None


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _setting(settings: BenchSettings, network, depth: int, evaluations: int):
    """The plan, policy and reuse mode of a benchmark setting (and the reuse and threshold names).

    ``fitted`` is a :class:`~jaxcache.FittedForecast` with gains of one for ``evaluations``
    model evaluations: the fitted forecast's program, whose cost does not depend on the gains.
    """
    policy = settings.policy
    if policy != "interval" and settings.decide != "static":
        raise ValueError("--decide applies to --policy interval only")
    if policy == "none":  # no layer cache: the sampler runs every layer (CFG-Cache's rows)
        return jc.CachePlan(network, depth), None, None, None, None
    threshold = settings.threshold
    if threshold is None:
        threshold = _DEFAULT_THRESHOLDS.get(policy)
    cached_layers = settings.cached_layers
    if policy == "interval" and cached_layers is None:
        cached_layers = depth // 2
    if policy == "interval" and not 1 <= cached_layers <= depth:
        raise ValueError(f"--cached-layers must be in [1, {depth}], got {cached_layers}")
    plan = named_plan(policy, network, depth, cached_layers=cached_layers,
                      first=settings.first, last=settings.last)
    rule = None if policy in PLANNED else named_policy(  # planned: fitted after the split
        policy, interval=settings.interval, threshold=0.0 if threshold is None else threshold,
        warmup=settings.warmup, on_device=settings.decide == "device")
    reuse = settings.reuse or ("output" if policy in ("interval", "layer-mask", "sencache")
                               else "residual")
    order = settings.order
    dtype = None if settings.forecast_dtype is None else jnp.dtype(settings.forecast_dtype)
    mode = {
        "output": lambda: jc.OutputReuse(),
        "residual": lambda: jc.ResidualReuse(),
        "taylor": lambda: jc.TaylorForecast(order, dtype=dtype),
        "hermite": lambda: jc.HermiteForecast(order, dtype=dtype),
        "fitted": lambda: jc.FittedForecast.taylor(evaluations, order, dtype=dtype),
    }[reuse]()
    return plan, rule, mode, reuse, threshold


def _solver(b: BenchSettings) -> jc.Solver:
    """The run's solver, with its shift where one is given."""
    kind = _SOLVERS[b.solver]
    return kind() if b.shift is None else kind(shift=float(b.shift))


def _inputs(config, batch: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """``(noise, cond)`` of a run: image latents and caption ids, or for the Wan model video
    latents ``[batch, frames, height, width, channels]`` and float text states ``[batch,
    text_len, text_dim]`` (a text encoder's output, here random)."""
    k_noise, k_cond = jax.random.split(jax.random.key(seed + 1))
    if isinstance(config, WanConfig):
        noise = jax.random.normal(k_noise, (batch, *config.latent_shape), jnp.float32)
        text = jax.random.normal(k_cond, (batch, config.text_len, config.text_dim), jnp.float32)
        return noise, text
    noise = jax.random.normal(k_noise, (batch, *config.image_shape), jnp.float32)
    cond = jax.random.randint(k_cond, (batch, config.caption_len), 1, config.vocab_size)
    return noise, cond


def build_model(model: str, size: str, dtype: str, seed: int = 0, **overrides: Any):
    """A reference model with random (non-zero) weights, as ``(network, params)``.

    ``overrides`` change fields of the named config (``depth=19``,
    ``attn_implementation="cudnn"``), as in :func:`jaxcache.models.create_model`.
    """
    compute_dtype = jnp.dtype(dtype)
    net_model = create_model(
        model, size, rngs=nnx.Rngs(seed), dtype=compute_dtype, param_dtype=compute_dtype,
        **overrides,
    )
    return jc.from_nnx(net_model)


def _compiler_options(text: str) -> dict[str, Any]:
    """``--compiler-options``: a JSON object of XLA option names and values."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of option: value, got {text!r}")
    return options


def _planned(b: BenchSettings, plan, seg, noise, cond, common) -> tuple[jc.RefreshPolicy, Any]:
    """A planned schedule fitted to the bench's own model: ``(policy, threshold or None)``.

    ``magcache``: calibrated on one full-compute run of the bench's batch, at ``threshold``
    (default the published 0.12) or, with ``refresh_target``, the least threshold whose schedule
    computes at most that fraction of the steps (searched on the host: MagCache's schedule
    depends only on the calibration). ``planned``: the refresh steps
    (:func:`jaxcache.tuning.plan_refreshes`, ``refresh_target`` of the evaluations or one in
    ``interval``) minimising the modelled error of the reuse mode. ``layer-mask``: every layer
    refreshing every ``interval`` steps, staggered (:func:`named.staggered_layer_mask`).
    """
    from jaxcache.tuning import calibrate_magcache, plan_refreshes

    evaluations = len(common["solver"].times(b.steps)[0])
    if b.policy == "layer-mask":
        mask = staggered_layer_mask(evaluations, plan.cached_layers, b.interval)
        return jc.LayerMaskPolicy(mask), None
    calibration = calibrate_magcache(plan, seg, noise, cond, **common)
    if b.policy == "planned":
        refreshes = (max(1, round(b.refresh_target * evaluations))
                     if b.refresh_target is not None else len(range(0, evaluations, b.interval)))
        mode = {"taylor": "taylor1", "output": "output"}.get(b.reuse or "residual", "residual")
        return plan_refreshes(calibration, refreshes=refreshes, reuse=mode), None
    if b.refresh_target is None:
        threshold = 0.12 if b.threshold is None else b.threshold
        return calibration.policy(threshold=threshold), threshold
    low, high = 1e-6, 1e3  # computed fraction falls as the threshold grows

    def fraction(t):
        return float(np.mean(calibration.policy(threshold=t).static_schedule(evaluations)))

    if fraction(high) > b.refresh_target:
        raise ValueError(
            f"magcache cannot compute as little as {b.refresh_target} of the steps (its "
            f"warm-up and max_skips allow {fraction(high):.3f} at least)"
        )
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if fraction(mid) > b.refresh_target else (low, mid)
    return calibration.policy(threshold=high), high


def run_benchmark(
    settings: BenchSettings = BenchSettings(),
    *,
    built: tuple[jc.Network, jc.NetworkParams] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark and returns its figures (see the module docstring).

    ``settings.refresh_target`` (signal-driven policies, SenCache's tolerance) replaces the
    threshold by the one whose run refreshes at most that fraction of the steps (the batch's),
    found by :func:`jaxcache.tuning.threshold_for` (bisection on one compiled program: a new
    threshold does not recompile).

    With ``cfg_cache`` the cached program (and the host loop) runs :class:`~jaxcache.CFGCache`
    and ``uncached`` runs both branches at every step: the result adds ``cfg_cache_steps`` (the
    evaluations that ran the conditional branch alone). With ``constants_per_step`` it adds
    ``per_step_constants_s`` (the cached program on
    :func:`~jaxcache.evaluation.loops.constants_per_step_network`) and ``constants_once_speedup``
    (that time over ``cached_s``).

    Args:
      settings: the run (:class:`BenchSettings`).
      built: a model from :func:`build_model` to reuse across runs (its parameters are then
        kept, not donated); built with ``settings.overrides``, so the benchmark counts the same
        layers.

    Raises:
      ValueError: for settings that cannot run (a cached-layer count outside ``[1, depth]``,
        ``first + last`` at or above the depth, ...).
    """
    if not isinstance(settings, BenchSettings):
        raise TypeError(f"run_benchmark takes a BenchSettings, got {type(settings).__name__}")
    b = settings
    overrides = dict(b.overrides)
    config = get_config(b.model, b.size)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise ValueError(f"{b.model} has no config fields {unknown} to override "
                         f"({type(config).__name__})")
    config = dataclasses.replace(config, **overrides)
    if built is None:
        network, params = build_model(b.model, b.size, b.dtype, b.seed, **overrides)
    else:
        network, params = built
    depth = jc.network.num_layers(params)  # every block, of every kind
    if b.layer_unroll is not None:
        unroll = 1 if b.layer_unroll is False else b.layer_unroll
        network = dataclasses.replace(network, layer_unroll=unroll)
    if b.compiler_options is not None:
        network = dataclasses.replace(network, compiler_options=b.compiler_options)
    steps, batch, guidance, policy = b.steps, b.batch, b.guidance, b.policy
    the_solver = _solver(b)
    plan, rule, mode, reuse, threshold = _setting(
        b, network, depth, evaluations=len(the_solver.times(steps)[0]),
    )
    # The port without the layer_constant hook: checked before anything is split or compiled.
    port = loops.constants_per_step_network(plan.network) if b.constants_per_step else None
    # Split once (freeing the unsplit layers as we go, unless the caller keeps the model for
    # more runs); every program uses the split parameters.
    seg = plan.split(params, donate=built is None)
    del params

    noise, cond = _inputs(config, batch, b.seed)
    uncond = None if guidance is None else jnp.zeros_like(cond)
    scale = None if guidance is None else float(guidance)
    common = dict(solver=the_solver, num_steps=steps, uncond=uncond, guidance_scale=scale)
    # CFG-Cache over the latents' spatial axes: height and width (each frame on its own).
    cfg = (None if b.cfg_cache is None else jc.CFGCache(
        interval=b.cfg_cache, warmup_steps=b.cfg_warmup,
        axes=(noise.ndim - 3, noise.ndim - 2)))
    if policy in PLANNED:
        rule, threshold = _planned(b, plan, seg, noise, cond, common)

    programs: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    # uncached: every layer and both branches at every step; cached: the policy, CFG-Cache.
    runs = [("uncached", plan, None, None), ("cached", plan, rule, cfg)]
    if port is not None:
        runs.append(("per_step_constants", dataclasses.replace(plan, network=port), rule, cfg))
    for name, run_plan, pol, guide in runs:
        lowered = jc.lower(run_plan, seg, noise, cond, policy=pol, reuse=mode, guidance=guide,
                           **common)
        start = time.perf_counter()
        compiled = lowered.compile()  # called by name, the lowered arguments by default
        compile_s[name] = time.perf_counter() - start
        programs[name] = compiled
    if b.refresh_target is not None and policy not in PLANNED:
        if policy == "interval":
            raise ValueError("--refresh-target applies to the signal-driven policies")
        found = threshold_for(plan, seg, noise, cond, policy=rule, reuse=mode,
                              target_fraction=b.refresh_target, **common)
        threshold, rule = found.threshold, found.policy
        for name in ("cached", "per_step_constants"):
            if name in programs:
                programs[name] = functools.partial(programs[name], policy=rule)
    if b.hand_loop:
        fn = loops.hand_loop(plan, seg, the_solver, steps, scale)
        start = time.perf_counter()
        compiled = fn.lower(seg, noise, cond, uncond).compile(
            dict(plan.network.compiler_options) or None)
        compile_s["hand_loop"] = time.perf_counter() - start
        programs["hand_loop"] = lambda c=compiled: c(seg, noise, cond, uncond)
    host_refreshes: list[int] = []
    if b.host_loop:
        if cfg is not None:  # the peer's way: a jitted full step and a jitted cache step
            host = loops.cfg_host_loop(plan, seg, cfg, rule, mode, the_solver, steps, scale)
        elif is_whole_network(rule):  # SenCache: the decision read back, the network skipped
            host = loops.whole_host_loop(plan, seg, rule, mode, the_solver, steps, scale)
        else:
            host = loops.host_loop(plan, seg, rule, mode, the_solver, steps, scale)

        def host_run():
            x, refreshes = host(seg, noise, cond, uncond)
            host_refreshes.append(refreshes)
            return x

        programs["host_loop"] = host_run

    outputs = {name: fn() for name, fn in programs.items()}  # warm-up (and the host's compiles)
    jax.block_until_ready(outputs)
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(b.repeats):  # interleaved, so drifts in clocks hit every program alike
        for name, program in programs.items():
            times[name].append(_time(program))
    median = {name: statistics.median(ts) for name, ts in times.items()}

    cached = outputs["cached"]
    evaluations = int(cached.layer_evaluations)
    ideal = float(cached.ideal_speedup)  # every layer that ran, weighed by its FLOPs
    speedup = median["uncached"] / median["cached"]
    diff = jnp.abs(cached.sample - outputs["uncached"].sample)
    result = {
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": b.model,
        "size": b.size,
        "overrides": {k: str(v) for k, v in overrides.items()},
        "dtype": b.dtype,
        "batch": batch,
        "steps": steps,
        "solver": b.solver,
        "shift": b.shift,
        "policy": policy,
        "interval": b.interval if policy == "interval" else None,
        "threshold": threshold,
        "reuse": reuse,
        "order": b.order if reuse in ("taylor", "hermite", "fitted") else None,
        "forecast_dtype": b.forecast_dtype,
        "first_layers": plan.first_layers,
        "cached_layers": plan.cached_layers,
        "depth": depth,
        "guidance": guidance,
        "decide": (b.decide if policy == "interval" else None if policy == "none"
                   else "device"),
        "layer_unroll": plan.network.layer_unroll,
        "compiler_options": dict(plan.network.compiler_options),
        "refresh_fraction": float(np.mean(np.asarray(cached.refreshed))),
        "refreshes": int(np.sum(np.asarray(cached.refreshed))),
        "layer_evaluations": evaluations,
        "uncached_layer_evaluations": steps * depth,
        "uncached_s": median["uncached"],
        "cached_s": median["cached"],
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "compile_s": compile_s["cached"],
        "uncached_compile_s": compile_s["uncached"],
        "max_abs_diff": float(jnp.max(diff)),
        "mean_abs_diff": float(jnp.mean(diff)),
        "repeats": b.repeats,
        "cfg_cache": b.cfg_cache,
        "cfg_warmup": None if cfg is None else b.cfg_warmup,
        # Evaluations that ran the conditional branch alone (CFG-Cache's cache steps).
        "cfg_cache_steps": (0 if cached.guidance_computed is None
                            else int(np.sum(~np.asarray(cached.guidance_computed)))),
        "constants_per_step": b.constants_per_step,
    }
    if port is not None:
        port_diff = jnp.abs(outputs["per_step_constants"].sample - cached.sample)
        result.update(
            per_step_constants_s=median["per_step_constants"],
            per_step_constants_compile_s=compile_s["per_step_constants"],
            constants_once_speedup=median["per_step_constants"] / median["cached"],
            per_step_constants_max_abs_diff=float(jnp.max(port_diff)),
        )
    if b.hand_loop:
        result.update(
            hand_loop_s=median["hand_loop"],
            hand_loop_compile_s=compile_s["hand_loop"],
            uncached_over_hand_loop=median["uncached"] / median["hand_loop"],
            speedup_over_hand_loop=median["hand_loop"] / median["cached"],
        )
    if b.host_loop:
        result.update(
            host_loop_s=median["host_loop"],
            host_loop_refreshes=host_refreshes[-1],
            host_over_compiled=median["host_loop"] / median["cached"],
            host_loop_max_abs_diff=float(jnp.max(jnp.abs(outputs["host_loop"] - cached.sample))),
        )
    return result


def _table(r: dict[str, Any]) -> str:
    rule = (f"interval {r['interval']} ({r['decide']} decisions)" if r["policy"] == "interval"
            else "no layer cache" if r["policy"] == "none"
            else f"{r['policy']} threshold {r['threshold']}")
    if r.get("cfg_cache") is not None:
        rule += (f" · CFG-Cache every {r['cfg_cache']} after {r['cfg_warmup']} "
                 f"({r['cfg_cache_steps']} cache steps)")
    head = (
        f"jaxcache bench · {r['model']}/{r['size']} · {r['dtype']} · batch {r['batch']} · "
        f"{r['steps']} steps · body layers [{r['first_layers']}, "
        f"{r['first_layers'] + r['cached_layers']}) of {r['depth']} · {rule} · reuse "
        f"{r['reuse']} · {r['device']}"
    )
    rows = [("", "time (s)", "compile (s)", "layer evals")]
    rows.append(("uncached", f"{r['uncached_s']:.4f}", f"{r['uncached_compile_s']:.2f}",
                 str(r["uncached_layer_evaluations"])))
    if "hand_loop_s" in r:
        rows.append(("hand loop", f"{r['hand_loop_s']:.4f}", f"{r['hand_loop_compile_s']:.2f}",
                     str(r["uncached_layer_evaluations"])))
    rows.append(("cached", f"{r['cached_s']:.4f}", f"{r['compile_s']:.2f}",
                 str(r["layer_evaluations"])))
    if "per_step_constants_s" in r:
        rows.append(("K/V per step", f"{r['per_step_constants_s']:.4f}",
                     f"{r['per_step_constants_compile_s']:.2f}", str(r["layer_evaluations"])))
    if "host_loop_s" in r:
        rows.append(("host loop", f"{r['host_loop_s']:.4f}", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head, ""]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines += [
        "",
        f"speedup {r['speedup']:.3f}x   ideal {r['ideal_speedup']:.3f}x   "
        f"efficiency {r['efficiency']:.3f}   refreshed {r['refresh_fraction']:.2f} of steps   "
        f"max |cached - uncached| {r['max_abs_diff']:.3g}",
    ]
    if "hand_loop_s" in r:
        if r["layer_evaluations"] >= r["uncached_layer_evaluations"]:
            cached = (f"cached skipped nothing (every layer ran at every step) and takes "
                      f"{1 / r['speedup_over_hand_loop']:.3f}x its time")
        else:
            cached = f"cached is {r['speedup_over_hand_loop']:.3f}x faster"
        lines.append(f"against the hand-written loop: uncached takes "
                     f"{r['uncached_over_hand_loop']:.3f}x its time, {cached}")
    if "per_step_constants_s" in r:
        lines.append(f"per-layer constants once, not at every step: "
                     f"{r['constants_once_speedup']:.3f}x faster (max |difference| "
                     f"{r['per_step_constants_max_abs_diff']:.3g})")
    if "host_loop_s" in r:
        lines.append(f"the same rule decided on the host is {r['host_over_compiled']:.2f}x slower")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        result = run_benchmark(BenchSettings(
            model=args.model, size=args.size, steps=args.steps, interval=args.interval,
            cached_layers=args.cached_layers, batch=args.batch, dtype=args.dtype,
            solver=args.solver, guidance=args.guidance, decide=args.decide, repeats=args.repeats,
            seed=args.seed, policy=args.policy, threshold=args.threshold, reuse=args.reuse,
            order=args.order, first=args.first, last=args.last, warmup=args.warmup,
            hand_loop=not args.no_hand_loop, host_loop=args.host_loop,
            refresh_target=args.refresh_target, forecast_dtype=args.forecast_dtype,
            overrides=_overrides(args), layer_unroll=_layer_unroll(args),
            compiler_options=args.compiler_options, shift=args.shift, cfg_cache=args.cfg_cache,
            cfg_warmup=args.cfg_warmup, constants_per_step=args.constants_per_step,
        ))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
