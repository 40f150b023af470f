"""The training noise schedule of the discrete-schedule solvers (DDIM, DDPM, EulerAncestral,
DPM-Solver++ 2M): diffusers' named schedules, explicit ``betas=`` / ``alphas_cumprod=`` tables,
and their validation.

Every expected table is written out here independently (Python ``math`` loops or closed forms),
never read back from the solver.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache import DDIM, DDPM, DPMSolverPP2M, EulerAncestral

SCHEDULE_SOLVERS = [DDIM, DDPM, EulerAncestral, DPMSolverPP2M]


def _table(solver) -> np.ndarray:
    """``alpha_bar`` at every training step, as the solver serves it (float32)."""
    T = solver.num_train_steps
    return np.asarray(solver.alpha_bar(jnp.asarray(np.arange(T) / T, jnp.float32)))


def _linear_alpha_bar(T, beta_start, beta_end):
    out, prod = [], 1.0
    for j in range(T):
        frac = j / (T - 1) if T > 1 else 0.0
        prod *= 1.0 - (beta_start + (beta_end - beta_start) * frac)
        out.append(prod)
    return np.array(out)


def _scaled_linear_alpha_bar(T, beta_start, beta_end):
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    out, prod = [], 1.0
    for j in range(T):
        frac = j / (T - 1) if T > 1 else 0.0
        prod *= 1.0 - (lo + (hi - lo) * frac) ** 2
        out.append(prod)
    return np.array(out)


def _cosine_f(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _cosine_alpha_bar(T):
    """Improved DDPM's betas (clipped at 0.999), multiplied out step by step."""
    out, prod = [], 1.0
    for i in range(T):
        beta = min(1.0 - _cosine_f((i + 1) / T) / _cosine_f(i / T), 0.999)
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


# ------------------------------------------------------------------------------ named schedules


def test_default_is_ddpms_linear_schedule_bitwise():
    solver = DDIM()
    assert solver == DDIM(num_train_steps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear")
    assert hash(solver) == hash(DDIM(1000))
    assert (solver.num_train_steps, solver.beta_schedule, solver.betas, solver.alphas_cumprod) == (
        1000, "linear", None, None)
    expected = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_array_equal(_table(solver), expected.astype(np.float32))


@settings(max_examples=20, deadline=None)
@given(
    # A few lengths (each one a new shape for the served float32 table, compiled anew), the
    # edge cases among them; the betas vary freely.
    T=st.sampled_from([1, 2, 3, 10, 999, 1000, 1500]),
    beta_start=st.floats(1e-5, 0.01),
    width=st.floats(0.0, 0.03),
    schedule=st.sampled_from(["linear", "scaled_linear"]),
)
def test_linear_schedules_match_their_formulas(T, beta_start, width, schedule):
    beta_end = beta_start + width
    solver = DDIM(T, beta_start, beta_end, beta_schedule=schedule)
    formula = _linear_alpha_bar if schedule == "linear" else _scaled_linear_alpha_bar
    expected = formula(T, beta_start, beta_end)
    np.testing.assert_allclose(solver._alpha_bar(), expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(_table(solver), expected, rtol=2e-7, atol=1e-37)


def test_scaled_linear_stable_diffusion_values():
    # Stable Diffusion: betas from 0.00085 to 0.012 on sqrt scale; alpha_bar_999 ~ 0.0047.
    solver = DDIM(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ab = _table(solver)
    np.testing.assert_allclose(ab[0], 1 - 0.00085, rtol=1e-7)
    np.testing.assert_allclose(ab[-1], 0.0046600, rtol=1e-3)


@pytest.mark.parametrize("T", [1, 2, 10, 500, 1000, 4000])
def test_cosine_schedule_matches_improved_ddpm(T):
    solver = DDIM(num_train_steps=T, beta_schedule="squaredcos_cap_v2")
    expected = _cosine_alpha_bar(T)
    np.testing.assert_allclose(solver._alpha_bar(), expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(_table(solver), expected, rtol=2e-6, atol=1e-37)
    # Before the 0.999 clip the betas telescope: alpha_bar_k = f((k + 1) / T) / f(0).
    betas = 1.0 - np.array([_cosine_f((i + 1) / T) / _cosine_f(i / T) for i in range(T)])
    unclipped = np.cumprod(betas < 0.999).astype(bool)
    closed = np.array([_cosine_f((k + 1) / T) / _cosine_f(0.0) for k in range(T)])
    np.testing.assert_allclose(solver._alpha_bar()[unclipped], closed[unclipped], rtol=1e-9)
    if T >= 500:  # the last beta is clipped, and the table stays positive
        assert betas[-1] > 0.999
        assert 0 < solver._alpha_bar()[-1] < 1e-6


@pytest.mark.parametrize("cls", SCHEDULE_SOLVERS)
@pytest.mark.parametrize("schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_every_discrete_solver_takes_the_schedule(cls, schedule):
    kwargs = {} if schedule == "squaredcos_cap_v2" else dict(beta_start=0.00085, beta_end=0.012)
    solver = cls(num_train_steps=500, beta_schedule=schedule, **kwargs)
    np.testing.assert_array_equal(
        _table(solver), _table(DDIM(num_train_steps=500, beta_schedule=schedule, **kwargs)))
    assert not np.array_equal(_table(solver), _table(cls(num_train_steps=500)))


def test_euler_ancestral_eta_stays_the_fourth_positional_argument():
    assert EulerAncestral(1000, 1e-4, 0.02, 0.5).eta == 0.5


# ------------------------------------------------------------------------------ tables


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 1200),
    beta_start=st.floats(1e-5, 0.01),
    width=st.floats(0.0, 0.03),
    schedule=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
)
def test_a_table_from_a_named_schedule_is_that_schedule_bitwise(T, beta_start, width, schedule):
    kwargs = ({} if schedule == "squaredcos_cap_v2"
              else dict(beta_start=beta_start, beta_end=beta_start + width))
    named = DDIM(T, beta_schedule=schedule, **kwargs)
    betas = named._betas()
    from_betas = DDIM(betas=betas)
    from_alphas = DDIM(alphas_cumprod=np.cumprod(1.0 - betas))
    assert from_betas.num_train_steps == from_alphas.num_train_steps == T
    assert isinstance(from_betas.betas, tuple) and isinstance(from_betas.betas[0], float)
    for solver in (from_betas, from_alphas):
        np.testing.assert_array_equal(solver._alpha_bar(), named._alpha_bar())
        assert solver.times(min(T, 17))[0].tobytes() == named.times(min(T, 17))[0].tobytes()


def test_table_solvers_are_hashable_and_equal_by_value():
    betas = np.linspace(1e-4, 0.02, 300)
    a, b = DDIM(betas=betas), DDIM(betas=list(betas), num_train_steps=300)
    c = DDIM(betas=jnp.asarray(betas, jnp.float32))  # float32 values: another schedule
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert a != DDIM(300)  # the same numbers, given another way: another static argument
    assert dataclasses.replace(a, betas=betas[:200], num_train_steps=None).num_train_steps == 200


def test_ddim_from_betas_samples_like_the_named_schedule_bitwise():
    named = DDIM(num_train_steps=500, beta_schedule="scaled_linear", beta_start=0.00085,
                 beta_end=0.012)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 500) ** 2
    network, params = _closed_form_network(500)
    x = rand.normal(jax.random.key(0), (2, 4))
    cond = jnp.zeros((2,), jnp.int32)
    plan = jc.CachePlan(network, 0)
    seg = plan.split(params)
    outs = [jc.sample(plan, seg, x, cond, solver=s, num_steps=25).sample
            for s in (named, DDIM(betas=betas), DDIM(alphas_cumprod=np.cumprod(1 - betas)))]
    np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(outs[0]))
    np.testing.assert_array_equal(np.asarray(outs[2]), np.asarray(outs[0]))


# ------------------------------------------------------------------------------ sampling

A, C = 0.3, 0.1  # the closed-form model: eps = A x + C k / T


def _closed_form_network(T):
    """A network that predicts ``eps = A x + C k / T`` from the training step ``k``."""

    def condition(p, cond):
        return cond

    def embed(p, x, k, c):
        return x, k

    def layer(p, h, k):
        return h * p  # p = 1: the identity, through the layer stack

    def final(p, h, k):
        return p[0] * h + p[1] * (k[:, None] / jnp.float32(T))

    params = jc.NetworkParams(condition=None, embed=None, layers=jnp.ones((2,), jnp.float32),
                              final=jnp.array([A, C], jnp.float32))
    return jc.Network(condition, embed, layer, final, time=jc.TimeConvention.index(T)), params


def _numpy_ddim(x, alpha_bar, num_steps):
    """DDIM (eta = 0) over ``alpha_bar`` on the grid ``round(linspace(T - 1, 0, N))``, float64."""
    T = len(alpha_bar)
    ks = np.round(np.linspace(T - 1, 0, num_steps)).astype(int)
    x = np.asarray(x, np.float64)
    for i, k in enumerate(ks):
        a = alpha_bar[k]
        a_next = alpha_bar[ks[i + 1]] if i + 1 < num_steps else 1.0
        eps = A * x + C * k / T
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x


@pytest.mark.parametrize("num_steps", [10, 50])
def test_scaled_linear_ddim_samples_its_own_schedule(num_steps):
    T = 500
    solver = DDIM(num_train_steps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012)
    network, params = _closed_form_network(T)
    x = rand.normal(jax.random.key(1), (3, 4))
    cond = jnp.zeros((3,), jnp.int32)
    plan = jc.CachePlan(network, 0)
    seg = plan.split(params)
    got = np.asarray(jc.sample(plan, seg, x, cond, solver=solver, num_steps=num_steps).sample)
    expected = _numpy_ddim(x, _scaled_linear_alpha_bar(T, 0.00085, 0.012), num_steps)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The option matters: the default (linear) schedule of the same length samples elsewhere.
    linear = np.asarray(jc.sample(plan, seg, x, cond, solver=DDIM(num_train_steps=T),
                                  num_steps=num_steps).sample)
    np.testing.assert_allclose(linear, _numpy_ddim(x, _linear_alpha_bar(T, 1e-4, 0.02),
                                                   num_steps), rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(linear - got)) > 1.0


def test_index_convention_checks_the_tables_length():
    network, params = _closed_form_network(500)
    plan = jc.CachePlan(network, 0)
    x, cond = jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32)
    wrong = DDIM(betas=np.full(400, 0.01))
    with pytest.raises(ValueError, match="num_train_steps=400"):
        jc.sample(plan, plan.split(params), x, cond, solver=wrong, num_steps=4)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta_schedule="cosine"),
         "unknown beta_schedule='cosine'; expected one of 'linear', 'scaled_linear', "
         "'squaredcos_cap_v2'"),
        (dict(beta_schedule=None), "unknown beta_schedule=None"),
        (dict(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.8]), "not both"),
        (dict(betas=[0.1, 0.2], num_train_steps=1000), "num_train_steps=1000 but betas has 2"),
        (dict(alphas_cumprod=[0.9, 0.8, 0.7], num_train_steps=2),
         "num_train_steps=2 but alphas_cumprod has 3"),
        (dict(betas=[0.1, 1.0]), r"betas must lie in the open interval \(0, 1\); entry 1"),
        (dict(betas=[0.0, 0.1]), r"betas must lie in the open interval \(0, 1\); entry 0"),
        (dict(alphas_cumprod=[1.0, 0.5]), "alphas_cumprod must lie in the open interval"),
        (dict(alphas_cumprod=[0.9, 0.9, 0.5]),
         "alphas_cumprod must be strictly decreasing.*entry 1"),
        (dict(alphas_cumprod=[0.9, 0.95]), "strictly decreasing"),
        (dict(betas=[]), "non-empty 1-D sequence"),
        (dict(betas=[[0.1, 0.2]]), r"1-D sequence of floats .*got shape \(1, 2\)"),
        (dict(betas="abc"), "1-D sequence of floats"),
        (dict(betas=[0.1, float("nan")]), "must be finite; entry 1 is nan"),
        (dict(betas=[0.5] * 2000), "last alphas_cumprod is 0.0; it must be positive"),
        (dict(betas=[0.1, 0.2], beta_schedule="scaled_linear"),
         "betas= is the whole training schedule, so beta_schedule='scaled_linear' would be "
         "ignored"),
        (dict(alphas_cumprod=[0.9], beta_start=0.00085, beta_end=0.012),
         "beta_start=0.00085, beta_end=0.012 would be ignored"),
        (dict(beta_schedule="squaredcos_cap_v2", beta_end=0.012),
         "'squaredcos_cap_v2' has no beta_start or beta_end"),
        (dict(beta_schedule="scaled_linear", beta_start=0.0),
         "needs 0 < beta_start <= beta_end < 1, got beta_start=0.0"),
        (dict(num_train_steps=0, beta_schedule="squaredcos_cap_v2"),
         "num_train_steps must be a positive int, got 0"),
        (dict(num_train_steps=2.5, betas=[0.1, 0.2]),
         "num_train_steps must be a positive int, got 2.5"),
    ],
)
@pytest.mark.parametrize("cls", [DDIM, DPMSolverPP2M])
def test_bad_schedules_raise_with_what_was_expected(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        cls(**kwargs)
    assert str(info.value).startswith(cls.__name__)


def test_schedule_and_table_fields_are_keyword_only():
    with pytest.raises(TypeError):
        DDIM(1000, 1e-4, 0.02, "scaled_linear")
