"""Reuse modes: plain reuse, residual, Taylor and Hermite forecasts, their state and memory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.reuse import Position

import toy_networks

SOLVER = jc.FlowMatchEuler(shift=3.0)
MODES = {
    "output": jc.OutputReuse(),
    "all_layers": jc.OutputReuse(all_layers=True),
    "residual": jc.ResidualReuse(),
    "taylor0": jc.TaylorForecast(0),
    "taylor1": jc.TaylorForecast(1),
    "taylor2": jc.TaylorForecast(2),
    "taylor1_residual": jc.TaylorForecast(1, residual=True),
    "hermite2": jc.HermiteForecast(2),
}


def _run(network, params, n, policy, mode, steps=12, guided=True, batch=3):
    noise, cond, uncond = toy_networks.inputs(batch)
    plan = jc.CachePlan(network, n)
    kwargs = dict(uncond=uncond, guidance_scale=4.0) if guided else {}
    return jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=steps,
                     policy=policy, reuse=mode, **kwargs)


@pytest.mark.parametrize(
    "name, mode", [("dual", m) for m in sorted(MODES)] + [("single", "taylor2")]
)
def test_interval_one_equals_uncached_bitwise(name, mode):
    network, params = getattr(toy_networks, f"{name}_stream")()
    uncached = _run(network, params, 0, None, None)
    got = _run(network, params, 4, jc.IntervalPolicy(1), MODES[mode])
    np.testing.assert_array_equal(np.asarray(got.sample), np.asarray(uncached.sample))


@pytest.mark.parametrize("policy", [jc.IntervalPolicy(3), jc.OnDevice(jc.IntervalPolicy(3))],
                         ids=["static", "device"])
def test_order_zero_is_plain_reuse_exactly(policy):
    network, params = toy_networks.dual_stream()
    reuse = _run(network, params, 4, policy, jc.OutputReuse())
    taylor0 = _run(network, params, 4, policy, jc.TaylorForecast(0))
    hermite0 = _run(network, params, 4, policy, jc.HermiteForecast(0))
    np.testing.assert_array_equal(np.asarray(taylor0.sample), np.asarray(reuse.sample))
    np.testing.assert_array_equal(np.asarray(hermite0.sample), np.asarray(reuse.sample))


@pytest.mark.parametrize("mode", ["taylor1", "taylor2", "hermite2", "residual"])
def test_static_and_device_decisions_agree(mode):
    network, params = toy_networks.single_stream()
    static = _run(network, params, 4, jc.IntervalPolicy(3), MODES[mode])
    device = _run(network, params, 4, jc.OnDevice(jc.IntervalPolicy(3)), MODES[mode])
    np.testing.assert_allclose(static.sample, device.sample, rtol=1e-5, atol=1e-5)


def test_forecasts_differ_from_reuse_and_each_other():
    network, params = toy_networks.single_stream()
    samples = {m: _run(network, params, 4, jc.IntervalPolicy(3), MODES[m]).sample
               for m in ("output", "residual", "taylor1", "taylor2", "hermite2")}
    names = sorted(samples)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert float(jnp.max(jnp.abs(samples[a] - samples[b]))) > 1e-4, (a, b)


# ------------------------------------------------------------------------------ the rules
def _store_all(mode, points, body):
    state = mode.init(None, body, None)
    for step, (t, value) in enumerate(points):
        state = mode.store(state, value, value, Position(jnp.int32(step), jnp.float32(t)), None)
    return state


@settings(max_examples=25, deadline=None)
@given(
    order=st.integers(0, 2),
    coefficients=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    ticks=st.lists(st.integers(0, 20), min_size=4, max_size=4, unique=True),
    target=st.floats(0.0, 1.0),
)
def test_taylor_order_k_is_exact_on_degree_k_polynomials(order, coefficients, ticks, target):
    # Any spacing, including uneven and out-of-order times; rows hold different polynomials.
    times = [k / 20 for k in ticks]
    poly = np.asarray(coefficients[: order + 1])  # degree <= order

    def value(t):
        row0 = np.polyval(poly, t)
        return jnp.asarray([[row0, 2.0 * row0 - 1.0]], jnp.float32).T  # [rows=2, 1]

    mode = jc.TaylorForecast(order)
    body = jax.ShapeDtypeStruct((2, 1), jnp.float32)
    state = _store_all(mode, [(t, value(t)) for t in times], body)
    got = mode.reuse(state, jnp.zeros((2, 1)), Position(jnp.int32(9), jnp.float32(target)))
    np.testing.assert_allclose(got, value(target), rtol=1e-3, atol=2e-3)


def test_taylor_warms_up_with_the_history_it_has():
    mode = jc.TaylorForecast(2)
    body = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    one = _store_all(mode, [(1.0, jnp.ones((1, 1)))], body)
    got = mode.reuse(one, jnp.zeros((1, 1)), Position(jnp.int32(1), jnp.float32(0.5)))
    np.testing.assert_allclose(got, 1.0)  # one point: reuse
    two = _store_all(mode, [(1.0, jnp.ones((1, 1))), (0.5, 2 * jnp.ones((1, 1)))], body)
    got = mode.reuse(two, jnp.zeros((1, 1)), Position(jnp.int32(2), jnp.float32(0.25)))
    np.testing.assert_allclose(got, 2.5)  # two points: linear


@pytest.mark.parametrize("sigma", [0.5, 0.65, 1 / math.sqrt(2)])
def test_hermite_weights(sigma):
    mode = jc.HermiteForecast(2, sigma)
    body = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    # Values 0, 1, 4 at steps 0, 1, 2 (y = s^2): D1 = 3, D2 = (3 - 1) / 1 = 2.
    state = _store_all(mode, [(0.0, jnp.full((1, 1), v)) for v in (0.0, 1.0, 4.0)], body)
    x = 2.0  # forecast two steps after the last stored one (step 4)
    got = mode.reuse(state, jnp.zeros((1, 1)), Position(jnp.int32(4), jnp.float32(0.0)))
    want = 4.0 + 3.0 * 2 * sigma**2 * x + 2.0 * (2 * sigma**4 * x**2 - sigma**2)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rows_that_do_not_store_keep_their_state():
    mode = jc.TaylorForecast(1)
    body = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    state = mode.init(None, body, None)
    state = mode.store(state, None, jnp.ones((2, 3)), Position(jnp.int32(0), jnp.float32(1.0)),
                       None)
    rows = jnp.array([True, False])
    state = mode.store(state, None, 3 * jnp.ones((2, 3)),
                       Position(jnp.int32(1), jnp.float32(0.5)), rows)
    assert state.count.tolist() == [2, 1]
    np.testing.assert_allclose(state.factors[0][:, 0], [3.0, 1.0])
    np.testing.assert_allclose(state.positions[0], [0.5, 1.0])


def test_residual_reuse_adds_the_stored_residual():
    mode = jc.ResidualReuse()
    body = jax.ShapeDtypeStruct((1, 2), jnp.float32)
    state = mode.init(None, body, None)
    state = mode.store(state, jnp.array([[1.0, 2.0]]), jnp.array([[1.5, 1.0]]),
                       Position(jnp.int32(0), jnp.float32(1.0)), None)
    got = mode.reuse(state, jnp.array([[10.0, 10.0]]), Position(jnp.int32(1), jnp.float32(0.5)))
    np.testing.assert_allclose(got, [[10.5, 9.0]])


def test_output_reuse_writes_rows_in_place_and_splits_branches():
    network, _ = toy_networks.single_stream()
    mode = jc.OutputReuse(all_layers=True)
    state = mode.init(jc.CachePlan(network, 2), jax.ShapeDtypeStruct((4, 3), jnp.float32),
                      jnp.arange(4.0))
    rows = jnp.array([True, False, True, False])
    state = mode.record(state, jnp.int32(1), jnp.ones((4, 3)), rows)
    np.testing.assert_array_equal(state.get(1)[:, 0], [1.0, 0.0, 1.0, 0.0])
    assert not bool(state.has(1))  # written, marked filled by store
    state = mode.store(state, None, jnp.ones((4, 3)), Position(jnp.int32(0), jnp.float32(1.0)),
                       rows)
    assert bool(state.has(0)) and bool(state.has(1))
    half = mode.rows(state, 2, 4)
    np.testing.assert_array_equal(half.get(1)[:, 0], [1.0, 0.0])
    np.testing.assert_array_equal(half.get_constant(), [2.0, 3.0])
    half.set(0, jnp.zeros((2, 3)))  # the slot structure follows the rows


# ------------------------------------------------------------------------------ memory
def _nbytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_state_bytes(order):
    network, params = toy_networks.dual_stream()
    out = _run(network, params, 4, jc.IntervalPolicy(3), jc.TaylorForecast(order), guided=False)
    (state,) = out.caches
    activation = 3 * 8 * 4 + 3 * 3 * 8 * 4  # image [3, 8] + text [3, 3, 8], float32
    factors = _nbytes(state.factors)
    assert factors == (order + 1) * activation
    assert _nbytes(state) - factors <= 3 * 4 * 4  # positions and counts: a few per row
    (cache,) = _run(network, params, 4, jc.IntervalPolicy(3), jc.OutputReuse(),
                    guided=False).caches
    slots = _nbytes((cache.stream1.slots, cache.stream2.slots))
    assert slots == activation  # one activation, not one per cached layer


# ------------------------------------------------------------------------------ bad input
def test_bad_forecast_settings_raise_before_compiling():
    with pytest.raises(ValueError, match="TaylorForecast.order must be 0, 1 or 2"):
        jc.TaylorForecast(3)
    with pytest.raises(ValueError, match="HermiteForecast.order"):
        jc.HermiteForecast(-1)
    with pytest.raises(ValueError, match="HermiteForecast.scale"):
        jc.HermiteForecast(1, -0.5)
    network, params = toy_networks.single_stream()
    with pytest.raises(ValueError, match="num_steps=2"):
        _run(network, params, 3, jc.IntervalPolicy(1), jc.TaylorForecast(2), steps=2)
    with pytest.raises(ValueError, match="refreshes only 2 times"):
        _run(network, params, 3, jc.IntervalPolicy(5), jc.TaylorForecast(2), steps=8)
    with pytest.raises(TypeError, match="reuse must be a ReuseMode"):
        _run(network, params, 3, jc.IntervalPolicy(2), "taylor")
