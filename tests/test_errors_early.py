"""Mistakes caught where they are made, with the reason, before anything is compiled (or while
tracing, where only the trace knows): options that cannot apply, a prediction of the wrong
shape, a plan longer than the network, classes passed for instances, settings of the wrong
type, and the bench's wording."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc
from jaxcache.evaluation import bench

import toy_networks

DEPTH = toy_networks.LAYERS
SOLVER = jc.FlowMatchEuler()
STEPS = 4


def _setup(cached_layers=3, first_layers=0):
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(network, cached_layers, first_layers)
    return network, params, plan, plan.split(params)


# ------------------------------------------------------------------------------- remat
@pytest.mark.parametrize("uncached", ["policy_none", "no_cached_layers"])
def test_remat_rematerialises_the_uncached_loop(uncached):
    network, params = toy_networks.single_stream()
    noise, cond, uncond = toy_networks.inputs(2)
    if uncached == "policy_none":
        plan, policy = jc.CachePlan(network, 3), None
    else:  # a policy that decides on the device, but nothing to cache: the uncached loop
        plan, policy = jc.CachePlan(network, 0, first_layers=1), jc.FirstBlockPolicy(0.1)
    seg = plan.split(params)

    def total(x, remat):
        out = jc.sample(plan, seg, x, cond, solver=SOLVER, num_steps=STEPS, policy=policy,
                        uncond=uncond, guidance_scale=2.0, remat=remat)
        return jnp.sum(jnp.square(out.sample)), out.sample

    (value, plain), grad = jax.value_and_grad(total, has_aux=True)(noise, False)
    (value_remat, remat), grad_remat = jax.value_and_grad(total, has_aux=True)(noise, True)
    np.testing.assert_array_equal(np.asarray(remat), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(value_remat), np.asarray(value))
    np.testing.assert_allclose(grad_remat, grad, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(grad))) > 0
    text = {r: str(jax.make_jaxpr(jax.grad(lambda x, r=r: total(x, r)[0]))(noise))
            for r in (False, True)}
    assert "checkpoint" in text[True] or "remat" in text[True]
    assert "checkpoint" not in text[False] and "remat" not in text[False]


@pytest.mark.parametrize("policy", [jc.FirstBlockPolicy(0.1), jc.OnDevice(jc.IntervalPolicy(2))])
def test_remat_is_refused_where_the_device_decides(policy):
    _, _, plan, seg = _setup(cached_layers=3, first_layers=1)
    noise, cond, _ = toy_networks.inputs(2)
    for run in (jc.sample, jc.lower):
        with pytest.raises(ValueError, match=r"remat=True .* decides on the device .*while_loop"):
            run(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, policy=policy,
                remat=True)
    # remat=False is fine there, and a known schedule takes remat=True.
    jc.lower(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, policy=policy)
    jc.lower(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
             policy=jc.IntervalPolicy(2), remat=True)


# ------------------------------------------------------------------------------- prediction
def _wide(network):
    """The network with a final projection twice as wide as the noise."""
    return jc.Network(network.condition, network.embed, network.layer,
                      lambda p, h, t: jnp.concatenate([h @ p, h @ p], axis=-1))


@pytest.mark.parametrize("policy", [None, jc.IntervalPolicy(2), jc.OnDevice(jc.IntervalPolicy(2))])
@pytest.mark.parametrize("guided", [False, True])
def test_a_prediction_of_another_shape_is_named(policy, guided):
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(_wide(network), 3)
    noise, cond, uncond = toy_networks.inputs(3)
    guidance = dict(uncond=uncond, guidance_scale=2.0) if guided else {}
    rows = 6 if guided else 3
    message = (rf"prediction .* has shape \({rows}, 16\), but the noise has shape \(3, 8\).*"
               rf"shape \({rows}, 8\)")
    for run in (jc.sample, jc.lower):
        with pytest.raises(ValueError, match=message):
            run(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                policy=policy, **guidance)


# ------------------------------------------------------------------------------- plan depth
def test_a_plan_longer_than_the_network_says_so():
    network, params, _, seg = _setup(cached_layers=3)
    noise, cond, _ = toy_networks.inputs(2)
    message = rf"first_layers=0 \+ cached_layers=10 exceeds the network's {DEPTH} layers"
    too_long = jc.CachePlan(network, cached_layers=10)  # the plan cannot know the depth
    with pytest.raises(ValueError, match=message):
        too_long.split(params)
    for run in (jc.sample, jc.lower):
        with pytest.raises(ValueError, match=message):
            run(too_long, seg, noise, cond, solver=SOLVER, num_steps=STEPS)
    with pytest.raises(ValueError, match=rf"first_layers=2 \+ cached_layers=5 exceeds the "
                                         rf"network's {DEPTH} layers"):
        jc.sample(jc.CachePlan(network, 5, first_layers=2), seg, noise, cond, solver=SOLVER,
                  num_steps=STEPS, policy=jc.IntervalPolicy(2))
    # A plan that fits but was not the one that split the params still says so.
    with pytest.raises(ValueError, match="split with first_layers=0, cached_layers=3"):
        jc.sample(jc.CachePlan(network, 4), seg, noise, cond, solver=SOLVER, num_steps=STEPS)
    # Given the depth, around checks it at once.
    with pytest.raises(ValueError, match="leaves nothing to cache"):
        jc.CachePlan.around(network, DEPTH, first=4, last=2)
    with pytest.raises(TypeError, match="network first"):
        jc.CachePlan(3, network)
    with pytest.raises(TypeError, match="got the class Network"):
        jc.CachePlan(jc.Network, 3)


# ------------------------------------------------------------------------------- classes
def test_a_class_for_an_instance_names_the_instance():
    _, _, plan, seg = _setup()
    noise, cond, _ = toy_networks.inputs(2)
    ok = dict(solver=SOLVER, num_steps=STEPS, policy=jc.IntervalPolicy(2))
    cases = [
        ({"solver": jc.FlowMatchEuler}, r"solver .*got the class FlowMatchEuler: pass an "
                                        r"instance, FlowMatchEuler\(\)"),
        ({"solver": jc.DDIM}, r"pass an instance, DDIM\(\)"),
        ({"policy": jc.FirstBlockPolicy}, r"policy .*pass an instance, FirstBlockPolicy\(\)"),
        ({"policy": jc.IntervalPolicy}, r"pass an instance, IntervalPolicy\(\.\.\.\)"),
        ({"reuse": jc.OutputReuse}, r"reuse .*pass an instance, OutputReuse\(\)"),
        ({"reuse": jc.TaylorForecast}, r"pass an instance, TaylorForecast"),
    ]
    for change, message in cases:
        for run in (jc.sample, jc.lower):
            with pytest.raises(TypeError, match=message):
                run(plan, seg, noise, cond, **{**ok, **change})
    # Not a class of the right kind: named as a class, never as its metaclass.
    with pytest.raises(TypeError, match="got the class IntervalPolicy") as error:
        jc.sample(plan, seg, noise, cond, **{**ok, "solver": jc.IntervalPolicy})
    assert "ABCMeta" not in str(error.value)
    with pytest.raises(TypeError, match=r"OnDevice\(IntervalPolicy\(\.\.\.\)\)"):
        jc.OnDevice(jc.IntervalPolicy)


# ------------------------------------------------------------------------------- time
def test_a_discrete_solver_on_a_continuous_network_is_accepted_quietly():
    """Documented, not refused: a model trained on ``t = k / T`` (the shipped dit-eps digits
    model) samples with DDIM on a continuous network; an index network is checked."""
    network, params, plan, seg = _setup()
    noise, cond, _ = toy_networks.inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jc.lower(plan, seg, noise, cond, solver=jc.DDIM(), num_steps=STEPS)
    assert "continuous" in jc.sample.__doc__ and "TimeConvention.index(T)" in jc.sample.__doc__
    index = jc.Network(network.condition, network.embed, network.layer, network.final,
                       time=jc.TimeConvention.index(1000))
    plan = jc.CachePlan(index, 3)
    with pytest.raises(ValueError, match="integer training-step indices"):
        jc.lower(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS)


# ------------------------------------------------------------------------------- settings
def test_policy_settings_are_checked_at_construction():
    with pytest.raises(TypeError, match="FirstBlockPolicy.threshold must be a number.*'0.1'"):
        jc.FirstBlockPolicy("0.1")
    with pytest.raises(TypeError, match="FirstBlockPolicy.threshold"):
        jc.FirstBlockPolicy(None)
    with pytest.raises(TypeError, match="FirstBlockPolicy.threshold"):
        jc.FirstBlockPolicy(True)
    with pytest.raises(ValueError, match="FirstBlockPolicy.warmup_steps must be an integer"):
        jc.FirstBlockPolicy(0.1, warmup_steps=2.5)
    with pytest.raises(ValueError, match="warmup_steps must be an integer"):
        jc.FirstBlockPolicy(0.1, warmup_steps=np.float32(1.5))
    with pytest.raises(TypeError, match="TeaCachePolicy.threshold"):
        jc.TeaCachePolicy("0.3")
    with pytest.raises(TypeError, match="TeaCachePolicy.coefficients"):
        jc.TeaCachePolicy(0.3, coefficients=("1.0", 0.0))
    with pytest.raises(TypeError, match="TeaCachePolicy.coefficients"):
        jc.TeaCachePolicy(0.3, coefficients=["1.0", "0.0"])
    with pytest.raises(TypeError, match="TeaCachePolicy.coefficients must be a sequence"):
        jc.TeaCachePolicy(0.3, coefficients=1.0)
    with pytest.raises(TypeError, match="DBCachePolicy.threshold"):
        jc.DBCachePolicy("0.1")
    for name in ("warmup_steps", "warmup_interval", "max_cached_steps",
                 "max_consecutive_cached_steps"):
        with pytest.raises(ValueError, match=f"DBCachePolicy.{name} must be an integer"):
            jc.DBCachePolicy(0.1, **{name: 2.5})
        with pytest.raises(TypeError, match=f"DBCachePolicy.{name}"):
            jc.DBCachePolicy(0.1, **{name: "2"})
    with pytest.raises(ValueError, match="max_cached_steps must be >= -1"):
        jc.DBCachePolicy(0.1, max_cached_steps=-2)
    with pytest.raises(TypeError, match="StepMaskPolicy.mask"):
        jc.StepMaskPolicy("1010")
    # Numbers of every kind pass: Python, numpy, JAX arrays, integral floats for step counts.
    jc.FirstBlockPolicy(1, warmup_steps=2.0)
    jc.FirstBlockPolicy(np.float32(0.1), warmup_steps=np.int64(2))
    jc.DBCachePolicy(jnp.float32(0.1), warmup_steps=jnp.int32(2), max_cached_steps=jnp.int32(-1))
    jc.TeaCachePolicy(jnp.float32(0.3), coefficients=np.array([1.0, 0.0]))


def test_policy_settings_stay_traced():
    """Settings are pytree leaves: rebuilt from tracers and placeholders, never float()-ed."""
    _, _, plan, seg = _setup(cached_layers=5, first_layers=1)
    noise, cond, _ = toy_networks.inputs(2)

    @jax.jit
    def run(policy):
        return jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                         policy=policy).sample

    for policy in (jc.FirstBlockPolicy(0.1, warmup_steps=1),
                   jc.DBCachePolicy(0.1, warmup_steps=1, max_cached_steps=2),
                   jc.OnDevice(jc.FirstBlockPolicy(0.2))):
        assert run(policy).shape == noise.shape
        shapes = jax.eval_shape(lambda p: p, policy)  # ShapeDtypeStruct leaves
        assert type(shapes) is type(policy)
    assert jax.vmap(lambda t: jc.FirstBlockPolicy(t).threshold)(jnp.ones(3)).shape == (3,)
    # A new threshold reuses the program (the leaf is traced).
    run(jc.FirstBlockPolicy(0.3, warmup_steps=1))
    assert run._cache_size() == 3


# ------------------------------------------------------------------------------- bench
def _result(**changes):
    result = dict(
        model="dit", size="tiny", dtype="float32", batch=2, steps=4, first_layers=0,
        cached_layers=2, depth=4, policy="interval", interval=1, decide="static",
        threshold=None, reuse="output", device="cpu: cpu", uncached_s=0.2,
        uncached_compile_s=1.0, uncached_layer_evaluations=16, hand_loop_s=0.25,
        hand_loop_compile_s=2.0, cached_s=0.2, compile_s=1.0, layer_evaluations=16,
        speedup=1.0, ideal_speedup=1.0, efficiency=1.0, refresh_fraction=1.0, max_abs_diff=0.0,
        uncached_over_hand_loop=0.8, speedup_over_hand_loop=1.25,
    )
    result.update(changes)
    return result


def test_bench_says_when_nothing_was_skipped():
    line = bench._table(_result()).splitlines()[-1]
    assert "skipped nothing" in line and "faster" not in line, line
    line = bench._table(_result(layer_evaluations=10, speedup_over_hand_loop=1.5))
    assert "cached is 1.500x faster" in line.splitlines()[-1]


def test_bench_help_shows_the_defaults():
    text = " ".join(bench._parser().format_help().split())
    assert isinstance(bench._parser().formatter_class("x"),
                      __import__("argparse").ArgumentDefaultsHelpFormatter)
    for shown in ("denoising steps (default: 30)", "architecture (default: dit)",
                  "named size (default: small)", "samples per batch (default: 4)",
                  "timed runs each (default: 5)", "(default: euler)", "(default: float32)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: dit)") == 1
