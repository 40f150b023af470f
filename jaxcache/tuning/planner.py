"""Planned schedules: the refresh steps that minimise a schedule's error within a budget.

A schedule known before sampling compiles to a loop with no decision in it, so it may as well be
the best one for the model. :func:`plan_refreshes` chooses it from the body's residuals along
one full-compute run (``jaxcache.sample(..., record=("body_residual",))``, or a
:class:`~jaxcache.tuning.MagCacheCalibration`, which keeps what is needed): given at most ``K``
refreshes, it finds the set of refresh steps, step 0 included, that minimises the summed error
of the skipped steps against full compute, by exact dynamic programming.

The error model (:class:`StepErrors`), per skipped step ``t`` and averaged over the rows:

* ``"residual"`` / ``"output"`` reuse from the last refresh ``s``: the relative L1 distance of
  the reused residual from the true one, ``mean|r_s - r_t| / mean|r_t|``. For output reuse
  this leaves out the change of the body's input, which it does not follow either.
* ``"taylor1"``, the order-1 forecast from the last two refreshes ``a < b``
  (:class:`~jaxcache.TaylorForecast` with ``residual=True``): the same distance for the linear
  extrapolation ``r_b + (r_b - r_a) (tau_t - tau_b) / (tau_b - tau_a)`` in the solver's time
  ``tau``; after the first refresh alone it is plain reuse, as the forecast is.

The errors add up over steps (each skipped step's error is measured on the full-compute
trajectory, not propagated), which makes the search exact and cheap: ``O(K T^2)`` for reuse,
``O(K T^3)`` for the forecast, well under a second for ``T <= 50`` on a CPU.

That model does not see what the final sample sees: errors propagate through the later steps,
and some cancel. :func:`plan_path` plans instead on errors measured on the final sample
(:func:`~jaxcache.tuning.measure_segments`, LeMiCa's graph: one sampling run per cached
segment), minimising the largest segment error lexicographically (LeMiCa) or their sum. Use
:func:`plan_refreshes` where sampling runs are dear (one run in all, milliseconds to plan),
:func:`plan_path` where a calibration batch can be sampled a few hundred times, and
:func:`~jaxcache.tuning.refine_schedule` after either, which measures whole schedules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxcache.policies.step_mask import StepMaskPolicy
from jaxcache.tuning.segments import SegmentErrors

PyTree = Any

__all__ = [
    "OBJECTIVES", "REUSE_MODELS", "StepErrors", "plan_path", "plan_refreshes", "step_errors",
]

#: The reuse modes whose error :func:`plan_refreshes` models.
REUSE_MODELS = ("residual", "output", "taylor1")

# A floor for the denominator, so a row whose residual is exactly zero reads as "no error".
_TINY = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class StepErrors:
    """The modelled error of every skipped step, from one full-compute run's body residuals.

    Attributes:
      reuse: ``[T, T]`` float64: ``reuse[s, t]`` is the error at step ``t > s`` of reusing the
        residual of refresh ``s`` (NaN where ``t <= s``).
      forecast: ``[T, T, T]`` float64: ``forecast[a, b, t]`` is the error at step ``t > b`` of the
        order-1 forecast from refreshes ``a < b`` (NaN elsewhere; inf where ``a`` and ``b``
        share a time, which the forecast cannot divide by). None when no times were given.
      times: ``[T]`` the solver's time at each model evaluation, or None.
    """

    reuse: np.ndarray
    forecast: np.ndarray | None = None
    times: np.ndarray | None = None

    @property
    def evaluations(self) -> int:
        """``T``, the model evaluations of the run."""
        return self.reuse.shape[0]

    def total(self, mask: Any, reuse: str = "residual") -> float:
        """The modelled error of a schedule: the sum over its skipped steps.

        Args:
          mask: ``[T]`` bools, the refresh steps (step 0 must refresh), or a
            :class:`~jaxcache.StepMaskPolicy`.
          reuse: one of :data:`REUSE_MODELS`.
        """
        reuse = _check_reuse(reuse, self)
        mask = np.asarray(getattr(mask, "mask", mask), bool)
        if mask.shape != (self.evaluations,) or not mask[0]:
            raise ValueError(
                f"mask must hold {self.evaluations} bools with step 0 refreshing, got "
                f"{mask.tolist()!r}"
            )
        total, last, before = 0.0, 0, None
        for t in range(1, self.evaluations):
            if mask[t]:
                if reuse == "taylor1" and self.times[t] == self.times[last]:
                    return math.inf  # the forecast would divide by a zero gap
                before, last = last, t
            elif reuse == "taylor1" and before is not None:
                total += self.forecast[before, last, t]
            else:
                total += self.reuse[last, t]
        return float(total)


def step_errors(residuals: PyTree, times: Any = None) -> StepErrors:
    """The error tables of :class:`StepErrors` from one full-compute run's body residuals.

    Args:
      residuals: ``SampleResult.body_residuals`` (``jaxcache.sample(..., policy=None,
        record=("body_residual",))``): leaves ``[T, rows, ...]``; of a dual-stream body,
        ``(image, text)``, the image stream is measured. Rows are every sample and guidance
        branch; the errors are averaged over them.
      times: ``[T]`` the solver's time at each evaluation (``solver.times(num_steps)[0]``),
        needed for the forecast's table; None leaves it out.

    Returns:
      The tables.

    Raises:
      ValueError, TypeError: for residuals that are not ``[T, rows, ...]`` arrays of finite
        values, or times of another length.
    """
    r = _image_stream(residuals)
    steps = r.shape[0]
    flat = r.reshape(steps, r.shape[1], -1)
    scale = np.maximum(np.mean(np.abs(flat), axis=2), _TINY)  # [T, rows], the truth's size

    def error(estimate: np.ndarray, t: slice) -> np.ndarray:
        """Relative L1 of ``estimate`` ([n, rows, D]) against steps ``t``, averaged over rows."""
        return np.mean(np.mean(np.abs(estimate - flat[t]), axis=2) / scale[t], axis=1)

    reuse = np.full((steps, steps), np.nan)
    for s in range(steps - 1):
        reuse[s, s + 1:] = error(flat[s][None], slice(s + 1, None))
    forecast = None
    if times is not None:
        tau = np.asarray(times, np.float64)
        if tau.shape != (steps,) or not np.all(np.isfinite(tau)):
            raise ValueError(
                f"times must hold the solver's {steps} finite times, one per model evaluation "
                f"(solver.times(num_steps)[0]), got shape {tau.shape}"
            )
        # The forecast divides in float32, as the sampler's does (positions are float32 there).
        tau = tau.astype(np.float32).astype(np.float64)
        forecast = np.full((steps, steps, steps), np.nan)
        for b in range(1, steps - 1):
            later = tau[b + 1:, None, None] - tau[b]
            for a in range(b):
                gap = tau[b] - tau[a]
                if gap == 0:
                    forecast[a, b, b + 1:] = np.inf
                    continue
                slope = (flat[b] - flat[a]) / gap
                forecast[a, b, b + 1:] = error(flat[b][None] + later * slope[None],
                                               slice(b + 1, None))
    return StepErrors(reuse=reuse, forecast=forecast,
                      times=None if times is None else np.asarray(times, np.float64))


def plan_refreshes(
    source: Any,
    *,
    refreshes: int | None = None,
    body_layer_budget: float | None = None,
    cached_layers: int | None = None,
    reuse: str = "residual",
    times: Any = None,
) -> StepMaskPolicy:
    """The refresh steps within a budget that minimise the modelled error against full compute.

    Exact dynamic programming over the last refresh (reuse) or the last two (the order-1
    forecast), on the error tables of :class:`StepErrors`; step 0 always refreshes. Among
    schedules of equal modelled error the one with more refreshes wins, so a budget of every
    step refreshes every step.

    Args:
      source: what the errors come from: a :class:`~jaxcache.tuning.MagCacheCalibration`
        (one full-compute run, its times and cached layers kept), a :class:`StepErrors`, or
        the body residuals of a full-compute run (``SampleResult.body_residuals``).
      refreshes: the budget as refresh steps (at most this many; at least 1).
      body_layer_budget: instead, the budget as the body's layer evaluations per sample:
        ``refreshes x cached_layers`` (head and tail, which run every step, not counted).
      cached_layers: the body's layers, for ``body_layer_budget``; default the calibration's.
      reuse: the reuse mode to plan for: ``"residual"`` (:class:`~jaxcache.ResidualReuse`),
        ``"output"`` (:class:`~jaxcache.OutputReuse`) or ``"taylor1"``
        (:class:`~jaxcache.TaylorForecast` of order 1; modelled on the residual).
      times: the solver's time at each evaluation (``solver.times(num_steps)[0]``), for
        ``"taylor1"`` from residuals (a calibration keeps its own).

    Returns:
      A :class:`~jaxcache.StepMaskPolicy`: sampled with it, the loop holds no decision.

    Raises:
      ValueError, TypeError: for both or neither budget, a budget below one refresh, an unknown
        reuse mode, or a source without what the mode needs (before anything runs).

    Example:
      >>> out = jaxcache.sample(plan, seg, noise, cond, solver=solver, num_steps=20,
      ...                       record=("body_residual",))             # doctest: +SKIP
      >>> policy = plan_refreshes(out.body_residuals, refreshes=7, reuse="taylor1",
      ...                         times=solver.times(20)[0])          # doctest: +SKIP
    """
    errors, layers = _errors_of(source, times, reuse)
    reuse = _check_reuse(reuse, errors)
    steps = errors.evaluations
    budget = _budget("plan_refreshes", refreshes, body_layer_budget,
                     cached_layers if cached_layers is not None else layers)
    budget = min(budget, steps)
    if reuse == "taylor1":
        if budget < 2:
            raise ValueError(
                f"plan_refreshes: reuse='taylor1' forecasts from the last two refreshes, so it "
                f"needs a budget of at least 2 refreshes (and a run of 2 evaluations); got "
                f"{budget}"
            )
        mask = _plan_forecast(errors, budget)
    else:
        mask = _plan_reuse(errors.reuse, budget)
    return StepMaskPolicy(tuple(bool(m) for m in mask))


#: What :func:`plan_path` minimises over a path's edges.
OBJECTIVES = ("minimax", "sum")


def plan_path(
    errors: SegmentErrors,
    *,
    refreshes: int | None = None,
    body_layer_budget: float | None = None,
    cached_layers: int | None = None,
    objective: str = "minimax",
) -> StepMaskPolicy:
    """The best refresh path within a budget over measured segment errors (LeMiCa).

    A schedule is a path through the steps, one edge from each refresh to the next (the last
    to the end of the run), weighed by :func:`~jaxcache.tuning.measure_segments`; segments
    are at most its ``max_length``. Exact dynamic programming over the last refresh, or the
    last two where the weights depend on the forecast's previous refresh
    (``previous="pairs"``); step 0 always refreshes. Among paths of equal value the one with
    more refreshes wins.

    Args:
      errors: the measured :class:`~jaxcache.tuning.SegmentErrors`.
      refreshes: the budget as refresh steps (at most this many; at least 1).
      body_layer_budget: instead, the budget as the body's layer evaluations per sample
        (``refreshes x cached_layers``).
      cached_layers: the body's layers, for ``body_layer_budget``.
      objective: ``"minimax"`` (LeMiCa's lexicographic minimax: the least largest edge
        error, then the least second largest, and so on) or ``"sum"`` (the least summed
        edge error: the final error if the segments' errors added up).

    Returns:
      A :class:`~jaxcache.StepMaskPolicy`: sampled with it, the loop holds no decision.

    Raises:
      ValueError, TypeError: for something other than segment errors, both or neither budget,
        a budget below one refresh, an unknown objective, or a budget that cannot cover the
        run with segments of at most ``max_length`` steps.

    Example:
      >>> errors = tuning.measure_segments(plan, seg, noise, cond, solver=solver,
      ...                                  num_steps=20, reuse=reuse)  # doctest: +SKIP
      >>> policy = tuning.plan_path(errors, refreshes=5)              # doctest: +SKIP
    """
    if not isinstance(errors, SegmentErrors):
        raise TypeError(
            "plan_path: errors must be SegmentErrors (jaxcache.tuning.measure_segments), got "
            f"{type(errors).__name__}; plan_refreshes plans from a run's body residuals"
        )
    if objective not in OBJECTIVES:
        raise ValueError(f"plan_path: objective must be one of {OBJECTIVES}, got {objective!r}")
    steps = errors.evaluations
    budget = min(_budget("plan_path", refreshes, body_layer_budget, cached_layers), steps)
    if budget * errors.max_length < steps:
        raise ValueError(
            f"plan_path: {budget} refreshes cannot cover {steps} evaluations with segments of "
            f"at most max_length={errors.max_length} steps (the longest measured); give at "
            f"least {-(-steps // errors.max_length)} refreshes or measure longer segments"
        )
    return StepMaskPolicy(tuple(bool(m) for m in _best_path(errors.errors, budget, objective)))


# ---------------------------------------------------------------------------- the searches
def _plan_reuse(cost: np.ndarray, budget: int) -> np.ndarray:
    """Exact DP over the last refresh: at most ``budget`` refreshes, step 0 one of them."""
    steps = cost.shape[0]
    filled = np.where(np.isnan(cost), 0.0, cost)
    # span[s, e]: the error of the steps strictly between refresh s and the next at e (e = T:
    # the end of the run), from cumulative sums along t.
    cumulative = np.concatenate([np.zeros((steps, 1)), np.cumsum(filled, axis=1)], axis=1)
    span = _spans(cumulative, steps)
    best = np.full((budget + 1, steps), np.inf)  # best[k, s]: k refreshes, the last at s
    back = np.zeros((budget + 1, steps), int)
    best[1, 0] = 0.0
    for k in range(2, budget + 1):
        # Arrive at refresh e from refresh s < e: best[k - 1, s] + span[s, e].
        options = best[k - 1][:, None] + np.where(
            np.arange(steps)[:, None] < np.arange(steps)[None, :], span[:, :steps], np.inf
        )
        back[k] = np.argmin(options, axis=0)
        best[k] = options[back[k], np.arange(steps)]
    final = best + span[:, steps][None, :]  # the steps after the last refresh
    k, last = _pick(final)
    mask = np.zeros(steps, bool)
    while k >= 1:
        mask[last] = True
        last, k = back[k, last], k - 1
    return mask


def _spans(cumulative: np.ndarray, steps: int) -> np.ndarray:
    """``span[s, e] = sum_{t=s+1}^{e-1} cost[s, t]`` for ``e`` in ``[0, T]`` (0 where e <= s+1).

    ``cumulative[s, j]`` is ``sum_{t<j} cost[s, t]`` (``[T, T + 1]``).
    """
    e = np.arange(steps + 1)
    s = np.arange(steps)
    lower = cumulative[s, s + 1][:, None]
    return np.where(e[None, :] > s[:, None] + 1, cumulative - lower, 0.0)


def _plan_forecast(errors: StepErrors, budget: int) -> np.ndarray:
    """Exact DP over the last two refreshes ``(a, b)``; ``a = T`` stands for "none yet"."""
    steps = errors.evaluations
    none = steps  # the index of "no earlier refresh"
    reuse_cum = np.concatenate(
        [np.zeros((steps, 1)), np.cumsum(np.where(np.isnan(errors.reuse), 0, errors.reuse),
                                         axis=1)], axis=1)
    first_span = _spans(reuse_cum, steps)[0]  # after refresh 0 alone: plain reuse, [T + 1]
    table = np.where(np.isnan(errors.forecast), 0.0, errors.forecast)
    cum = np.concatenate([np.zeros((steps, steps, 1)), np.cumsum(table, axis=2)], axis=2)
    # span[a, b, e] = sum_{t=b+1}^{e-1} forecast[a, b, t] for e > b + 1 (0 otherwise).
    e = np.arange(steps + 1)
    b_index = np.arange(steps)
    lower = np.take_along_axis(
        cum, np.minimum(b_index + 1, steps)[None, :, None].repeat(steps, axis=0), axis=2
    )
    span = np.where(e[None, None, :] > b_index[None, :, None] + 1, cum - lower, 0.0)
    # inf spans (a and b at one time) stay inf even where 0 * inf would read NaN.
    span = np.where(np.isnan(span), np.inf, span)
    valid = np.arange(steps)[:, None] < np.arange(steps)[None, :]  # a < b
    # Two refreshes in a row at one time (a two-stage solver's pair) leave the forecast nothing
    # to divide by: the sampler refuses such schedules, so the search never makes one.
    distinct = errors.times[:, None] != errors.times[None, :]
    # best[k][a, b]: k refreshes, the last two a < b (a = none: b = 0 is the only refresh).
    best = np.full((budget + 1, steps + 1, steps), np.inf)
    back = np.zeros((budget + 1, steps + 1, steps), int)
    best[1, none, 0] = 0.0
    for k in range(2, budget + 1):
        # To (b, c) from (a, b): best[k - 1, a, b] + span(a, b, c); from (none, 0) to (0, c).
        previous = best[k - 1]
        allowed = valid[:, :, None] & (valid & distinct)[None, :, :]  # a < b < c, new time
        options = previous[:steps, :, None] + np.where(allowed, span[:, :, :steps], np.inf)
        back[k, :steps] = np.argmin(options, axis=0)
        best[k, :steps] = np.take_along_axis(options, back[k, :steps][None], axis=0)[0]
        start = previous[none, 0] + first_span[:steps]  # (none, 0) -> (0, c), c >= 1
        start[~distinct[0]] = np.inf
        better = start < best[k, 0]
        best[k, 0] = np.where(better, start, best[k, 0])
        back[k, 0] = np.where(better, none, back[k, 0])
    final = best.copy()
    final[:, :steps] += np.where(valid, span[:, :, steps], np.inf)[None]
    final[:, none, 0] += first_span[steps]
    final[:, none, 1:] = np.inf
    flat = final.reshape(budget + 1, -1)
    k, index = _pick(flat, least=2)  # the forecast needs two refreshes (the sampler checks)
    a, b = divmod(index, steps)
    mask = np.zeros(steps, bool)
    while k >= 1:
        mask[b] = True
        if a == none:
            break
        a, b, k = back[k, a, b], a, k - 1
    return mask


def _best_path(table: np.ndarray, budget: int, objective: str) -> np.ndarray:
    """Exact DP over the last two refreshes ``(h, i)`` (``h = T``: none) on ``table[h, i, j]``.

    The value of a partial path is its summed weight, or for the minimax its weights sorted
    from the largest: adding the same edges to two paths keeps their lexicographic order
    (the largest weight where they differ decides, and shared edges never differ), so the
    best path to a state extends to the best path through it.
    """
    steps = table.shape[1]
    none = steps
    if objective == "sum":
        start, extend = 0.0, lambda value, w: value + w
    else:
        start = ()

        def extend(value, w):
            at = int(np.searchsorted(-np.asarray(value), -w, side="right"))
            return (*value[:at], w, *value[at:])

    def padded(value, k):  # a path of fewer edges: absent edges weigh nothing
        return value if objective == "sum" else value + (0.0,) * (budget - k)

    layer = {(none, 0): (start, (0,))}  # (h, i) -> (value, refreshes), k refreshes so far
    best_value, best_path = None, None
    for k in range(1, budget + 1):
        following: dict[tuple[int, int], tuple[Any, tuple[int, ...]]] = {}
        for (h, i), (value, path) in layer.items():
            for j in np.flatnonzero(~np.isnan(table[h, i, i + 1:])) + i + 1:
                j = int(j)
                extended = extend(value, float(table[h, i, j]))
                if j == steps:
                    # >=: of equal values the path with more refreshes (later k) wins.
                    final = padded(extended, k)
                    if best_value is None or not final > best_value:
                        best_value, best_path = final, path
                elif k < budget:
                    held = following.get((i, j))
                    if held is None or extended < held[0]:
                        following[(i, j)] = (extended, (*path, j))
        layer = following
    total = best_value if objective == "sum" else (best_value[0] if best_value else None)
    if best_path is None or not np.isfinite(total):
        raise ValueError(
            "plan_path: no measured path within the budget reaches the end of the run"
        )
    mask = np.zeros(steps, bool)
    mask[list(best_path)] = True
    return mask


def _pick(final: np.ndarray, least: int = 1) -> tuple[int, int]:
    """``(k, index)`` of the least error in ``final[k, index]`` over ``k >= least``, the largest
    ``k`` among ties."""
    lowest = np.min(final[least:])
    if not np.isfinite(lowest):
        raise ValueError(
            "plan_refreshes: no schedule within the budget can be sampled (with a two-stage "
            "solver, the forecast needs refreshes at distinct times)"
        )
    for k in range(final.shape[0] - 1, least - 1, -1):
        hits = np.flatnonzero(final[k] == lowest)
        if len(hits):
            return k, int(hits[0])
    raise AssertionError("unreachable: the least error is in some row")


# ---------------------------------------------------------------------------- inputs
def _budget(name: str, refreshes: Any, body_layer_budget: Any, layers: Any) -> int:
    """The budget in refreshes from exactly one of ``refreshes`` and ``body_layer_budget``."""
    if (refreshes is None) == (body_layer_budget is None):
        raise ValueError(f"{name}: give one of refreshes= and body_layer_budget=")
    if refreshes is not None:
        if isinstance(refreshes, (bool, np.bool_)) or not isinstance(
            refreshes, (int, np.integer)
        ):
            raise TypeError(f"{name}: refreshes must be an int >= 1, got {refreshes!r}")
        if refreshes < 1:
            raise ValueError(
                f"{name}: refreshes={refreshes} is below one refresh; step 0 always "
                "computes, so the budget must allow at least 1"
            )
        return int(refreshes)
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
        raise ValueError(
            f"{name}: body_layer_budget counts the body's layers, so it needs "
            f"cached_layers= (an int >= 1), got {layers!r}"
        )
    if isinstance(body_layer_budget, (bool, np.bool_)) or not isinstance(
        body_layer_budget, (int, float, np.integer, np.floating)
    ) or not math.isfinite(body_layer_budget):
        raise TypeError(
            f"{name}: body_layer_budget must be a finite number, got {body_layer_budget!r}"
        )
    if body_layer_budget < layers:
        raise ValueError(
            f"{name}: body_layer_budget={body_layer_budget!r} is below one refresh of the "
            f"body ({layers} layers); step 0 always computes, so the budget must be at least "
            f"{layers}"
        )
    return int(body_layer_budget // layers)


def _check_reuse(reuse: Any, errors: StepErrors) -> str:
    if reuse not in REUSE_MODELS:
        raise ValueError(f"reuse must be one of {REUSE_MODELS}, got {reuse!r}")
    if reuse == "taylor1" and errors.forecast is None:
        raise ValueError(
            "reuse='taylor1' models the forecast in the solver's time: give times= (the "
            "solver's times, solver.times(num_steps)[0]) with the residuals"
        )
    return reuse


def _errors_of(source: Any, times: Any, reuse: str) -> tuple[StepErrors, int | None]:
    """The error tables and the body's layer count (if known) of a planner's source."""
    if isinstance(source, SegmentErrors):
        raise TypeError(
            "plan_refreshes models the error from body residuals; measured SegmentErrors plan "
            "with jaxcache.tuning.plan_path"
        )
    if isinstance(source, StepErrors):
        if times is not None:
            raise ValueError("plan_refreshes: times= is for residuals; StepErrors keep their own")
        return source, None
    errors = getattr(source, "errors", None)
    if isinstance(errors, StepErrors):  # a MagCacheCalibration (or anything that keeps errors)
        if times is not None:
            raise ValueError(
                "plan_refreshes: times= is for residuals; a calibration keeps its solver's times"
            )
        return errors, getattr(source, "cached_layers", None)
    if reuse == "taylor1" and times is None:
        raise ValueError(
            "reuse='taylor1' models the forecast in the solver's time: give times= (the "
            "solver's times, solver.times(num_steps)[0]) with the residuals"
        )
    return step_errors(source, times if reuse == "taylor1" else None), None


def _image_stream(residuals: PyTree) -> np.ndarray:
    """The residuals of stream 1 as float64 ``[T, rows, ...]``, checked."""
    if isinstance(residuals, tuple) and len(residuals) == 2:
        residuals = residuals[0]  # a dual-stream body: (image, text)
    leaves = jax.tree.leaves(residuals)
    if len(leaves) != 1 or not hasattr(leaves[0], "shape"):
        raise TypeError(
            "residuals must be SampleResult.body_residuals of a full-compute run: one array "
            "[evaluations, rows, ...] (or (image, text) for a dual-stream body), got "
            f"{type(residuals).__name__}"
        )
    r = np.asarray(leaves[0], np.float64)
    if r.ndim < 3 or r.shape[0] < 1 or r.shape[1] < 1:
        raise ValueError(
            f"residuals must be [evaluations, rows, ...features], got shape {r.shape}"
        )
    if not np.all(np.isfinite(r)):
        raise ValueError("residuals must be finite")
    return r
