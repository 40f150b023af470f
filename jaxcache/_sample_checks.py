"""What :func:`jaxcache.sample` refuses before compiling, each argument with an error that
names it: the plan against the parameters, the policy against the plan (its signal, its layer
plan), the reuse mode against the schedule it gets, the solver, the guidance and what ``record=``
asks for. Checks that read only shapes run while tracing (``check_prediction``) and cost nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np

from jaxcache._checks import check_arrays, check_int
from jaxcache._record import RECORDABLE
from jaxcache._schedule_runs import REUSE, layer_actions, layer_units, unit_plan
from jaxcache.guidance import CFGCache
from jaxcache.plan import CachePlan
from jaxcache.policies.base import RefreshPolicy
from jaxcache.policies.sencache import is_whole_network
from jaxcache.policies.signals import check_signal
from jaxcache.reuse.base import ReuseMode
from jaxcache.reuse.forecast import Ladder, TaylorForecast
from jaxcache.reuse.output import OutputReuse
from jaxcache.sharding import normalize_sequence_axis
from jaxcache.solvers import Solver

PyTree = Any


def _check_remat(remat: Any, policy: RefreshPolicy | None = None, on_device: bool = False) -> bool:
    """``remat`` as a bool; refused where it cannot apply (a loop that decides on the device)."""
    if not isinstance(remat, bool):
        raise TypeError(f"remat must be a bool (static), got {remat!r}")
    if remat and on_device:
        raise ValueError(
            f"remat=True rematerialises each step of the uncached loop or of a schedule known "
            f"before sampling in the backward pass; {type(policy).__name__} decides on the "
            "device (its static_schedule is None), and that loop runs the body in a "
            "while_loop, which reverse-mode differentiation does not cross: there is no "
            "backward pass to rematerialise. Drop remat=, or differentiate through a known "
            "schedule (IntervalPolicy, StepMaskPolicy)"
        )
    return remat


def _kind_of(value: Any) -> str:
    """How an argument of the wrong kind is named in a message (a class as a class)."""
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return type(value).__name__


def _check_instance(value: Any, base: type, what: str) -> None:
    """Refuses a class of ``base`` passed where an instance is needed, naming the fix."""
    if isinstance(value, type) and issubclass(value, base):
        try:
            needs = any(
                p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                for p in inspect.signature(value).parameters.values()
            )
        except (TypeError, ValueError):
            needs = False
        call = f"{value.__name__}(...)" if needs else f"{value.__name__}()"
        raise TypeError(
            f"{what} must be an instance, got the class {value.__name__}: pass an instance, "
            f"{call}"
        )


def checked_arguments(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond, scale,
                      key, remat=False, sequence_axis=None, record=(), guidance=None):
    """Validates every argument (before tracing) and returns ``_sample``'s arguments."""
    _check_instance(plan, CachePlan, "plan")
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {_kind_of(plan)}")
    _check_remat(remat)
    plan.check(params)
    check_arrays(params, "params")
    _check_solver(solver, key)
    check_int(num_steps, "num_steps")
    times, next_times = solver.times(num_steps)
    evaluations = len(times)
    if np.shape(times) != (evaluations,) or np.shape(next_times) != (evaluations,):
        raise ValueError(
            f"{type(solver).__name__}.times({num_steps}) must return two 1-D arrays of equal "
            f"length, got shapes {np.shape(times)} and {np.shape(next_times)}"
        )
    # Only an index network is checked: a discrete-schedule solver on a continuous network may
    # be right (a model trained on t = k / T) or wrong (a DDPM-trained one); nothing here knows.
    plan.network.time.check_times(times, solver)
    counted = "" if evaluations == num_steps else (
        f" (the cache counts model evaluations: {type(solver).__name__} makes {evaluations} in "
        f"{num_steps} steps)"
    )
    schedule = None
    if policy is not None:
        _check_instance(policy, RefreshPolicy, "policy")
        if not isinstance(policy, RefreshPolicy):
            raise TypeError(f"policy must be a RefreshPolicy or None, got {_kind_of(policy)}")
        check_signal(policy, plan)  # the signal checks itself against the plan
        try:
            policy.check(plan, evaluations)
        except ValueError as error:
            raise ValueError(f"{error}{counted}") from error
    if reuse is not None:
        _check_instance(reuse, ReuseMode, "reuse")
        if not isinstance(reuse, ReuseMode):
            raise TypeError(f"reuse must be a ReuseMode or None, got {_kind_of(reuse)}")
    whole = policy is not None and is_whole_network(policy)
    inner = getattr(policy, "policy", None)
    if not whole and inner is not None and is_whole_network(inner):
        raise ValueError(
            f"{type(inner).__name__} already decides on the device, before the network; pass "
            f"it as policy= itself, not wrapped in {type(policy).__name__}"
        )
    if whole:  # the reuse mode stands in for the network's prediction
        mode = prediction_mode(policy, reuse)
        try:
            mode.check(plan, evaluations, None)
        except ValueError as error:
            raise ValueError(f"{error}{counted}") from error
        _check_forecast_times(mode, solver, times, None)
        _check_remat(remat, policy, on_device=True)
    elif policy is not None and plan.cached_layers > 0:
        mode = reuse or OutputReuse()
        layers = policy.static_layer_schedule(evaluations)
        gates = None if layers is not None else policy.layer_gates(evaluations)
        if layers is not None or gates is not None:
            _check_layer_plan(plan, policy, mode, solver, times, layers, counted)
        else:
            schedule = policy.static_schedule(evaluations)
            refreshes = None if schedule is None else int(np.sum(schedule))
            try:
                mode.check(plan, evaluations, refreshes)
            except ValueError as error:
                raise ValueError(f"{error}{counted}") from error
            _check_forecast_times(mode, solver, times, schedule)
            _check_remat(remat, policy, on_device=schedule is None)
    if np.ndim(noise) < 1:
        raise ValueError("noise must have a leading batch axis")
    if (scale is None) != (uncond is None):
        raise ValueError("classifier-free guidance needs both uncond and guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"guidance_scale must be a Python number (static), got {scale!r}")
    if scale is not None and not (np.isfinite(scale) and scale >= 0):
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1 is the conditional prediction, 0 "
            f"the unconditional one, above 1 guides), got {scale!r}"
        )
    _check_conditions(noise, cond, uncond)
    sequence = normalize_sequence_axis(sequence_axis)
    record = _check_record(record, policy, plan)
    if whole and record and record != ("sensitivity",):
        raise ValueError(
            f"record={record!r} is not available with {type(policy).__name__}: it skips the "
            "whole network, so a skipped step has no signal or prediction of its own to record"
        )
    if guidance is not None:
        _check_guidance(guidance, plan, policy, evaluations, noise, scale, record, sequence,
                        counted)
    return (plan, params, noise, cond, uncond, solver, num_steps, policy, reuse, scale, key,
            remat, sequence, record, guidance)


def prediction_mode(policy: RefreshPolicy, reuse: ReuseMode | None) -> ReuseMode:
    """The reuse mode that stands in for the network's prediction under a policy that skips
    the whole network: the given one, or order-0 Taylor (the last prediction) for the default
    and :class:`~jaxcache.OutputReuse`, whose cache is shaped for the body's streams."""
    if isinstance(reuse, OutputReuse) and reuse.all_layers:
        raise ValueError(
            f"OutputReuse(all_layers=True) keeps every body layer's output, and "
            f"{type(policy).__name__} skips the whole network, reusing its prediction: pass "
            "reuse=None (the last prediction), a forecast of it (TaylorForecast(1)) or "
            "ResidualReuse()"
        )
    if reuse is None or isinstance(reuse, OutputReuse):
        return TaylorForecast(0)
    return reuse


def _check_guidance(guidance, plan, policy, evaluations, noise, scale, record, sequence,
                    counted) -> None:
    """CFG-Cache's settings fit this run, and nothing else in it excludes CFG-Cache."""
    _check_instance(guidance, CFGCache, "guidance")
    if not isinstance(guidance, CFGCache):
        raise TypeError(f"guidance must be a CFGCache or None, got {_kind_of(guidance)}")
    try:
        guidance.check(evaluations, tuple(np.shape(noise)), scale)
    except ValueError as error:
        raise ValueError(f"{error}{counted}") from error
    if record:
        raise ValueError(
            f"record={record!r} is not available with CFGCache: its cache steps compute the "
            "conditional rows only. Record on a run without guidance="
        )
    if sequence:
        raise ValueError(
            "CFGCache splits the gap between the branches into frequencies by an FFT over each "
            "whole sample; with sequence_axis a device holds part of a sample: drop guidance= "
            "or sequence_axis="
        )
    if policy is None:
        return
    name = type(policy).__name__
    if is_whole_network(policy):
        raise ValueError(
            f"{name} skips the whole network for both guidance branches, and CFGCache runs the "
            "conditional branch alone on its cache steps; the two do not combine: drop one"
        )
    if (plan.cached_layers > 0 and policy.static_layer_schedule(evaluations) is None
            and policy.layer_gates(evaluations) is not None):
        raise ValueError(
            f"{name} mixes every layer's output with its reuse value at every step (for "
            "training a router, at the uncached run's cost); CFGCache does not combine with it. "
            "Sample with the trained mask, LayerMaskPolicy(gates > 0.5), and CFGCache"
        )


def _check_record(record: Any, policy: RefreshPolicy | None, plan: CachePlan) -> tuple[str, ...]:
    """``record`` as a tuple in :data:`RECORDABLE`'s order; refused where it cannot apply."""
    names = (record,) if isinstance(record, str) else record
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(
            f"record must be a tuple of names from {RECORDABLE}, got {record!r}"
        ) from None
    unknown = [n for n in names if n not in RECORDABLE]
    if unknown:
        raise ValueError(f"record: unknown {unknown!r}; choose from {RECORDABLE}")
    if "signal" in names:
        kind = None if policy is None else policy.signal_kind
        if kind is None:
            name = "policy=None" if policy is None else type(policy).__name__
            raise ValueError(
                f"record='signal' returns the change of the policy's signal, and {name} reads "
                "none: give a policy that reads one (FirstBlockPolicy, TeaCachePolicy, "
                "DBCachePolicy); at threshold 0 it computes every step, as uncached"
            )
        if plan.first_layers + plan.cached_layers == 0:
            raise ValueError(
                "record='signal' reads the first layer in the head or the cached body; this plan "
                "has neither (first_layers + cached_layers == 0)"
            )
    if "sensitivity" in names and not getattr(policy, "estimates", False):
        name = "policy=None" if policy is None else type(policy).__name__
        raise ValueError(
            f"record='sensitivity' returns the sensitivities SenCache measures while warming up, "
            f"and {name} measures none: give SenCachePolicy without sensitivity_x and "
            "sensitivity_t (jaxcache.tuning.calibrate_sencache does)"
        )
    if "body_residual" in names:
        if policy is not None:
            raise ValueError(
                f"record='body_residual' records the cached body's residual at every "
                f"evaluation, which only the uncached run computes: pass policy=None (got "
                f"{type(policy).__name__})"
            )
        if plan.cached_layers == 0:
            raise ValueError(
                "record='body_residual' records the cached body's residual; this plan caches no "
                "layer (cached_layers == 0): build it with the layers the schedule will cache"
            )
    return tuple(n for n in RECORDABLE if n in names)


def _check_solver(solver: Solver, key) -> None:
    """The solver can be a static argument, and the key fits what it draws."""
    _check_instance(solver, Solver, "solver")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxcache Solver, got {_kind_of(solver)}")
    name = type(solver).__name__
    try:
        hash(solver)
    except TypeError as error:
        raise TypeError(
            f"solver {name} must be hashable: it is a static argument of the compiled program, "
            "looked up by hash and ==. Make it a frozen dataclass "
            "(@dataclasses.dataclass(frozen=True)) of numbers, strings and tuples"
        ) from error
    if not solver.defines_update():
        raise TypeError(
            f"solver {name} defines neither step(x, prediction, t, t_next) nor "
            "advance(state, x, prediction, t, t_next, index=..., key=...)"
        )
    if solver.uses_key and key is None:
        raise ValueError(
            f"{name} draws fresh noise at every step: pass key=jax.random.key(seed) (traced, so "
            "a new seed reuses the compiled program)"
        )
    if key is not None:
        if not solver.uses_key:
            raise ValueError(
                f"key= was given, but {name} draws no noise (its uses_key is False): drop key=, "
                "or use an ancestral solver (DDPM, EulerAncestral)"
            )
        dtype = getattr(key, "dtype", None)
        typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        raw = dtype == np.uint32 and np.shape(key) == (2,)
        if not ((typed and np.shape(key) == ()) or raw):
            raise ValueError(
                "key must be one PRNG key, jax.random.key(seed) (or jax.random.PRNGKey(seed)), "
                f"got {type(key).__name__} of shape {np.shape(key)} and dtype {dtype}"
            )


def _check_layer_plan(plan, policy, mode, solver, times, layers, counted) -> None:
    """A per-layer plan's shape, and the reuse mode's checks for each run of layers it reuses.

    ``layers``: the plan's static ``[evaluations, cached_layers]`` mask, or None for gates
    (which store, weighted, at every evaluation).
    """
    evaluations = len(times)
    name = type(policy).__name__
    if layers is None:
        shape = tuple(np.shape(policy.layer_gates(evaluations)))
        checks = [((0, 1), None, None)]
    else:
        layers = np.asarray(layers)
        shape = layers.shape
        checks = []
    want = (evaluations, plan.cached_layers)
    if shape != want:  # LayerMaskPolicy.check says so first; this covers any per-layer policy
        raise ValueError(
            f"{name}'s per-layer plan has shape {shape}, but this run needs (evaluations, "
            f"cached_layers) = {want}{counted}"
        )
    if layers is not None:
        if layers.dtype != bool:
            raise TypeError(f"{name}.static_layer_schedule must return bools, got {layers.dtype}")
        actions = layer_actions(layers)
        for lo, hi in layer_units(layers):
            # Only a run of layers that is ever reused needs what it stored.
            reused = bool(np.any(actions[:, lo] == REUSE))
            checks.append(((lo, hi), int(layers[:, lo].sum()) if reused else None, layers[:, lo]))
    for (lo, hi), refreshes, column in checks:
        where = "" if layers is None else f" (body layers [{lo}, {hi}) of the layer mask)"
        try:
            mode.check(unit_plan(plan, lo, hi), evaluations, refreshes)
            _check_forecast_times(mode, solver, times, column)
        except ValueError as error:
            raise ValueError(f"{error}{where}{counted}") from error


def _check_forecast_times(mode, solver, times, schedule) -> None:
    """A Taylor forecast divides by the time between stored steps: none may share a time."""
    if not (isinstance(mode, Ladder) and mode.divides_by_time and mode.order >= 1):
        return
    stored = np.asarray(times) if schedule is None else np.asarray(times)[np.asarray(schedule)]
    same = np.flatnonzero(np.diff(stored) == 0)
    if len(same):
        raise ValueError(
            f"{type(mode).__name__}(order={mode.order}) divides by the time between the steps it "
            f"stores, and this run could store two evaluations at t={float(stored[same[0]]):.6g} "
            f"({type(solver).__name__} evaluates twice at some times). Use HermiteForecast (it "
            "counts in steps), OutputReuse, or a schedule that never refreshes two evaluations "
            "at one time (an interval of 2 or more)"
        )


def check_prediction(prediction: Any, x: jax.Array, branches: int) -> None:
    """The network's prediction is shaped like the sample (per guidance branch).

    Run while tracing (shapes are static): a prediction of another shape would otherwise meet
    the sample inside the solver's update as a broadcasting error, or broadcast silently.
    """
    shape = getattr(prediction, "shape", None)
    want = (branches * x.shape[0], *x.shape[1:])
    if shape is not None and tuple(shape) == want:
        return
    got = f"shape {tuple(shape)}" if shape is not None else f"a {type(prediction).__name__}"
    rows = "" if branches == 1 else (
        f" (guidance runs both branches as one batch: {branches} x {x.shape[0]} rows)"
    )
    raise ValueError(
        f"the network's prediction (its final projection's output) has {got}, but the noise "
        f"has shape {tuple(x.shape)}: the solver combines the two element by element, so the "
        f"prediction must be one array of shape {want}{rows}. Check network.final (e.g. "
        "unpatchify back to the noise's layout, or keep only the predicted half of a "
        "learned-variance output)"
    )


def _describe(leaf) -> str:
    return f"shape {np.shape(leaf)} {getattr(leaf, 'dtype', type(leaf).__name__)}"


def _check_conditions(noise, cond, uncond) -> None:
    """cond and uncond are arrays with the noise's batch axis, and alike."""
    batch = noise.shape[0]
    for name, tree in (("cond", cond), ("uncond", uncond)):
        for leaf in jax.tree.leaves(tree):
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise TypeError(
                    f"{name} must be an array, or a pytree of arrays, with a leading batch axis; "
                    f"it holds a {type(leaf).__name__} leaf (a Python list or tuple is a pytree "
                    "of its items: convert it with jnp.asarray)"
                )
            if np.ndim(leaf) < 1 or leaf.shape[0] != batch:
                raise ValueError(
                    f"{name} leaves need a leading batch axis of {batch} (the noise's), "
                    f"got shape {np.shape(leaf)}. noise is [batch, ...]: its shape "
                    f"{tuple(noise.shape)} reads as {batch} samples of shape "
                    f"{tuple(noise.shape[1:])}; for one sample without a batch axis pass "
                    "noise[None]"
                )
    if uncond is None:
        return
    cond_leaves, cond_def = jax.tree.flatten(cond)
    uncond_leaves, uncond_def = jax.tree.flatten(uncond)
    if cond_def != uncond_def:
        raise ValueError(
            f"uncond must have cond's structure (both branches run as one batch): cond is "
            f"{cond_def}, uncond is {uncond_def}"
        )
    for a, b in zip(cond_leaves, uncond_leaves):
        if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
            raise ValueError(
                f"uncond must match cond leaf for leaf (both branches run as one batch): cond "
                f"has {_describe(a)}, uncond {_describe(b)}; pad or cast the negative condition "
                "to cond's shape and dtype"
            )
