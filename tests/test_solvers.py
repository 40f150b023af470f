"""Tests of ``jaxcache.solvers`` against closed forms computed independently (numpy, float64).

The solvers are never checked against themselves: every expected value is written out here from
the solver's stated convention (rectified flow ``x_t = (1 - t) x0 + t n``; DDIM with the linear
beta schedule of DDPM).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcache import DDIM, FlowMatchEuler, Solver

SHAPE = (3, 5)
shifts = st.floats(min_value=0.05, max_value=20.0, allow_nan=False)
steps = st.integers(min_value=1, max_value=60)


def _x0_and_noise(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=SHAPE), rng.normal(size=SHAPE)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _integrate(solver: Solver, predict, x, times, next_times):
    """Runs ``solver.step`` over the grid the way the sampler does (scalar float32 times)."""

    def body(x, tt):
        t, t_next = tt
        return solver.step(x, predict(x, t), t, t_next), x

    x, path = jax.lax.scan(body, x, (times, next_times))
    return x, path


def _run(solver, predict, x, num_steps):
    times, next_times = solver.times(num_steps)
    return _integrate(solver, predict, jnp.asarray(x, jnp.float32), times, next_times)


def _flow_grid(num_steps: int, shift: float) -> np.ndarray:
    """The shifted rectified-flow grid, written out point by point."""
    out = []
    for i in range(num_steps + 1):
        s = 1.0 - i / num_steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return np.array(out, np.float64)


def _alpha_bar(num_train_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """``prod_{j <= k} (1 - beta_j)`` for the linear schedule, as a Python product."""
    out, prod = [], 1.0
    for j in range(num_train_steps):
        frac = j / (num_train_steps - 1) if num_train_steps > 1 else 0.0
        prod *= 1.0 - (beta_start + (beta_end - beta_start) * frac)
        out.append(prod)
    return np.array(out, np.float64)


# ------------------------------------------------------------------------------ FlowMatchEuler


def test_solvers_are_solvers():
    assert isinstance(FlowMatchEuler(), Solver)
    assert isinstance(DDIM(), Solver)


@settings(max_examples=30, deadline=None)
@given(num_steps=steps, shift=shifts)
def test_flow_times_match_closed_form_grid(num_steps, shift):
    t, t_next = FlowMatchEuler(shift).times(num_steps)
    grid = _flow_grid(num_steps, shift)
    assert t.dtype == t_next.dtype == np.float32
    assert t.shape == t_next.shape == (num_steps,)
    np.testing.assert_allclose(t, grid[:-1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t_next, grid[1:], rtol=1e-6, atol=1e-7)
    # From pure noise at exactly 1 to data at exactly 0, strictly decreasing, contiguous.
    assert t[0] == 1.0 and t_next[-1] == 0.0
    np.testing.assert_array_equal(t[1:], t_next[:-1])
    assert np.all(np.diff(np.append(t, t_next[-1])) < 0)


@settings(max_examples=30, deadline=None)
@given(num_steps=st.integers(2, 60), shift=shifts)
def test_flow_shift_maps_unit_interval_monotonically(num_steps, shift):
    t, _ = FlowMatchEuler(shift).times(num_steps)
    plain, _ = FlowMatchEuler().times(num_steps)
    assert np.all((t >= 0.0) & (t <= 1.0))
    # The shift keeps the order of the plain grid and moves every point the same way.
    assert np.all(np.diff(t) < 0)
    inner_s, inner_p = t[1:].astype(np.float64), plain[1:].astype(np.float64)
    if shift > 1.0 + 1e-6:
        assert np.all(inner_s >= inner_p - 1e-7)
    elif shift < 1.0 - 1e-6:
        assert np.all(inner_s <= inner_p + 1e-7)


def test_flow_unit_shift_is_the_uniform_grid():
    t, t_next = FlowMatchEuler(1.0).times(4)
    np.testing.assert_array_equal(t, np.float32([1.0, 0.75, 0.5, 0.25]))
    np.testing.assert_array_equal(t_next, np.float32([0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan")])
def test_flow_rejects_non_positive_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        FlowMatchEuler(shift)


@settings(max_examples=6, deadline=None)
@given(num_steps=steps, shift=shifts, seed=st.integers(0, 3))
def test_flow_constant_velocity_lands_on_data(num_steps, shift, seed):
    """On ``x_t = (1 - t) x0 + t n`` the velocity is exactly ``n - x0``: Euler is exact."""
    x0, n = _x0_and_noise(seed)
    v = jnp.asarray(n - x0, jnp.float32)
    solver = FlowMatchEuler(shift)
    x, path = _run(solver, lambda x, t: v, n, num_steps)
    np.testing.assert_allclose(np.asarray(x), x0, atol=2e-5)
    # Every intermediate sample is on the straight line at its time.
    grid = _flow_grid(num_steps, shift)[:-1, None, None]
    np.testing.assert_allclose(np.asarray(path), (1 - grid) * x0 + grid * n, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(
    num_steps=steps,
    shift=shifts,
    a=st.floats(min_value=-3.0, max_value=3.0, allow_nan=False),
)
def test_flow_linear_velocity_is_eulers_product(num_steps, shift, a):
    """``v(x, t) = a x``: Euler gives ``x_N = x_0 prod_k (1 + a (t_{k+1} - t_k))``."""
    _, n = _x0_and_noise(1)
    x, _ = _run(FlowMatchEuler(shift), lambda x, t: a * x, n, num_steps)
    grid = _flow_grid(num_steps, shift)
    factor = np.prod(1.0 + a * np.diff(grid))
    np.testing.assert_allclose(np.asarray(x), factor * n, rtol=1e-4, atol=1e-6)


def test_flow_step_closed_form_and_dtype():
    x = jnp.asarray([[1.0, -2.0]], jnp.bfloat16)
    v = jnp.asarray([[0.5, 4.0]], jnp.float32)
    out = FlowMatchEuler().step(x, v, jnp.float32(0.75), jnp.float32(0.5))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), [[1.0 - 0.125, -3.0]])


# ------------------------------------------------------------------------------------- DDIM


ddim_configs = st.tuples(
    st.integers(min_value=1, max_value=2000),
    st.floats(min_value=1e-5, max_value=0.05),
    st.floats(min_value=0.0, max_value=0.2),
).map(lambda c: DDIM(c[0], c[1], c[1] + c[2]))


@settings(max_examples=40, deadline=None)
@given(solver=ddim_configs, data=st.data())
def test_ddim_times_decrease_from_last_training_step(solver, data):
    T = solver.num_train_steps
    num_steps = data.draw(st.integers(1, min(T, 200)))
    t, t_next = solver.times(num_steps)
    assert t.dtype == t_next.dtype == np.float32
    assert t.shape == t_next.shape == (num_steps,)
    k = t.astype(np.float64) * T
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # training steps k / T
    assert round(k[0]) == T - 1
    if num_steps > 1:
        assert t[-1] == 0.0
    assert np.all(np.diff(t) < 0)
    np.testing.assert_array_equal(t_next[:-1], t[1:])
    assert t_next[-1] < 0  # past step 0: the clean sample


@settings(max_examples=4, deadline=None)
@given(solver=ddim_configs)
def test_ddim_alpha_bar_is_the_linear_schedules_product(solver):
    T = solver.num_train_steps
    expected = _alpha_bar(T, solver.beta_start, solver.beta_end)
    k = np.unique(np.linspace(0, T - 1, min(T, 64)).round().astype(np.int64))
    got = solver.alpha_bar(jnp.asarray(k / T, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected[k], rtol=1e-5, atol=1e-37)


def test_ddim_default_schedule_values():
    # DDPM's schedule: alpha_bar_0 = 1 - 1e-4; alpha_bar at the last of 1000 steps ~ 4.04e-5.
    solver = DDIM()
    ab = np.asarray(solver.alpha_bar(jnp.float32([0.0, 0.999])))
    np.testing.assert_allclose(ab[0], 1 - 1e-4, rtol=1e-7)
    np.testing.assert_allclose(ab[1], 4.035e-5, rtol=1e-3)
    # Past the first training step (the last step's t_next) is the clean sample.
    _, t_next = solver.times(10)
    assert float(solver.alpha_bar(jnp.float32(t_next[-1]))) == 1.0


@pytest.mark.parametrize("k, k_next", [(999, 949), (500, 480), (37, 0), (0, -1)])
def test_ddim_one_step_closed_form(k, k_next):
    solver = DDIM()
    T = solver.num_train_steps
    ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    a = ab[k]
    a_next = 1.0 if k_next < 0 else ab[k_next]
    rng = np.random.default_rng(k)
    x, eps = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    expected = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
    got = solver.step(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(eps, jnp.float32),
        jnp.float32(k / T),
        jnp.float32(k_next / T),
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5 * np.abs(x0).max())


@settings(max_examples=6, deadline=None)
@given(num_steps=st.sampled_from([1, 2, 3, 7, 10, 50, 250, 1000]), seed=st.integers(0, 3))
def test_ddim_true_noise_lands_on_data(num_steps, seed):
    """An epsilon-predictor that returns the true noise makes every DDIM step exact."""
    x0, eps = _x0_and_noise(seed)
    solver = DDIM()
    T = solver.num_train_steps
    ab = _alpha_bar(T, 1e-4, 0.02)
    start = np.sqrt(ab[T - 1]) * x0 + np.sqrt(1 - ab[T - 1]) * eps
    eps32 = jnp.asarray(eps, jnp.float32)
    x, path = _run(solver, lambda x, t: eps32, start, num_steps)
    # Exact in real arithmetic. In float32 each step's rounding of x, divided by
    # sqrt(alpha_bar) >= 1/160, is carried into the next step: a random walk over the steps.
    atol = 5e-5 + 1e-5 * np.sqrt(num_steps)
    np.testing.assert_allclose(np.asarray(x), x0, atol=atol)
    # Every intermediate sample is the forward process at its own training step.
    t, _ = solver.times(num_steps)
    a = ab[np.round(t.astype(np.float64) * T).astype(np.int64)][:, None, None]
    expected = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    np.testing.assert_allclose(np.asarray(path), expected, atol=atol)


def test_ddim_step_keeps_dtype():
    x = jnp.ones((2, 3), jnp.bfloat16)
    out = DDIM().step(x, jnp.zeros((2, 3), jnp.float32), jnp.float32(0.5), jnp.float32(0.25))
    assert out.dtype == jnp.bfloat16


def test_ddim_rejects_more_steps_than_training_steps():
    DDIM(num_train_steps=10).times(10)
    with pytest.raises(ValueError, match="num_train_steps"):
        DDIM(num_train_steps=10).times(11)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_train_steps=0),
        dict(num_train_steps=True),
        dict(num_train_steps=2.5),
        dict(beta_start=0.0),
        dict(beta_start=0.03, beta_end=0.02),
        dict(beta_end=1.0),
    ],
)
def test_ddim_rejects_bad_schedule(kwargs):
    with pytest.raises(ValueError):
        DDIM(**kwargs)


@pytest.mark.parametrize("solver", [FlowMatchEuler(), DDIM()], ids=["flow", "ddim"])
@pytest.mark.parametrize("num_steps", [0, -1, True, False, 2.5, "4", None, np.float32(3)])
def test_times_rejects_bad_num_steps(solver, num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        solver.times(num_steps)


@pytest.mark.parametrize("solver", [FlowMatchEuler(), DDIM()], ids=["flow", "ddim"])
def test_times_accepts_numpy_ints(solver):
    t, t_next = solver.times(np.int64(5))
    assert t.shape == t_next.shape == (5,)
