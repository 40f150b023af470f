"""The JAX peer's caches as settings of the trade-off study: CFG-Cache and SenCache.

* ``cfg-cache``: :class:`~jaxcache.CFGCache` alone (no layer cache): every ``k``-th evaluation
  runs both guidance branches, the others the conditional branch alone with the unconditional
  prediction estimated from the last full step (FasterCache's rule). A cache step costs half a
  guided step, so CFG-Cache alone saves at most half.
* ``cfg-cache c + interval``: the same (full steps every ``c`` evaluations) on top of the
  interval layer cache with a reuse mode (the whole stack cached): a step either refreshes the
  body (for the conditional rows alone on a CFG-Cache step) or forecasts it; ``c`` does not
  divide the layer cache's interval, so that some refreshes are cache steps.
* ``fewer steps`` at each CFG-Cache row's compute (rounded to whole steps), so that every row
  has its honest baseline.

SenCache (:class:`~jaxcache.SenCachePolicy`) is a signal-driven policy: the trade-off study
searches its tolerance to the same compute as First-Block's and TeaCache's thresholds
(:data:`jaxcache.digits.tradeoff.SIGNAL_POLICIES`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxcache.digits.harness import REUSE_MODES, Body, Setting
from jaxcache.guidance import CFGCache
from jaxcache.policies import IntervalPolicy
from jaxcache.solvers import Solver

__all__ = ["cfg_cache_settings", "guided_compute"]


def guided_compute(guidance: CFGCache, evaluations: int,
                   refreshed: Sequence[bool] | None = None) -> float:
    """A run's share of full compute in guided steps: 1 per full step, 1/2 per cache step.

    Args:
      guidance: the CFG-Cache setting.
      evaluations: the run's model evaluations.
      refreshed: which evaluations compute the cached body (the whole stack); None: all.

    Returns:
      The share in ``(0, 1]``, the embedding and final projection left out (they are a small
      part of a step; the harness's ideal speedup counts them).
    """
    full = np.asarray(guidance.full_steps(evaluations), np.float64)
    computed = np.ones(evaluations) if refreshed is None else np.asarray(refreshed, np.float64)
    return float(np.sum(computed * (1.0 + full) / 2.0) / evaluations)


def cfg_cache_settings(
    num_steps: int,
    solver: Solver,
    *,
    intervals: Sequence[int] = (2, 3, 5),
    layer_intervals: Sequence[int] = (2, 3),
    layer_modes: Sequence[str] = ("taylor1",),
) -> list[Setting]:
    """CFG-Cache alone and on the interval layer cache, with fewer steps at each one's compute.

    Args:
      num_steps: the step count of every cached row (full compute's).
      solver: the solver (its evaluations per run count the compute).
      intervals: CFG-Cache's full-step intervals of the rows without a layer cache.
      layer_intervals: the layer cache's intervals of the combined rows.
      layer_modes: the combined rows' reuse modes (:data:`REUSE_MODES` names).

    Returns:
      The CFG-Cache rows, then a fewer-steps row per distinct compute they reach.

    Raises:
      ValueError: for an unknown reuse mode.
    """
    unknown = [m for m in layer_modes if m not in REUSE_MODES]
    if unknown:
        raise ValueError(f"unknown reuse modes {unknown}; choose from {sorted(REUSE_MODES)}")
    evaluations = len(solver.times(num_steps)[0])
    settings, shares = [], []
    for k in intervals:
        guidance = CFGCache(interval=k)
        settings.append(Setting("cfg-cache", "-", num_steps, knob=k, guidance=guidance))
        shares.append(guided_compute(guidance, evaluations))
    for k in layer_intervals:
        # CFG-Cache's full steps every 3 (or 2, 5) evaluations: an interval that does not
        # divide k, so that some refreshes run the conditional branch alone (with equal
        # intervals every refresh would be a full step and CFG-Cache would save nothing).
        cfg_interval = next(c for c in (3, 2, 5, 7) if k % c)
        guidance = CFGCache(interval=cfg_interval)
        refreshed = np.asarray(IntervalPolicy(k).static_schedule(evaluations))
        for name in layer_modes:
            settings.append(Setting(f"cfg-cache {cfg_interval} + interval", name, num_steps,
                                    Body(), IntervalPolicy(k), REUSE_MODES[name], knob=k,
                                    guidance=guidance))
        shares.append(guided_compute(guidance, evaluations, refreshed))
    steps = sorted({max(1, round(share * num_steps)) for share in shares}, reverse=True)
    settings += [Setting.fewer_steps(n) for n in steps if n < num_steps]
    return settings
