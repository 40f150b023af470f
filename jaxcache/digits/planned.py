"""Planned schedules fitted to a digit model, as settings of the trade-off study.

Each family is fitted on a batch of its own (digits the scored run never sees) and then made
into one :class:`~jaxcache.digits.harness.Setting` per budget: a budget is an interval's
compute (``len(range(0, steps, k))`` refreshes of the whole stack, or the same share of
body-layer evaluations for a per-layer plan), so every row sits beside the interval row and the
fewer-steps row of the same compute.

* ``centered``: DeepCache's non-uniform schedule (:meth:`jaxcache.StepMaskPolicy.centered`).
* ``magcache``: MagCache calibrated on the fitting batch, its threshold searched on the host
  (the schedule depends only on the calibration) for the most refreshes within the budget.
* ``planned``: the refresh steps :func:`jaxcache.tuning.refine_schedule` finds for the budget,
  measured on the fitting batch's final samples, from the interval and from the modelled plan
  of :func:`jaxcache.tuning.plan_refreshes` (one search per reuse mode); for the fitted
  forecast, gains fitted to the Taylor search's schedule, the schedule searched again with
  them and the gains fitted again where it moved, keeping of these (and gains of one) the one
  with the lowest measured error on the fitting batch.
* ``learned``: a Learning-to-Cache router (:func:`jaxcache.tuning.train_router`), trained once
  per reuse mode, cut to each budget by its largest gates (:meth:`Router.budget_mask`).

The step-mask families take every reuse mode asked for and, with ``fitted=True``, a
:class:`~jaxcache.FittedForecast` whose gains are fitted to that very schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxcache as jc
from jaxcache.digits import pretrained
from jaxcache.digits.harness import REUSE_MODES, Body, Setting
from jaxcache.tuning import (
    CalibrationRun,
    calibrate_magcache,
    fit_forecast,
    plan_refreshes,
    refine_schedule,
    train_router,
)

__all__ = ["FAMILIES", "fit_batch", "planned_settings"]

#: The planned families, in the table's order.
FAMILIES = ("centered", "magcache", "planned", "learned")
# The planner's model of each reuse mode (plan_refreshes' names).
_PLANNER_MODE = {"reuse": "output", "residual": "residual", "taylor1": "taylor1"}


def fit_batch(model, *, seed: int, per_class: int, guidance: float | None, solver: jc.Solver,
              num_steps: int) -> CalibrationRun:
    """``per_class`` digits of each class with noise of ``seed``, the whole stack cached: a
    run for the tuning functions (``function.on_run(batch, ...)``)."""
    network, params = jc.from_nnx(model)
    plan = Body()(network, model.config.depth)
    labels = [c for c in range(10) for _ in range(per_class)]
    cond = pretrained.class_condition(labels)
    uncond = None if guidance is None else jnp.full_like(cond, pretrained.NULL_CLASS)
    noise = jax.random.normal(jax.random.key(seed), (len(labels), *model.config.image_shape))
    return CalibrationRun(plan, plan.split(params), noise, cond, solver, num_steps, uncond,
                          guidance)


def _magcache_within(calibration, evaluations: int, refreshes: int) -> jc.MagCachePolicy:
    """MagCache with the most refreshes at most ``refreshes`` (threshold searched on the host).

    The published FLUX warm-up (a tenth of the steps) and no cap on skips in a row, so that
    every budget of the study can be reached.
    """

    def policy(threshold):
        return calibration.policy(threshold=threshold, max_skips=evaluations, warmup=0.1)

    def count(threshold):
        return int(np.sum(policy(threshold).static_schedule(evaluations)))

    low, high = 1e-6, 1e3  # refreshes fall as the threshold grows
    if count(high) > refreshes:
        raise ValueError(f"MagCache cannot refresh as few as {refreshes} of {evaluations} steps")
    for _ in range(80):
        mid = float(np.sqrt(low * high))
        low, high = (mid, high) if count(mid) > refreshes else (low, mid)
    return policy(high)


def _searched_and_fitted(taylor, search, fit, evaluations: int):
    """The searched schedule with the fitted forecast's gains, where fitting helps.

    ``taylor`` is the schedule searched with the Taylor forecast (a
    :class:`~jaxcache.tuning.RefinedSchedule`); gains are fitted to it, the schedule is
    searched again with them and the gains fitted again where it moved. The fit minimises the
    batch's mean squared error, led by its worst samples, while the search (and the study's
    mean PSNR) weighs every sample alike, and on some schedules the fitted gains measure worse
    than gains of one (TaylorSeer exactly): of the three, the one with the lowest measured
    error on the fitting batch is kept.

    Returns:
      ``(policy, gains, what was kept)``.
    """
    gains = fit(taylor.policy)
    moved = search(taylor.policy, gains)  # its start_error: the searched schedule with gains
    candidates = [(taylor.error, taylor.policy, jc.FittedForecast.taylor(evaluations, 1),
                   "gains of one kept (fitting did not lower the measured error)"),
                  (moved.start_error, taylor.policy, gains, "forecast fitted")]
    if moved.policy != taylor.policy:
        regains = fit(moved.policy)
        candidates.append((search(moved.policy, regains, max_rounds=0).error, moved.policy,
                           regains, "searched again with the gains, forecast fitted again"))
    _, policy, gains, how = min(candidates, key=lambda c: c[0])
    return policy, gains, how


def planned_settings(
    model,
    num_steps: int,
    intervals: Sequence[int] = (2, 3, 4),
    *,
    seed: int,
    per_class: int = 20,
    guidance: float | None = pretrained.DEFAULT_GUIDANCE,
    solver: jc.Solver | None = None,
    modes: Sequence[str] = ("reuse", "taylor1"),
    fitted: bool = True,
    families: Sequence[str] = FAMILIES,
    learned_modes: Sequence[str] = ("residual", "taylor1"),
    router_iterations: int = 150,
    router_lam: float = 1e-3,
    fit_iterations: int = 60,
    log: Callable[[str], None] = lambda s: None,
) -> list[Setting]:
    """The planned families at each interval's compute, fitted on a batch of their own.

    Args:
      model: a trained digit model.
      num_steps: its step count.
      intervals: one budget per interval (that interval's refreshes).
      seed: the fitting batch's noise seed (give one other than the scored run's).
      per_class: digits per class of the fitting batch.
      guidance: the guidance scale (None: unguided).
      solver: the solver (default: the model's recipe's).
      modes: reuse modes (:data:`~jaxcache.digits.harness.REUSE_MODES` names) of the
        step-mask families.
      fitted: also a :class:`~jaxcache.FittedForecast` (order 1) fitted to each step mask.
      families: which of :data:`FAMILIES`.
      learned_modes: reuse modes of the per-layer plans (one router trained per mode).
      router_iterations: Adam steps of each router.
      router_lam: the router's weight on its mean gate.
      fit_iterations: Adam steps of each fitted forecast.
      log: called with a line per fit.

    Raises:
      ValueError: for an unknown family or mode (before anything is fitted).
    """
    unknown = [f for f in families if f not in FAMILIES]
    unknown += [m for m in (*modes, *learned_modes) if m not in REUSE_MODES]
    if unknown:
        raise ValueError(f"unknown families or modes {unknown}; families {FAMILIES}, modes "
                         f"{sorted(REUSE_MODES)}")
    solver = solver or pretrained.recipe_of(model).solver
    batch = fit_batch(model, seed=seed, per_class=per_class, guidance=guidance, solver=solver,
                      num_steps=num_steps)
    evaluations = len(solver.times(num_steps)[0])
    budgets = {k: len(range(0, evaluations, k)) for k in intervals}
    calibration = None
    if {"magcache", "planned"} & set(families):
        calibration = calibrate_magcache.on_run(batch)
    settings: list[Setting] = []

    def fit(policy: jc.RefreshPolicy) -> jc.FittedForecast:
        return fit_forecast.on_run(batch, policy=policy, order=1, iterations=fit_iterations)

    def search(starts, reuse, **kw):
        return refine_schedule.on_run(batch, start=starts, reuse=reuse, **kw)

    def add_step_mask(family: str, k: int, policy: jc.RefreshPolicy, names=modes):
        for name in names:
            settings.append(Setting(family, name, num_steps, Body(), policy, REUSE_MODES[name],
                                    knob=k))
        if fitted:
            settings.append(Setting(family, "fitted1", num_steps, Body(), policy, fit(policy),
                                    knob=k))
            log(f"{family} at interval {k}'s compute: forecast fitted")

    for family in families:
        if family == "learned":
            continue
        for k, refreshes in budgets.items():
            if family == "centered":
                add_step_mask(family, k, jc.StepMaskPolicy.centered(evaluations, refreshes))
            elif family == "magcache":
                add_step_mask(family, k, _magcache_within(calibration, evaluations, refreshes))
            else:  # planned: one measured search per reuse mode
                def starts(mode: str, k=k, refreshes=refreshes):
                    return [jc.IntervalPolicy(k),
                            plan_refreshes(calibration, refreshes=refreshes, reuse=mode)]

                found = {}
                for name in modes:
                    found[name] = search(starts(_PLANNER_MODE.get(name, "residual")),
                                         REUSE_MODES[name])
                    settings.append(Setting(family, name, num_steps, Body(),
                                            found[name].policy, REUSE_MODES[name], knob=k))
                if fitted:
                    # The Taylor row's search is the fitted row's first (searched once).
                    taylor = found.get("taylor1") or search(starts("taylor1"),
                                                            REUSE_MODES["taylor1"])
                    policy, gains, how = _searched_and_fitted(taylor, search, fit, evaluations)
                    settings.append(Setting(family, "fitted1", num_steps, Body(), policy, gains,
                                            knob=k))
                    log(f"{family} at interval {k}'s compute: schedule searched, {how}")
    if "learned" in families:
        for name in learned_modes:
            router = train_router.on_run(batch, reuse=REUSE_MODES[name], lam=router_lam,
                                         iterations=router_iterations, progress=False)
            log(f"learned router ({name}): mean gate {router.gates.mean():.3f}")
            for k, refreshes in budgets.items():
                mask = router.budget_mask(refreshes / evaluations)
                settings.append(Setting("learned", name, num_steps, Body(),
                                        jc.LayerMaskPolicy(mask), REUSE_MODES[name], knob=k))
    return settings
