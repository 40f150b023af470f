"""Known schedules cut into the runs the program scans over (numpy, before tracing).

A step mask becomes runs of equal groups (one refresh and its reuse steps); a per-(step, layer)
mask becomes runs of layers that share a column and each step's action for them; any sequence of
step kinds becomes repetitions of patterns. Repeating patterns share one scan, so the program
grows with the number of distinct patterns, not the step count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcache.plan import CachePlan

PyTree = Any


# The action of a run of body layers at a step, under a per-layer plan.
REUSE, STORE, PLAIN = 0, 1, 2


def layer_actions(mask: np.ndarray) -> np.ndarray:
    """``[steps, layers]`` actions of a per-layer mask: store where True; where False, reuse
    if the layer stored before, else run without storing (the reference's empty-slot rule)."""
    mask = np.asarray(mask, bool)
    stored = np.logical_or.accumulate(mask, axis=0)
    return np.where(mask, STORE, np.where(stored, REUSE, PLAIN)).astype(np.int8)


def layer_units(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Runs ``(lo, hi)`` of consecutive body layers whose mask columns are equal.

    Such layers are computed and reused at the same steps, so one reuse state covers them, fed
    the run's input and output: for the shipped modes (linear in what they store) this is the
    per-layer rule exactly in real arithmetic, with fewer states (a uniform mask is one run,
    the whole body, as a step mask).
    """
    mask = np.asarray(mask, bool)
    n = mask.shape[1]
    starts = [0] + [j for j in range(1, n) if not np.array_equal(mask[:, j], mask[:, j - 1])]
    return tuple(zip(starts, [*starts[1:], n]))


def unit_actions(mask: np.ndarray, units) -> np.ndarray:
    """``[steps, units]``: each run's action (the action of its first layer)."""
    return layer_actions(mask)[:, [lo for lo, _ in units]]


def row_runs(ids: np.ndarray, max_period: int = 8) -> list[tuple[int, int, tuple]]:
    """A sequence of step-function ids as runs the program scans over.

    The ids are first cut into items ``(id, count)`` of equal consecutive ids (a scan of
    ``count`` steps). ``(start, reps, items)``: ``reps`` repetitions of a pattern of up to
    ``max_period`` items from step ``start``, so an interval-like plan is one run (plus a
    shorter end) whatever the step count.
    """
    items: list[tuple[int, int]] = []
    starts: list[int] = []
    for step, row_id in enumerate(int(r) for r in ids):
        if items and items[-1][0] == row_id:
            items[-1] = (row_id, items[-1][1] + 1)
        else:
            items.append((row_id, 1))
            starts.append(step)
    runs = []
    for i, period, reps in _repeats(items, max_period):
        runs.append((starts[i], reps, tuple(items[i : i + period])))
    return runs


def _repeats(items: list, max_period: int) -> list[tuple[int, int, int]]:
    """``items`` cut into repetitions of patterns: ``(start, period, reps)`` each, in order.

    At each position the pattern of at most ``max_period`` items that repeats over the most
    items wins (one item, once, if none repeats).
    """
    out = []
    i = 0
    while i < len(items):
        best_period, best_reps = 1, 1
        for period in range(1, max_period + 1):
            pattern = items[i : i + period]
            if len(pattern) < period:
                break
            reps = 1
            while items[i + reps * period : i + (reps + 1) * period] == pattern:
                reps += 1
            if reps > 1 and reps * period > best_reps * best_period:
                best_period, best_reps = period, reps
        out.append((i, best_period, best_reps))
        i += best_period * best_reps
    return out


def computed_steps(schedule: np.ndarray) -> np.ndarray:
    """Which steps compute the body under a known schedule (refreshes, and plain steps)."""
    schedule = np.asarray(schedule, bool)
    first = np.flatnonzero(schedule)
    computed = schedule.copy()
    computed[: first[0] if len(first) else len(schedule)] = True
    return computed


def step_actions(schedule: np.ndarray) -> list[str]:
    """Each step's action under a known schedule: ``"plain"`` before the first refresh (run,
    store nothing), ``"refresh"``, or ``"reuse"``."""
    schedule = np.asarray(schedule, bool)
    stored = np.logical_or.accumulate(schedule)
    return ["refresh" if s else "reuse" if seen else "plain" for s, seen in zip(schedule, stored)]


def schedule_runs(schedule: np.ndarray, max_period: int = 8) -> list[tuple]:
    """A known schedule as runs the program scans over.

    ``("plain", start, count)``: ``count`` steps before the first refresh (run the body, store
    nothing). ``("groups", start, reps, lengths)``: ``reps`` repetitions of a pattern of groups,
    a group of length ``L`` being one refresh and ``L - 1`` reuse steps. Repeating patterns of
    up to ``max_period`` groups share one scan, so an interval schedule is one run (plus a
    shorter last group) and a periodic mask a few, whatever the step count.
    """
    schedule = np.asarray(schedule, bool)
    refreshes = np.flatnonzero(schedule)
    if not len(refreshes):
        return [("plain", 0, len(schedule))]
    runs: list[tuple] = [("plain", 0, int(refreshes[0]))] if refreshes[0] else []
    lengths = [int(n) for n in np.diff(np.append(refreshes, len(schedule)))]
    starts = [int(r) for r in refreshes]
    for i, period, reps in _repeats(lengths, max_period):
        runs.append(("groups", starts[i], reps, tuple(lengths[i : i + period])))
    return runs


def unit_plan(plan: CachePlan, lo: int, hi: int) -> CachePlan:
    """The plan whose cached body is body layers ``[lo, hi)`` of ``plan`` (for reuse modes)."""
    return CachePlan(plan.network, cached_layers=hi - lo, first_layers=plan.first_layers + lo)
