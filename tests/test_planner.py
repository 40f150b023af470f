"""The budgeted planner (jaxcache.tuning.planner): planned refresh schedules.

* Exact: the planned schedule's modelled error equals the least over every schedule within the
  budget, enumerated (hypothesis over random residuals, budgets and both error models), with
  the error of a schedule written out anew from the residuals.
* The budget: never exceeded (counted in refreshes and in body layers), every step when it
  allows every step, refused below one refresh.
* The plan samples: a StepMaskPolicy whose program holds no decision; with a two-stage solver
  the forecast's plan is one the sampler accepts.
"""

import itertools

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxcache as jc
from jaxcache import tuning
from jaxcache.evaluation.program import runtime_decisions
from jaxcache.tuning.planner import StepErrors

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
