"""UniPC and the flow-matching grids of the diffusers pipelines (``jaxcache.solvers``).

Every expected value is computed here, independently of the solver: the grids from the formulas
the diffusers schedulers publish (UniPCMultistepScheduler with ``use_flow_sigmas``,
FlowMatchEulerDiscreteScheduler), with their constants (1000 training steps, Wan 2.1's flow
shifts 3 and 5); UniPC from a plain numpy scheduler written from the UniPC paper (Zhao et al.
2023, the B(h) updates of any order, data prediction) with diffusers' step semantics (the
corrector first, with the last predictor's order; the simplified ``rho = 1/2`` of the
second-order predictor; ``lower_order_final``).
"""

from __future__ import annotations

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
WAN_SHIFTS = (3.0, 5.0)  # Wan 2.1's flow_shift at 480p and 720p
MU, S = 0.7, 0.5  # Gaussian data N(MU, S^2): the flow and its endpoint in closed form


# ----------------------------------------------------------------------- the published grids


def diffusers_flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """UniPCMultistepScheduler.set_timesteps with use_flow_sigmas=True, final_sigmas_type="zero":
    ``num_steps + 1`` float32 sigmas, as the scheduler computes them."""
    alphas = np.linspace(1, 1 / T, num_steps + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def diffusers_flow_sigmas_timesteps(num_steps: int, shift: float) -> np.ndarray:
    """The same scheduler's integer timesteps: ``sigmas * 1000`` (float64) cast to int64."""
    alphas = np.linspace(1, 1 / T, num_steps + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    return (sigmas * T).copy().astype(np.int64)


def diffusers_flow_match_euler(num_steps: int, shift: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift=...) then set_timesteps(num_steps): the sigmas.

    __init__ shifts the training sigmas ``linspace(1, T, T)[::-1] / T`` in float32 and keeps
    ``sigma_max`` / ``sigma_min``; set_timesteps spaces ``num_steps`` timesteps from
    ``sigma_max * T`` to ``sigma_min * T`` (end included), shifts them again, casts to float32
    and appends 0.
    """
    f32 = np.float32
    first = f32(T) / f32(T)
    last = f32(1) / f32(T)
    shifted = [f32(shift) * s / (f32(1) + f32(shift - 1) * s) for s in (first, last)]
    sigma_max, sigma_min = float(shifted[0]), float(shifted[1])
    timesteps = np.linspace(sigma_max * T, sigma_min * T, num_steps)
    sigmas = timesteps / T
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def default_grid(num_steps: int, shift: float) -> np.ndarray:
    """The library's default grid, written point by point: ``shift(1 - i / N)``."""
    out = [shift * (1 - i / num_steps) / (1 + (shift - 1) * (1 - i / num_steps))
           for i in range(num_steps + 1)]
    return np.asarray(out, np.float64)


def _grid(solver, num_steps):
    t, t_next = solver.times(num_steps)
    assert t.dtype == t_next.dtype == np.float32 and t.shape == t_next.shape == (num_steps,)
    np.testing.assert_array_equal(t[1:], t_next[:-1])
    return np.append(t, t_next[-1])


@settings(max_examples=40, deadline=None)
@given(num_steps=st.integers(1, 120), shift=st.floats(0.1, 20.0))
def test_flow_sigmas_grid_is_the_schedulers_bitwise(num_steps, shift):
    want = diffusers_flow_sigmas(num_steps, shift)
    np.testing.assert_array_equal(_grid(jc.FlowMatchEuler(shift, grid="flow_sigmas"), num_steps),
                                  want)
    np.testing.assert_array_equal(_grid(jc.UniPC(shift), num_steps), want)


@settings(max_examples=40, deadline=None)
@given(num_steps=st.integers(1, 120), shift=st.floats(0.1, 20.0))
def test_flow_match_euler_grid_is_the_schedulers_bitwise(num_steps, shift):
    got = _grid(jc.FlowMatchEuler(shift, grid="flow_match_euler"), num_steps)
    np.testing.assert_array_equal(got, diffusers_flow_match_euler(num_steps, shift))


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_match_euler_grid_spot_values(shift):
    # Written out: 5 times from 1 to the twice-shifted 1/1000, evenly spaced before the shift.
    once = shift * 0.001 / (1 + (shift - 1) * 0.001)
    s = np.linspace(1.0, once, 5)
    want = shift * s / (1 + (shift - 1) * s)
    got = _grid(jc.FlowMatchEuler(shift, grid="flow_match_euler"), 5)
    np.testing.assert_allclose(got[:-1], want, rtol=1e-6)
    assert got[0] == 1.0 and got[-1] == 0.0


@settings(max_examples=30, deadline=None)
@given(num_steps=st.integers(1, 80), shift=st.floats(0.05, 20.0))
def test_default_grid_is_unchanged(num_steps, shift):
    got = _grid(jc.FlowMatchEuler(shift), num_steps)
    np.testing.assert_array_equal(got, _grid(jc.FlowMatchEuler(shift, grid="linspace"),
                                             num_steps))
    np.testing.assert_allclose(got, default_grid(num_steps, shift), rtol=1e-6, atol=1e-7)
    assert jc.FlowMatchEuler(shift) == jc.FlowMatchEuler(shift, grid="linspace")


def test_repr_names_only_settings_off_their_defaults():
    # The repr is a recorded identity (MagCache calibrations, routers): grids must differ in it,
    # and the default grid's stays as it reads without the option.
    assert repr(jc.FlowMatchEuler(3.0)) == "FlowMatchEuler(shift=3.0)"
    assert repr(jc.FlowMatchEuler(3.0, grid="flow_sigmas")) == (
        "FlowMatchEuler(shift=3.0, grid='flow_sigmas')")
    assert repr(jc.FlowMatchEuler(2.0, grid="flow_match_euler", num_train_steps=500)) == (
        "FlowMatchEuler(shift=2.0, grid='flow_match_euler', num_train_steps=500)")
    assert repr(jc.UniPC(5.0)) == "UniPC(shift=5.0, num_train_steps=1000)"


@pytest.mark.parametrize("shift", WAN_SHIFTS)
def test_flow_sigmas_sit_below_the_default_grid_by_the_documented_amount(shift):
    steps = 50
    default = _grid(jc.FlowMatchEuler(shift), steps).astype(np.float64)
    wan = _grid(jc.FlowMatchEuler(shift, grid="flow_sigmas"), steps).astype(np.float64)
    assert default[0] == 1.0 and wan[0] < 1.0
    assert np.all(wan <= default)
    # 1e-3 s shift'(s) peaks at s = 1 / (shift - 1): 3.75e-4 at shift 3, 3.1e-4 at shift 5.
    bound = 1e-3 * shift / (4 * (shift - 1))
    assert 0.9 * bound < np.max(default - wan) < bound + 1e-6


# --------------------------------------------------------------- UniPC against numpy (float64)


def unipc_numpy(x, velocity, sigmas, order=2):
    """UniPC with B(h) = e^h - 1 (bh2) and data prediction, stepped as diffusers steps it.

    At step ``i``: the data prediction ``m_i = x_i - sigma_i v_i``; then (``i > 0``) the
    corrector UniC-p from the sample the last predictor started at, with that predictor's order
    ``p``; then the predictor UniP-p, ``p = min(order, steps left, i + 1)``. Every coefficient is
    the general one of the paper (``R rho = b`` solved with numpy), except the second-order
    predictor's ``rho = 1/2``. Returns the last sample and every step's output.
    """
    sig = np.asarray(sigmas, np.float64)
    n = len(sig) - 1

    def lam(s):
        with np.errstate(divide="ignore"):
            return np.log(1.0 - s) - np.log(s)

    def coefficients(h, p):
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
        for k in range(1, p + 1):
            b.append(h_phi_k * factorial / h_phi_1)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, np.array(b)

    outputs, start, last_order, path = [], None, 0, []
    for i in range(n):
        m = x - sig[i] * velocity(x, sig[i])
        if i > 0:
            h = lam(sig[i]) - lam(sig[i - 1])
            rks = [(lam(sig[i - 1 - k]) - lam(sig[i - 1])) / h for k in range(1, last_order)]
            d1s = [(outputs[-1 - k] - outputs[-1]) / rk for k, rk in enumerate(rks, 1)]
            h_phi_1, b = coefficients(h, last_order)
            if last_order == 1:
                rhos = np.array([0.5])
            else:
                rhos = np.linalg.solve(np.stack([np.array(rks + [1.0]) ** k
                                                 for k in range(last_order)]), b)
            history = sum(r * d for r, d in zip(rhos[:-1], d1s))
            x = (sig[i] / sig[i - 1] * start - (1 - sig[i]) * h_phi_1 * outputs[-1]
                 - (1 - sig[i]) * h_phi_1 * (history + rhos[-1] * (m - outputs[-1])))
        outputs = (outputs + [m])[-order:]
        p = min(order, n - i, i + 1)
        start = x
        with np.errstate(divide="ignore", invalid="ignore"):
            h = lam(sig[i + 1]) - lam(sig[i])
        h_phi_1 = np.expm1(-h)
        x = sig[i + 1] / sig[i] * x - (1 - sig[i + 1]) * h_phi_1 * m
        if p == 2:
            r = (lam(sig[i - 1]) - lam(sig[i])) / h
            x = x - (1 - sig[i + 1]) * h_phi_1 * 0.5 * (outputs[-2] - m) / r
        last_order = p
        path.append(x)
    return x, np.array(path)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _drive(solver, predict, x, num_steps):
    """``init_state`` / ``advance`` over the solver's evaluations, as the sampler runs them."""
    times, next_times = solver.times(num_steps)
    xs = (jnp.arange(len(times), dtype=jnp.int32), jnp.asarray(times), jnp.asarray(next_times))

    def body(carry, step):
        x, state = carry
        i, t, t_next = step
        x, state = solver.advance(state, x, predict(x, t), t, t_next, index=i)
        return (x, state), x

    (x, _), path = jax.lax.scan(body, (x, solver.init_state(x)), xs)
    return x, path


class _Linear:
    """The fixed linear "model" ``v = A x + b t`` (hashable: a static argument of _drive)."""

    def __init__(self, seed: int, d: int = 6):
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(d, d)) * 0.5 / np.sqrt(d)
        self.b = rng.normal(size=d)
        self.x = rng.normal(size=(3, d))

    def numpy(self, x, t):
        return x @ self.a.T + self.b * t

    def __call__(self, x, t):
        return x @ jnp.asarray(self.a.T, jnp.float32) + jnp.asarray(self.b, jnp.float32) * t


@pytest.mark.parametrize("num_steps, shift", [(1, 3.0), (2, 5.0), (3, 1.0), (4, 3.0),
                                              (10, 5.0), (25, 3.0), (25, 1.0)])
def test_unipc_follows_the_numpy_scheduler_on_a_linear_model(num_steps, shift):
    model = _Linear(seed=num_steps)
    _, want = unipc_numpy(model.x, model.numpy, diffusers_flow_sigmas(num_steps, shift))
    _, got = _drive(jc.UniPC(shift), model, jnp.asarray(model.x, jnp.float32), num_steps)
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_the_reference_is_not_euler():
    # Both orders act: UniPC leaves Euler's path after the first step on this model.
    model = _Linear(seed=0)
    sig = diffusers_flow_sigmas(10, 3.0)
    _, unipc = unipc_numpy(model.x, model.numpy, sig)
    x, euler = model.x, []
    for i in range(10):
        x = x + (float(sig[i + 1]) - float(sig[i])) * model.numpy(x, float(sig[i]))
        euler.append(x)
    np.testing.assert_allclose(unipc[0], euler[0], rtol=1e-9)  # first order: Euler
    assert np.max(np.abs(unipc[1:] - np.array(euler[1:]))) > 1e-3


def test_one_step_unipc_is_euler_bitwise():
    # One step is first order and the last: the data prediction x - t v, Euler's x + (0 - t) v.
    model = _Linear(seed=1)
    x = jnp.asarray(model.x, jnp.float32)
    unipc, _ = _drive(jc.UniPC(3.0), model, x, 1)
    euler, _ = _drive(jc.FlowMatchEuler(3.0, grid="flow_sigmas"), model, x, 1)
    np.testing.assert_array_equal(np.asarray(unipc), np.asarray(euler))


@settings(max_examples=6, deadline=None)
@given(num_steps=st.sampled_from([1, 2, 5, 20]), shift=st.sampled_from(WAN_SHIFTS),
       seed=st.integers(0, 3))
def test_unipc_with_the_true_data_prediction_stays_on_the_line(num_steps, shift, seed):
    """A single data point ``x0``: the true velocity ``(x - x0) / t`` predicts ``x0`` exactly at
    every evaluation, so every update keeps ``x_t = (1 - t) x0 + t n`` and ends at ``x0``."""
    rng = np.random.default_rng(seed)
    x0, noise = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
    solver = jc.UniPC(shift)
    t0 = float(solver.times(num_steps)[0][0])
    start = jnp.asarray((1 - t0) * x0 + t0 * noise, jnp.float32)
    x0_32 = jnp.asarray(x0, jnp.float32)
    x, path = _drive(solver, lambda x, t: (x - x0_32) / t, start, num_steps)
    np.testing.assert_allclose(np.asarray(x), x0, atol=2e-5)
    grid = _grid(solver, num_steps)[1:, None, None].astype(np.float64)
    np.testing.assert_allclose(np.asarray(path), (1 - grid) * x0 + grid * noise, atol=5e-5)


def test_unipc_converges_faster_than_euler():
    z = np.random.default_rng(0).normal(size=64)

    def velocity(x, t):  # the exact velocity of rectified flow from N(MU, S^2) data
        var = (1 - t) ** 2 * S**2 + t**2
        return -MU + (x - (1 - t) * MU) * (t - (1 - t) * S**2) / var

    def error(solver, n):
        t0 = float(solver.times(n)[0][0])  # start on the same quantile of x_t0
        start = (1 - t0) * MU + np.sqrt((1 - t0) ** 2 * S**2 + t0**2) * z
        x, _ = _drive(solver, velocity, jnp.asarray(start, jnp.float32), n)
        return float(np.max(np.abs(np.asarray(x) - (MU + S * z))))

    euler = [error(jc.FlowMatchEuler(grid="flow_sigmas"), n) for n in (40, 80)]
    unipc = [error(jc.UniPC(), n) for n in (40, 80)]
    assert 1.7 < euler[0] / euler[1] < 2.3, euler
    assert unipc[0] / unipc[1] > 3.0, unipc
    assert unipc[0] < euler[0] / 10 and unipc[1] < euler[1] / 20, (unipc, euler)


def test_unipc_is_one_evaluation_per_step():
    for n in (1, 7, 50):
        t, t_next = jc.UniPC(3.0).times(n)
        assert len(t) == len(t_next) == n and t_next[-1] == 0.0
        assert np.all(np.diff(t) < 0) and 0.0 < t[-1] <= t[0] < 1.0
    assert jc.UniPC(3.0).time_kind == "continuous"
    with pytest.raises(NotImplementedError, match="advance"):
        jc.UniPC().step(jnp.ones(2), jnp.ones(2), jnp.float32(0.5), jnp.float32(0.25))


def test_unipc_keeps_the_sample_dtype_and_updates_in_float32():
    model = _Linear(seed=2)
    x16 = jnp.asarray(model.x, jnp.bfloat16)
    out, _ = _drive(jc.UniPC(3.0), lambda x, t: model(x.astype(jnp.float32), t).astype(x.dtype),
                    x16, 6)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    state = jc.UniPC().init_state(x16)
    assert all(s.dtype == jnp.float32 for s in state)


# ------------------------------------------------------------------------------ in the sampler


def _sample(solver, policy, *, steps=6, guided=True, network=None, **kwargs):
    base, params = toy_networks.single_stream()
    network = network or base
    noise, cond, uncond = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    extra = dict(uncond=uncond, guidance_scale=3.0) if guided else {}
    return jc.sample(plan, plan.split(params), noise, cond, solver=solver, num_steps=steps,
                     policy=policy, **extra, **kwargs)


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
def test_unipc_interval_one_equals_uncached_bitwise(guided):
    solver = jc.UniPC(3.0)
    uncached = _sample(solver, None, guided=guided)
    cached = _sample(solver, jc.IntervalPolicy(1), guided=guided)
    assert uncached.sample.shape[0] == 3  # a batch of three
    np.testing.assert_array_equal(np.asarray(cached.sample), np.asarray(uncached.sample))
    assert np.all(np.isfinite(np.asarray(uncached.sample)))


def test_uncached_sampler_is_the_unipc_loop():
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()
    out = _sample(jc.UniPC(3.0), None, guided=False)  # the unguided program above

    def predict(x, t):
        return network(params, x, jnp.full((x.shape[0],), t, jnp.float32), cond)

    want, _ = _drive(jc.UniPC(3.0), predict, noise, 6)
    np.testing.assert_allclose(np.asarray(out.sample), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unipc_caches_one_evaluation_per_step():
    steps = 7
    every = _sample(jc.UniPC(3.0), None, steps=steps)
    static = _sample(jc.UniPC(3.0), jc.IntervalPolicy(2), steps=steps)
    dynamic = _sample(jc.UniPC(3.0), jc.OnDevice(jc.IntervalPolicy(2)), steps=steps)
    assert static.refreshed.shape == (steps,)
    np.testing.assert_array_equal(np.asarray(static.refreshed), np.arange(steps) % 2 == 0)
    assert int(static.layer_evaluations) == steps * toy_networks.LAYERS - 3 * 3
    np.testing.assert_allclose(np.asarray(static.sample), np.asarray(dynamic.sample),
                               rtol=1e-5, atol=1e-5)
    # Reused steps feed the solver's state: the cached sample differs from the uncached one.
    assert not np.allclose(np.asarray(static.sample), np.asarray(every.sample))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shift", [0.0, -3.0, float("nan"), float("inf")])
@pytest.mark.parametrize("make", [lambda s: jc.FlowMatchEuler(s, grid="flow_sigmas"), jc.UniPC],
                         ids=["euler", "unipc"])
def test_bad_shift_is_refused(make, shift):
    with pytest.raises(ValueError, match=r"shift must be > 0 and finite"):
        make(shift)


def test_bad_grid_settings_are_refused():
    with pytest.raises(ValueError, match=r"unknown grid='diffusers'; expected one of 'linspace', "
                                         r"'flow_sigmas', 'flow_match_euler'"):
        jc.FlowMatchEuler(3.0, grid="diffusers")
    with pytest.raises(ValueError, match="num_train_steps=500 applies to the diffusers grids"):
        jc.FlowMatchEuler(3.0, num_train_steps=500)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_train_steps must be a positive int"):
            jc.UniPC(3.0, num_train_steps=bad)
        with pytest.raises(ValueError, match="num_train_steps must be a positive int"):
            jc.FlowMatchEuler(3.0, grid="flow_sigmas", num_train_steps=bad)
    with pytest.raises(ValueError, match="shift must be a number"):
        jc.UniPC("3")
    with pytest.raises(ValueError, match="num_steps"):
        jc.UniPC().times(0)


def test_unipc_on_an_index_network_is_refused_before_compiling():
    base, params = toy_networks.single_stream()
    traced = []

    def embed(*args):
        traced.append(1)
        return base.embed(*args)

    for time in (jc.TimeConvention.index(1000), jc.TimeConvention.index(500)):
        network = jc.Network(base.condition, embed, base.layer, base.final, time=time)
        T_ = int(time.scale)
        with pytest.raises(ValueError, match=(
                rf"integer training-step indices 0..{T_ - 1}.*UniPC evaluates at continuous "
                rf"flow-matching times.*TimeConvention.truncated\({T_}\)")):
            _sample(jc.UniPC(3.0), jc.IntervalPolicy(2), network=network)
    assert not traced
