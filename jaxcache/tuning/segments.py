"""Errors measured on the final sample: cached segments (LeMiCa) and whole schedules.

:func:`~jaxcache.tuning.plan_refreshes` models a schedule's error from one run's body
residuals, step by step; on a trained model that sum need not predict the final sample's error
(errors propagate through the later steps, and some cancel). The functions here measure instead,
with real sampling runs of a calibration batch against full compute:

* :func:`measure_segments` weighs every edge of LeMiCa's graph (Gao et al. 2025, "LeMiCa:
  Lexicographic Minimax Path Caching"): edge ``i -> j`` refreshes at step ``i`` and reuses (or
  forecasts) until the next refresh at ``j`` (``j = T``: the end of the run). Its weight is the
  mean squared error of the final sample when only that segment is cached and every other step
  computes. :func:`~jaxcache.tuning.plan_path` then finds the best path of at most ``K`` edges.
* :func:`refine_schedule` improves whole schedules by local search, each candidate measured
  by one run: it optimises the final sample's error itself, interactions between segments
  included.

Every run of either is one call of the same compiled program: the refresh mask is a traced
array that a policy indexes on the device, so a new mask reuses the program.

A forecast (order 1) needs a refresh before the segment's own. With ``previous="adjacent"``
the steps before ``i`` all compute, so the forecast reads the refreshes ``i - 1`` and ``i``;
with ``previous="pairs"`` every previous refresh ``h`` is measured too (the steps between
``h`` and ``i`` compute without being stored), so an edge is ``(h, i) -> j``, as on the
path, for about ``max_length`` times the runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int
from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy
from jaxcache.policies.step_mask import StepMaskPolicy
from jaxcache.reuse.base import ReuseMode
from jaxcache.reuse.output import OutputReuse
from jaxcache.tuning.run import CalibrationRun, takes_a_run

PyTree = Any

__all__ = [
    "METRICS",
    "PREVIOUS",
    "RefinedSchedule",
    "SegmentErrors",
    "measure_segments",
    "refine_schedule",
]

#: How the previous refresh of a forecast's segment is chosen (see the module docstring).
PREVIOUS = ("adjacent", "pairs")
#: What :func:`refine_schedule` minimises: the mean squared error of the final samples, or the
#: mean of each sample's in decibels (``10 log10 MSE``: minimising it maximises mean PSNR).
METRICS = ("mse", "mse_db")

# A floor for a sample's squared error before its logarithm (a sample equal to full compute).
_TINY = 1e-30


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentErrors:
    """The measured final-sample error of every cached segment (LeMiCa's edge weights).

    Attributes:
      errors: ``[T + 1, T, T + 1]`` float64: ``errors[h, i, j]`` is the mean squared error of
        the final sample against full compute when steps ``i + 1 .. j - 1`` reuse the refresh
        at ``i`` (``j = T``: to the end) and every other step computes, the forecast's
        previous refresh being ``h`` (``h = T``: none, for ``i = 0``). With
        ``previous="adjacent"`` the weight does not depend on ``h`` (the steps before ``i``
        all refresh) and is the same for every ``h``. ``j = i + 1`` skips nothing and weighs
        0; NaN marks what was not measured (``j - i`` or ``i - h`` above ``max_length``).
      previous: ``"adjacent"`` or ``"pairs"`` (see the module docstring).
      max_length: the longest segment measured, in steps from refresh to refresh.
      runs: the sampling runs made (the full-compute reference included).
      reuse: the reuse mode measured, as its ``repr``.
    """

    errors: np.ndarray
    previous: str
    max_length: int
    runs: int
    reuse: str

    @property
    def evaluations(self) -> int:
        """``T``, the model evaluations of a run."""
        return self.errors.shape[1]

    def edges(self, mask: Any) -> list[tuple[int, int, int, float]]:
        """The edges of a schedule: ``(h, i, j, weight)`` per refresh ``i`` (``h = T``: none).

        Args:
          mask: ``[T]`` bools with step 0 refreshing, or a policy whose schedule is known
            (:class:`~jaxcache.StepMaskPolicy`, :class:`~jaxcache.IntervalPolicy`).
        """
        steps = self.evaluations
        refreshes = list(np.flatnonzero(_mask_of(mask, steps)))
        out, previous = [], steps
        for i, j in zip(refreshes, refreshes[1:] + [steps]):
            out.append((previous, int(i), int(j), float(self.errors[previous, i, j])))
            previous = int(i)
        return out

    def total(self, mask: Any, objective: str = "sum") -> float | tuple[float, ...]:
        """A schedule's modelled error: the sum of its edges' weights (``"sum"``), or the
        weights sorted from the largest (``"minimax"``, compared lexicographically). NaN
        where an edge was not measured.

        Args:
          mask: as for :meth:`edges`.
          objective: ``"sum"`` or ``"minimax"``.
        """
        weights = [w for *_, w in self.edges(mask)]
        if objective == "sum":
            return float(sum(weights))
        if objective == "minimax":
            return tuple(sorted(weights, reverse=True))
        raise ValueError(f"objective must be 'sum' or 'minimax', got {objective!r}")


class RefinedSchedule(NamedTuple):
    """What :func:`refine_schedule` found.

    Attributes:
      policy: the best schedule measured, a :class:`~jaxcache.StepMaskPolicy`.
      error: its measured error (the ``metric``).
      start_error: the best start's measured error.
      probes: every schedule measured, as ``(refresh steps, error)``, in order.
    """

    policy: StepMaskPolicy
    error: float
    start_error: float
    probes: tuple[tuple[tuple[int, ...], float], ...]


@takes_a_run
def measure_segments(
    run: CalibrationRun,
    *,
    reuse: ReuseMode | None = None,
    max_length: int = 8,
    previous: str = "adjacent",
    log: Callable[[int, int], None] | None = None,
) -> SegmentErrors:
    """The final-sample error of every cached segment up to ``max_length`` steps, measured.

    One run of the calibration batch per edge, all of one compiled program (the refresh mask
    is traced), against the same program with every step computed. Calibrate on samples that
    are not the ones you score. Runs: about ``T (max_length - 1)`` with
    ``previous="adjacent"``, ``max_length`` times that with ``"pairs"``.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`): a
        plan with a body of at least one layer, a calibration batch of its own.
      reuse: the reuse mode to sample with (default :class:`~jaxcache.OutputReuse`).
      max_length: the longest segment measured, from refresh to refresh (>= 2): a schedule
        planned from these errors never goes longer without refreshing.
      previous: the forecast's previous refresh: ``"adjacent"`` (the step before the
        segment's refresh) or ``"pairs"`` (each one a path can have; see the module
        docstring). For reuse that reads one refresh both measure the same.
      log: called with ``(runs done, runs in all)`` as each run's error is read.

    Returns:
      The :class:`SegmentErrors`, for :func:`~jaxcache.tuning.plan_path`.

    Raises:
      ValueError, TypeError: for a plan that caches nothing, a ``max_length`` below 2, an
        unknown ``previous``, ``"pairs"`` with a forecast in time and a solver that evaluates
        twice at one time, or settings the sampler refuses (before anything compiles).

    Example:
      >>> errors = tuning.measure_segments(plan, seg, noise, cond, solver=solver,  # doctest: +SKIP
      ...                                  num_steps=20, reuse=jaxcache.ResidualReuse())
      >>> policy = tuning.plan_path(errors, refreshes=7)              # doctest: +SKIP
    """
    max_length = check_int(max_length, "measure_segments: max_length", minimum=2)
    if previous not in PREVIOUS:
        raise ValueError(f"measure_segments: previous must be one of {PREVIOUS}, got {previous!r}")
    if previous == "pairs":
        _check_pairs(reuse, run.solver.times(run.num_steps)[0])
    runner = _Runner(run, reuse, "mse", stores=previous == "pairs")
    steps = runner.steps
    jobs = []  # (h, i, j) of every run, in order
    for i in range(steps):
        before = [steps] if i == 0 or previous == "adjacent" else range(max(0, i - max_length), i)
        for h in before:
            jobs += [(h, i, j) for j in range(i + 2, min(i + max_length, steps) + 1)]
    pending = []  # every run dispatched before any is read: the device never waits
    for h, i, j in jobs:
        mask = np.ones(steps, bool)
        mask[i + 1:j] = False
        keep = None
        if previous == "pairs":
            keep = np.ones(steps, bool)
            if h < steps:
                keep[h + 1:i] = False  # computed, not stored: the forecast reads h and i
        pending.append(runner.start(mask, keep))
    measured = []
    for p in pending:
        measured.append(runner.finish(p))
        if log is not None:
            log(len(measured), len(jobs))
    errors = np.full((steps + 1, steps, steps + 1), np.nan)
    for i in range(steps):  # a segment of one step skips nothing
        errors[_previous_of(i, steps, max_length), i, i + 1] = 0.0
    for (h, i, j), value in zip(jobs, measured):
        rows = _previous_of(i, steps, max_length) if previous == "adjacent" else [h]
        errors[rows, i, j] = value
    return SegmentErrors(errors=errors, previous=previous, max_length=max_length,
                         runs=runner.runs, reuse=repr(runner.reuse))


@takes_a_run
def refine_schedule(
    run: CalibrationRun,
    *,
    start: RefreshPolicy | Sequence[RefreshPolicy],
    reuse: ReuseMode | None = None,
    shift: int = 2,
    max_rounds: int = 50,
    metric: str = "mse_db",
) -> RefinedSchedule:
    """The schedule of least measured error near ``start``, by local search.

    From each start, steepest descent: every schedule that moves one refresh (step 0 stays)
    by up to ``shift`` steps, keeping the order and the count, is sampled once on the
    calibration batch and scored against full compute; the best replaces the current one while
    it is better, for at most ``max_rounds`` rounds. The result is the best found from any
    start. Every run is one call of one compiled program (the mask is traced). Calibrate on
    samples that are not the ones you score.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`): a
        plan with a body of at least one layer, a calibration batch of its own.
      start: a policy whose schedule is known before sampling, step 0 refreshing
        (:class:`~jaxcache.StepMaskPolicy`, e.g. from :func:`~jaxcache.tuning.plan_path`;
        :class:`~jaxcache.IntervalPolicy`), or several.
      reuse: the reuse mode to sample with.
      shift: the farthest one refresh moves in one move (>= 1).
      max_rounds: the most moves from each start (>= 0; 0 measures the starts only).
      metric: one of :data:`METRICS`: ``"mse_db"`` (the mean of each sample's squared error
        in decibels, ``10 log10 MSE``: what a mean PSNR reads, every sample weighing alike) or
        ``"mse"`` (the mean squared error over the batch, led by the worst samples).

    Returns:
      A :class:`RefinedSchedule`: the policy, its error, the best start's, every probe.

    Raises:
      ValueError, TypeError: for a start that is not a known schedule with step 0, starts of
        another length, ``shift < 1``, ``max_rounds < 0``, an unknown metric, or settings the
        sampler refuses (before anything compiles).

    Example:
      >>> found = tuning.refine_schedule(plan, seg, noise, cond, solver=solver, num_steps=20,
      ...                                start=jaxcache.IntervalPolicy(3),
      ...                                reuse=jaxcache.TaylorForecast(1))  # doctest: +SKIP
      >>> found.policy, found.error, found.start_error                    # doctest: +SKIP
    """
    shift = check_int(shift, "refine_schedule: shift", minimum=1)
    max_rounds = check_int(max_rounds, "refine_schedule: max_rounds", minimum=0)
    if metric not in METRICS:
        raise ValueError(f"refine_schedule: metric must be one of {METRICS}, got {metric!r}")
    starts = [start] if isinstance(start, RefreshPolicy) else list(start)
    if not starts:
        raise ValueError("refine_schedule: give at least one start")
    masks = [_mask_of(s, run.evaluations, "refine_schedule: start") for s in starts]
    runner = _Runner(run, reuse, metric)
    steps = runner.steps
    scores: dict[tuple[int, ...], float] = {}

    def measure(candidates: list[tuple[int, ...]]) -> None:
        new = [c for c in dict.fromkeys(candidates) if c not in scores]
        pending = [runner.start(_mask(c, steps)) for c in new]  # dispatched, then read
        for c, p in zip(new, pending):
            scores[c] = runner.finish(p)

    firsts = [tuple(int(s) for s in np.flatnonzero(m)) for m in masks]
    measure(firsts)
    best = min(firsts, key=scores.__getitem__)
    start_error = scores[best]
    for current in firsts:
        for _ in range(max_rounds):
            near = _moves(current, steps, shift)
            measure(near)
            if not near:
                break
            candidate = min(near, key=scores.__getitem__)
            if not scores[candidate] < scores[current]:
                break
            current = candidate
        if scores[current] < scores[best]:
            best = current
    return RefinedSchedule(
        policy=StepMaskPolicy(tuple(bool(m) for m in _mask(best, steps))),
        error=scores[best], start_error=start_error, probes=tuple(scores.items()),
    )


# ---------------------------------------------------------------------------- the runs
@settings_dataclass()
class _TracedMask(RefreshPolicy):
    """Refresh where a traced ``[T]`` bool array says: one compiled program for every mask.

    Its schedule is not known while compiling, so the loop decides on the device.
    """

    mask: Any

    def check(self, plan, num_steps):
        if np.shape(self.mask) != (num_steps,):
            raise ValueError(f"the mask has shape {np.shape(self.mask)}, not ({num_steps},)")

    def init(self, num_steps, signal=None):
        return ()

    def decide(self, state, step, signal):
        return self.mask[step], state


@settings_dataclass()
class _StoreWhere(ReuseMode):
    """``mode`` storing only at the steps where a traced ``keep`` mask is True.

    A computed step that does not store leaves the reuse state as it was, so a forecast reads
    the refreshes before it: the pairs of :func:`measure_segments`.
    """

    mode: Any
    keep: Any

    @property
    def records_layers(self) -> bool:  # type: ignore[override]
        return self.mode.records_layers

    def history(self) -> int:
        return self.mode.history()

    def init(self, plan, body, constant):
        return self.mode.init(plan, body, constant)

    def store(self, state, body_in, body_out, position, rows):
        stored = self.mode.store(state, body_in, body_out, position, rows)
        keep = self.keep[position.step]
        return jax.tree.map(lambda new, old: jnp.where(keep, new, old), stored, state)

    def reuse(self, state, body_in, position):
        return self.mode.reuse(state, body_in, position)

    def record(self, state, index, h, rows):
        return self.mode.record(state, index, h, rows)

    def rows(self, state, start, stop):
        return self.mode.rows(state, start, stop)

    def check(self, plan, num_steps, refreshes):
        self.mode.check(plan, num_steps, refreshes)


@jax.jit
def _per_sample_mse(sample_: jax.Array, reference: jax.Array) -> jax.Array:
    """``[batch]`` float32: each sample's mean squared error against the reference."""
    difference = sample_.astype(jnp.float32) - reference.astype(jnp.float32)
    return jnp.mean(jnp.square(difference).reshape(difference.shape[0], -1), axis=1)


class _Runner:
    """Samples the calibration batch under any mask, with one compiled program."""

    def __init__(self, run: CalibrationRun, reuse, metric, stores=False):
        if getattr(run.plan, "cached_layers", None) == 0:
            raise ValueError("the plan caches no layer, so no schedule changes the sample")
        self.run = run
        self.steps = run.evaluations
        self.reuse = reuse if reuse is not None else OutputReuse()  # the sampler's default
        self.metric = metric
        self.stores = stores  # masks the stores too (one program for every keep mask)
        self.runs = 0
        # The reference is the same program with every step computed, so a mask of every
        # step measures exactly 0 (and no second program compiles).
        self.reference = self._sample(np.ones(self.steps, bool), None)

    def _sample(self, mask: np.ndarray, keep: np.ndarray | None) -> jax.Array:
        mode = self.reuse
        if self.stores:
            keep = np.ones(self.steps, bool) if keep is None else keep
            mode = _StoreWhere(self.reuse, jnp.asarray(keep))
        self.runs += 1
        return self.run.sample(policy=_TracedMask(jnp.asarray(mask)), reuse=mode).sample

    def start(self, mask: np.ndarray, keep: np.ndarray | None = None) -> jax.Array:
        """Dispatches one run; :meth:`finish` reads its error."""
        return _per_sample_mse(self._sample(mask, keep), self.reference)

    def finish(self, pending: jax.Array) -> float:
        per_sample = np.asarray(pending, np.float64)
        if self.metric == "mse_db":
            return float(np.mean(10 * np.log10(np.maximum(per_sample, _TINY))))
        return float(np.mean(per_sample))


# ---------------------------------------------------------------------------- helpers
def _check_pairs(reuse: Any, times: Any) -> None:
    """Pairs store refreshes far apart; a forecast in time cannot divide by a zero gap."""
    times = np.asarray(times)
    if getattr(reuse, "divides_by_time", False) and getattr(reuse, "order", 0) >= 1 and (
        len(np.unique(times)) < len(times)
    ):
        raise ValueError(
            f"measure_segments: previous='pairs' with {type(reuse).__name__}, which divides by "
            "the time between stored steps, and a solver that evaluates twice at one time: "
            "use previous='adjacent', or HermiteForecast (it counts in steps)"
        )


def _previous_of(i: int, steps: int, max_length: int) -> list[int]:
    """The previous refreshes a path can have before refresh ``i`` (``steps``: none)."""
    return [steps] if i == 0 else list(range(max(0, i - max_length), i))


def _moves(refreshes: tuple[int, ...], steps: int, shift: int) -> list[tuple[int, ...]]:
    """Every schedule that moves one refresh but step 0 by ``1 .. shift`` steps, in order."""
    out = []
    for r in range(1, len(refreshes)):
        low = refreshes[r - 1]
        high = refreshes[r + 1] if r + 1 < len(refreshes) else steps
        for d in range(-shift, shift + 1):
            moved = refreshes[r] + d
            if d and low < moved < high:
                out.append(refreshes[:r] + (moved,) + refreshes[r + 1:])
    return out


def _mask(refreshes: tuple[int, ...], steps: int) -> np.ndarray:
    mask = np.zeros(steps, bool)
    mask[list(refreshes)] = True
    return mask


def _mask_of(policy: Any, steps: int, name: str = "mask") -> np.ndarray:
    """``[steps]`` bools from a mask or a policy with a known schedule; step 0 must refresh."""
    if isinstance(policy, RefreshPolicy):
        schedule = policy.static_schedule(steps)
        if schedule is None:
            raise ValueError(
                f"{name} must be a schedule known before sampling (StepMaskPolicy, "
                f"IntervalPolicy), got {type(policy).__name__}"
            )
        policy = schedule
    mask = np.asarray(policy)
    if mask.shape != (steps,) or mask.dtype != bool or not mask[0]:
        raise ValueError(
            f"{name} must hold {steps} bools with step 0 refreshing, got "
            f"{np.asarray(policy).tolist()!r}"
        )
    return mask
