"""The Wan-style text-to-video reference model (``jaxcache.models.Wan``), tiny sizes only.

The model samples through ``jaxcache.from_nnx(model)`` exactly as a loop over its own forward
does; its blocks' text keys and values come from their ``layer_constant`` method, once per run,
where a port that computes them in every block call recomputes them at every step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from flax import nnx

import jaxcache as jc
from jaxcache.models import WAN_CONFIGS, Wan, WanConfig, create_model, get_config
from jaxcache.models import wan as wan_module

import toy_networks

B = 2


@functools.cache
def _model(**overrides):
    return rand.random_model("wan", "tiny", **overrides)


@functools.cache
def _network():
    return jc.from_nnx(_model())


def _inputs(batch=B, frames=None, seed=0):
    cfg = _model().config
    shape = cfg.latent_shape if frames is None else (frames, *cfg.latent_shape[1:])
    kx, kc = jax.random.split(jax.random.key(seed))
    x = rand.normal(kx, (batch, *shape))
    text = rand.normal(kc, (batch, cfg.text_len, cfg.text_dim))
    return x, text


def _max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# ------------------------------------------------------------------------- config and registry
def test_sizes_in_the_registry():
    big = get_config("wan", "wan-1.3b")  # Wan2.1-T2V-1.3B
    assert isinstance(big, WanConfig)
    assert (big.width, big.depth, big.heads, big.ffn_dim, big.text_dim, big.text_len) == (
        1536, 30, 12, 8960, 4096, 512)
    assert big.patch_size == (1, 2, 2) and big.channels == 16
    assert big.num_tokens == 21 * 30 * 52  # 81 frames at 480x832, as latents
    assert list(WAN_CONFIGS) == ["tiny", "small", "wan-1.3b"]
    abstract = nnx.eval_shape(lambda: create_model("wan", "wan-1.3b", rngs=nnx.Rngs(0)))
    assert isinstance(abstract, Wan) and abstract.num_layers == 30
    count = sum(a.size for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 1.40e9 < count < 1.43e9, count
    tiny = nnx.eval_shape(lambda: create_model("wan", "tiny", rngs=nnx.Rngs(0), depth=2,
                                               frames=4))
    assert tiny.config.depth == 2 and tiny.config.frames == 4
    assert all(a.shape[0] == 2 for a in jax.tree.leaves(nnx.state(tiny.blocks)))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown size"):
        get_config("wan", "wan-14b")
    with pytest.raises(ValueError, match="unknown WanConfig fields"):
        create_model("wan", "tiny", rngs=nnx.Rngs(0), image_size=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        dataclasses.replace(get_config("wan", "tiny"), heads=3)
    with pytest.raises(ValueError, match="patch size"):
        dataclasses.replace(get_config("wan", "tiny"), latent_height=5)
    with pytest.raises(TypeError, match="WanConfig"):
        Wan(get_config("dit", "tiny"), rngs=nnx.Rngs(0))
    x, text = _inputs()
    model = _model()
    with pytest.raises(ValueError, match="video latents"):
        model(x[..., :2], jnp.ones(B), text)
    with pytest.raises(ValueError, match="text states"):
        model(x, jnp.ones(B), text[..., :3])


def test_the_output_layer_is_not_zero_at_init():
    """Unlike Wan's zero-initialised head, a fresh model's output depends on its input."""
    head = wan_module.WanFinalLayer(get_config("wan", "tiny"), rngs=nnx.Rngs(0))
    assert float(jnp.mean(jnp.abs(head.linear.kernel[...]))) > 0.05
    assert float(jnp.mean(jnp.abs(head.modulation[...]))) > 0


@pytest.mark.parametrize("frames", [2, 4])
def test_patches_round_trip_and_positions_differ(frames):
    x = np.arange(2 * frames * 4 * 6 * 3, dtype=np.float32).reshape(2, frames, 4, 6, 3)
    tokens = wan_module.patchify_3d(x, (1, 2, 2))
    assert tokens.shape == (2, frames * 2 * 3, 12)
    np.testing.assert_array_equal(tokens[:, 0], x[:, :1, :2, :2].reshape(2, -1))
    np.testing.assert_array_equal(wan_module.unpatchify_3d(tokens, (1, 2, 2), (frames, 4, 6)), x)
    pos = wan_module.sincos_3d(32, frames, 2, 3)
    assert pos.shape == (frames * 6, 32) and len({row.tobytes() for row in pos}) == frames * 6


# ------------------------------------------------------------------------- the Network
def test_from_nnx_finds_the_layer_constant_and_matches_the_model_bitwise():
    network, params = _network()
    assert network.kinds[0].layer_constant is not None  # found by the block method's name
    x, text = _inputs()
    t = jnp.array([0.9, 0.3])
    assert jc.check_parity(network, params, _model(), x, t, text, rtol=0, atol=0) == 0.0
    # The video's shape reaches the final layer through ctx: another length, same model.
    x4, text4 = _inputs(frames=4)
    assert jc.check_parity(network, params, _model(), x4, t, text4, rtol=0, atol=0) == 0.0
    out = jax.jit(network)(params, x4, t, text4)
    assert out.shape == x4.shape and float(jnp.std(out)) > 0.1


def test_bfloat16_compute_runs_under_strict_promotion():
    model = _model(dtype="bfloat16")
    x, text = _inputs()
    out = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, x, jnp.array([0.5, 0.5]), text)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))


def _hand_loop(model, solver, x, text, steps):
    """The model's own forward, once per evaluation, in a Python loop with the solver's update."""
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
    times, next_times = solver.times(steps)
    state = solver.init_state(x)
    for i, (t, t_next) in enumerate(zip(times, next_times)):
        v = forward(model, x, jnp.full((x.shape[0],), t, jnp.float32), text)
        x, state = solver.advance(state, x, v, jnp.float32(t), jnp.float32(t_next), index=i,
                                  key=None)
    return x


@pytest.mark.parametrize("solver", [jc.FlowMatchEuler(shift=3.0), jc.UniPC(shift=3.0)],
                         ids=["euler", "unipc"])
def test_interval_one_equals_a_loop_over_the_models_forward(solver):
    network, params = _network()
    x, text = _inputs()
    plan = jc.CachePlan(network, 2, first_layers=1)
    out = jc.sample(plan, plan.split(params), x, text, solver=solver, num_steps=4,
                    policy=jc.IntervalPolicy(1))
    want = _hand_loop(_model(), solver, x, text, 4)
    # The model's forward computes the text keys and values inside its scan over blocks, the
    # sampler in one vectorised call before its loop: equal up to float rounding.
    assert _max_rel(out.sample, want) <= 1e-6
    assert bool(out.refreshed.all())


# ------------------------------------------------------------------------- the keys and values
def _port_layer(block, h, ctx):
    wan_ctx, text = ctx
    return block(h, wan_ctx, block.layer_constant(text))  # keys and values at every call


def _port_embed(model, x, t, text):
    h, ctx = model.embedder(x, t, text)
    return h, (ctx, text)  # the text rides in ctx, as a port without the hook carries it


def _port_final(model, h, ctx):
    return model.final_layer(h, ctx[0])


@functools.cache
def _port_network():
    """The same model glued as a port is written: each block projects the text at each call."""
    return jc.from_nnx(
        _model(), blocks="blocks", layer=_port_layer, embed=_port_embed, final=_port_final,
        condition=lambda m, cond: m.condition_encoder(cond),
        time=jc.TimeConvention.continuous(),
    )


def _kv_projections(jaxpr, rows):
    """Loop depths of the dot_generals that project the text states ``[rows, L, D]`` by a
    block's key or value weight ``[..., D, D]``."""
    cfg = _model().config
    return [depth for depth, _ in
            toy_networks.projections(jaxpr, (rows, cfg.text_len, cfg.width), cfg.width)]


def test_the_text_keys_and_values_are_computed_once_not_per_step():
    """Wan's blocks project the constant text at every step (the JAX port's 2 x 30 projections
    per evaluation); through ``layer_constant`` the program computes them once, before the
    loop, and samples the same."""
    x, text = _inputs()
    policy = jc.IntervalPolicy(2)
    found, samples = [], []
    for network, params in (_port_network(), _network()):
        plan = jc.CachePlan(network, 2, first_layers=1)
        seg = plan.split(params)
        kwargs = dict(solver=jc.FlowMatchEuler(shift=3.0), num_steps=4, policy=policy)
        samples.append(jc.sample(plan, seg, x, text, **kwargs).sample)
        jaxpr = jax.make_jaxpr(functools.partial(jc.sample, plan, seg, x, text, **kwargs))()
        found.append(_kv_projections(jaxpr.jaxpr, B))
    port, hooked = found
    # Outside any loop: the text encoder's last projection (the condition path), in both.
    assert port.count(0) == 1 and len(port) > 1  # the blocks': inside the loop over steps
    assert hooked == [0] * (1 + 4)  # and the head's and body's keys and values, one call each
    assert _max_rel(samples[1], samples[0]) <= 1e-5


@pytest.mark.parametrize("policy", ["teacache", "first_block"])
def test_signal_policies_run_on_wan(policy):
    """TeaCache reads the first block's modulated input (its parameters unwrapped from the
    bound layer inputs); First-Block reads the first block's residual."""
    network, params = _network()
    x, text = _inputs()
    if policy == "teacache":
        plan, chosen = jc.CachePlan(network, 3), jc.TeaCachePolicy(0.05)
    else:
        plan, chosen = jc.CachePlan(network, 2, first_layers=1), jc.FirstBlockPolicy(0.05)
    out = jc.sample(plan, plan.split(params), x, text, solver=jc.FlowMatchEuler(shift=3.0),
                    num_steps=4, policy=chosen, uncond=jnp.zeros_like(text),
                    guidance_scale=5.0)
    assert out.sample.shape == x.shape and bool(jnp.all(jnp.isfinite(out.sample)))
    assert float(out.ideal_speedup) >= 1.0
