"""Planned schedules on the shipped digit DiT: interval, MagCache and the budgeted planner.

    python benchmarks/planned_schedules.py                 # 64 digits, 20 Euler steps
    python benchmarks/planned_schedules.py --digits 500

At 2x, 2.86x and 4x fewer body evaluations (10, 7 and 5 refreshes of 20 steps: the interval
schedules 2, 3 and 4), every schedule caches the whole block stack (``CachePlan(network, 8)``)
and is sampled with residual reuse and with the order-1 Taylor forecast (of the body's output,
the library's default, and of its residual, the one the planner models). Schedules:

* ``interval``: ``IntervalPolicy(k)``;
* ``magcache``: :class:`jaxcache.MagCachePolicy` from a calibration, its threshold searched on
  the host (the schedule is known before sampling) for the fewest refreshes within the budget,
  with no cap on skips in a row and the published FLUX warm-up (10% of the steps);
* ``planned``: :func:`jaxcache.tuning.plan_refreshes` for the reuse mode (``"residual"`` for
  residual reuse, ``"taylor1"`` for both forecasts).

The calibration (one uncached run recording the body's residuals) uses its own digits and
noise (``--calibration-digits``, seed + 1); every row is scored on the evaluation digits
against full compute (PSNR, images in [-1, 1]), beside uncached sampling with as many steps as
refreshes (the honest baseline at equal body compute).
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
    "residual": (jc.ResidualReuse(), "residual"),
    "taylor1": (jc.TaylorForecast(1), "taylor1"),
    "taylor1-res": (jc.TaylorForecast(1, residual=True), "taylor1"),
}


def magcache_for(calibration, refreshes: int, warmup: float) -> tuple[jc.MagCachePolicy, float]:
    """The MagCache policy with the fewest refreshes within ``refreshes``, and its threshold.

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
    return policy(high), high


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", type=int, default=64, help="evaluation digits (default 64)")
    p.add_argument("--calibration-digits", type=int, default=20,
                   help="digits of the calibration run (default 20)")
    p.add_argument("--arch", default="dit", help="shipped digit model (default dit)")
    p.add_argument("--seed", type=int, default=0)
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
        return noise, cond, jnp.full_like(cond, pretrained.NULL_CLASS)

    noise, cond, uncond = batch(args.calibration_digits, args.seed + 1)
    calibration = tuning.calibrate_magcache(plan, seg, noise, cond, solver=solver,
                                            num_steps=steps, uncond=uncond, guidance_scale=scale)
    noise, cond, uncond = batch(args.digits, args.seed)
    common = dict(solver=solver, uncond=uncond, guidance_scale=scale)
    full = jc.sample(plan, seg, noise, cond, num_steps=steps, **common).sample
    full = jnp.clip(full, -1, 1)

    def psnr(images):
        return metrics.mean_image_scores(jnp.clip(images, -1, 1), full)[0]

    print(f"{args.arch}: {args.digits} digits, {type(solver).__name__} {steps} steps, guidance "
          f"{scale}; calibrated on {args.calibration_digits} other digits; body = all {depth} "
          "layers; PSNR dB against full compute")
    print()
    print("| refreshes | schedule | reuse | steps refreshed | modelled error | PSNR dB | "
          "fewer steps dB |")
    print("|---:|---|---|---|---:|---:|---:|")
    for k in INTERVALS:
        refreshes = len(range(0, steps, k))
        fewer = psnr(jc.sample(jc.CachePlan(network, 0), jc.CachePlan(network, 0).split(params),
                               noise, cond, num_steps=refreshes, **common).sample)
        magcache, threshold = magcache_for(calibration, refreshes, args.warmup)
        for mode_name, (mode, model_name) in MODES.items():
            schedules = {
                "interval": jc.IntervalPolicy(k),
                f"magcache ({threshold:.3g})": magcache,
                "planned": tuning.plan_refreshes(calibration, refreshes=refreshes,
                                                 reuse=model_name),
            }
            for name, policy in schedules.items():
                mask = np.asarray(policy.static_schedule(steps), bool)
                out = jc.sample(plan, seg, noise, cond, num_steps=steps, policy=policy,
                                reuse=mode, **common)
                error = calibration.errors.total(mask, model_name)
                steps_text = " ".join(str(i) for i in np.flatnonzero(mask))
                print(f"| {int(mask.sum())} | {name} | {mode_name} | {steps_text} | "
                      f"{error:.2f} | {psnr(out.sample):.1f} | {fewer:.1f} |", flush=True)
    print()
    print(f"({time.perf_counter() - start:.0f} s on {jax.devices()[0].platform}, jax "
          f"{jax.__version__})")


if __name__ == "__main__":
    main()
