"""The budgeted planner (jaxcache.tuning.planner): planned refresh schedules.

* Exact: the planned schedule's modelled error equals the least over every schedule within the
  budget, enumerated (hypothesis over random residuals, budgets and both error models), with
  the error of a schedule written out anew from the residuals.
* The budget: never exceeded (counted in refreshes and in body layers), every step when it
  allows every step, refused below one refresh.
* The plan samples: a StepMaskPolicy whose program holds no decision; with a two-stage solver
  the forecast's plan is one the sampler accepts.
"""

import dataclasses
import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxcache as jc
from jaxcache import tuning
from jaxcache.evaluation.program import runtime_decisions
from jaxcache.tuning.planner import StepErrors
from jaxcache.tuning.segments import SegmentErrors

import toy_networks

DEPTH = toy_networks.LAYERS
SOLVER = jc.FlowMatchEuler(shift=3.0)
STEPS = 10


def _schedule_error(residuals, times, mask, reuse):
    """The summed error of a schedule, from the residuals: each skipped step's estimate (the
    last refresh's residual, or the line through the last two in time) against the truth,
    mean |difference| / mean |truth| per row, averaged over rows."""
    r = np.asarray(residuals, np.float64).reshape(len(residuals), residuals.shape[1], -1)
    refreshed, total = [], 0.0
    for t, refresh in enumerate(mask):
        if refresh:
            refreshed.append(t)
            continue
        b = refreshed[-1]
        estimate = r[b]
        if reuse == "taylor1" and len(refreshed) >= 2:
            a = refreshed[-2]
            ta, tb, tt = (np.float64(np.float32(times[i])) for i in (a, b, t))
            estimate = r[b] + (r[b] - r[a]) / (tb - ta) * (tt - tb)
        per_row = np.abs(estimate - r[t]).mean(axis=1) / np.maximum(np.abs(r[t]).mean(axis=1),
                                                                    1e-12)
        total += per_row.mean()
    return total


def _least_error(residuals, times, budget, reuse):
    """The least error over every schedule with step 0 and at most ``budget`` refreshes."""
    steps = len(residuals)
    least = np.inf
    for rest in itertools.product([False, True], repeat=steps - 1):
        count = 1 + sum(rest)
        if count > budget or (reuse == "taylor1" and count < 2):
            continue
        least = min(least, _schedule_error(residuals, times, (True, *rest), reuse))
    return least


problems = st.integers(2, 7).flatmap(
    lambda steps: st.tuples(
        st.integers(0, 2**31 - 1),
        st.just(steps),
        st.integers(1, steps + 1),
        st.sampled_from(["residual", "output", "taylor1"]),
    )
)


def _random(seed, steps, rows=2):
    rng = np.random.default_rng(seed)
    residuals = rng.normal(size=(steps, rows, 3, 4)).cumsum(axis=0)
    times = np.sort(rng.uniform(size=steps))[::-1]
    return residuals, times


@settings(max_examples=60, deadline=None)
@given(problem=problems)
def test_the_plan_is_the_best_schedule_within_the_budget(problem):
    seed, steps, budget, reuse = problem
    residuals, times = _random(seed, steps)
    if reuse == "taylor1":
        budget = max(budget, 2)
    policy = tuning.plan_refreshes(residuals, refreshes=budget, reuse=reuse, times=times)
    mask = np.asarray(policy.mask)
    assert mask[0] and mask.sum() <= budget
    got = _schedule_error(residuals, times, mask, reuse)
    want = _least_error(residuals, times, budget, reuse)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (mask, got, want)
    # The tables' own sum agrees with the one written out here.
    errors = tuning.step_errors(residuals, times)
    assert errors.total(mask, reuse) == pytest.approx(got, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(2, 40),
    layers=st.integers(1, 12),
    fraction=st.floats(0.0, 1.5),
    reuse=st.sampled_from(["residual", "taylor1"]),
)
def test_the_plan_never_exceeds_its_budget(seed, steps, layers, fraction, reuse):
    residuals, times = _random(seed, steps, rows=1)
    errors = tuning.step_errors(residuals, times)
    least = 2 if reuse == "taylor1" else 1
    refreshes = max(least, round(fraction * steps))
    by_steps = tuning.plan_refreshes(errors, refreshes=refreshes, reuse=reuse)
    assert sum(by_steps.mask) <= refreshes and by_steps.mask[0]
    budget = max(least * layers, fraction * steps * layers)  # body layers, not a whole refresh
    by_layers = tuning.plan_refreshes(errors, body_layer_budget=budget, cached_layers=layers,
                                      reuse=reuse)
    assert sum(by_layers.mask) * layers <= budget and by_layers.mask[0]
    assert len(by_layers.mask) == steps


@pytest.mark.parametrize("reuse", ["residual", "output", "taylor1"])
def test_a_budget_of_every_step_refreshes_every_step(reuse):
    residuals, times = _random(0, 12)
    for budget in (12, 30):
        policy = tuning.plan_refreshes(residuals, refreshes=budget, reuse=reuse, times=times)
        assert all(policy.mask)
    # Ties go to more refreshes: with a residual that never changes every schedule models as
    # exact, and the budget is still spent.
    still = np.broadcast_to(residuals[:1], residuals.shape)
    assert all(tuning.plan_refreshes(still, refreshes=12, reuse=reuse, times=times).mask)
    # And one step fewer skips exactly one step.
    policy = tuning.plan_refreshes(residuals, refreshes=11, reuse=reuse, times=times)
    assert sum(policy.mask) == 11


def test_budgets_that_cannot_work_are_refused():
    residuals, times = _random(0, 6)
    errors = tuning.step_errors(residuals, times)
    with pytest.raises(ValueError, match=r"refreshes=0 is below one refresh"):
        tuning.plan_refreshes(errors, refreshes=0)
    with pytest.raises(ValueError, match=r"body_layer_budget=5 is below one refresh of the "
                                         r"body \(6 layers\).*at least 6"):
        tuning.plan_refreshes(errors, body_layer_budget=5, cached_layers=6)
    with pytest.raises(ValueError, match=r"needs cached_layers="):
        tuning.plan_refreshes(errors, body_layer_budget=12)
    with pytest.raises(ValueError, match=r"give one of refreshes= and body_layer_budget="):
        tuning.plan_refreshes(errors)
    with pytest.raises(ValueError, match=r"give one of refreshes= and body_layer_budget="):
        tuning.plan_refreshes(errors, refreshes=2, body_layer_budget=12, cached_layers=6)
    with pytest.raises(TypeError, match=r"refreshes must be an int >= 1"):
        tuning.plan_refreshes(errors, refreshes=2.5)
    with pytest.raises(ValueError, match=r"needs a budget of at least 2 refreshes"):
        tuning.plan_refreshes(errors, refreshes=1, reuse="taylor1")
    with pytest.raises(ValueError, match=r"reuse must be one of"):
        tuning.plan_refreshes(errors, refreshes=2, reuse="taylor2")
    with pytest.raises(ValueError, match=r"give times="):
        tuning.plan_refreshes(residuals, refreshes=3, reuse="taylor1")
    with pytest.raises(ValueError, match=r"times must hold the solver's 6 finite times"):
        tuning.plan_refreshes(residuals, refreshes=3, reuse="taylor1", times=times[:4])
    with pytest.raises(ValueError, match=r"\[evaluations, rows, \.\.\.features\]"):
        tuning.plan_refreshes(residuals[:, 0, 0], refreshes=3)


@pytest.fixture(scope="module")
def calibrated():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(3)
    calibration = tuning.calibrate_magcache(plan, seg, noise, cond, solver=SOLVER,
                                            num_steps=STEPS, uncond=uncond, guidance_scale=2.0)
    return plan, seg, noise, cond, uncond, calibration


def test_a_calibration_plans_as_its_residuals_do(calibrated):
    plan, seg, noise, cond, uncond, calibration = calibrated
    out = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, uncond=uncond,
                    guidance_scale=2.0, record=("body_residual",))
    times = SOLVER.times(STEPS)[0]
    for reuse in ("residual", "taylor1"):
        from_calibration = tuning.plan_refreshes(calibration, body_layer_budget=4 * DEPTH,
                                                 reuse=reuse)  # its cached layers: DEPTH
        from_residuals = tuning.plan_refreshes(out.body_residuals, refreshes=4, reuse=reuse,
                                               times=times)
        assert from_calibration == from_residuals and sum(from_calibration.mask) <= 4
    with pytest.raises(ValueError, match="a calibration keeps its solver's times"):
        tuning.plan_refreshes(calibration, refreshes=3, times=times)


@pytest.mark.parametrize("reuse, mode", [("residual", jc.ResidualReuse()),
                                         ("taylor1", jc.TaylorForecast(1, residual=True))])
def test_the_plan_samples_with_no_decision_in_the_loop(calibrated, reuse, mode):
    plan, seg, noise, cond, uncond, calibration = calibrated
    policy = tuning.plan_refreshes(calibration, refreshes=5, reuse=reuse)
    assert isinstance(policy, jc.StepMaskPolicy) and sum(policy.mask) == 5
    common = dict(solver=SOLVER, num_steps=STEPS, policy=policy, reuse=mode, uncond=uncond,
                  guidance_scale=2.0)
    compiled = jc.lower(plan, seg, noise, cond, **common).compile().as_text()
    assert runtime_decisions(compiled) == []
    out = jc.sample(plan, seg, noise, cond, **common)
    assert np.asarray(out.refreshed).tolist() == list(policy.mask)


def test_the_forecast_plan_of_a_two_stage_solver_is_one_the_sampler_takes():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    heun = jc.FlowMatchHeun()
    calibration = tuning.calibrate_magcache(plan, seg, noise, cond, solver=heun, num_steps=5)
    times = heun.times(5)[0]
    assert calibration.evaluations == 9 and len(np.unique(times)) < 9  # times repeat
    for budget in range(2, 10):
        policy = tuning.plan_refreshes(calibration, refreshes=budget, reuse="taylor1")
        stored = times[np.asarray(policy.mask)]
        assert np.all(np.diff(stored) != 0), (budget, policy.mask)
        jc.lower(plan, seg, noise, cond, solver=heun, num_steps=5, policy=policy,
                 reuse=jc.TaylorForecast(1, residual=True))  # accepted
    # A schedule with a repeated time has no finite forecast error.
    repeated = np.zeros(9, bool)
    repeated[[0, 1, 2]] = True
    assert calibration.errors.total(repeated, "taylor1") == np.inf


def test_planning_fifty_steps_takes_well_under_a_second():
    import time

    residuals, times = _random(1, 50, rows=4)
    errors = tuning.step_errors(residuals, times)
    start = time.perf_counter()
    for reuse in ("residual", "taylor1"):
        tuning.plan_refreshes(errors, refreshes=17, reuse=reuse)
    assert time.perf_counter() - start < 1.0
    assert isinstance(errors, StepErrors) and errors.forecast.shape == (50, 50, 50)


def test_a_dual_stream_body_is_measured_on_its_image_stream():
    residuals, times = _random(3, 6)
    text = np.zeros((6, 2, 5, 4))
    a = tuning.plan_refreshes((residuals, text), refreshes=3)
    b = tuning.plan_refreshes(residuals, refreshes=3)
    assert a == b
    assert jnp.asarray(a.mask).dtype == bool


# ------------------------------------------------------------ measured segments (LeMiCa)
SEGMENT_STEPS = 7
SEGMENT_LENGTH = 4


def _paths(steps, budget, max_length):
    """Every schedule with step 0, at most ``budget`` refreshes and segments of at most
    ``max_length`` steps, as refresh tuples."""
    for rest in itertools.product([False, True], repeat=steps - 1):
        refreshes = (0, *(t + 1 for t, r in enumerate(rest) if r))
        ends = (*refreshes, steps)
        if len(refreshes) <= budget and max(np.diff(ends)) <= max_length:
            yield refreshes


def _value(weight, refreshes, steps, budget, objective):
    """A schedule's value from ``weight(h, i, j)`` (h = steps: none), written out anew."""
    previous, weights = steps, []
    for i, j in zip(refreshes, (*refreshes[1:], steps)):
        weights.append(weight(previous, i, j))
        previous = i
    if objective == "sum":
        return (sum(weights),)
    return tuple(sorted(weights, reverse=True)) + (0.0,) * (budget - len(weights))


def _best(weight, steps, budget, max_length, objective):
    return min(_value(weight, p, steps, budget, objective)
               for p in _paths(steps, budget, max_length))


def _random_segments(seed, steps, max_length, previous):
    """Segment errors as measure_segments lays them out, with random weights."""
    rng = np.random.default_rng(seed)
    table = np.full((steps + 1, steps, steps + 1), np.nan)
    for i in range(steps):
        before = [steps] if i == 0 else list(range(max(0, i - max_length), i))
        for j in range(i + 1, min(i + max_length, steps) + 1):
            if previous == "adjacent":
                table[before, i, j] = 0.0 if j == i + 1 else rng.exponential()
            else:
                table[before, i, j] = (0.0 if j == i + 1
                                       else rng.exponential(size=len(before)))
    return SegmentErrors(errors=table, previous=previous, max_length=max_length, runs=0,
                         reuse="test")


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 9),
    data=st.data(),
    previous=st.sampled_from(["adjacent", "pairs"]),
    objective=st.sampled_from(["sum", "minimax"]),
)
def test_the_path_is_the_best_schedule_over_the_measured_edges(seed, steps, data, previous,
                                                                objective):
    max_length = data.draw(st.integers(2, max(2, steps)))
    budget = data.draw(st.integers(1, steps + 1))
    errors = _random_segments(seed, steps, max_length, previous)

    def weight(h, i, j):
        return errors.errors[h, i, j]

    if min(budget, steps) * max_length < steps:
        with pytest.raises(ValueError, match=r"cannot cover .* max_length="):
            tuning.plan_path(errors, refreshes=budget, objective=objective)
        return
    policy = tuning.plan_path(errors, refreshes=budget, objective=objective)
    refreshes = tuple(int(t) for t in np.flatnonzero(policy.mask))
    assert refreshes[0] == 0 and len(refreshes) <= budget
    assert max(np.diff((*refreshes, steps))) <= max_length
    got = _value(weight, refreshes, steps, budget, objective)
    assert got == pytest.approx(_best(weight, steps, budget, max_length, objective), rel=1e-12)
    # The table's own totals agree with the ones written out here.
    if objective == "sum":
        assert errors.total(policy) == pytest.approx(got[0], rel=1e-12)
    else:
        assert errors.total(policy, "minimax") + (0.0,) * (budget - len(refreshes)) == got


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(2, 30),
    max_length=st.integers(2, 10),
    layers=st.integers(1, 12),
    fraction=st.floats(0.0, 1.5),
    objective=st.sampled_from(["sum", "minimax"]),
)
def test_the_path_never_exceeds_its_budget(seed, steps, max_length, layers, fraction,
                                           objective):
    errors = _random_segments(seed, steps, max_length, "adjacent")
    least = -(-steps // max_length)  # the fewest refreshes that cover the run
    refreshes = max(least, round(fraction * steps))
    by_steps = tuning.plan_path(errors, refreshes=refreshes, objective=objective)
    assert sum(by_steps.mask) <= refreshes and by_steps.mask[0]
    budget = max(least * layers, fraction * steps * layers)
    by_layers = tuning.plan_path(errors, body_layer_budget=budget, cached_layers=layers,
                                 objective=objective)
    assert sum(by_layers.mask) * layers <= budget and by_layers.mask[0]
    for mask in (by_steps.mask, by_layers.mask):
        assert max(np.diff((*np.flatnonzero(mask), steps))) <= max_length


def test_ties_spend_the_budget():
    errors = _random_segments(0, 8, 8, "adjacent")
    still = dataclasses.replace(errors, errors=np.where(np.isnan(errors.errors), np.nan, 0.0))
    for objective in ("sum", "minimax"):
        assert all(tuning.plan_path(still, refreshes=8, objective=objective).mask)
        assert sum(tuning.plan_path(still, refreshes=5, objective=objective).mask) == 5


@pytest.fixture(scope="module")
def toy():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(network, DEPTH)
    noise, cond, uncond = toy_networks.inputs(3)
    return network, params, plan, plan.split(params), noise, cond, uncond


def _mse(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))))


def test_measured_plan_equals_brute_force_over_independent_runs(toy):
    """Residual reuse with guidance: each edge weight sampled anew by a Python loop."""
    network, params, plan, seg, noise, cond, uncond = toy
    common = dict(solver=SOLVER, num_steps=SEGMENT_STEPS, uncond=uncond, guidance_scale=2.0)
    mode = jc.ResidualReuse()
    logged = []
    errors = tuning.measure_segments(plan, seg, noise, cond, reuse=mode,
                                     max_length=SEGMENT_LENGTH, log=lambda *a: logged.append(a),
                                     **common)
    assert logged == [(n, errors.runs - 1) for n in range(1, errors.runs)]
    assert errors.reuse == repr(mode) and errors.previous == "adjacent"
    loop = dict(order=0, uncond=uncond, scale=2.0)
    full = _loop_sample(network, params, noise, cond, (0, 0), **loop)
    assert _mse(full, jc.sample(plan, seg, noise, cond, **common).sample) < 1e-10
    steps, weights = SEGMENT_STEPS, {}
    for i in range(steps):
        weights[i, i + 1] = 0.0
        for j in range(i + 2, min(i + SEGMENT_LENGTH, steps) + 1):
            weights[i, j] = _mse(_loop_sample(network, params, noise, cond, (i, j), **loop), full)
            assert weights[i, j] > 0
            before = [steps] if i == 0 else range(max(0, i - SEGMENT_LENGTH), i)
            for h in before:
                assert errors.errors[h, i, j] == pytest.approx(weights[i, j], rel=1e-4)
    assert errors.runs == 1 + len(weights) - steps  # the reference, then one run per edge
    assert np.isnan(errors.errors[0, 0, SEGMENT_LENGTH + 1])  # longer than measured

    def weight(h, i, j):
        return weights[i, j]

    for objective in ("sum", "minimax"):
        for budget in (2, 3, 4, 6):
            policy = tuning.plan_path(errors, refreshes=budget, objective=objective)
            refreshes = tuple(int(t) for t in np.flatnonzero(policy.mask))
            got = _value(weight, refreshes, steps, budget, objective)
            want = _best(weight, steps, budget, SEGMENT_LENGTH, objective)
            assert got == pytest.approx(want, rel=1e-4), (objective, budget, refreshes)


def _loop_sample(network, params, noise, cond, skip, unstored=(0, 0), order=1, uncond=None,
                 scale=None):
    """A Python loop over steps and layers. Steps strictly inside ``skip = (i, j)`` take the
    body's residual from the stored steps (order 0: the last one's; order 1: on the line
    through the last two, in time); steps strictly inside ``unstored = (h, i)`` compute
    without being stored; the rest compute and store. Guidance runs both branches as rows."""
    times, next_times = SOLVER.times(SEGMENT_STEPS)
    guided = scale is not None
    constant = network.condition(params.condition,
                                 jnp.concatenate([cond, uncond]) if guided else cond)
    x, stored = noise, []
    for s in range(SEGMENT_STEPS):
        t = np.float32(times[s])
        rows = jnp.concatenate([x, x]) if guided else x
        body_in, ctx = network.embed(params.embed, rows, jnp.full((rows.shape[0],), t),
                                     constant)
        if skip[0] < s < skip[1]:
            (tb, rb) = stored[-1]
            residual = rb
            if order == 1 and len(stored) > 1:
                ta, ra = stored[-2]
                residual = rb + (rb - ra) / (tb - ta) * (t - tb)
            out = body_in + residual
        else:
            out = body_in
            for k in range(DEPTH):
                out = network.layer(jax.tree.map(lambda a, k=k: a[k], params.layers), out, ctx)
            if not unstored[0] < s < unstored[1]:
                stored.append((t, out - body_in))
        prediction = network.final(params.final, out, ctx)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + scale * (positive - negative)
        x = SOLVER.step(x, prediction, times[s], next_times[s])
    return x


def test_pairs_measure_the_forecast_from_each_previous_refresh(toy):
    network, params, plan, seg, noise, cond, _ = toy
    common = dict(solver=SOLVER, num_steps=SEGMENT_STEPS)
    mode = jc.TaylorForecast(1, residual=True)
    pairs = tuning.measure_segments(plan, seg, noise, cond, reuse=mode, previous="pairs",
                                    max_length=SEGMENT_LENGTH, **common)
    adjacent = tuning.measure_segments(plan, seg, noise, cond, reuse=mode,
                                       max_length=SEGMENT_LENGTH, **common)
    full = _loop_sample(network, params, noise, cond, (0, 0))
    assert _mse(full, jc.sample(plan, seg, noise, cond, **common).sample) < 1e-10
    checked = 0
    for i in range(SEGMENT_STEPS):
        before = [SEGMENT_STEPS] if i == 0 else range(max(0, i - SEGMENT_LENGTH), i)
        for h in before:
            for j in range(i + 2, min(i + SEGMENT_LENGTH, SEGMENT_STEPS) + 1):
                out = _loop_sample(network, params, noise, cond, (i, j), (h, i))
                want = _mse(out, full)
                assert pairs.errors[h, i, j] == pytest.approx(want, rel=1e-3, abs=1e-12)
                if h in (i - 1, SEGMENT_STEPS):  # the adjacent weight is this pair's
                    assert adjacent.errors[h, i, j] == pytest.approx(want, rel=1e-3)
                checked += 1
    assert checked == pairs.runs - 1
    # Far pairs differ from the adjacent one (else the pairs would measure nothing new).
    assert pairs.errors[1, 3, 6] != pytest.approx(adjacent.errors[1, 3, 6], rel=1e-2)


def test_every_run_is_one_compiled_program(toy):
    network, params, *_ = toy
    noise, cond, _ = toy_networks.inputs(2)
    mode = jc.TaylorForecast(1, residual=True)
    common = dict(solver=SOLVER, num_steps=SEGMENT_STEPS, reuse=mode)
    single, single_traces = toy_networks.trace_counted(network)
    plan = jc.CachePlan(single, DEPTH)
    jc.sample(plan, plan.split(params), noise, cond, policy=jc.OnDevice(jc.IntervalPolicy(2)),
              **common)
    once = len(single_traces)
    assert once > 0
    counted, traces = toy_networks.trace_counted(network)
    plan = jc.CachePlan(counted, DEPTH)
    seg = plan.split(params)
    errors = tuning.measure_segments(plan, seg, noise, cond, max_length=5, **common)
    assert errors.runs > 15 and len(traces) == once  # every edge and the reference: one trace
    found = tuning.refine_schedule(plan, seg, noise, cond, start=jc.IntervalPolicy(3), **common)
    assert len(found.probes) > 5 and len(traces) == once  # the same program
    # Pairs mask the stores too: a program of their own, compiled once for every pair.
    counted, traces = toy_networks.trace_counted(network)
    plan = jc.CachePlan(counted, DEPTH)
    seg = plan.split(params)
    errors = tuning.measure_segments(plan, seg, noise, cond, max_length=4, previous="pairs",
                                     **common)
    assert errors.runs > 30 and len(traces) == once


def test_refining_measures_whole_schedules_and_keeps_the_best(toy):
    _, _, plan, seg, noise, cond, uncond = toy
    steps = 9
    common = dict(solver=SOLVER, num_steps=steps, uncond=uncond, guidance_scale=2.0,
                  reuse=jc.TaylorForecast(1))
    starts = [jc.IntervalPolicy(3), jc.StepMaskPolicy([t in (0, 1, 2) for t in range(steps)])]
    found = tuning.refine_schedule(plan, seg, noise, cond, start=starts, shift=2, metric="mse",
                                   **common)
    probes = dict(found.probes)
    refreshes = tuple(int(t) for t in np.flatnonzero(found.policy.mask))
    assert len(refreshes) == 3 and refreshes[0] == 0
    assert found.error == probes[refreshes] == min(probes.values())
    assert found.start_error == min(probes[(0, 3, 6)], probes[(0, 1, 2)])
    assert found.error <= found.start_error
    early = tuning.refine_schedule(plan, seg, noise, cond, start=starts[1], metric="mse",
                                   **common)
    assert early.error < early.start_error == probes[(0, 1, 2)]  # a poor start moves
    # A local optimum: no move of one refresh by up to 2 steps measures better.
    for r in (1, 2):
        for d in (-2, -1, 1, 2):
            moved = list(refreshes)
            moved[r] += d
            if moved == sorted(set(moved)) and moved[-1] < steps and moved[1] > 0:
                assert probes[tuple(moved)] >= found.error
    # The error is the final sample's, as a known schedule samples it.
    full = jc.sample(plan, seg, noise, cond, **{k: v for k, v in common.items()
                                                if k != "reuse"}).sample
    out = jc.sample(plan, seg, noise, cond, policy=found.policy, **common).sample
    assert found.error == pytest.approx(_mse(out, full), rel=1e-4)
    # In decibels: the mean of each sample's 10 log10 MSE.
    db = tuning.refine_schedule(plan, seg, noise, cond, start=found.policy, max_rounds=0,
                                **common)  # the default
    per_sample = np.mean((np.asarray(out, np.float64) - np.asarray(full)) ** 2, axis=1)
    assert db.error == pytest.approx(np.mean(10 * np.log10(per_sample)), abs=1e-3)
    assert db.policy == found.policy and len(db.probes) == 1


def test_bad_segment_settings_are_refused(toy):
    network, params, plan, seg, noise, cond, uncond = toy
    common = dict(solver=SOLVER, num_steps=SEGMENT_STEPS)
    with pytest.raises(ValueError, match=r"max_length must be an int >= 2"):
        tuning.measure_segments(plan, seg, noise, cond, max_length=1, **common)
    with pytest.raises(ValueError, match=r"previous must be one of"):
        tuning.measure_segments(plan, seg, noise, cond, previous="all", **common)
    nothing = jc.CachePlan(network, 0)
    with pytest.raises(ValueError, match=r"caches no layer"):
        tuning.measure_segments(nothing, nothing.split(params), noise, cond, **common)
    heun = jc.FlowMatchHeun()
    with pytest.raises(ValueError, match=r"previous='pairs' with TaylorForecast.*adjacent"):
        tuning.measure_segments(plan, seg, noise, cond, solver=heun, num_steps=3,
                                reuse=jc.TaylorForecast(1), previous="pairs")
    with pytest.raises(ValueError, match=r"classifier-free guidance needs both"):
        tuning.measure_segments(plan, seg, noise, cond, uncond=uncond, **common)
    errors = _random_segments(0, 6, 3, "adjacent")
    with pytest.raises(TypeError, match=r"errors must be SegmentErrors"):
        tuning.plan_path(np.zeros((7, 6, 7)), refreshes=3)
    with pytest.raises(ValueError, match=r"objective must be one of"):
        tuning.plan_path(errors, refreshes=3, objective="mean")
    with pytest.raises(ValueError, match=r"1 refreshes cannot cover 6 evaluations .* at least 2"):
        tuning.plan_path(errors, refreshes=1)
    with pytest.raises(ValueError, match=r"plan_path: refreshes=0 is below one refresh"):
        tuning.plan_path(errors, refreshes=0)
    with pytest.raises(ValueError, match=r"plan_path: give one of refreshes="):
        tuning.plan_path(errors)
    with pytest.raises(TypeError, match=r"measured SegmentErrors plan with .*plan_path"):
        tuning.plan_refreshes(errors, refreshes=3)
    refine = dict(reuse=jc.ResidualReuse(), **common)
    with pytest.raises(ValueError, match=r"start must be a schedule known before sampling"):
        tuning.refine_schedule(plan, seg, noise, cond, start=jc.TeaCachePolicy(0.1), **refine)
    with pytest.raises(ValueError, match=r"start must hold 7 bools with step 0 refreshing"):
        tuning.refine_schedule(plan, seg, noise, cond,
                               start=jc.StepMaskPolicy([False] + [True] * 6), **refine)
    with pytest.raises(ValueError, match=r"mask has 5 entries but num_steps=7"):
        tuning.refine_schedule(plan, seg, noise, cond, start=jc.StepMaskPolicy([True] * 5),
                               **refine)
    with pytest.raises(ValueError, match=r"at least one start"):
        tuning.refine_schedule(plan, seg, noise, cond, start=[], **refine)
    with pytest.raises(ValueError, match=r"shift must be an int >= 1"):
        tuning.refine_schedule(plan, seg, noise, cond, start=jc.IntervalPolicy(2), shift=0,
                               **refine)
    with pytest.raises(ValueError, match=r"max_rounds must be an int >= 0"):
        tuning.refine_schedule(plan, seg, noise, cond, start=jc.IntervalPolicy(2),
                               max_rounds=-1, **refine)
    with pytest.raises(ValueError, match=r"metric must be one of"):
        tuning.refine_schedule(plan, seg, noise, cond, start=jc.IntervalPolicy(2),
                               metric="psnr", **refine)
