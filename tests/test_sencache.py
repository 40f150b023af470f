"""SenCache: the predicted output change a_x |dx| + a_t |dt| decides per row, before the
network; a skipped step runs none of it. Checked against uncached sampling, its rule by hand,
finite differences by hand, FLOPs, and the batch against its samples alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.evaluation.program import host_round_trips, runtime_decisions
from jaxcache.policies.signals import relative_l1

import toy_networks

DEPTH = toy_networks.LAYERS
STEPS, SCALE = 10, 3.0
SOLVER = jc.FlowMatchEuler(shift=3.0)
# Calibrated-looking sensitivities: at tolerance 0.3 the toy rows skip some steps, not all.
GIVEN = dict(sensitivity_x=1.0, sensitivity_t=0.5)


def _plan(cached=DEPTH - 1, first=1):
    network, params = toy_networks.single_stream()
    return jc.CachePlan(network, cached, first_layers=first), params


def _run(policy, reuse=None, *, batch=3, seed=3, guided=True, plan=None, lower=False,
         rows=slice(None), **kw):
    plan, params = plan or _plan()
    noise, cond, uncond = toy_networks.inputs(batch, seed)
    guidance = dict(uncond=uncond[rows], guidance_scale=SCALE) if guided else {}
    run = jc.lower if lower else jc.sample
    return run(plan, plan.split(params), noise[rows], cond[rows], solver=SOLVER,
               num_steps=STEPS, policy=policy, reuse=reuse, **guidance, **kw)


def _equal(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize(
    "policy, guided",
    [(jc.SenCachePolicy(0.0), True), (jc.SenCachePolicy(0.0, **GIVEN), True),
     (jc.SenCachePolicy(0.0), False)],
    ids=["estimated", "given", "unguided"],
)
def test_tolerance_zero_equals_uncached_bitwise(policy, guided):
    uncached = _run(None, guided=guided)
    got = _run(policy, jc.TaylorForecast(1), guided=guided)
    _equal(got.sample, uncached.sample)
    assert bool(jnp.all(got.body_computed)) and bool(jnp.all(got.layers_computed))


def test_output_reuse_is_the_default_last_prediction():
    policy = jc.SenCachePolicy(0.3, **GIVEN)
    default = _run(policy, batch=2)
    _equal(_run(policy, jc.OutputReuse(), batch=2).sample, default.sample)
    assert not bool(jnp.all(default.refreshed))
    # A first-order forecast of the prediction stands in differently, with the same decisions.
    forecast = _run(policy, jc.TaylorForecast(1), batch=2)
    _equal(forecast.body_computed, default.body_computed)
    assert float(jnp.max(jnp.abs(forecast.sample - default.sample))) > 1e-5


# ------------------------------------------------------------------------------ skipping
def test_skipped_steps_run_no_layer_and_cost_nothing():
    policy = jc.SenCachePolicy(0.3, **GIVEN)
    out = _run(policy, batch=2)
    refreshed = np.asarray(out.refreshed)
    assert 0 < refreshed.sum() < STEPS
    layers = np.asarray(out.layers_computed)
    # Every layer, the head's and the tail's included, runs exactly where any row computed.
    _equal(layers, np.broadcast_to(refreshed[:, None], layers.shape))
    _equal(refreshed, np.asarray(out.body_computed).reshape(STEPS, -1).any(axis=1))
    # A skipped evaluation costs nothing: not its layers, not the embedding, not the final
    # projection (the toy's condition path is a table look-up, no matrix product).
    per_evaluation = float(out.uncached_flops) / STEPS
    np.testing.assert_allclose(float(out.flops), refreshed.sum() * per_evaluation, rtol=1e-6)
    assert float(out.flops) < float(out.uncached_flops)


def test_a_skipped_step_runs_nothing_at_run_time():
    # The embedding and the layers report each call from inside the running program.
    network, params = toy_networks.single_stream()
    calls = {"embed": 0, "layer": 0}

    def reporting(name, fn):
        def wrapped(p, *args):
            jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
            return fn(p, *args)

        return wrapped

    counted = jc.Network(network.condition, reporting("embed", network.embed),
                         reporting("layer", network.layer), network.final)
    plan = jc.CachePlan(counted, DEPTH - 1, first_layers=1)
    out = _run(jc.SenCachePolicy(0.3, **GIVEN), batch=2, plan=(plan, params))
    jax.block_until_ready(out.sample)
    ran = int(np.sum(np.asarray(out.refreshed)))
    assert 0 < ran < STEPS
    assert calls == {"embed": ran, "layer": ran * DEPTH}


def test_a_plan_without_a_body_still_skips_the_whole_network():
    out = _run(jc.SenCachePolicy(0.3, **GIVEN), plan=_plan(cached=0, first=0), batch=2)
    ref = _run(jc.SenCachePolicy(0.3, **GIVEN), batch=2)
    assert not bool(jnp.all(ref.refreshed))
    _equal(out.refreshed, ref.refreshed)
    np.testing.assert_allclose(out.sample, ref.sample, rtol=1e-6, atol=1e-6)


def test_estimating_costs_one_probe_per_warm_up_step_after_the_first():
    policy = jc.SenCachePolicy(0.0, warmup_steps=3)
    out = _run(policy)
    per_evaluation = float(out.uncached_flops) / STEPS
    np.testing.assert_allclose(float(out.flops), float(out.uncached_flops) + 2 * per_evaluation,
                               rtol=1e-6)


# ------------------------------------------------------------------------------ per row
def test_the_probe_shares_the_network_with_the_step():
    # The probe f(x_i, t_{i-1}) runs in the same loop as the step's own evaluation: the program
    # holds one copy of the network whether the sensitivities are estimated or given (with two
    # copies, one loop each, the program ran twice as slow on a CPU).
    def products(policy):
        text = _run(policy, lower=True).compile().as_text()
        return text.count(" dot(") + text.count(" convolution(")

    assert products(jc.SenCachePolicy(0.1)) == products(jc.SenCachePolicy(0.1, **GIVEN)) > 0


def test_decisions_are_per_row_and_a_batch_equals_its_samples_alone():
    policy = jc.SenCachePolicy(0.5, **GIVEN)
    together = _run(policy, jc.TaylorForecast(1), batch=4, seed=5)
    computed = np.asarray(together.body_computed)  # [steps, branches, batch]
    assert 0 < computed.mean() < 1
    assert (computed != computed[:, :, :1]).any(), "the samples must decide differently"
    for i in range(4):
        alone = _run(policy, jc.TaylorForecast(1), batch=4, seed=5, rows=slice(i, i + 1))
        np.testing.assert_allclose(together.sample[i], alone.sample[0], rtol=2e-5, atol=2e-5)
        _equal(computed[:, :, i], np.asarray(alone.body_computed)[:, :, 0])


def _sensitivities_by_hand(plan, params, noise, cond):
    """``(a_x, a_t)`` per row from the first warm-up pair, by a Python loop over the pieces:
    ``f(x1, t0)`` against ``f(x0, t0)`` over the sample's drift, and ``f(x1, t1)`` against it
    over the time's."""
    network = plan.network
    times, next_times = SOLVER.times(STEPS)

    def f(x, t):
        constant = network.condition(params.condition, cond)
        h, ctx = network.embed(params.embed, x, jnp.full((x.shape[0],), t), constant)
        for j in range(DEPTH):
            h = network.layer(jax.tree.map(lambda a, j=j: a[j], params.layers), h, ctx)
        return network.final(params.final, h, ctx)

    f0 = f(noise, times[0])
    x1 = SOLVER.step(noise, f0, jnp.float32(times[0]), jnp.float32(next_times[0]))
    probe = f(x1, times[0])
    a_x = relative_l1(probe, f0) / relative_l1(x1, noise)
    a_t = relative_l1(f(x1, times[1]), probe) / abs(float(times[1]) - float(times[0]))
    return a_x, a_t


def test_estimated_sensitivities_are_the_finite_differences_by_hand():
    # One warm-up pair: a_x and a_t are measured at step 1 from f(x1, t0); a run given those
    # values by hand decides alike.
    plan, params = _plan()
    noise, cond, _ = toy_networks.inputs(3)
    seg = plan.split(params)
    a_x, a_t = _sensitivities_by_hand(plan, params, noise, cond)
    tolerance = 0.3  # the rows skip some steps, each its own
    estimated = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                          policy=jc.SenCachePolicy(tolerance, max_skips=2))
    computed = np.asarray(estimated.body_computed)
    assert 0 < computed.mean() < 1 and (computed != computed[:, :, :1]).any()
    for i in range(3):  # the sensitivities are per row: give each row its own
        alone = jc.sample(plan, seg, noise[i : i + 1], cond[i : i + 1], solver=SOLVER,
                          num_steps=STEPS,
                          policy=jc.SenCachePolicy(tolerance, max_skips=2,
                                                   sensitivity_x=float(a_x[i]),
                                                   sensitivity_t=float(a_t[i])))
        _equal(computed[:, :, i], np.asarray(alone.body_computed)[:, :, 0])
        np.testing.assert_allclose(estimated.sample[i], alone.sample[0], rtol=1e-5, atol=1e-5)


def test_calibration_records_the_finite_differences_of_every_probe():
    # One run probes every step after the first; the recorded pair at step 1 is the by-hand
    # finite difference above, and the calibrated policy (no probe) samples as given them.
    plan, params = _plan()
    noise, cond, _ = toy_networks.inputs(3)
    seg = plan.split(params)
    a_x, a_t = _sensitivities_by_hand(plan, params, noise, cond)
    found = jc.tuning.calibrate_sencache(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS)
    assert found.per_step.shape == (STEPS, 2, 3)
    assert np.isnan(found.per_step[0]).all() and np.isfinite(found.per_step[1:]).all()
    np.testing.assert_allclose(found.per_step[1, 0], a_x, rtol=1e-4)
    np.testing.assert_allclose(found.per_step[1, 1], a_t, rtol=1e-4)
    assert found.x == pytest.approx(np.mean(found.per_step[1:, 0]))
    assert found.t == pytest.approx(np.mean(found.per_step[1:, 1]))
    policy = found.policy(0.3, max_skips=2)
    assert not policy.estimates and policy.probe_evaluations(STEPS) == 0
    given = jc.SenCachePolicy(0.3, max_skips=2, sensitivity_x=found.x, sensitivity_t=found.t)
    _equal(_run(policy).sample, _run(given).sample)


def test_recording_sensitivities_needs_a_policy_that_measures_them():
    with pytest.raises(ValueError, match="measures none"):
        _run(jc.SenCachePolicy(0.1, **GIVEN), record=("sensitivity",), lower=True)
    with pytest.raises(ValueError, match="measures none"):
        _run(None, record=("sensitivity",), lower=True)


# ------------------------------------------------------------------------------ the rule
def _state(policy, rows=2, shape=(4,)):
    return policy.init(8, jax.ShapeDtypeStruct((rows, *shape), jnp.float32))


def _x(values):
    return jnp.asarray(values, jnp.float32)[:, None] * jnp.ones((1, 4))


def test_the_rule_by_hand():
    policy = jc.SenCachePolicy(0.2, sensitivity_x=1.0, sensitivity_t=2.0, warmup_steps=1,
                               final_steps=1, max_skips=2, early_fraction=0.0)
    state = _state(policy)
    refresh, state = policy.decide(state, jnp.int32(0), (_x([1.0, 1.0]), 0.9))
    assert refresh.tolist() == [True, True]
    # Row 0: |dx| 0.05 + 2 * 0.05 = 0.15 < 0.2 skips; row 1: 0.2 + 0.1 = 0.3 computes.
    refresh, state = policy.decide(state, jnp.int32(1), (_x([1.05, 1.2]), 0.85))
    assert refresh.tolist() == [False, True]
    np.testing.assert_allclose(state.x_last[:, 0], [1.0, 1.2])
    np.testing.assert_allclose(state.t_last, [0.9, 0.85])
    # Row 0's drift is from its last computed step: 0.06 + 2 * 0.1 = 0.26 computes.
    refresh, state = policy.decide(state, jnp.int32(2), (_x([1.06, 1.2]), 0.8))
    assert refresh.tolist() == [True, False]
    # At most max_skips in a row: row 1 skipped steps 2, 3; step 4 computes though unchanged.
    refresh, state = policy.decide(state, jnp.int32(3), (_x([1.06, 1.2]), 0.8))
    assert refresh.tolist() == [False, False]
    refresh, state = policy.decide(state, jnp.int32(4), (_x([1.06, 1.2]), 0.8))
    assert refresh.tolist() == [False, True]
    # The last step computes.
    refresh, state = policy.decide(state, jnp.int32(7), (_x([1.06, 1.2]), 0.8))
    assert refresh.tolist() == [True, True]


def test_the_early_tolerance_governs_the_first_fraction():
    policy = jc.SenCachePolicy(1.0, early_tolerance=0.0, early_fraction=0.5, warmup_steps=1,
                               final_steps=0, sensitivity_x=1.0, sensitivity_t=0.0)
    state = _state(policy)
    decisions = []
    for step in range(8):
        refresh, state = policy.decide(state, jnp.int32(step), (_x([1.0, 1.0]), 0.5))
        decisions.append(bool(refresh[0]))
    # round(0.5 * 8) = 4 early steps compute (tolerance 0), then an unchanged sample skips.
    assert decisions == [True, True, True, True, False, False, False, True]


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 0.2), st.floats(0.0, 0.2), st.floats(0.0, 3.0), st.floats(0.0, 3.0),
       st.floats(0.01, 0.5))
def test_the_predicted_change_is_a_linear_bound(dx, dt, a_x, a_t, tolerance):
    policy = jc.SenCachePolicy(tolerance, sensitivity_x=a_x, sensitivity_t=a_t, warmup_steps=1,
                               final_steps=0, early_fraction=0.0)
    state = _state(policy, rows=1)
    _, state = policy.decide(state, jnp.int32(0), (_x([1.0]), 0.9))
    refresh, _ = policy.decide(state, jnp.int32(1), (_x([1.0 + dx]), 0.9 - dt))
    change = a_x * np.float32(dx) + a_t * abs(np.float32(0.9 - dt) - np.float32(0.9))
    if abs(change - tolerance) > 1e-4:  # away from float32 rounding at the boundary
        assert bool(refresh[0]) == (change >= tolerance)


def test_observe_measures_the_warm_up_pairs():
    policy = jc.SenCachePolicy(0.1, warmup_steps=3)
    state = _state(policy, rows=1)
    _, state = policy.decide(state, jnp.int32(0), (_x([1.0]), 0.9))
    state = policy.observe(state, jnp.int32(0), _x([2.0]), _x([0.0]))
    assert float(state.pairs[0]) == 0  # step 0 measures nothing
    _, state = policy.decide(state, jnp.int32(1), (_x([1.1]), 0.8))
    # f(x0, t0) = 2, f(x1, t0) = 2.2, f(x1, t1) = 2.42: a_x = 0.1 / 0.1, a_t = 0.1 / 0.1.
    state = policy.observe(state, jnp.int32(1), _x([2.42]), _x([2.2]))
    np.testing.assert_allclose(policy.sensitivities(state), [[1.0], [1.0]], rtol=1e-4)
    assert bool(policy.probes(state, jnp.int32(2))) and not bool(policy.probes(state,
                                                                               jnp.int32(3)))


# ------------------------------------------------------------------------------ the program
def test_the_program_decides_on_the_device_without_host_round_trips():
    lowered = _run(jc.SenCachePolicy(0.2), jc.TaylorForecast(1), lower=True)
    compiled = lowered.compile().as_text()
    assert host_round_trips(lowered.as_text()) == [] and host_round_trips(compiled) == []
    assert runtime_decisions(compiled)


def test_new_settings_reuse_the_program():
    network, params = toy_networks.single_stream()
    counted, traces = toy_networks.trace_counted(network)
    plan = jc.CachePlan(counted, DEPTH - 1, first_layers=1)
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    outs = []
    for value in (0.1, 0.4):
        outs.append(jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                              policy=jc.SenCachePolicy(value, sensitivity_x=value,
                                                       sensitivity_t=1.0, max_skips=3)))
        if value == 0.1:
            first = len(traces)
    assert first > 0 and len(traces) == first, "a new tolerance retraced the program"
    assert int(jnp.sum(outs[0].body_computed)) > int(jnp.sum(outs[1].body_computed))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs",
    [dict(sensitivity_x=-1.0, sensitivity_t=1.0), dict(sensitivity_x=1.0, sensitivity_t=-0.5),
     dict(sensitivity_x=1.0), dict(warmup_steps=1), dict(tolerance=-0.1),
     dict(max_skips=1.5), dict(tolerance="0.1")],
)
def test_bad_settings_are_refused_when_made(kwargs):
    with pytest.raises((ValueError, TypeError)):
        jc.SenCachePolicy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reuse=jc.OutputReuse(all_layers=True)), "all_layers"),
        (dict(record=("output_change",)), "record="),
        (dict(remat=True), "remat"),
        (dict(guidance=jc.CFGCache(interval=2, axes=(1,))), "do not combine"),
        (dict(policy=jc.OnDevice(jc.SenCachePolicy(0.1))), "unwrapped|itself"),
    ],
)
def test_bad_runs_are_refused_before_compiling(kwargs, match):
    kwargs = {"policy": jc.SenCachePolicy(0.1), **kwargs}
    with pytest.raises(ValueError, match=match):
        _run(lower=True, **kwargs)
