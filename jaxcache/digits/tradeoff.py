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
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxcache as jc
from jaxcache.digits import pretrained
from jaxcache.digits.harness import REUSE_MODES, Body, Evaluator, Row, Setting, check_settings
from jaxcache.digits.planned import fit_batch
from jaxcache.tuning import fit_forecast

__all__ = [
    "DEFAULT_MODES",
    "DEFAULT_SIGNAL_POLICIES",
    "SIGNAL_POLICIES",
    "TABLE_HEADER",
    "calibrate",
    "default_settings",
    "evaluate",
    "fitted_settings",
    "format_row",
]

#: The interval rows' modes of the recorded 500-digit table (the default).
DEFAULT_MODES = ("reuse", "taylor1", "taylor2", "hermite2")
#: The signal-driven policies, by name: the body they cache and the policy (its threshold is
#: searched; TeaCache's coefficients are fitted to the model).
SIGNAL_POLICIES: dict[str, tuple[Body, jc.RefreshPolicy]] = {
    "first-block": (Body(first=1), jc.FirstBlockPolicy(0.0)),
    "teacache": (Body(), jc.TeaCachePolicy(0.0)),
    "dbcache": (Body(first=2), jc.DBCachePolicy(0.0, warmup_steps=2)),
    # Its tolerance is searched; a skip skips the whole network, sensitivities estimated in
    # the program from the warm-up (its one extra evaluation counted). Up to 5 skips in a row
    # (the paper's 3 cannot reach 2.86x in 20 steps with the warm-up and the last step).
    "sencache": (Body(), jc.SenCachePolicy(0.0, max_skips=5)),
}
#: The signal-driven policies of the recorded tables (the default).
DEFAULT_SIGNAL_POLICIES = ("first-block", "teacache", "dbcache")


def default_settings(
    num_steps: int,
    intervals: Sequence[int] = (2, 3, 4),
    modes: Sequence[str] = DEFAULT_MODES,
) -> list[Setting]:
    """Full compute, fewer steps and the interval schedule with each reuse mode of ``modes``.

    The body is every layer (the final projection runs each step), the setting where caching
    saves the most per refresh. Each fewer-steps row has the refreshes of one interval.

    Raises:
      ValueError: for a mode that is not a :data:`~jaxcache.digits.harness.REUSE_MODES` key.
    """
    unknown = [m for m in modes if m not in REUSE_MODES]
    if unknown:
        raise ValueError(f"unknown reuse modes {unknown}; choose from {sorted(REUSE_MODES)}")
    settings = [Setting.full(num_steps)]
    settings += [Setting.fewer_steps(len(range(0, num_steps, k))) for k in intervals]
    settings += [Setting.interval(k, name, num_steps=num_steps) for k in intervals
                 for name in modes]
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
    batch = fit_batch(model, seed=seed, per_class=per_class, guidance=guidance,
                      solver=solver or jc.FlowMatchEuler(), num_steps=num_steps)
    settings = []
    for k in intervals:
        start = time.perf_counter()
        losses = []
        fitted = fit_forecast.on_run(batch, policy=jc.IntervalPolicy(k), order=order,
                                     iterations=iterations,
                                     log=lambda i, loss, losses=losses: losses.append(loss))
        log(f"fitted interval {k} on {batch.noise.shape[0]} digits in "
            f"{time.perf_counter() - start:.0f} s"
            f" (mean squared error {losses[0]:.3g} -> {losses[-1]:.3g})")
        settings.append(Setting.interval(k, fitted, num_steps=num_steps, mode=f"fitted{order}"))
    return settings


def calibrate(evaluator: Evaluator, num_steps: int, *, seed: int, per_class: int = 10):
    """TeaCache coefficients for the evaluator's model, fitted on other noise than it scores."""
    labels = [c for c in range(10) for _ in range(per_class)]
    cond = pretrained.class_condition(labels)
    noise = jax.random.normal(jax.random.key(seed), (len(labels), *evaluator.noise.shape[1:]))
    uncond = None if evaluator.uncond is None else jnp.full_like(cond, pretrained.NULL_CLASS)
    plan = jc.CachePlan(evaluator.network, evaluator.depth)
    return jc.calibrate_teacache(
        plan, evaluator.split(plan), noise, cond, solver=evaluator.solver, num_steps=num_steps,
        uncond=uncond, guidance_scale=evaluator.guidance,
    )


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
    signal_policies: Sequence[str] = DEFAULT_SIGNAL_POLICIES,
    log: Callable[[str], None] = lambda s: None,
) -> list[Row]:
    """Samples ``labels`` under every setting and scores each against the first (full) one.

    The settings, and a signal-driven row per policy, mode and target, run through one
    :class:`~jaxcache.digits.harness.Evaluator`.

    Args:
      model: a trained digit model.
      labels: one requested class per sample.
      settings: the settings; the first must be full compute.
      seed: seed of the shared initial noise.
      guidance: classifier-free guidance scale (None: off).
      solver: the solver (default: the model's recipe's).
      repeats: timed runs per setting (medians are reported).
      signal_targets: ideal speedups at which to add each signal-driven policy of
        ``signal_policies``, with each of ``signal_modes``, its threshold searched on the
        first 100 digits; TeaCache's coefficients are fitted on digits of seed ``seed + 1``.
      signal_modes: reuse modes of the signal-driven rows
        (:data:`~jaxcache.digits.harness.REUSE_MODES` keys).
      signal_policies: :data:`SIGNAL_POLICIES` names.
      log: called with each row as a markdown table line (:func:`format_row`).

    Returns:
      One :class:`~jaxcache.digits.harness.Row` per setting, signal-driven rows last.

    Raises:
      ValueError: for settings :func:`~jaxcache.digits.harness.check_settings` refuses, or an
        unknown signal mode (before anything is sampled).
    """
    settings = check_settings(settings)
    unknown = [m for m in signal_modes if m not in REUSE_MODES]
    if unknown:
        raise ValueError(f"unknown signal modes {unknown}; choose from {sorted(REUSE_MODES)}")
    unknown = [p for p in signal_policies if p not in SIGNAL_POLICIES]
    if unknown:
        raise ValueError(f"unknown signal policies {unknown}; choose from "
                         f"{sorted(SIGNAL_POLICIES)}")
    evaluator = Evaluator(model, labels, seed=seed, guidance=guidance, solver=solver,
                          repeats=repeats)
    full_steps = settings[0].num_steps
    coefficients = None
    if signal_targets and "teacache" in signal_policies:
        coefficients = calibrate(evaluator, full_steps, seed=seed + 1)
    for target in signal_targets:
        for name in signal_policies:
            body, policy = SIGNAL_POLICIES[name]
            if name == "teacache":  # the published workflow: coefficients fitted per model
                policy = dataclasses.replace(policy, coefficients=coefficients)
            for mode in signal_modes:
                probe = Setting(name, mode, full_steps, body, policy, REUSE_MODES[mode])
                settings.append(evaluator.threshold_setting(probe, target))
    return evaluator.evaluate(settings, log=lambda row: log(format_row(row)))


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
