"""What a video pipeline's port needs from ``jaxcache.network``: the truncated-integer time
convention (``TimeConvention.truncated``), its checks against the solver before compiling, and
``check_parity`` for an NNX model whose blocks run under ``nnx.scan`` (Wan's layout).

The integers a pipeline computes are written out here as the pipelines compute them: diffusers'
UniPCMultistepScheduler with flow sigmas (``sigmas * 1000`` in float64, cast to int64) and its
JAX ports (``int32(1000 * sigma)`` in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc

import toy_networks

T = 1000
TRUNCATED = jc.TimeConvention.truncated(T)


def diffusers_timesteps(num_steps: int, shift: float) -> np.ndarray:
    """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).timesteps (int64)."""
    alphas = np.linspace(1, 1 / T, num_steps + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    return (sigmas * T).copy().astype(np.int64)


def port_timesteps(num_steps: int, shift: float) -> np.ndarray:
    """The JAX port's scheduler: the same formula in float32 jnp, then ``int32(1000 * sigma)``."""
    alphas = jnp.linspace(1, 1 / T, num_steps + 1)
    sigmas = 1.0 - alphas
    sigmas = jnp.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1]
    return np.asarray((sigmas * T).astype(jnp.int32))


# ---------------------------------------------------------------------- the convention itself


def test_truncated_reads_the_integer_part_of_the_scaled_time():
    t = jnp.asarray([0.99966645, 0.5004, 0.0419999, 0.00099, 0.0], jnp.float32)
    got = TRUNCATED.to_model(t)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), [999, 500, 41, 0, 0])
    # The other conventions read the same times otherwise.
    np.testing.assert_array_equal(np.asarray(jc.TimeConvention.index(T).to_model(t)),
                                  [1000, 500, 42, 1, 0])
    assert TRUNCATED == jc.TimeConvention("truncated", 1000.0)
    assert TRUNCATED.kind == "truncated" and TRUNCATED.scale == 1000.0


@settings(max_examples=60, deadline=None)
@given(t=st.floats(0.0, 1.0, width=32), factor=st.sampled_from([1000.0, 999.0, 4096.0]))
def test_truncated_is_the_ports_float32_expression(t, factor):
    want = np.trunc(np.float32(t) * np.float32(factor))  # int32(factor * sigma), in float32
    got = jc.TimeConvention.truncated(factor).to_model(jnp.float32(t))
    assert float(got) == float(want)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, T))
def test_truncated_round_trips_every_integer(k):
    t = TRUNCATED.to_solver(jnp.float32(k))
    assert k / T <= float(t) < (k + 1) / T
    assert float(TRUNCATED.to_model(t)) == k


@pytest.mark.parametrize("scale", [0.0, -1000.0, float("nan"), float("inf")])
def test_truncated_needs_a_positive_finite_factor(scale):
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        jc.TimeConvention.truncated(scale)


@jax.jit
def _truncated(times):
    return TRUNCATED.to_model(times)


def _received(shift, num_steps):
    """The integers a network of the truncated convention receives from UniPC's times."""
    times, _ = jc.UniPC(shift).times(num_steps)
    padded = np.zeros(128, np.float32)  # one shape: one compiled conversion
    padded[:num_steps] = times
    return np.asarray(_truncated(padded))[:num_steps].astype(np.int64)


@pytest.mark.parametrize("shift", [2.0, 3.0, 5.0, 7.0, 8.0, 12.0])  # Wan 2.1: 3 and 5
def test_unipc_times_truncate_to_the_pipelines_ints(shift):
    for num_steps in range(1, 121):
        np.testing.assert_array_equal(_received(shift, num_steps),
                                      diffusers_timesteps(num_steps, shift))
    # The JAX port's float32 scheduler (eager jnp: each length compiles, so a few of them).
    for num_steps in (1, 4, 30, 50):
        np.testing.assert_array_equal(_received(shift, num_steps),
                                      port_timesteps(num_steps, shift))


def test_at_shift_one_the_pipelines_themselves_disagree():
    # 1000 sigma is an integer in exact arithmetic (333 at 3 steps): float64 lands just below
    # it, float32 on it, so diffusers and the JAX port differ by one (as documented).
    assert diffusers_timesteps(3, 1.0)[2] == 332 and port_timesteps(3, 1.0)[2] == 333


# ------------------------------------------------------------------ checked before compiling


def _network(time, embed=None):
    base, params = toy_networks.single_stream()
    return jc.Network(base.condition, embed or base.embed, base.layer, base.final,
                      time=time), params


def _sample(network, params, solver, steps=4):
    noise, cond, _ = toy_networks.inputs()
    plan = jc.CachePlan(network, 2)
    return jc.sample(plan, plan.split(params), noise, cond, solver=solver, num_steps=steps)


class _CustomTimes(jc.Solver):
    """A solver that declares no time_kind: checked by value only."""

    def times(self, num_steps):
        return jc.DDIM().times(num_steps)

    def step(self, x, prediction, t, t_next):
        return x


def test_truncated_refuses_a_discrete_schedule_before_compiling():
    traced = []
    base, _ = toy_networks.single_stream()

    def embed(*args):
        traced.append(1)
        return base.embed(*args)

    network, params = _network(TRUNCATED, embed)
    for solver in (jc.DDIM(), jc.DPMSolverPP2M(num_train_steps=500)):
        with pytest.raises(ValueError, match=(
                rf"reads int\(1000 t\).*{type(solver).__name__} evaluates at training-step "
                r"indices k / T.*one step short.*TimeConvention.index\(T\)")):
            _sample(network, params, solver)
    assert not traced
    assert jc.DDIM().time_kind == "index" and _CustomTimes.time_kind is None


def test_index_refuses_flow_solvers_and_names_truncated():
    network, params = _network(jc.TimeConvention.index(T))
    for solver in (jc.FlowMatchEuler(3.0, grid="flow_sigmas"), jc.FlowMatchHeun(), jc.UniPC()):
        with pytest.raises(ValueError, match=(
                rf"integer training-step indices 0..999.*{type(solver).__name__} evaluates at "
                r"continuous flow-matching times.*truncated\(1000\).*scaled\(1000\)")):
            _sample(network, params, solver)
    # A solver of undeclared times is checked by its values, as before.
    _sample(network, params, _CustomTimes())


def test_truncated_accepts_flow_solvers_and_undeclared_ones():
    network, params = _network(TRUNCATED)
    for solver in (jc.UniPC(5.0), jc.FlowMatchEuler(3.0, grid="flow_sigmas"), _CustomTimes()):
        out = _sample(network, params, solver)
        assert np.all(np.isfinite(np.asarray(out.sample)))


# ------------------------------------------------- a Wan-style NNX model: blocks under nnx.scan


def _sinusoidal(timestep, dim):
    """Wan's timestep embedding of the integer timestep."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timestep.astype(jnp.float32)[:, None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class _WanBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.modulation = nnx.Linear(width, 2 * width, rngs=rngs)
        self.mlp = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, h, temb):
        shift, scale = jnp.split(self.modulation(temb)[:, None], 2, axis=-1)
        return h + nnx.gelu(self.mlp(h * (1 + scale) + shift))


class _TinyWan(nnx.Module):
    """Blocks built stacked with nnx.vmap and run with nnx.scan, as the Wan JAX port does;
    ``__call__`` reads the pipeline's integer timesteps."""

    def __init__(self, depth: int = 3, width: int = 16, channels: int = 4, *, rngs: nnx.Rngs):
        self.patch = nnx.Linear(channels, width, rngs=rngs)
        self.time_proj = nnx.Linear(width, width, rngs=rngs)
        self.text = nnx.Embed(8, width, rngs=rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0)
        def init_block(rngs):
            return _WanBlock(width, rngs)

        self.blocks = init_block(rngs)
        self.out = nnx.Linear(width, channels, rngs=rngs)
        self.width = width

    def __call__(self, x, timestep, y):
        h = self.patch(x)
        temb = nnx.silu(self.time_proj(_sinusoidal(timestep, self.width))) + self.text(y)

        def body(h, block):
            return block(h, temb), None

        h, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(h, self.blocks)
        return self.out(h)


SEEN: list[np.ndarray] = []  # the times the glued embed received (a host callback, tests only)


def _w_condition(m, y):
    return m.text(y)


def _w_embed(m, x, t, text):
    jax.debug.callback(lambda v: SEEN.append(np.asarray(v)), t)
    return m.patch(x), nnx.silu(m.time_proj(_sinusoidal(t, m.width))) + text


def _w_final(m, h, temb):
    return m.out(h)


def _wan():
    model = _TinyWan(rngs=nnx.Rngs(0))
    network, params = jc.from_nnx(model, blocks="blocks", condition=_w_condition,
                                  embed=_w_embed, final=_w_final, time=TRUNCATED)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))
    y = jnp.asarray([1, 3])
    t = jnp.asarray(jc.UniPC(5.0).times(10)[0][[0, 6]])
    return model, network, params, (x, t, y)


def _forward(model):
    # The reference forward as a port's loop calls it: integer timesteps, closing over the model.
    return lambda x, t_model, y: model(x, t_model.astype(jnp.int32), y)


def test_a_closure_over_the_model_cannot_be_compiled_by_jax_jit():
    # The cause: nnx.scan, inside jax.jit, refuses the closed-over (outer trace) variables.
    model, network, _, (x, t, y) = _wan()
    with pytest.raises(Exception, match="different trace level"):
        jax.jit(_forward(model))(x, TRUNCATED.to_model(t), y)


def test_check_parity_takes_a_closure_over_an_nnx_scan_model():
    model, network, params, (x, t, y) = _wan()
    diff = jc.check_parity(network, params, _forward(model), x, t, y, rtol=1e-5, atol=1e-5)
    assert diff < 1e-5
    # The model itself as the forward: split and rebuilt inside one compiled program.
    assert jc.check_parity(network, params, model, x, t, y, rtol=1e-5, atol=1e-5) < 1e-5


def test_check_parity_on_the_closure_still_catches_a_glue_bug():
    model, _, params, (x, t, y) = _wan()

    def embed_without_time(m, x, t, text):  # a planted bug: the timestep embedding left out
        return m.patch(x), text

    wrong, wrong_params = jc.from_nnx(model, blocks="blocks", condition=_w_condition,
                                      embed=embed_without_time, final=_w_final, time=TRUNCATED)
    with pytest.raises(jc.ParityError, match=r"max \|difference\| = "):
        jc.check_parity(wrong, wrong_params, _forward(model), x, t, y)


def test_check_parity_passes_on_other_errors_of_the_forward():
    model, network, params, (x, t, y) = _wan()

    def broken(x, t_model, y):
        raise ValueError("the forward's own mistake")

    with pytest.raises(ValueError, match="the forward's own mistake"):
        jc.check_parity(network, params, broken, x, t, y)


def test_the_wan_style_network_samples_with_unipc_reading_the_pipelines_ints():
    model, network, params, (x, _, y) = _wan()
    plan = jc.CachePlan(network, 2)
    steps, shift = 12, 5.0
    SEEN.clear()
    out = jc.sample(plan, plan.split(params), x, y, solver=jc.UniPC(shift), num_steps=steps,
                    policy=jc.IntervalPolicy(2), uncond=jnp.zeros_like(y), guidance_scale=4.0)
    jax.block_until_ready(out.sample)
    assert out.refreshed.shape == (steps,) and np.all(np.isfinite(np.asarray(out.sample)))
    received = sorted({int(v) for call in SEEN for v in np.ravel(call)}, reverse=True)
    assert all(np.all(call == call.ravel()[0]) for call in SEEN)  # one time per evaluation
    np.testing.assert_array_equal(received, diffusers_timesteps(steps, shift))
    np.testing.assert_array_equal(received, port_timesteps(steps, shift))
