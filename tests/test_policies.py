"""Refresh policies: their published rules, per-sample decisions, exactness at threshold 0,
calibration, and clear errors for bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.policies import relative_l1
from jaxcache.tuning import fit_teacache_coefficients, teacache_calibration_data

import toy_networks

DEPTH = toy_networks.LAYERS
SOLVER = jc.FlowMatchEuler(shift=3.0)


def _network():
    network, params = toy_networks.single_stream()
    network = jc.Network(
        network.condition, network.embed, network.layer, network.final,
        modulated_input=lambda p, h, t: h @ p["w"] + t[:, None] * p["b"],
    )
    return network, params


def _dual():
    network, params = toy_networks.dual_stream()
    return jc.Network(
        network.condition, network.embed, network.layer, network.final, dual_stream=True,
        modulated_input=lambda p, h, t: h[0] @ p["wi"] + t[:, None],
    ), params


CASES = {
    "first_block": (lambda net: jc.CachePlan.around(net, DEPTH, first=1),
                    lambda thr: jc.FirstBlockPolicy(thr)),
    "teacache": (lambda net: jc.CachePlan(net, DEPTH), lambda thr: jc.TeaCachePolicy(thr)),
    "dbcache": (lambda net: jc.CachePlan.around(net, DEPTH, first=2, last=1),
                lambda thr: jc.DBCachePolicy(thr, warmup_steps=2)),
}
MODES = {
    "output": jc.OutputReuse(),
    "residual": jc.ResidualReuse(),
    "taylor": jc.TaylorForecast(1),
    "hermite": jc.HermiteForecast(2),
}


def _sample(plan, params, policy, mode, noise, cond, uncond, steps=12):
    return jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=steps,
                     policy=policy, reuse=mode, uncond=uncond, guidance_scale=3.0)


# ------------------------------------------------------------------------------ exactness
# Every policy with every mode would compile 24 programs; every policy with two modes and
# every mode with one policy covers each piece.
PAIRS = sorted(
    {(case, mode) for case in CASES for mode in ("residual", "taylor")}
    | {("first_block", mode) for mode in MODES}
)


@pytest.mark.parametrize("case, mode", PAIRS)
def test_threshold_zero_equals_uncached_exactly(case, mode):
    network, params = _network()
    make_plan, make_policy = CASES[case]
    plan = make_plan(network)
    noise, cond, uncond = toy_networks.inputs(3)
    uncached = _sample(plan, params, None, None, noise, cond, uncond)
    got = _sample(plan, params, make_policy(0.0), MODES[mode], noise, cond, uncond)
    np.testing.assert_array_equal(np.asarray(got.sample), np.asarray(uncached.sample))
    assert bool(jnp.all(got.body_computed))


# ------------------------------------------------------------------------------ per sample
@pytest.mark.parametrize("case, mode", PAIRS)
def test_a_batch_equals_its_samples_alone(case, mode):
    network, params = _dual() if case == "first_block" else _network()
    make_plan, make_policy = CASES[case]
    plan = make_plan(network)
    noise, cond, uncond = toy_networks.inputs(4)
    if network.dual_stream:
        noise = noise  # the dual toy shares the input layout
    policy = make_policy(0.3)
    together = _sample(plan, params, policy, MODES[mode], noise, cond, uncond)
    computed = np.asarray(together.body_computed)  # [steps, branches, batch]
    # The threshold is active, and samples and branches decide differently.
    assert 0 < computed.mean() < 1
    assert (computed != computed[:, :1, :1]).any()
    for i in range(4):
        alone = _sample(plan, params, policy, MODES[mode], noise[i : i + 1], cond[i : i + 1],
                        uncond[i : i + 1])
        np.testing.assert_allclose(together.sample[i], alone.sample[0], rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(computed[:, :, i], np.asarray(alone.body_computed)[:, :, 0])


def test_body_runs_when_any_row_needs_it_and_reports_per_sample():
    network, params = _network()
    plan = jc.CachePlan.around(network, DEPTH, first=1)
    noise, cond, uncond = toy_networks.inputs(4)
    out = _sample(plan, params, jc.FirstBlockPolicy(0.3), jc.ResidualReuse(), noise, cond, uncond)
    rows = np.asarray(out.body_computed).reshape(12, -1)
    np.testing.assert_array_equal(np.asarray(out.refreshed), rows.any(axis=1))
    layers = np.asarray(out.layers_computed)
    np.testing.assert_array_equal(layers[:, 0], True)  # the head always runs
    np.testing.assert_array_equal(
        layers[:, 1:], np.broadcast_to(rows.any(axis=1)[:, None], (12, DEPTH - 1))
    )


# ------------------------------------------------------------------------------ the rules
def _signal(values):
    return jnp.asarray(values, jnp.float32)[:, None] * jnp.ones((1, 4))


def test_first_block_rule():
    policy = jc.FirstBlockPolicy(0.1)
    state = policy.init(10, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    refresh, state = policy.decide(state, jnp.int32(0), _signal([1.0, 1.0]))
    assert refresh.tolist() == [True, True]  # nothing seen yet
    # Row 0 changes by 5%, row 1 by 20%: only row 1 recomputes.
    refresh, state = policy.decide(state, jnp.int32(1), _signal([1.05, 1.2]))
    assert refresh.tolist() == [False, True]
    # The reference of row 0 stays at its last computed step: 1.0 -> 1.12 is 12% > 10%.
    refresh, state = policy.decide(state, jnp.int32(2), _signal([1.12, 1.25]))
    assert refresh.tolist() == [True, False]
    np.testing.assert_allclose(state.previous[:, 0], [1.12, 1.2])


def test_first_block_warmup_and_zero_residual():
    policy = jc.FirstBlockPolicy(0.5, warmup_steps=2)
    state = policy.init(10, jax.ShapeDtypeStruct((1, 4), jnp.float32))
    zero = _signal([0.0])
    decisions = []
    for step in range(4):
        refresh, state = policy.decide(state, jnp.int32(step), zero)
        decisions.append(bool(refresh[0]))
    # An exactly zero residual reads as "unchanged" (no 0/0 NaN that never caches).
    assert decisions == [True, True, False, False]


def test_teacache_rule():
    policy = jc.TeaCachePolicy(0.25, coefficients=(2.0, 0.0))  # P(x) = 2x
    state = policy.init(5, jax.ShapeDtypeStruct((1, 4), jnp.float32))
    decisions, accumulated = [], []
    for step, value in enumerate([1.0, 1.1, 1.21, 1.1, 1.1]):
        refresh, state = policy.decide(state, jnp.int32(step), _signal([value]))
        decisions.append(bool(refresh[0]))
        accumulated.append(float(state.accumulated[0]))
    # step 0 computes; 1: 2*0.1 = 0.2 < 0.25 skip; 2: 0.2 + 2*0.1 = 0.4 computes (reset);
    # 3: 2 * |1.1 - 1.21| / 1.21 = 0.18 skip; 4 is the last step: computes.
    assert decisions == [True, False, True, False, True]
    np.testing.assert_allclose(accumulated, [0.0, 0.2, 0.0, 0.11 / 1.21 * 2, 0.0], rtol=1e-5)


def test_dbcache_rule():
    policy = jc.DBCachePolicy(0.5, warmup_steps=2, max_cached_steps=3,
                              max_consecutive_cached_steps=2)
    state = policy.init(12, jax.ShapeDtypeStruct((1, 4), jnp.float32))
    decisions = []
    for step in range(9):
        refresh, state = policy.decide(state, jnp.int32(step), _signal([1.0]))
        decisions.append(bool(refresh[0]))
    # Warm-up 2 steps; then at most 2 skips in a row, at most 3 in all.
    assert decisions == [True, True, False, False, True, False, True, True, True]
    assert int(state.cached[0]) == 3


def test_dbcache_warmup_interval():
    policy = jc.DBCachePolicy(0.5, warmup_steps=6, warmup_interval=2)
    state = policy.init(12, jax.ShapeDtypeStruct((1, 4), jnp.float32))
    decisions = []
    for step in range(6):
        refresh, state = policy.decide(state, jnp.int32(step), _signal([1.0]))
        decisions.append(bool(refresh[0]))
    assert decisions == [True, False, True, False, True, False]


def test_relative_l1_is_per_row():
    a = jnp.array([[1.0, 1.0], [2.0, 2.0]])
    b = jnp.array([[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(relative_l1(a, b), [0.0, 1.0])


# ------------------------------------------------------------------------------ calibration
@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_fit_recovers_a_known_polynomial(coefficients):
    x = np.linspace(0.0, 0.5, 40)
    y = np.polyval(coefficients, x)
    got = fit_teacache_coefficients(x, y, degree=2)
    np.testing.assert_allclose(got, coefficients, atol=1e-6)


def test_calibrate_teacache_on_a_network():
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(4)
    x, y = teacache_calibration_data(plan, seg, noise, cond, solver=SOLVER, num_steps=8,
                                     uncond=uncond, guidance_scale=3.0)
    assert x.shape == y.shape == (7 * 8,) and np.all(x > 0) and np.all(y > 0)
    coefficients = jc.calibrate_teacache(plan, seg, noise, cond, solver=SOLVER, num_steps=8)
    assert len(coefficients) == 5 and np.all(np.isfinite(coefficients))
    out = _sample(plan, params, jc.TeaCachePolicy(0.5, coefficients), jc.ResidualReuse(),
                  noise, cond, uncond)
    assert bool(jnp.all(jnp.isfinite(out.sample)))


# ------------------------------------------------------------------------------ bad input
def test_bad_settings_raise_before_compiling():
    network, params = _network()
    with pytest.raises(ValueError, match="FirstBlockPolicy.threshold"):
        jc.FirstBlockPolicy(-0.1)
    with pytest.raises(ValueError, match="TeaCachePolicy.threshold"):
        jc.TeaCachePolicy(-1.0)
    with pytest.raises(ValueError, match="DBCachePolicy.threshold"):
        jc.DBCachePolicy(-0.01)
    with pytest.raises(ValueError, match="max_cached_steps"):
        jc.DBCachePolicy(0.1, max_cached_steps=-2)
    with pytest.raises(ValueError, match="first=4 \\+ last=2"):
        jc.CachePlan.around(network, DEPTH, first=4, last=2)
    with pytest.raises(ValueError, match="shapes"):
        fit_teacache_coefficients(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="1-D"):
        fit_teacache_coefficients(np.ones((5, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="distinct"):
        fit_teacache_coefficients(np.ones(10), np.ones(10))
    noise, cond, _ = toy_networks.inputs(2)
    plan = jc.CachePlan(network, 3)  # no head layers: no head residual
    with pytest.raises(ValueError, match="first_layers >= 1"):
        jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=4,
                  policy=jc.FirstBlockPolicy(0.1))
    bare, _ = toy_networks.single_stream()
    plan = jc.CachePlan(bare, 3)
    with pytest.raises(ValueError, match="modulated input"):
        jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=4,
                  policy=jc.TeaCachePolicy(0.1))
    with pytest.raises(ValueError, match="modulated_input"):
        teacache_calibration_data(plan, plan.split(params), noise, cond, solver=SOLVER,
                                  num_steps=4)


def test_static_policies():
    assert jc.IntervalPolicy(3).static_schedule(7).tolist() == [
        True, False, False, True, False, False, True]
    mask = (True, False, True)
    assert jc.StepMaskPolicy(mask).static_schedule(3).tolist() == list(mask)
    with pytest.raises(ValueError, match="3 entries but num_steps=4"):
        jc.StepMaskPolicy(mask).static_schedule(4)
    with pytest.raises(ValueError, match="empty"):
        jc.StepMaskPolicy(())
    assert jc.OnDevice(jc.IntervalPolicy(2)).static_schedule(4) is None
    refresh, _ = jc.IntervalPolicy(3).decide((), jnp.int32(6), None)
    assert bool(refresh)
    # Settings objects are pytrees: numbers are leaves, structure is static.
    assert jax.tree.leaves(jc.IntervalPolicy(3)) == []
    assert len(jax.tree.leaves(jc.TeaCachePolicy(0.2, (1.0, 2.0, 3.0)))) == 4
