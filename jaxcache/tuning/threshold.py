"""Choosing a signal policy's threshold for a compute budget, on the user's model and batch.

A signal-driven policy (:class:`~jaxcache.FirstBlockPolicy`, :class:`~jaxcache.TeaCachePolicy`,
:class:`~jaxcache.DBCachePolicy`, and :class:`~jaxcache.SenCachePolicy` by its tolerance) skips
more steps as its threshold grows, but how many depends
on the model, the batch, the solver and the step count. :func:`threshold_for` finds the
threshold at which a run computes a target fraction of its model evaluations (or a budget of
layer evaluations) by bisection, each probe one run of :func:`jaxcache.sample`. Thresholds are
traced, so every probe runs the one compiled program: the search compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from jaxcache.policies.base import RefreshPolicy
from jaxcache.policies.sencache import is_whole_network
from jaxcache.tuning.run import CalibrationRun, takes_a_run

PyTree = Any

__all__ = ["ThresholdChoice", "threshold_for"]

# The largest threshold tried before a target is called out of reach.
_CEILING = 1e6


class ThresholdChoice(NamedTuple):
    """What :func:`threshold_for` found.

    Attributes:
      threshold: the threshold (a Python float).
      fraction: the fraction of the model evaluations whose body ran at that threshold: for the
        batch (a step counts when any row ran it; ``mean(out.refreshed)``), or with
        ``per_sample=True`` the mean over rows of each row's own (``mean(out.body_computed)``).
      layer_evaluations: the layer evaluations of that run, head and tail included, counted as
        ``fraction`` is: the batch's (``out.layer_evaluations``; a guided step counts once), or
        one sample's on average.
      policy: ``policy`` with that threshold, ready for :func:`jaxcache.sample`.
      probes: ``(threshold, fraction)`` of every run the search made, in order.
    """

    threshold: float
    fraction: float
    layer_evaluations: float
    policy: RefreshPolicy
    probes: tuple[tuple[float, float], ...]


@takes_a_run
def threshold_for(
    run: CalibrationRun,
    *,
    policy: RefreshPolicy,
    target_fraction: float | None = None,
    layer_budget: float | None = None,
    reuse=None,
    per_sample: bool = False,
    tolerance: float | None = None,
    start: float = 1.0,
    iterations: int = 30,
) -> ThresholdChoice:
    """The threshold at which ``policy`` computes a target share of the run, by bisection.

    Finds the least threshold (to the search's resolution) whose run computes at most the
    target, so the run stays within budget: within one model evaluation of the target wherever
    one more or one fewer computed step is reachable. Each probe is one
    :func:`jaxcache.sample` run on these inputs; the threshold is traced, so the probes share
    one compiled program (the search compiles it once, or not at all when it is cached).

    The search doubles as a budget search for a sample's or a batch's layer evaluations: give
    ``layer_budget`` instead of ``target_fraction``. Larger thresholds skip more (for
    TeaCache, on the accumulated change); where a model's measure makes the computed share
    non-monotone in the threshold, the result is one threshold within budget, not necessarily
    the least.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`): a
        plan with a body of at least one layer; your own noise (the share depends on it).
      policy: a policy that decides on the device and has a ``threshold`` field
        (:class:`~jaxcache.FirstBlockPolicy`, :class:`~jaxcache.TeaCachePolicy`,
        :class:`~jaxcache.DBCachePolicy`), or a :class:`~jaxcache.SenCachePolicy`, whose
        ``tolerance`` is searched (its ``early_tolerance`` kept in the same ratio to it); its
        other settings are kept. A SenCache skip skips the whole network, so its fraction
        and layer evaluations count every layer; with sensitivities estimated in the program,
        its warm-up probes are not counted (give calibrated ones for an exact count).
      target_fraction: the fraction of model evaluations whose body may run, in ``(0, 1]``.
      layer_budget: instead, the layer evaluations the run may make, head and tail included
        (counted as :attr:`jaxcache.SampleResult.layer_evaluations`; per sample with
        ``per_sample``). At least the layers outside the body at every evaluation.
      reuse: the reuse mode to sample with (it changes the trajectory, so the share).
      per_sample: count each row's own computed steps, averaged over the rows (a sample's
        compute as if sampled alone), rather than the steps the batch ran the body on.
      tolerance: how far below the target the fraction may stop, in fractions of the model
        evaluations; default half of one evaluation (the search runs to its resolution).
      start: the first threshold tried; it grows fourfold until the run computes at most the
        target.
      iterations: the most bisection steps after that.

    Returns:
      A :class:`ThresholdChoice`: the threshold, the fraction it reached, its layer
      evaluations, the policy with that threshold, and every probe.

    Raises:
      ValueError, TypeError: for a target outside its range, both or neither target, a
        policy without a ``threshold`` or one whose schedule is known before sampling, a plan
        with nothing cached (before anything compiles); a target no threshold up to 1e6
        reaches (the policy always computes some steps: warm-up, TeaCache's first and last),
        naming the least fraction reached.
    """
    if not isinstance(policy, RefreshPolicy) or not dataclasses.is_dataclass(policy):
        raise TypeError(f"threshold_for: policy must be a RefreshPolicy instance, got {policy!r}")
    evaluations = run.evaluations
    plan = run.plan
    if policy.static_schedule(evaluations) is not None:
        raise ValueError(
            f"threshold_for: {type(policy).__name__}'s schedule is known before sampling, so "
            "no threshold changes it; give a policy that decides on the device"
        )
    whole = is_whole_network(policy)
    try:
        policy.with_threshold(0.0)
    except TypeError:
        raise TypeError(
            f"threshold_for searches a policy's threshold; {type(policy).__name__} has none"
        ) from None
    if plan.cached_layers < 1 and not whole:
        raise ValueError("threshold_for: the plan caches no layer, so no threshold skips any")
    if (target_fraction is None) == (layer_budget is None):
        raise ValueError("threshold_for: give one of target_fraction= and layer_budget=")
    if not isinstance(per_sample, bool):
        raise TypeError(f"threshold_for: per_sample must be a bool, got {per_sample!r}")
    depth = plan.total_layers(run.params)
    # What runs every evaluation (head and tail) and what a skip saves (the body, were it
    # computed every evaluation); a policy that skips the whole network saves every layer.
    skippable = depth if whole else plan.cached_layers
    always = evaluations * (depth - skippable)
    body = evaluations * skippable
    if target_fraction is not None:
        target = _number(target_fraction, "target_fraction")
        if not 0 < target <= 1:
            raise ValueError(
                f"threshold_for: target_fraction must be in (0, 1], got {target_fraction!r}"
            )
    else:
        budget = _number(layer_budget, "layer_budget")
        if budget <= always:
            raise ValueError(
                f"threshold_for: layer_budget={layer_budget!r} leaves nothing for the body: the "
                f"head and tail alone make {always} layer evaluations "
                f"({evaluations} evaluations x {depth - plan.cached_layers} layers)"
            )
        target = min((budget - always) / body, 1.0)
    tolerance = 0.5 / evaluations if tolerance is None else _number(tolerance, "tolerance")
    if tolerance < 0:
        raise ValueError(f"threshold_for: tolerance must be >= 0, got {tolerance!r}")
    start = _number(start, "start")
    if not 0 < start < _CEILING:
        raise ValueError(f"threshold_for: start must be in (0, {_CEILING:g}), got {start!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or (
        iterations < 0
    ):
        raise ValueError(f"threshold_for: iterations must be an int >= 0, got {iterations!r}")

    probes: list[tuple[float, float]] = []

    def fraction_at(threshold: float) -> float:
        # Always a Python float: one argument type, so one compiled program for every probe.
        out = run.sample(policy=policy.with_threshold(threshold), reuse=reuse)
        computed = out.body_computed if per_sample else out.refreshed
        fraction = float(np.mean(np.asarray(computed)))
        probes.append((threshold, fraction))
        return fraction

    def choice(threshold: float, fraction: float) -> ThresholdChoice:
        return ThresholdChoice(
            threshold, fraction, float(always + fraction * body),
            policy.with_threshold(threshold), tuple(probes),
        )

    if target >= 1:  # threshold 0 computes every step
        return choice(0.0, fraction_at(0.0))
    # Invariant: the run at `low` computes more than the target, the one at `high` at most it.
    low, high = 0.0, float(start)
    reached = fraction_at(high)
    while reached > target:
        if high * 4 > _CEILING:
            raise ValueError(
                f"threshold_for: no threshold up to {high:g} computes at most {target:.4g} of "
                f"the evaluations; the least fraction reached is {reached:.4g} (the policy "
                "always computes some steps: warm-up, TeaCache's first and last)"
            )
        low, high = high, high * 4
        reached = fraction_at(high)
    for _ in range(iterations):
        if target - reached <= tolerance or high - low <= 1e-6 * high:
            break
        middle = (low + high) / 2
        fraction = fraction_at(middle)
        if fraction > target:
            low = middle
        else:
            high, reached = middle, fraction
    return choice(high, reached)


def _number(value: Any, name: str) -> float:
    """``value`` as a finite Python float (a concrete number), else a TypeError/ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"threshold_for: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"threshold_for: {name} must be finite, got {value!r}")
    return value
