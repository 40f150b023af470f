"""Solvers with state and keys (Heun, DPM-Solver++ 2M, DDPM, Euler ancestral), alone and in the
sampler: closed forms and orders of convergence computed independently (numpy, float64), the key
traced (a new seed never recompiles), each model evaluation one cache step, clear errors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc

import toy_networks

T = 1000
MU, S = 0.7, 0.5  # Gaussian data N(MU, S^2): every flow and its exact endpoint in closed form


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _drive(solver, predict, x, key, num_steps):
    """``init_state`` / ``advance`` over the solver's evaluations, the way the sampler runs them."""
    times, next_times = solver.times(num_steps)
    xs = (jnp.arange(len(times), dtype=jnp.int32), jnp.asarray(times), jnp.asarray(next_times))

    def body(carry, step):
        x, state = carry
        i, t, t_next = step
        k = None if key is None else jax.random.fold_in(key, i)
        x, state = solver.advance(state, x, predict(x, t), t, t_next, index=i, key=k)
        return (x, state), x

    (x, _), path = jax.lax.scan(body, (x, solver.init_state(x)), xs)
    return x, path


def _z(n=64, seed=0):
    return np.random.default_rng(seed).normal(size=(n,))


def _alpha_bar_table() -> np.ndarray:
    out, prod = [], 1.0
    for j in range(T):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * j / (T - 1))
        out.append(prod)
    return np.array(out)


# --------------------------------------------------------------------------- FlowMatchHeun


def _flow_velocity(x, t):
    """The exact velocity of rectified flow from N(MU, S^2) data: x_t = (1 - t) x0 + t n."""
    var = (1 - t) ** 2 * S**2 + t**2
    return -MU + (x - (1 - t) * MU) * (t - (1 - t) * S**2) / var


@settings(max_examples=20, deadline=None)
@given(num_steps=st.integers(1, 40), shift=st.floats(0.2, 5.0))
def test_heun_times_list_predictor_and_corrector(num_steps, shift):
    t, t_next = jc.FlowMatchHeun(shift).times(num_steps)
    grid = np.asarray(jc.FlowMatchEuler(shift).times(num_steps)[0].tolist() + [0.0], np.float32)
    assert t.dtype == t_next.dtype == np.float32
    assert t.shape == t_next.shape == (2 * num_steps - 1,)
    np.testing.assert_array_equal(t[0::2], grid[:-1])  # predictors at t_k
    np.testing.assert_array_equal(t[1::2], grid[1:-1])  # correctors at t_{k+1}
    np.testing.assert_array_equal(t_next[0::2], grid[1:])
    np.testing.assert_array_equal(t_next[1::2], grid[1:-1])


@settings(max_examples=10, deadline=None)
@given(num_steps=st.integers(1, 12), a=st.floats(-2.0, 2.0), shift=st.floats(0.5, 3.0))
def test_heun_on_a_linear_velocity_is_the_second_order_taylor_product(num_steps, a, shift):
    """``v = a x``: each Heun step multiplies by ``1 + a dt + (a dt)^2 / 2``; the last by Euler."""
    x, _ = _drive(jc.FlowMatchHeun(shift), lambda x, t: a * x, jnp.ones((3,)), None, num_steps)
    grid = np.asarray(jc.FlowMatchEuler(shift).times(num_steps)[0].tolist() + [0.0], np.float64)
    dt = np.diff(grid)
    factor = np.prod(1 + a * dt[:-1] + (a * dt[:-1]) ** 2 / 2) * (1 + a * dt[-1])
    np.testing.assert_allclose(np.asarray(x), factor, rtol=2e-5)


def test_heun_with_one_step_is_euler_bitwise():
    x = jnp.asarray(_z(8), jnp.float32)
    heun, _ = _drive(jc.FlowMatchHeun(), _flow_velocity, x, None, 1)
    euler, _ = _drive(jc.FlowMatchEuler(), _flow_velocity, x, None, 1)
    np.testing.assert_array_equal(np.asarray(heun), np.asarray(euler))


def test_heun_is_second_order_and_euler_first():
    z = jnp.asarray(_z(), jnp.float32)
    exact = MU + S * np.asarray(z, np.float64)  # the flow keeps the standardised value

    def error(solver, n):
        return float(np.max(np.abs(np.asarray(_drive(solver, _flow_velocity, z, None, n)[0])
                                   - exact)))

    euler = [error(jc.FlowMatchEuler(), n) for n in (8, 16)]
    heun = [error(jc.FlowMatchHeun(), n) for n in (8, 16)]
    assert 1.7 < euler[0] / euler[1] < 2.3, euler
    assert heun[0] / heun[1] > 3.5, heun
    assert heun[1] < euler[1] / 10


# -------------------------------------------------------------------------- DPMSolverPP2M


def _gaussian_eps(solver):
    """The exact noise prediction for N(MU, S^2) data on the solver's schedule."""

    def eps(x, t):
        a = solver.alpha_bar(t)
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)

    return eps


def _dpmpp_2m_numpy(x, predict, num_steps):
    """DPM-Solver++ (2M), written from the paper in float64 (first order first and last)."""
    ab = _alpha_bar_table()
    k = np.round(np.linspace(T - 1, 0, num_steps)).astype(np.int64)
    a = [ab[i] for i in k] + [1.0]

    def lam(v):
        return 0.5 * np.log(v / (1 - v))

    previous = None
    for i in range(num_steps):
        eps = predict(x, k[i] / T)
        x0 = (x - np.sqrt(1 - a[i]) * eps) / np.sqrt(a[i])
        if a[i + 1] == 1.0:
            return x0
        h = lam(a[i + 1]) - lam(a[i])
        d = x0
        if previous is not None:
            r = (lam(a[i]) - lam(previous[1])) / h
            d = (1 + 1 / (2 * r)) * x0 - previous[0] / (2 * r)
        x = np.sqrt((1 - a[i + 1]) / (1 - a[i])) * x - np.sqrt(a[i + 1]) * np.expm1(-h) * d
        previous = (x0, a[i])
    return x


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 25])
def test_dpmpp_2m_matches_the_papers_update(num_steps):
    def predict(x, t):  # any smooth predictor will do
        return 0.4 * np.tanh(x) + 0.3 * t

    x = _z(16, seed=num_steps)
    want = _dpmpp_2m_numpy(x, predict, num_steps)
    got, _ = _drive(jc.DPMSolverPP2M(), lambda x, t: 0.4 * jnp.tanh(x) + 0.3 * t,
                    jnp.asarray(x, jnp.float32), None, num_steps)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@settings(max_examples=6, deadline=None)
@given(num_steps=st.sampled_from([1, 2, 5, 20, 100]), seed=st.integers(0, 3))
def test_dpmpp_2m_true_noise_lands_on_data(num_steps, seed):
    """With the true noise every data prediction is exact, so both orders are exact."""
    rng = np.random.default_rng(seed)
    x0, eps = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    solver = jc.DPMSolverPP2M()
    ab = _alpha_bar_table()
    start = np.sqrt(ab[T - 1]) * x0 + np.sqrt(1 - ab[T - 1]) * eps
    eps32 = jnp.asarray(eps, jnp.float32)
    x, _ = _drive(solver, lambda x, t: eps32, jnp.asarray(start, jnp.float32), None, num_steps)
    np.testing.assert_allclose(np.asarray(x), x0, atol=5e-5 + 1e-5 * np.sqrt(num_steps))


def test_dpmpp_2m_is_second_order_and_ddim_first():
    z = _z()

    def error(solver, n):
        a_T = float(solver.alpha_bar(jnp.float32(solver.times(n)[0][0])))
        start = np.sqrt(a_T) * MU + np.sqrt(a_T * S**2 + 1 - a_T) * z  # same quantile of x_T
        x, _ = _drive(solver, _gaussian_eps(solver), jnp.asarray(start, jnp.float32), None, n)
        return float(np.max(np.abs(np.asarray(x) - (MU + S * z))))

    ddim = [error(jc.DDIM(), n) for n in (80, 160)]
    dpm = [error(jc.DPMSolverPP2M(), n) for n in (80, 160)]
    assert 1.7 < ddim[0] / ddim[1] < 2.3, ddim
    assert dpm[0] / dpm[1] > 3.3, dpm
    assert dpm[1] < ddim[1] / 3


# ------------------------------------------------------------------- DDPM, Euler ancestral


@pytest.mark.parametrize("k, k_next", [(999, 949), (500, 480), (37, 0)])
def test_ddpm_one_step_is_the_posterior_sample(k, k_next):
    ab = _alpha_bar_table()
    a, a_next = ab[k], ab[k_next]
    rng = np.random.default_rng(k)
    x, eps = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    key = jax.random.key(k)
    z = np.asarray(jax.random.normal(key, (3, 5), jnp.float32), np.float64)
    beta = 1 - a / a_next
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mean = (np.sqrt(a_next) * beta * x0 + np.sqrt(1 - beta) * (1 - a_next) * x) / (1 - a)
    want = mean + np.sqrt((1 - a_next) / (1 - a) * beta) * z
    got = jc.DDPM().step(jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32),
                         jnp.float32(k / T), jnp.float32(k_next / T), key)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(x0).max())


@pytest.mark.parametrize("solver", [jc.DDPM(), jc.EulerAncestral()], ids=["ddpm", "euler_a"])
def test_ancestral_last_step_is_the_clean_prediction_whatever_the_key(solver):
    x = jnp.asarray(_z(10), jnp.float32)
    eps = jnp.asarray(_z(10, 1), jnp.float32)
    t, t_next = solver.times(5)
    outs = [solver.step(x, eps, t[-1], t_next[-1], jax.random.key(s)) for s in range(3)]
    a = float(solver.alpha_bar(jnp.float32(t[-1])))
    x0 = (np.asarray(x) - np.sqrt(1 - a) * np.asarray(eps)) / np.sqrt(a)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", [jc.DDPM(), jc.EulerAncestral()], ids=["ddpm", "euler_a"])
def test_ancestral_steps_keep_the_forward_marginals(solver):
    """With the true noise of a fixed x0, each step's sample is N(sqrt(abar) x0, 1 - abar)."""
    rows, x0 = 40000, 0.8
    eps0 = jax.random.normal(jax.random.key(1), (rows,))
    times, _ = solver.times(6)
    a_T = solver.alpha_bar(jnp.float32(times[0]))
    start = jnp.sqrt(a_T) * x0 + jnp.sqrt(1 - a_T) * eps0

    def oracle(x, t):
        a = solver.alpha_bar(t)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    final, path = _drive(solver, oracle, start, jax.random.key(7), 6)
    _, next_times = solver.times(6)
    for i, t_next in enumerate(next_times[:-1]):
        a = float(solver.alpha_bar(jnp.float32(t_next)))
        row = np.asarray(path[i], np.float64)
        assert abs(row.mean() - np.sqrt(a) * x0) < 0.02, (i, row.mean())
        assert abs(row.var() - (1 - a)) < 0.03 * (1 - a) + 1e-3, (i, row.var())
    np.testing.assert_allclose(np.asarray(final), x0, atol=1e-4)


def test_euler_ancestral_without_noise_is_ddim():
    x = jnp.asarray(_z(12), jnp.float32)

    def predict(x, t):
        return 0.5 * jnp.tanh(x) + t

    ea, _ = _drive(jc.EulerAncestral(eta=0.0), predict, x, jax.random.key(0), 10)
    ddim, _ = _drive(jc.DDIM(), predict, x, None, 10)
    np.testing.assert_allclose(np.asarray(ea), np.asarray(ddim), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_euler_ancestral_rejects_eta_outside_unit_interval(eta):
    with pytest.raises(ValueError, match="eta"):
        jc.EulerAncestral(eta=eta)


@pytest.mark.parametrize("solver", [jc.DPMSolverPP2M(), jc.FlowMatchHeun()])
def test_stateful_solvers_have_no_stateless_step(solver):
    with pytest.raises(NotImplementedError, match="advance"):
        solver.step(jnp.ones(2), jnp.ones(2), jnp.float32(0.5), jnp.float32(0.25))


def test_existing_solvers_advance_is_their_step_bitwise():
    x = jnp.asarray(_z(9), jnp.float32)
    p = jnp.asarray(_z(9, 2), jnp.float32)
    for solver in (jc.FlowMatchEuler(3.0), jc.DDIM()):
        t, t_next = jnp.asarray(solver.times(4)[0][1]), jnp.asarray(solver.times(4)[1][1])
        assert solver.init_state(x) is None and not solver.uses_key
        out, state = solver.advance(None, x, p, t, t_next, index=jnp.int32(1))
        assert state is None
        np.testing.assert_array_equal(np.asarray(out), np.asarray(solver.step(x, p, t, t_next)))


# ------------------------------------------------------------------------------ in the sampler
ALL = {
    "ddpm": jc.DDPM(),
    "euler_a": jc.EulerAncestral(),
    "dpmpp_2m": jc.DPMSolverPP2M(),
    "heun": jc.FlowMatchHeun(shift=2.0),
}


def _sample(solver, policy, *, steps=6, key=0, guided=True, network=None, **kwargs):
    base, params = toy_networks.single_stream()
    network = network or base
    noise, cond, uncond = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    extra = dict(uncond=uncond, guidance_scale=3.0) if guided else {}
    return jc.sample(plan, plan.split(params), noise, cond, solver=solver, num_steps=steps,
                     policy=policy, key=jax.random.key(key) if solver.uses_key else None,
                     **extra, **kwargs)


@pytest.mark.parametrize("name", sorted(ALL))
def test_interval_one_equals_uncached_bitwise(name):
    solver = ALL[name]
    uncached = _sample(solver, None)
    cached = _sample(solver, jc.IntervalPolicy(1))
    np.testing.assert_array_equal(np.asarray(cached.sample), np.asarray(uncached.sample))
    assert np.all(np.isfinite(np.asarray(uncached.sample)))


@pytest.mark.parametrize("name", sorted(ALL))
def test_known_schedule_equals_device_decisions(name):
    # The per-evaluation key and the solver state do not depend on how the loop is grouped.
    static = _sample(ALL[name], jc.IntervalPolicy(2), steps=7)
    dynamic = _sample(ALL[name], jc.OnDevice(jc.IntervalPolicy(2)), steps=7)
    # (The toy network is no noise predictor: the discrete solvers' samples grow large.)
    np.testing.assert_allclose(np.asarray(static.sample), np.asarray(dynamic.sample),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(static.refreshed), np.asarray(dynamic.refreshed))


@pytest.mark.parametrize("name", sorted(ALL))
def test_uncached_sampler_is_the_solver_loop(name):
    solver = ALL[name]
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()
    key = jax.random.key(3)
    out = _sample(solver, None, guided=False, key=3)

    def predict(x, t):
        return network(params, x, jnp.full((x.shape[0],), t, jnp.float32), cond)

    want, _ = _drive(solver, predict, noise, key if solver.uses_key else None, 6)
    np.testing.assert_allclose(np.asarray(out.sample), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_heun_counts_each_evaluation_as_a_cache_step():
    out = _sample(jc.FlowMatchHeun(), jc.IntervalPolicy(2), steps=5)
    evaluations = 2 * 5 - 1
    assert out.refreshed.shape == (evaluations,)
    np.testing.assert_array_equal(np.asarray(out.refreshed), np.arange(evaluations) % 2 == 0)
    assert int(out.layer_evaluations) == evaluations * toy_networks.LAYERS - 4 * 3


def test_a_new_seed_never_recompiles():
    network, _ = toy_networks.single_stream()
    traces = []

    def embed(*args):
        traces.append(1)
        return network.embed(*args)

    counted = jc.Network(network.condition, embed, network.layer, network.final)
    samples = []
    for seed in (0, 1, 2, 0):
        out = _sample(jc.DDPM(), jc.IntervalPolicy(2), key=seed, network=counted)
        samples.append(np.asarray(out.sample))
        if seed == 0 and len(samples) == 1:
            first = len(traces)
    assert first > 0 and len(traces) == first, "a new seed retraced the program"
    assert not np.allclose(samples[0], samples[1]) and not np.allclose(samples[1], samples[2])
    np.testing.assert_array_equal(samples[0], samples[3])  # the same seed, the same sample


def test_raw_uint32_keys_work_too():
    a = _sample(jc.DDPM(), None, guided=False, key=0)
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    b = jc.sample(plan, plan.split(params), noise, cond, solver=jc.DDPM(), num_steps=6,
                  key=jax.random.PRNGKey(0))
    assert b.sample.shape == a.sample.shape and np.all(np.isfinite(np.asarray(b.sample)))


def test_taylor_forecast_refuses_two_stored_evaluations_at_one_time():
    with pytest.raises(ValueError, match="TaylorForecast.*HermiteForecast"):
        _sample(jc.FlowMatchHeun(), jc.OnDevice(jc.IntervalPolicy(2)), reuse=jc.TaylorForecast(1))
    with pytest.raises(ValueError, match="twice"):
        _sample(jc.FlowMatchHeun(), jc.StepMaskPolicy((1, 1, 1, 0, 1)), steps=3,
                reuse=jc.TaylorForecast(1))
    out = _sample(jc.FlowMatchHeun(), jc.IntervalPolicy(2), steps=5, reuse=jc.TaylorForecast(1))
    assert np.all(np.isfinite(np.asarray(out.sample)))
    out = _sample(jc.FlowMatchHeun(), jc.OnDevice(jc.IntervalPolicy(1)),
                  reuse=jc.HermiteForecast(1))
    assert np.all(np.isfinite(np.asarray(out.sample)))


def test_mask_length_counts_evaluations():
    with pytest.raises(ValueError, match="FlowMatchHeun makes 5 in 3 steps"):
        _sample(jc.FlowMatchHeun(), jc.StepMaskPolicy((1, 0, 1)), steps=3)
    _sample(jc.FlowMatchHeun(), jc.StepMaskPolicy((1, 0, 1, 0, 1)), steps=3)


# ------------------------------------------------------------------------------ bad solvers
@dataclasses.dataclass  # not frozen: eq=True without a hash
class _Unhashable(jc.Solver):
    def times(self, num_steps):
        return jc.FlowMatchEuler().times(num_steps)

    def step(self, x, prediction, t, t_next):
        return x


class _NoUpdate(jc.Solver):
    def times(self, num_steps):
        return jc.FlowMatchEuler().times(num_steps)


def test_solver_errors_name_what_was_expected():
    with pytest.raises(TypeError, match="must be hashable.*frozen dataclass"):
        _sample(_Unhashable(), None)
    with pytest.raises(TypeError, match="defines neither step.*nor advance"):
        _sample(_NoUpdate(), None)
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    with pytest.raises(ValueError, match=r"DDPM draws fresh noise.*key=jax.random.key"):
        jc.sample(plan, plan.split(params), noise, cond, solver=jc.DDPM(), num_steps=4)
    with pytest.raises(ValueError, match="key= was given, but DDIM draws no noise"):
        jc.sample(plan, plan.split(params), noise, cond, solver=jc.DDIM(), num_steps=4,
                  key=jax.random.key(0))
    with pytest.raises(ValueError, match="key must be one PRNG key"):
        jc.sample(plan, plan.split(params), noise, cond, solver=jc.DDPM(), num_steps=4,
                  key=jax.random.split(jax.random.key(0), 3))
