"""The fitted forecast: TaylorSeer with a gain per step, and fitting the gains with Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.evaluation.program import host_round_trips, runtime_decisions
from jaxcache.reuse import Position

import toy_networks

SOLVER = jc.FlowMatchEuler(shift=3.0)
STEPS = 12
INTERVAL_3 = jc.IntervalPolicy(3)


def _run(reuse, policy=INTERVAL_3, batch=3, network=None, params=None):
    if network is None:
        network, params = toy_networks.dual_stream()
    noise, cond, uncond = toy_networks.inputs(batch)
    plan = jc.CachePlan(network, 4)
    return jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                     policy=policy, reuse=reuse, uncond=uncond, guidance_scale=4.0)


def _gains(order, seed=0):
    return rand.uniform(jax.random.key(seed), (STEPS, order), minval=0.3, maxval=1.7)


@pytest.mark.parametrize("order, residual, policy", [
    (1, False, INTERVAL_3), (1, False, jc.OnDevice(INTERVAL_3)), (2, False, INTERVAL_3),
    (1, True, INTERVAL_3),
], ids=["order1", "order1-device", "order2", "order1-residual"])
def test_gains_of_one_are_taylorseer_exactly(order, residual, policy):
    taylor = _run(jc.TaylorForecast(order, residual=residual), policy)
    fitted = _run(jc.FittedForecast.taylor(STEPS, order, residual=residual), policy)
    np.testing.assert_array_equal(np.asarray(fitted.sample), np.asarray(taylor.sample))


def test_known_schedule_and_device_decisions_read_the_same_step_gains():
    # The known schedule runs grouped scans: each skipped step must still read its own gains.
    reuse = jc.FittedForecast(gains=_gains(2), order=2)
    static = _run(reuse, jc.IntervalPolicy(3))
    device = _run(reuse, jc.OnDevice(jc.IntervalPolicy(3)))
    np.testing.assert_allclose(static.sample, device.sample, rtol=1e-5, atol=1e-5)
    shifted = _run(jc.FittedForecast(gains=jnp.roll(_gains(2), 1, axis=0), order=2))
    assert float(jnp.max(jnp.abs(shifted.sample - static.sample))) > 1e-4


def test_gains_of_zero_are_plain_reuse_exactly():
    reuse = _run(jc.OutputReuse())
    fitted = _run(jc.FittedForecast(gains=jnp.zeros((STEPS, 1))))
    np.testing.assert_array_equal(np.asarray(fitted.sample), np.asarray(reuse.sample))


def test_interval_one_equals_uncached_bitwise():
    network, params = toy_networks.dual_stream()
    noise, cond, uncond = toy_networks.inputs(3)
    plan = jc.CachePlan(network, 0)
    uncached = jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER,
                         num_steps=STEPS, uncond=uncond, guidance_scale=4.0)
    got = _run(jc.FittedForecast(gains=_gains(2), order=2), jc.IntervalPolicy(1))
    np.testing.assert_array_equal(np.asarray(got.sample), np.asarray(uncached.sample))


def test_a_batch_equals_its_samples_alone():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan.around(network, toy_networks.LAYERS, first=1)
    noise, cond, uncond = toy_networks.inputs(4)
    reuse = jc.FittedForecast(gains=_gains(1), residual=True)
    policy = jc.FirstBlockPolicy(0.3)

    def run(i, j):
        return jc.sample(plan, plan.split(params), noise[i:j], cond[i:j], solver=SOLVER,
                         num_steps=STEPS, policy=policy, reuse=reuse, uncond=uncond[i:j],
                         guidance_scale=3.0)

    together = run(0, 4)
    computed = np.asarray(together.body_computed)
    assert 0 < computed.mean() < 1 and (computed != computed[:, :1, :1]).any()
    for i in range(4):
        alone = run(i, i + 1)
        np.testing.assert_allclose(together.sample[i], alone.sample[0], rtol=2e-5, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(
    gains=st.lists(st.floats(-2, 2, width=32), min_size=8, max_size=8),
    values=st.lists(st.floats(-3, 3, width=32), min_size=3, max_size=3),
    step=st.integers(5, 7),
)
def test_each_step_scales_taylors_terms_by_its_gains(gains, values, step):
    gains = jnp.asarray(gains, jnp.float32).reshape(4, 2)
    gains = jnp.concatenate([gains, gains])  # 8 steps
    times = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    body = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    fitted = jc.FittedForecast(gains=gains, order=2)
    taylor = jc.TaylorForecast(2)
    states = [m.init(None, body, None) for m in (fitted, taylor)]
    for stored, value in zip((0, 2, 4), values):
        position = Position(jnp.int32(stored), jnp.float32(times[stored]))
        out = jnp.full((1, 2), value, jnp.float32)
        states = [m.store(s, out, out, position, None) for m, s in zip((fitted, taylor), states)]
    position = Position(jnp.int32(step), jnp.float32(times[step]))
    got = fitted.reuse(states[0], jnp.zeros((1, 2)), position)
    # Taylor's terms, each scaled by this step's gain.
    f = states[1].factors
    w = taylor._weights(states[1], position.t, position)
    want = f[0] + gains[step, 0] * w[0][:, None] * f[1] + gains[step, 1] * w[1][:, None] * f[2]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_new_gains_do_not_recompile():
    network, params = toy_networks.single_stream()
    counted, traces = toy_networks.trace_counted(network)
    outs = []
    for seed in range(3):
        outs.append(_run(jc.FittedForecast(gains=_gains(1, seed)), network=counted,
                         params=params).sample)
        if seed == 0:
            first = len(traces)
    assert first > 0 and len(traces) == first, "new gains retraced the program"
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-5  # ... and the gains acted


@pytest.mark.parametrize("policy", [jc.IntervalPolicy(3), jc.OnDevice(jc.IntervalPolicy(3))],
                         ids=["known", "device"])
def test_program_checks_hold(policy):
    network, params = toy_networks.single_stream()
    noise, cond, uncond = toy_networks.inputs(2)
    plan = jc.CachePlan(network, 4)
    lowered = jc.lower(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                       policy=policy, reuse=jc.FittedForecast(gains=_gains(2), order=2),
                       uncond=uncond, guidance_scale=2.0)
    compiled = lowered.compile().as_text()
    assert host_round_trips(lowered.as_text()) == [] and host_round_trips(compiled) == []
    assert (runtime_decisions(compiled) == []) == isinstance(policy, jc.IntervalPolicy)


def test_fitting_lowers_the_error_against_full_compute():
    network, params = toy_networks.single_stream()
    noise, cond, uncond = toy_networks.inputs(4)
    plan = jc.CachePlan(network, 4)
    seg = plan.split(params)
    kwargs = dict(solver=SOLVER, num_steps=STEPS, uncond=uncond, guidance_scale=2.0)
    target = jc.sample(plan, seg, noise, cond, **kwargs).sample
    policy = jc.IntervalPolicy(4)

    def error(reuse):
        out = jc.sample(plan, seg, noise, cond, policy=policy, reuse=reuse, **kwargs).sample
        return float(jnp.mean(jnp.square(out - target)))

    losses = []
    fitted = jc.fit_forecast(plan, seg, noise, cond, policy=policy, iterations=15,
                             log=lambda i, loss: losses.append((i, loss)), **kwargs)
    assert isinstance(fitted, jc.FittedForecast) and fitted.gains.shape == (STEPS, 1)
    assert not np.allclose(np.asarray(fitted.gains), 1.0)
    taylor = error(jc.TaylorForecast(1))
    assert error(fitted) < 0.9 * taylor, (error(fitted), taylor)
    # The log sees every step; its first loss is Taylor's (the fit starts from gains of one).
    assert [i for i, _ in losses] == list(range(15)) and losses[-1][1] < losses[0][1]
    np.testing.assert_allclose(losses[0][1], taylor, rtol=1e-4)


def test_bad_settings_raise_before_compiling():
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs(2)
    plan = jc.CachePlan(network, 4)
    seg = plan.split(params)
    for order in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match="FittedForecast.order"):
            jc.FittedForecast(gains=jnp.ones((STEPS, 1)), order=order)
    with pytest.raises(ValueError, match=r"FittedForecast.gains.*\(12, 1\).*\(10, 1\)"):
        jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                  policy=jc.IntervalPolicy(3), reuse=jc.FittedForecast(gains=jnp.ones((10, 1))))
    with pytest.raises(ValueError, match="needs 3 computed steps"):
        jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                  policy=jc.IntervalPolicy(6),
                  reuse=jc.FittedForecast(gains=jnp.ones((STEPS, 2)), order=2))
    fit = dict(solver=SOLVER, num_steps=STEPS, policy=jc.IntervalPolicy(3))
    with pytest.raises(ValueError, match="iterations"):
        jc.fit_forecast(plan, seg, noise, cond, iterations=0, **fit)
    with pytest.raises(ValueError, match="learning_rate"):
        jc.fit_forecast(plan, seg, noise, cond, learning_rate=0.0, **fit)
    for policy in (jc.OnDevice(jc.IntervalPolicy(3)), jc.FirstBlockPolicy(0.1)):
        with pytest.raises(ValueError, match="known before sampling"):
            jc.fit_forecast(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                            policy=policy)
    with pytest.raises(ValueError, match="policy is None"):
        jc.fit_forecast(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, policy=None)
    with pytest.raises(ValueError, match="initial has order=2"):
        jc.fit_forecast(plan, seg, noise, cond,
                        initial=jc.FittedForecast.taylor(STEPS, 2, residual=False), **fit)
    with pytest.raises(ValueError, match="divides by the time"):
        jc.sample(plan, seg, noise, cond, solver=jc.FlowMatchHeun(), num_steps=4,
                  policy=jc.OnDevice(jc.IntervalPolicy(2)),
                  reuse=jc.FittedForecast(gains=jnp.ones((7, 1))))


def test_remat_keeps_the_samples_and_the_gradient():
    network, params = toy_networks.single_stream()
    noise, cond, uncond = toy_networks.inputs(2)
    plan = jc.CachePlan(network, 4)
    seg = plan.split(params)

    def total(gains, remat):
        out = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                        policy=INTERVAL_3, reuse=jc.FittedForecast(gains=gains, order=2),
                        uncond=uncond, guidance_scale=2.0, remat=remat)
        return jnp.sum(jnp.square(out.sample))

    gains = _gains(2)
    (value, grad), (value_remat, grad_remat) = (
        jax.value_and_grad(total)(gains, r) for r in (False, True))
    np.testing.assert_array_equal(np.asarray(value_remat), np.asarray(value))
    np.testing.assert_allclose(grad_remat, grad, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(grad_remat))) > 0
    # The rematerialised program recomputes the steps: its gradient holds checkpoint regions.
    text = {r: str(jax.make_jaxpr(jax.grad(lambda g, r=r: total(g, r)))(gains))
            for r in (False, True)}
    assert "checkpoint" in text[True] or "remat" in text[True]
    assert "checkpoint" not in text[False] and "remat" not in text[False]
    with pytest.raises(TypeError, match="remat must be a bool"):
        jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, policy=INTERVAL_3,
                  remat=1)
