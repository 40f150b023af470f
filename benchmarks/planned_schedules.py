"""Planned schedules on the shipped digit DiT: the interval against schedules planned by measuring.

    python benchmarks/planned_schedules.py                 # 64 digits, 20 Euler steps
    python benchmarks/planned_schedules.py --digits 500 --calibration-digits 100

At 2x, 2.86x and 4x fewer body evaluations (10, 7 and 5 refreshes of 20 steps: the interval
schedules 2, 3 and 4), every schedule caches the whole block stack (``CachePlan(network, 8)``).
Reuse modes: residual reuse, the order-1 Taylor forecast (``TaylorForecast(1)``), HiCache
(``HermiteForecast(1, scale=0.65, residual=True)``) and the fitted forecast. Schedules:

* ``interval``: ``IntervalPolicy(k)``;
* ``magcache``: :class:`jaxcache.MagCachePolicy` from a calibration, its threshold searched on
  the host for the fewest refreshes within the budget, with no cap on skips in a row and the
  published FLUX warm-up (10% of the steps);
* ``modelled``: :func:`jaxcache.tuning.plan_refreshes`, the summed per-step error modelled on
  one run's body residuals (``"residual"`` for residual reuse, ``"taylor1"`` for the
  forecasts);
* ``lemica-minimax`` / ``lemica-sum``: :func:`jaxcache.tuning.plan_path` over
  :func:`jaxcache.tuning.measure_segments` (each segment of at most ``--max-length`` steps
  weighed by the final sample's error when only it is cached; the forecast's previous refresh
  the step before), LeMiCa's lexicographic minimax and the plain sum;
* with ``--pairs``, ``pairs-minimax`` / ``pairs-sum`` for the forecasts: the same over
  segments measured from every previous refresh a path can have (``previous="pairs"``);
* ``refined``: :func:`jaxcache.tuning.refine_schedule` from the interval and both paths
  (moves of one refresh by up to 2 steps, each schedule measured by one run, in dB);
* for the fitted forecast: ``interval`` with gains fitted for it
  (:func:`jaxcache.tuning.fit_forecast`), and ``refined``: from the Taylor forecast's and
  HiCache's refined schedules, gains fitted for each, the schedule refined again with them and
  the gains fitted again where it moved; of the two, the one of least calibration error.

Calibration (segment runs, searches, fits) uses digits of its own (``--calibration-digits``,
noise of seed + 1); every row is scored on the evaluation digits against full compute (PSNR,
images in [-1, 1]) beside uncached sampling with as many steps as refreshes (the baseline at
equal body compute). ``calibration dB`` is the mean of the calibration samples' squared error in
decibels, what the search minimises; ``MSE / sum`` is the calibration batch's mean squared error
over the sum of the schedule's segment errors (what ``lemica-sum`` minimises; 1 where they
add up).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcache as jc
from jaxcache import tuning
from jaxcache.digits import pretrained
from jaxcache.evaluation import metrics

INTERVALS = (2, 3, 4)
MODES = {
    "residual": jc.ResidualReuse(),
    "taylor1": jc.TaylorForecast(1),
    "hicache": jc.HermiteForecast(1, scale=0.65, residual=True),
}


def magcache_for(calibration, refreshes: int, warmup: float) -> jc.MagCachePolicy:
    """The MagCache policy with the fewest refreshes within ``refreshes``.

    The schedule is computed on the host, so the search samples nothing: a geometric scan,
    then bisection between the last threshold over budget and the first within it.
    """
    steps = calibration.evaluations

    def policy(threshold):
        return calibration.policy(threshold=threshold, max_skips=steps, warmup=warmup)

    def count(threshold):
        return int(policy(threshold).static_schedule(steps).sum())

    grid = np.geomspace(1e-4, 1e3, 200)
    within = [t for t in grid if count(float(t)) <= refreshes]
    if not within:
        raise ValueError(f"no threshold up to 1e3 reaches {refreshes} refreshes")
    high = float(within[0])
    low = float(grid[max(np.searchsorted(grid, high) - 1, 0)])
    for _ in range(60):
        middle = (low + high) / 2
        if count(middle) <= refreshes:
            high = middle
        else:
            low = middle
    return policy(high)


def steps_of(policy, steps: int) -> str:
    return " ".join(str(i) for i in np.flatnonzero(policy.static_schedule(steps)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", type=int, default=64, help="evaluation digits (default 64)")
    p.add_argument("--calibration-digits", type=int, default=40,
                   help="digits of the calibration batch (default 40)")
    p.add_argument("--arch", default="dit", help="shipped digit model (default dit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=8, help="longest segment measured")
    p.add_argument("--no-fitted", action="store_true", help="leave out the fitted forecast")
    p.add_argument("--pairs", action="store_true",
                   help="also plan the forecasts over segments measured from every previous "
                        "refresh")
    p.add_argument("--warmup", type=float, default=0.1, help="MagCache's warm-up fraction")
    args = p.parse_args()

    start = time.perf_counter()
    model = pretrained.load_digits_model(args.arch)
    recipe = pretrained.recipe_of(model)
    solver, steps, scale = recipe.solver, recipe.num_steps, pretrained.DEFAULT_GUIDANCE
    depth = model.config.depth
    network, params = jc.from_nnx(model)
    plan = jc.CachePlan(network, depth)
    seg = plan.split(params)

    def batch(n, seed):
        labels = [i % 10 for i in range(n)]
        cond = pretrained.class_condition(labels)
        noise = jax.random.normal(jax.random.key(seed), (n, *model.config.image_shape))
        return dict(noise=noise, cond=cond, uncond=jnp.full_like(cond, pretrained.NULL_CLASS))

    calibration = batch(args.calibration_digits, args.seed + 1)
    evaluation = batch(args.digits, args.seed)
    common = dict(solver=solver, num_steps=steps, guidance_scale=scale)

    def run(inputs, **kw):
        return jc.sample(plan, seg, inputs["noise"], inputs["cond"], uncond=inputs["uncond"],
                         **common, **kw).sample

    full = jnp.clip(run(evaluation), -1, 1)

    def psnr(images):
        return metrics.mean_image_scores(jnp.clip(images, -1, 1), full)[0]

    def calibrate(function, **kw):
        c = calibration
        return function(plan, seg, c["noise"], c["cond"], uncond=c["uncond"], **common, **kw)

    def measured(policy, mode, metric="mse_db"):
        """The calibration error of one schedule, by the search's own program."""
        return calibrate(tuning.refine_schedule, start=policy, reuse=mode, max_rounds=0,
                         metric=metric).error

    print(f"{args.arch}: {args.digits} digits, {type(solver).__name__} {steps} steps, guidance "
          f"{scale}; calibrated on {args.calibration_digits} other digits; body = all {depth} "
          "layers; PSNR dB against full compute")
    print()
    rows = []

    def row(refreshes, mode_name, name, policy, mode, fewer, segments=None):
        score = psnr(run(evaluation, policy=policy, reuse=mode))
        rows.append((refreshes, mode_name, name, score))
        ratio = "-"
        if segments is not None:
            ratio = f"{measured(policy, mode, 'mse') / segments.total(policy):.2f}"
        print(f"| {refreshes} | {mode_name} | {name} | {steps_of(policy, steps)} | "
              f"{measured(policy, mode):.1f} | {ratio} | {score:.1f} | {fewer:.1f} |",
              flush=True)

    fewer = {}
    for k in INTERVALS:
        refreshes = len(range(0, steps, k))
        uncached = jc.CachePlan(network, 0)
        fewer[k] = psnr(jc.sample(uncached, uncached.split(params), evaluation["noise"],
                                  evaluation["cond"], uncond=evaluation["uncond"],
                                  solver=solver, num_steps=refreshes,
                                  guidance_scale=scale).sample)

    header = ("| refreshes | reuse | schedule | steps refreshed | calibration dB | MSE / sum | "
              "PSNR dB | fewer steps dB |\n|---:|---|---|---|---:|---:|---:|---:|")
    print(header)
    refined = {}  # the forecasts' refined schedules, per interval
    notes = []
    residuals = calibrate(tuning.calibrate_magcache)  # one uncached run: MagCache, modelled
    for mode_name, mode in MODES.items():
        clock = time.perf_counter()
        errors = calibrate(tuning.measure_segments, reuse=mode, max_length=args.max_length)
        notes.append(f"{mode_name}: {errors.runs} segment runs in "
                     f"{time.perf_counter() - clock:.0f} s")
        pairs = None
        if args.pairs and mode_name != "residual":  # reuse reads one refresh: pairs alike
            clock = time.perf_counter()
            pairs = calibrate(tuning.measure_segments, reuse=mode, max_length=args.max_length,
                              previous="pairs")
            notes.append(f"{mode_name}: {pairs.runs} runs for the pairs in "
                         f"{time.perf_counter() - clock:.0f} s")
        for k in INTERVALS:
            refreshes = len(range(0, steps, k))
            interval = jc.IntervalPolicy(k)
            paths = {o: tuning.plan_path(errors, refreshes=refreshes, objective=o)
                     for o in ("minimax", "sum")}
            clock = time.perf_counter()
            found = calibrate(tuning.refine_schedule, start=[interval, *paths.values()],
                              reuse=mode, metric="mse_db")
            notes.append(f"{mode_name} at {refreshes}: refined over {len(found.probes)} "
                         f"schedules in {time.perf_counter() - clock:.0f} s")
            if mode_name in ("taylor1", "hicache"):
                refined.setdefault(k, []).append(found.policy)
            row(refreshes, mode_name, "interval", interval, mode, fewer[k], errors)
            row(refreshes, mode_name, "magcache",
                magcache_for(residuals, refreshes, args.warmup), mode, fewer[k])
            model = "residual" if mode_name == "residual" else "taylor1"
            row(refreshes, mode_name, "modelled",
                tuning.plan_refreshes(residuals, refreshes=refreshes, reuse=model), mode,
                fewer[k])
            for objective, policy in paths.items():
                row(refreshes, mode_name, f"lemica-{objective}", policy, mode, fewer[k], errors)
            for objective in ("minimax", "sum") if pairs is not None else ():
                policy = tuning.plan_path(pairs, refreshes=refreshes, objective=objective)
                row(refreshes, mode_name, f"pairs-{objective}", policy, mode, fewer[k], pairs)
            row(refreshes, mode_name, "refined", found.policy, mode, fewer[k], errors)

    if not args.no_fitted:
        for k in INTERVALS:
            refreshes = len(range(0, steps, k))
            clock = time.perf_counter()
            interval = jc.IntervalPolicy(k)
            fitted = calibrate(tuning.fit_forecast, policy=interval)
            row(refreshes, "fitted", "interval", interval, fitted, fewer[k])
            candidates = []
            for start_policy in dict.fromkeys(refined[k]):  # Taylor's and HiCache's schedules
                policy = start_policy
                gains = calibrate(tuning.fit_forecast, policy=policy)
                again = calibrate(tuning.refine_schedule, start=policy, reuse=gains)
                if again.policy != policy:
                    policy = again.policy
                    gains = calibrate(tuning.fit_forecast, policy=policy)
                candidates.append((measured(policy, gains), policy, gains))
            _, policy, gains = min(candidates, key=lambda c: c[0])
            row(refreshes, "fitted", "refined", policy, gains, fewer[k])
            notes.append(f"fitted at {refreshes}: {time.perf_counter() - clock:.0f} s")

    print()
    print("Best schedule against the interval with the same reuse (PSNR dB):")
    for k in INTERVALS:
        refreshes = len(range(0, steps, k))
        for mode_name in (*MODES, "fitted"):
            scores = {n: s for r, m, n, s in rows if r == refreshes and m == mode_name}
            if not scores:
                continue
            best = max((n for n in scores if n != "interval"), key=scores.__getitem__)
            print(f"  {refreshes} refreshes, {mode_name}: {best} {scores[best]:.1f} against "
                  f"{scores['interval']:.1f} ({scores[best] - scores['interval']:+.1f})")
    if not args.no_fitted:
        print("Best planned schedule of any reuse against the interval with the fitted forecast:")
        for k in INTERVALS:
            refreshes = len(range(0, steps, k))
            here = [(s, m, n) for r, m, n, s in rows if r == refreshes]
            score, mode_name, name = max(x for x in here if x[2] != "interval")
            target = next(s for s, m, n in here if (m, n) == ("fitted", "interval"))
            print(f"  {refreshes} refreshes: {mode_name} {name} {score:.1f} against "
                  f"{target:.1f} ({score - target:+.1f})")
    print()
    for note in notes:
        print(f"  {note}")
    print(f"({time.perf_counter() - start:.0f} s on {jax.devices()[0].platform}, jax "
          f"{jax.__version__})")


if __name__ == "__main__":
    main()
