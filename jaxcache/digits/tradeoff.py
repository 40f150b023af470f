"""Quality at equal compute: every policy and reuse mode beside sampling with fewer steps.

The honest baseline for any cache is the uncached sampler run with fewer steps at the same
compute. For a trained digit model this module samples one batch of digits (the same noise and
classes for every setting) under

* full compute at the reference step count (what everything is scored against),
* fewer steps, uncached (the baseline),
* the reference interval schedule with each reuse mode (plain reuse, Taylor, Hermite, and the
  fitted forecast, its gains fitted on a batch of their own),
* the signal-driven policies (First-Block, TeaCache, DBCache) with residual reuse and with the
  Taylor forecast, their thresholds searched to land at the interval rows' compute,

and scores each: layer evaluations per sample, ideal speedup (matrix FLOPs of full compute over
the setting's, per sample: a sample's own decisions, as if sampled alone), the measured CPU
speedup of the whole batch (where per-sample decisions run the body for the batch whenever any
sample asks), PSNR, SSIM and relative L1 against full compute, class accuracy and the Frechet
distance of classifier features to the real held-out digits.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxcache as jc
from jaxcache.digits import pretrained
from jaxcache.digits.classifier import accuracy, default_classifier, extract_features
from jaxcache.digits.data import load_digits_images
from jaxcache.evaluation import metrics
from jaxcache.evaluation.flops import step_flops
from jaxcache.tuning import threshold_for

__all__ = [
    "DEFAULT_MODES",
    "REUSE_MODES",
    "Row",
    "Setting",
    "default_settings",
    "evaluate",
    "find_threshold",
    "fitted_settings",
]

PlanFn = Callable[[jc.Network, int], jc.CachePlan]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to sample.

    Attributes:
      family: ``"full"``, ``"fewer steps"``, ``"interval"``, or a policy name.
      mode: the reuse mode's label (``"-"`` when uncached).
      num_steps: solver steps.
      plan: ``plan(network, depth) -> CachePlan``, or None for uncached sampling.
      policy: the refresh policy (None: uncached).
      reuse: the reuse mode.
      knob: the setting's own parameter for the table (steps, interval or threshold).
    """

    family: str
    mode: str
    num_steps: int
    plan: PlanFn | None = None
    policy: jc.RefreshPolicy | None = None
    reuse: jc.ReuseMode | None = None
    knob: float | int | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """The scores of one setting (see the module docstring)."""

    family: str
    mode: str
    knob: float | int | None
    num_steps: int
    layer_evaluations: float
    batch_layer_evaluations: int
    ideal_speedup: float
    speedup: float
    seconds: float
    psnr: float
    ssim: float
    relative_l1: float
    accuracy: float
    frechet: float
    computed_per_step: tuple[float, ...]


def _full(network, depth):
    return jc.CachePlan(network, depth)


def _first_block(network, depth):
    return jc.CachePlan.around(network, depth, first=1)


def _dbcache(network, depth):
    return jc.CachePlan.around(network, depth, first=2)


REUSE_MODES: dict[str, jc.ReuseMode] = {
    "reuse": jc.OutputReuse(),
    "taylor1": jc.TaylorForecast(1),
    "taylor2": jc.TaylorForecast(2),
    "hermite2": jc.HermiteForecast(2),
    # HiCache order 1 on the residual at the contraction that did best at 4x on 80 digits.
    "hicache1": jc.HermiteForecast(1, scale=0.65, residual=True),
}
#: The interval rows' modes of the recorded 500-digit table (the default).
DEFAULT_MODES = ("reuse", "taylor1", "taylor2", "hermite2")
SIGNAL_POLICIES: dict[str, tuple[PlanFn, Callable[[float], jc.RefreshPolicy], str]] = {
    "first-block": (_first_block, lambda v: jc.FirstBlockPolicy(v), "residual"),
    "teacache": (_full, lambda v: jc.TeaCachePolicy(v), "residual"),
    "dbcache": (_dbcache, lambda v: jc.DBCachePolicy(v, warmup_steps=2), "residual"),
}


def default_settings(
    num_steps: int,
    intervals: Sequence[int] = (2, 3, 4),
    modes: Sequence[str] = DEFAULT_MODES,
) -> list[Setting]:
    """Full compute, fewer steps and the interval schedule with each reuse mode of ``modes``.

    The body is every layer (the final projection runs each step), the setting where caching
    saves the most per refresh.

    Raises:
      ValueError: for a mode that is not a :data:`REUSE_MODES` key.
    """
    unknown = [m for m in modes if m not in REUSE_MODES]
    if unknown:
        raise ValueError(f"unknown reuse modes {unknown}; choose from {sorted(REUSE_MODES)}")
    settings = [Setting("full", "-", num_steps, knob=num_steps)]
    for k in intervals:
        steps = max(1, round(num_steps * _interval_fraction(num_steps, k)))
        settings.append(Setting("fewer steps", "-", steps, knob=steps))
    for k in intervals:
        for name in modes:
            settings.append(Setting("interval", name, num_steps, _full, jc.IntervalPolicy(k),
                                    REUSE_MODES[name], knob=k))
    return settings


def fitted_settings(
    model,
    num_steps: int,
    intervals: Sequence[int] = (2, 3, 4),
    *,
    seed: int,
    per_class: int = 20,
    guidance: float | None = pretrained.DEFAULT_GUIDANCE,
    solver: jc.Solver | None = None,
    order: int = 1,
    iterations: int = 60,
    log: Callable[[str], None] = lambda s: None,
) -> list[Setting]:
    """The interval schedule with a :class:`~jaxcache.FittedForecast` fitted per interval.

    The gains are fitted (:func:`jaxcache.fit_forecast`) on a batch of its own,
    ``per_class`` digits of each class drawn with ``seed``: give a seed other than the
    evaluation's, so that the rows are scored on samples the fit never saw.

    Returns:
      One ``"interval"`` setting per interval, its mode labelled ``fitted{order}``.
    """
    solver = solver or jc.FlowMatchEuler()
    network, params = jc.from_nnx(model)
    plan = _full(network, model.config.depth)
    seg = plan.split(params)
    labels = [c for c in range(10) for _ in range(per_class)]
    cond = pretrained.class_condition(labels)
    uncond = None if guidance is None else jnp.full_like(cond, pretrained.NULL_CLASS)
    noise = jax.random.normal(jax.random.key(seed), (len(labels), *model.config.image_shape))
    settings = []
    for k in intervals:
        start = time.perf_counter()
        policy = jc.IntervalPolicy(k)
        losses = []
        fitted = jc.fit_forecast(plan, seg, noise, cond, solver=solver, num_steps=num_steps,
                                 policy=policy, order=order, uncond=uncond,
                                 guidance_scale=guidance, iterations=iterations,
                                 log=lambda i, loss, losses=losses: losses.append(loss))
        log(f"fitted interval {k} on {len(labels)} digits in {time.perf_counter() - start:.0f} s"
            f" (mean squared error {losses[0]:.3g} -> {losses[-1]:.3g})")
        settings.append(Setting("interval", f"fitted{order}", num_steps, _full, policy, fitted,
                                knob=k))
    return settings


def _interval_fraction(num_steps: int, k: int) -> float:
    return len(range(0, num_steps, k)) / num_steps


class _Bench:
    """One model, one batch: samples settings and scores them against full compute."""

    def __init__(self, model, labels, *, seed, guidance, solver, repeats):
        self.network, self.params = jc.from_nnx(model)
        self.depth = model.config.depth
        self.labels = np.asarray(labels)
        self.cond = pretrained.class_condition(labels)
        self.uncond = None if guidance is None else jnp.full_like(self.cond,
                                                                   pretrained.NULL_CLASS)
        self.guidance = guidance
        self.solver = solver
        self.repeats = repeats
        self.noise = jax.random.normal(
            jax.random.key(seed), (len(self.labels), *model.config.image_shape)
        )
        self.classifier = default_classifier()
        real, _ = load_digits_images(model.config.image_size, "test")
        self.real_features = np.asarray(extract_features(self.classifier, real))
        seg = jc.CachePlan(self.network, 0).split(self.params)
        self.flops = step_flops(self.network, seg, self.noise, self.cond, uncond=self.uncond)
        self._split: dict[Any, Any] = {}

    def split(self, plan: jc.CachePlan):
        """The model's parameters split for ``plan`` (once per head and body)."""
        key = (plan.first_layers, plan.cached_layers)
        if key not in self._split:
            self._split[key] = plan.split(self.params)
        return self._split[key]

    def run(self, setting: Setting, noise=None, cond=None, uncond=None, policy=None):
        plan = (setting.plan or (lambda net, depth: jc.CachePlan(net, 0)))(self.network,
                                                                           self.depth)
        return jc.sample(
            plan, self.split(plan), self.noise if noise is None else noise,
            self.cond if cond is None else cond, solver=self.solver,
            num_steps=setting.num_steps, policy=policy or setting.policy, reuse=setting.reuse,
            uncond=self.uncond if uncond is None else uncond, guidance_scale=self.guidance,
        )

    def per_sample_evaluations(self, setting: Setting, out) -> float:
        """Layer evaluations of one sample, from its own decisions (a guided step counts once)."""
        if setting.policy is None:
            return float(setting.num_steps * self.depth)
        plan = setting.plan(self.network, self.depth)
        body = np.asarray(out.body_computed).mean(axis=(1, 2)).sum()  # steps, averaged
        always = self.depth - plan.cached_layers
        return float(setting.num_steps * always + body * plan.cached_layers)

    def ideal(self, num_steps: int, evaluations: float, full_steps: int) -> float:
        full = self.flops.total(full_steps, full_steps * self.depth)
        return full / self.flops.total(num_steps, evaluations)

    def seconds(self, setting: Setting) -> float:
        """Median wall time of the whole batch, after a warm call (compiled once)."""
        jax.block_until_ready(self.run(setting).sample)
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            jax.block_until_ready(self.run(setting).sample)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def calibrate(bench: _Bench, num_steps: int, *, seed: int, per_class: int = 10):
    """TeaCache coefficients for the bench's model, fitted on other noise than the scored run."""
    labels = [c for c in range(10) for _ in range(per_class)]
    cond = pretrained.class_condition(labels)
    noise = jax.random.normal(jax.random.key(seed), (len(labels), *bench.noise.shape[1:]))
    uncond = None if bench.uncond is None else jnp.full_like(cond, pretrained.NULL_CLASS)
    plan = jc.CachePlan(bench.network, bench.depth)
    return jc.calibrate_teacache(
        plan, plan.split(bench.params), noise, cond, solver=bench.solver, num_steps=num_steps,
        uncond=uncond, guidance_scale=bench.guidance,
    )


def find_threshold(
    bench: _Bench, setting: Setting, make: Callable[[float], jc.RefreshPolicy],
    target: float, full_steps: int, *, rows: int = 100,
) -> float:
    """The threshold whose per-sample ideal speedup on the first ``rows`` digits is ``target``.

    The speedup is a budget of layer evaluations per sample (the matrix FLOPs of a run are
    linear in them); :func:`jaxcache.tuning.threshold_for` finds the least threshold within it
    (bisection on one compiled program: thresholds are traced), so the speedup reached is at
    least ``target``.
    """
    noise, cond = bench.noise[:rows], bench.cond[:rows]
    uncond = None if bench.uncond is None else bench.uncond[:rows]
    flops = bench.flops
    full = flops.total(full_steps, full_steps * bench.depth)
    budget = (full / target - flops.condition - setting.num_steps * flops.step) / flops.layer
    plan = setting.plan(bench.network, bench.depth)
    found = threshold_for(
        plan, bench.split(plan), noise, cond, policy=make(0.0), solver=bench.solver,
        num_steps=setting.num_steps, layer_budget=budget, per_sample=True,
        reuse=setting.reuse, uncond=uncond, guidance_scale=bench.guidance,
    )
    return found.threshold


def evaluate(
    model,
    labels: Sequence[int],
    settings: Sequence[Setting],
    *,
    seed: int = 0,
    guidance: float | None = pretrained.DEFAULT_GUIDANCE,
    solver: jc.Solver | None = None,
    repeats: int = 3,
    signal_targets: Sequence[float] = (),
    signal_modes: Sequence[str] = ("residual", "taylor1"),
    log: Callable[[str], None] = lambda s: None,
) -> list[Row]:
    """Samples ``labels`` under every setting and scores each against the first (full) one.

    Args:
      model: a trained digit model.
      labels: one requested class per sample.
      settings: the settings; the first must be full compute.
      seed: seed of the shared initial noise.
      guidance: classifier-free guidance scale (None: off).
      solver: the solver (default: flow-matching Euler).
      repeats: timed runs per setting (medians are reported).
      signal_targets: ideal speedups at which to add every signal-driven policy, with each of
        ``signal_modes``, its threshold searched on the first 100 digits.
      signal_modes: reuse modes of the signal-driven rows (``"residual"`` or a
        :data:`REUSE_MODES` key).
      log: called with a line per finished setting.

    Returns:
      One :class:`Row` per setting, signal-driven rows last.
    """
    solver = solver or jc.FlowMatchEuler()
    bench = _Bench(model, labels, seed=seed, guidance=guidance, solver=solver, repeats=repeats)
    full_setting = settings[0]
    if full_setting.policy is not None:
        raise ValueError("the first setting must be full compute (no policy)")
    full_steps = full_setting.num_steps
    settings = list(settings)
    coefficients = calibrate(bench, full_steps, seed=seed + 1) if signal_targets else None
    for target in signal_targets:
        for name, (plan, make, _) in SIGNAL_POLICIES.items():
            if name == "teacache":  # the published workflow: coefficients fitted per model

                def make(v, c=coefficients):
                    return jc.TeaCachePolicy(v, coefficients=c)

            for mode_name in signal_modes:
                mode = jc.ResidualReuse() if mode_name == "residual" else REUSE_MODES[mode_name]
                probe = Setting(name, mode_name, full_steps, plan, make(0.1), mode)
                value = find_threshold(bench, probe, make, target, full_steps)
                settings.append(dataclasses.replace(probe, policy=make(value),
                                                    knob=round(value, 4)))
    full = bench.run(full_setting)
    reference = jnp.clip(full.sample, -1.0, 1.0)
    full_seconds = bench.seconds(full_setting)
    rows = []
    for setting in settings:
        out = full if setting is full_setting else bench.run(setting)
        images = jnp.clip(out.sample, -1.0, 1.0)
        evaluations = bench.per_sample_evaluations(setting, out)
        seconds = full_seconds if setting is full_setting else bench.seconds(setting)
        computed = (np.ones(setting.num_steps) if out.body_computed is None
                    else np.asarray(out.body_computed).mean(axis=(1, 2)))
        psnr, ssim, relative_l1 = metrics.mean_image_scores(images, reference)
        rows.append(Row(
            family=setting.family,
            mode=setting.mode,
            knob=setting.knob,
            num_steps=setting.num_steps,
            layer_evaluations=evaluations,
            batch_layer_evaluations=int(out.layer_evaluations),
            ideal_speedup=bench.ideal(setting.num_steps, evaluations, full_steps),
            speedup=full_seconds / seconds,
            seconds=seconds,
            psnr=psnr,
            ssim=ssim,
            relative_l1=relative_l1,
            accuracy=accuracy(bench.classifier, images, jnp.asarray(bench.labels)),
            frechet=metrics.frechet_distance(
                np.asarray(extract_features(bench.classifier, images)), bench.real_features
            ),
            computed_per_step=tuple(float(c) for c in computed),
        ))
        log(format_row(rows[-1]))
    return rows


def format_row(r: Row) -> str:
    """One markdown table row."""
    knob = "-" if r.knob is None else str(r.knob)
    psnr = "inf" if np.isinf(r.psnr) else f"{r.psnr:.1f}"
    return (f"| {r.family} | {r.mode} | {knob} | {r.layer_evaluations:.1f} | "
            f"{r.ideal_speedup:.2f} | {r.speedup:.2f} | {psnr} | {r.ssim:.4f} | "
            f"{r.accuracy:.3f} | {r.frechet:.2f} |")


TABLE_HEADER = (
    "| setting | reuse | steps / interval / threshold | layer evals per sample | ideal x | "
    "CPU x | PSNR dB | SSIM | class acc | Frechet |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)
