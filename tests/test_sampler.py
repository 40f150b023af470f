"""The compiled cached sampling loop against the uncached loop and the reference's Python loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache import sampler as sampler_module

import toy_networks
from reference import reference_sample

ALL_LAYERS = jc.OutputReuse(all_layers=True)
NETWORKS = {
    "single": toy_networks.single_stream,
    "dual": toy_networks.dual_stream,
    "linen": toy_networks.linen,
}
SOLVERS = {"euler": jc.FlowMatchEuler(shift=3.0), "ddim": jc.DDIM()}


def run(network, params, n, policy, steps=12, solver=None, guided=False, batch=3, reuse=None):
    noise, cond, uncond = toy_networks.inputs(batch)
    plan = jc.CachePlan(network, n)
    kwargs = dict(uncond=uncond, guidance_scale=4.0) if guided else {}
    return jc.sample(
        plan, plan.split(params), noise, cond,
        solver=solver or SOLVERS["euler"], num_steps=steps, policy=policy, reuse=reuse, **kwargs,
    )


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("guided", [False, True])
def test_interval_one_equals_uncached_bitwise(name, solver, guided):
    network, params = NETWORKS[name]()
    uncached = run(network, params, 0, None, solver=SOLVERS[solver], guided=guided)
    cached = run(network, params, 3, jc.IntervalPolicy(1), solver=SOLVERS[solver], guided=guided)
    np.testing.assert_array_equal(np.asarray(cached.sample), np.asarray(uncached.sample))
    assert bool(jnp.all(cached.refreshed))
    assert int(cached.layer_evaluations) == 12 * toy_networks.LAYERS


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("n, interval", [(3, 3), (6, 2), (1, 4), (5, 5)])
def test_interval_matches_reference_python_loop(name, n, interval):
    network, params = NETWORKS[name]()
    noise, cond, _ = toy_networks.inputs()
    cached = run(network, params, n, jc.IntervalPolicy(interval))
    want, _ = reference_sample(
        network, params, noise, cond, solver=SOLVERS["euler"], num_steps=12, cached_layers=n,
        refresh_at=lambda s: s % interval == 0,
    )
    np.testing.assert_allclose(cached.sample, want, rtol=1e-5, atol=1e-5)
    uncached = run(network, params, 0, None)
    assert float(jnp.max(jnp.abs(cached.sample - uncached.sample))) > 1e-4  # caching did act
    np.testing.assert_array_equal(cached.refreshed, np.arange(12) % interval == 0)
    expected = np.ones((12, toy_networks.LAYERS), bool)
    expected[np.arange(12) % interval != 0, :n] = False
    np.testing.assert_array_equal(cached.layers_computed, expected)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.booleans(), min_size=6, max_size=6), st.integers(1, 6))
def test_step_masks_match_reference_including_late_first_refresh(mask, n):
    # A mask whose step 0 is False runs the cached layers without storing until the first
    # refresh, as the reference's per-layer loop did with empty slots.
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()
    got = run(network, params, n, jc.StepMaskPolicy(tuple(mask)), steps=6)
    want, _ = reference_sample(
        network, params, noise, cond, solver=SOLVERS["euler"], num_steps=6, cached_layers=n,
        refresh_at=lambda s: mask[s],
    )
    np.testing.assert_allclose(got.sample, want, rtol=1e-5, atol=1e-5)
    ran = np.logical_or(mask, ~np.cumsum(mask).astype(bool))  # refresh, or nothing stored yet
    np.testing.assert_array_equal(got.refreshed, ran)


def DeviceInterval(interval):
    """The interval rule decided on the device each step (no static schedule)."""
    return jc.OnDevice(jc.IntervalPolicy(interval))


@pytest.mark.parametrize("name", ["single", "dual"])
@pytest.mark.parametrize("interval", [1, 3, 5])
def test_static_schedule_path_equals_device_decisions(name, interval):
    network, params = NETWORKS[name]()
    static = run(network, params, 3, jc.IntervalPolicy(interval), steps=11, guided=True)
    dynamic = run(network, params, 3, DeviceInterval(interval), steps=11, guided=True)
    np.testing.assert_allclose(static.sample, dynamic.sample, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(static.refreshed, dynamic.refreshed)
    np.testing.assert_array_equal(static.layers_computed, dynamic.layers_computed)
    for a, b in zip(static.caches, dynamic.caches):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("name", ["single", "dual"])
def test_guidance_keeps_separate_cache_per_branch(name):
    network, params = NETWORKS[name]()
    noise, cond, uncond = toy_networks.inputs()
    got = run(network, params, 3, jc.IntervalPolicy(3), guided=True, reuse=ALL_LAYERS)
    kwargs = dict(
        solver=SOLVERS["euler"], num_steps=12, cached_layers=3, refresh_at=lambda s: s % 3 == 0,
        uncond=uncond, guidance_scale=4.0,
    )
    separate, ref_caches = reference_sample(network, params, noise, cond, **kwargs)
    shared, _ = reference_sample(network, params, noise, cond, shared_cache=True, **kwargs)
    np.testing.assert_allclose(got.sample, separate, rtol=1e-5, atol=1e-5)
    # The reference's shared cache gives a different (wrong) result; ours cannot produce it.
    assert float(jnp.max(jnp.abs(got.sample - shared))) > 1e-3

    cond_cache, uncond_cache = got.caches
    chex.assert_trees_all_close(
        cond_cache.get_constant(), network.condition(params.condition, cond), rtol=1e-6
    )
    chex.assert_trees_all_close(
        uncond_cache.get_constant(), network.condition(params.condition, uncond), rtol=1e-6
    )
    for branch, ref in zip(got.caches, ref_caches):
        for i in range(3):
            want = (ref.get(i), ref.get2(i)) if network.dual_stream else ref.get(i)
            have = (branch.get(i), branch.get2(i)) if network.dual_stream else branch.get(i)
            chex.assert_trees_all_close(have, want, rtol=1e-5, atol=1e-5)


def test_unguided_returns_one_cache_with_all_slots():
    network, params = toy_networks.single_stream()
    got = run(network, params, 4, jc.IntervalPolicy(2), reuse=ALL_LAYERS)
    (cache,) = got.caches
    assert cache.num_layers == 4 and all(bool(cache.has(i)) for i in range(4))
    assert got.caches is not None and run(network, params, 0, None).caches is None


@pytest.mark.parametrize("name", ["single", "dual"])
def test_default_cache_keeps_only_the_body_output(name):
    # Only the last body layer's output is ever read: by default it is all that is kept, and
    # the samples equal those of the reference layout (every layer's output kept).
    network, params = NETWORKS[name]()
    last = run(network, params, 4, jc.IntervalPolicy(3), guided=True)
    every = run(network, params, 4, jc.IntervalPolicy(3), guided=True, reuse=ALL_LAYERS)
    np.testing.assert_array_equal(last.sample, every.sample)
    for small, full in zip(last.caches, every.caches):
        assert small.num_layers == 1 and full.num_layers == 4
        chex.assert_trees_all_equal(small.get(0), full.get(3))
        if network.dual_stream:
            chex.assert_trees_all_equal(small.get2(0), full.get2(3))
        chex.assert_trees_all_equal(small.get_constant(), full.get_constant())


def test_no_state_leaks_between_runs():
    network, params = toy_networks.single_stream()
    first = run(network, params, 3, jc.IntervalPolicy(3))
    second = run(network, params, 3, jc.IntervalPolicy(3))
    np.testing.assert_array_equal(first.sample, second.sample)


# ------------------------------------------------------------------------------- compilation
POLICIES = {"static": jc.IntervalPolicy(3), "device": DeviceInterval(3)}


def _lower(steps, policy, counted_layer=None):
    network, params = toy_networks.single_stream()
    if counted_layer is not None:
        network = jc.Network(network.condition, network.embed, counted_layer, network.final)
    noise, cond, _ = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    return sampler_module.lower(
        plan, plan.split(params), noise, cond,
        solver=jc.FlowMatchEuler(), num_steps=steps, policy=POLICIES[policy],
    )


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_traces_do_not_grow_with_steps(policy):
    network, _ = toy_networks.single_stream()
    counts = {}
    for steps in (10, 100, 101):
        calls = []

        def layer(p, h, t, calls=calls):
            calls.append(1)
            return network.layer(p, h, t)

        _lower(steps, policy, layer)
        counts[steps] = len(calls)
    assert 0 < counts[10] == counts[100] and counts[101] <= counts[10] + 2, counts


def test_repeated_calls_do_not_retrace():
    network, params = toy_networks.single_stream()
    traces = []
    base_embed = network.embed

    def embed(*args):
        traces.append(1)
        return base_embed(*args)

    network = jc.Network(network.condition, embed, network.layer, network.final)
    counts = []
    for seed in range(3):
        noise, cond, _ = toy_networks.inputs(seed=seed)
        plan = jc.CachePlan(network, 3)  # an equal plan: the compiled program is reused
        jc.sample(plan, plan.split(params), noise, cond, solver=jc.FlowMatchEuler(),
                  num_steps=8, policy=jc.IntervalPolicy(3))
        counts.append(len(traces))
    assert counts[0] > 0 and counts[0] == counts[1] == counts[2]


def test_no_host_transfer_inside_the_loop():
    network, params = toy_networks.single_stream()
    noise, cond, uncond = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    seg, noise, cond, uncond = jax.device_put((plan.split(params), noise, cond, uncond))
    with jax.transfer_guard("disallow"):
        for policy in (jc.IntervalPolicy(3), jc.StepMaskPolicy((True, False) * 5), None):
            out = jc.sample(plan, seg, noise, cond, solver=jc.DDIM(), num_steps=10,
                            policy=policy, uncond=uncond, guidance_scale=3.0)
            out.sample.block_until_ready()


# ------------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors():
    network, params = toy_networks.single_stream()
    noise, cond, uncond = toy_networks.inputs()
    plan = jc.CachePlan(network, 3)
    seg = plan.split(params)
    ok = dict(solver=jc.FlowMatchEuler(), num_steps=4, policy=jc.IntervalPolicy(2))
    with pytest.raises(ValueError, match="num_steps"):
        jc.sample(plan, seg, noise, cond, **{**ok, "num_steps": 0})
    with pytest.raises(ValueError, match="interval"):
        jc.IntervalPolicy(0)
    with pytest.raises(ValueError, match="cached_layers"):
        jc.CachePlan(network, -1)
    with pytest.raises(ValueError, match="exceeds"):
        jc.CachePlan(network, 7).split(params)
    with pytest.raises(ValueError, match="split with first_layers=0, cached_layers=3"):
        jc.sample(jc.CachePlan(network, 2), seg, noise, cond, **ok)
    with pytest.raises(TypeError, match="SegmentParams"):
        jc.sample(plan, params, noise, cond, **ok)
    with pytest.raises(ValueError, match="both uncond and guidance_scale"):
        jc.sample(plan, seg, noise, cond, uncond=uncond, **ok)
    with pytest.raises(ValueError, match="cond leaves need a leading batch axis of 3"):
        jc.sample(plan, seg, noise, cond[:2], **ok)
    with pytest.raises(ValueError, match="mask has 3 entries but num_steps=4"):
        jc.sample(plan, seg, noise, cond, **{**ok, "policy": jc.StepMaskPolicy((1, 0, 1))})
    with pytest.raises(TypeError, match="policy"):
        jc.sample(plan, seg, noise, cond, **{**ok, "policy": 3})


# ------------------------------------------------------------------------------- reference models
@pytest.fixture(scope="module", params=["dit", "mmdit"])
def tiny_model(request):
    from random_models import random_model

    model = random_model(request.param, "tiny")
    network, params = jc.from_nnx(model)
    config = model.config
    k1, k2 = jax.random.split(jax.random.key(7))
    noise = rand.normal(k1, (2, *config.image_shape))
    cond = rand.randint(k2, (2, config.caption_len), 1, config.vocab_size)
    return network, params, noise, cond


def test_reference_models_interval_one_bitwise(tiny_model):
    network, params, noise, cond = tiny_model
    plan = jc.CachePlan(network, 2)
    seg = plan.split(params)
    kw = dict(solver=jc.FlowMatchEuler(), num_steps=6, uncond=jnp.zeros_like(cond),
              guidance_scale=3.0)
    uncached = jc.sample(plan, seg, noise, cond, policy=None, **kw)
    cached = jc.sample(plan, seg, noise, cond, policy=jc.IntervalPolicy(1), **kw)
    np.testing.assert_array_equal(np.asarray(cached.sample), np.asarray(uncached.sample))


def test_reference_models_match_reference_loop(tiny_model):
    network, params, noise, cond = tiny_model
    plan = jc.CachePlan(network, 2)
    uncond = jnp.zeros_like(cond)
    got = jc.sample(plan, plan.split(params), noise, cond, solver=jc.FlowMatchEuler(),
                    num_steps=6, policy=jc.IntervalPolicy(3), uncond=uncond, guidance_scale=3.0)
    want, ref_caches = reference_sample(
        network, params, noise, cond, solver=jc.FlowMatchEuler(), num_steps=6, cached_layers=2,
        refresh_at=lambda s: s % 3 == 0, uncond=uncond, guidance_scale=3.0,
    )
    np.testing.assert_allclose(got.sample, want, rtol=1e-4, atol=1e-4)
    # Each branch kept its own caption constant (the reference's Z-Image shared one).
    for branch, ref in zip(got.caches, ref_caches):
        chex.assert_trees_all_close(branch.get_constant(), ref.constant, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got.caches[0].get_constant(), got.caches[1].get_constant())


def test_split_with_donation_frees_the_stacked_layers():
    network, params = toy_networks.single_stream()
    layers = params.layers
    seg = jc.CachePlan(network, 2).split(params, donate=True)
    assert all(a.is_deleted() for a in jax.tree.leaves(layers))
    assert jax.tree.leaves(seg.body)[0].shape[0] == 2
    assert jax.tree.leaves(seg.tail)[0].shape[0] == toy_networks.LAYERS - 2


def test_reference_models_use_the_cache_streams(tiny_model):
    network, params, noise, cond = tiny_model
    plan = jc.CachePlan(network, 2)
    out = jc.sample(plan, plan.split(params), noise, cond, solver=jc.FlowMatchEuler(),
                    num_steps=3, policy=jc.IntervalPolicy(2))
    (cache,) = out.caches
    from jaxcache.models import get_config

    width = get_config("dit", "tiny").width
    if network.dual_stream:  # MMDiT: image states in stream 1, text states in stream 2
        assert cache.has_stream2
        assert cache.get(0).shape == (2, 16, width) and cache.get2(0).shape == (2, 4, width)
    else:  # DiT: image + caption tokens in stream 1
        assert not cache.has_stream2 and cache.get(0).shape == (2, 16 + 4, width)
