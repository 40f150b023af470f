"""Cached sampling against what a user would otherwise run, timed in one run.

Usage::

    python -m jaxcache.evaluation.bench       # small DiT on whatever device JAX sees
    python -m jaxcache.evaluation.bench --model mmdit --size flux --steps 50 --cached-layers 25 \\
        --interval 3 --batch 1 --dtype bfloat16 --json
    python -m jaxcache.evaluation.bench --policy first-block --threshold 0.1 --reuse residual \\
        --host-loop

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
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jaxcache.evaluation.named import (
    PLANNED,
    POLICIES,
    named_plan,
    named_policy,
    staggered_layer_mask,
)
from jaxcache.models import ARCHS, SIZES, create_model, get_config
from jaxcache.policies.signals import signal_function
from jaxcache.reuse import Position
from jaxcache.tuning import threshold_for

__all__ = ["POLICIES", "REUSE_MODES", "BenchSettings", "main", "run_benchmark"]

_SOLVERS = {"euler": jc.FlowMatchEuler, "ddim": jc.DDIM}
REUSE_MODES = ("output", "residual", "taylor", "hermite", "fitted")
_DEFAULT_THRESHOLDS = {"first-block": 0.1, "teacache": 0.3, "dbcache": 0.1}


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
      solver: ``"euler"`` (FlowMatchEuler) or ``"ddim"``.
      guidance: classifier-free guidance scale (None: off).
      decide: interval only: ``"static"`` (no decision in the loop) or ``"device"``.
      repeats: timed runs of each program.
      seed: seed of the noise and the conditions (and the model's weights when built here).
      policy: a :data:`POLICIES` name.
      threshold: signal-driven policies' threshold (None: the policy's bench default).
      reuse: a :data:`REUSE_MODES` name (None: output for the interval, residual otherwise).
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

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.reuse is not None and self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {list(REUSE_MODES)}, got {self.reuse!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {self.solver!r}")
        if self.decide not in ("static", "device"):
            raise ValueError(f"decide must be 'static' or 'device', got {self.decide!r}")


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
        "the same rule decided on the host, on a reference diffusion transformer.",
        formatter_class=Help,
    )
    p.add_argument("--model", choices=ARCHS, default="dit", help="architecture")
    p.add_argument("--size", choices=SIZES, default="small", help="named size")
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
                   "full-compute calibration run; layer-mask: a per-(step, layer) plan)")
    p.add_argument("--interval", type=_positive("interval"), default=3,
                   help="refresh interval of --policy interval (and of planned: one refresh in "
                   "--interval steps; layer-mask: each layer's, staggered)")
    p.add_argument("--threshold", type=float, default=None,
                   help="threshold of a signal-driven policy (default: first-block 0.1, "
                   "teacache 0.3, dbcache 0.1)")
    p.add_argument("--reuse", choices=REUSE_MODES, default=None,
                   help="what a skipped step uses (default: output for interval, residual "
                   "for the signal-driven policies)")
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
                   help="euler: FlowMatchEuler; ddim: DDIM")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (off by default)")
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
                   help="also time the same rule decided on the host (a read-back per step)")
    p.add_argument("--refresh-target", type=float, default=None,
                   help="signal-driven policies and magcache: search the threshold that "
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
    reuse = settings.reuse or ("output" if policy in ("interval", "layer-mask") else "residual")
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


def _hand_loop(plan, seg, solver, steps, guidance):
    """A user's own sampler: a jitted, unrolled Python loop over the forward and the solver."""
    network = plan.network
    times, next_times = solver.times(steps)

    @jax.jit
    def run(seg, noise, cond, uncond):
        cond_rows = cond if guidance is None else jnp.concatenate([cond, uncond])
        x, state = noise, solver.init_state(noise)
        for i, (t, t_next) in enumerate(zip(times, next_times)):
            rows = x if guidance is None else jnp.concatenate([x, x])
            t_rows = jnp.full((rows.shape[0],), t, jnp.float32)
            constant = network.condition(seg.condition, cond_rows)
            # A per-step loop computes per-layer constants (text K/V) at every step, as the
            # layers of a port do; nothing to bind for a network without them.
            bound = plan.bind_layers(seg, constant)
            h, ctx = network.embed(seg.embed, rows, t_rows, constant)
            for stack in (bound.head, bound.body, bound.tail):
                h = jc.stack.run_layers(network.kinds, stack, h, ctx,
                                        unroll=network.layer_unroll)
            prediction = network.final(seg.final, h, ctx)
            if guidance is not None:
                positive, negative = jnp.split(prediction, 2)
                prediction = negative + guidance * (positive - negative)
            x, state = solver.advance(state, x, prediction, t, t_next, index=jnp.int32(i))
        return x

    return run


def _host_loop(plan, seg, policy, mode, solver, steps, guidance):
    """The same rule decided on the host, as the anchors decide: a read-back every step.

    Jitted pieces (head and signal, decision, body and store, reuse, tail and solver step)
    called from a Python loop; the batch computes when any row asks (``bool(any)``).
    """
    guided = guidance is not None
    signal_of = signal_function(policy.signal_kind, plan, seg)

    @jax.jit
    def head(seg, x, t, constant):
        rows = jnp.concatenate([x, x]) if guided else x
        embedded, h, ctx = plan.run_head(seg, rows, jnp.full((rows.shape[0],), t), constant)
        return h, ctx, None if signal_of is None else signal_of(embedded, h, ctx)

    @jax.jit
    def decide(policy_state, step, signal):
        refresh, policy_state = policy.decide(policy_state, step, signal)
        return jnp.any(refresh), policy_state

    @jax.jit
    def body(seg, h, ctx, state, step, t):
        out = plan.run_body(seg, h, ctx)
        return out, mode.store(state, h, out, Position(step, t), None)

    @jax.jit
    def reuse(state, h, step, t):
        return mode.reuse(state, h, Position(step, t))

    @jax.jit
    def tail(seg, x, solver_state, h, ctx, t, t_next, step):
        prediction = plan.run_tail(seg, h, ctx)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + guidance * (positive - negative)
        return solver.advance(solver_state, x, prediction, t, t_next, index=step)

    times, next_times = solver.times(steps)

    def run(seg, noise, cond, uncond):
        cond_rows = jnp.concatenate([cond, uncond]) if guided else cond
        constant = jax.jit(plan.network.condition)(seg.condition, cond_rows)
        seg = jax.jit(plan.bind_layers)(seg, constant)  # per-layer constants, once
        x, solver_state = noise, solver.init_state(noise)
        h0, _, signal = head(seg, x, jnp.float32(times[0]), constant)
        state = mode.init(plan, jax.eval_shape(lambda: h0), constant)
        evaluations = len(times)  # the cache counts model evaluations
        policy_state = (policy.init(evaluations) if signal is None
                        else policy.init(evaluations, jax.eval_shape(lambda: signal)))
        refreshes = 0
        for i in range(evaluations):
            step, t, t_next = jnp.int32(i), jnp.float32(times[i]), jnp.float32(next_times[i])
            h, ctx, signal = head(seg, x, t, constant)
            refresh, policy_state = decide(policy_state, step, signal)
            if bool(refresh) or i == 0:  # the read-back the anchors make every step
                out, state = body(seg, h, ctx, state, step, t)
                refreshes += 1
            else:
                out = reuse(state, h, step, t)
            x, solver_state = tail(seg, x, solver_state, out, ctx, t, t_next, step)
        return x, refreshes

    return run


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

    ``settings.refresh_target`` (signal-driven policies) replaces the threshold by the one whose
    run refreshes at most that fraction of the steps (the batch's), found by
    :func:`jaxcache.tuning.threshold_for` (bisection on one compiled program: a new threshold
    does not recompile).

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
    config = dataclasses.replace(get_config(b.model, b.size), **overrides)
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
    plan, rule, mode, reuse, threshold = _setting(
        b, network, depth, evaluations=len(_SOLVERS[b.solver]().times(steps)[0]),
    )
    # Split once (freeing the unsplit layers as we go, unless the caller keeps the model for
    # more runs); every program uses the split parameters.
    seg = plan.split(params, donate=built is None)
    del params

    k_noise, k_cond = jax.random.split(jax.random.key(b.seed + 1))
    noise = jax.random.normal(k_noise, (batch, *config.image_shape), jnp.float32)
    cond = jax.random.randint(k_cond, (batch, config.caption_len), 1, config.vocab_size)
    uncond = None if guidance is None else jnp.zeros_like(cond)
    scale = None if guidance is None else float(guidance)
    the_solver = _SOLVERS[b.solver]()
    common = dict(solver=the_solver, num_steps=steps, uncond=uncond, guidance_scale=scale)
    if policy in PLANNED:
        rule, threshold = _planned(b, plan, seg, noise, cond, common)

    programs: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    for name, pol in (("uncached", None), ("cached", rule)):
        lowered = jc.lower(plan, seg, noise, cond, policy=pol, reuse=mode, **common)
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
        compiled_cached = programs["cached"]
        programs["cached"] = lambda: compiled_cached(policy=rule)
    if b.hand_loop:
        fn = _hand_loop(plan, seg, the_solver, steps, scale)
        start = time.perf_counter()
        compiled = fn.lower(seg, noise, cond, uncond).compile(
            dict(plan.network.compiler_options) or None)
        compile_s["hand_loop"] = time.perf_counter() - start
        programs["hand_loop"] = lambda c=compiled: c(seg, noise, cond, uncond)
    host_refreshes: list[int] = []
    if b.host_loop:
        host = _host_loop(plan, seg, rule, mode, the_solver, steps, scale)

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
        "decide": b.decide if policy == "interval" else "device",
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
    }
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
        )
    return result


def _table(r: dict[str, Any]) -> str:
    rule = (f"interval {r['interval']} ({r['decide']} decisions)" if r["policy"] == "interval"
            else f"{r['policy']} threshold {r['threshold']}")
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
            compiler_options=args.compiler_options,
        ))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
