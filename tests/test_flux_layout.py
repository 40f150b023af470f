"""FLUX.1's layout in the reference MMDiT: double-stream blocks, then single-stream blocks.

A tiny model (``depth=2, single_depth=2``, float32): the network ``from_nnx`` makes of it has two
block kinds across four layers, runs what the model runs, and what the test writes out by hand;
the single-stream block computes its formula; each kind's FLOPs are its matrix products.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from flax import nnx

import jaxcache
from jaxcache.models import MMDiTSingleBlock, create_model, get_config
from jaxcache.network import num_layers
from jaxcache.stack import layer_at
from jaxcache.work import network_work

BATCH = 2


@functools.cache
def _flux_tiny():
    model = create_model("mmdit", "tiny", depth=2, single_depth=2, rngs=nnx.Rngs(0))
    network, params = jaxcache.from_nnx(model)
    return model, network, params


def _inputs(cfg, seed: int = 0):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = rand.normal(kx, (BATCH, *cfg.image_shape), jnp.float32)
    t = jnp.array([0.25, 0.75], jnp.float32)
    cond = rand.randint(kc, (BATCH, cfg.caption_len), 0, cfg.vocab_size, jnp.int32)
    return x, t, cond


def test_from_nnx_gives_two_kinds_over_four_layers():
    model, network, params = _flux_tiny()
    assert model.num_layers == 4
    assert model.block_stacks == ("blocks", "single_blocks")
    assert num_layers(params) == 4
    assert len(network.kinds) == 2
    assert [k.name for k in network.kinds] == ["MMDiTBlock", "MMDiTSingleBlock"]
    assert network.kinds[0].enter is None and network.kinds[1].enter is not None
    assert isinstance(params.layers, jaxcache.Segments)
    assert params.layers.lengths() == (2, 2)
    assert params.layers.kind_of_layers() == (0, 0, 1, 1)
    assert network.dual_stream and network.modulated_input is not None  # TeaCache's signal
    # Without single-stream blocks the model is what it always was: one stack, one kind.
    plain = create_model("mmdit", "tiny", depth=2, rngs=nnx.Rngs(0))
    assert not hasattr(plain, "single_blocks") and not hasattr(plain, "block_stacks")
    plain_network, plain_params = jaxcache.from_nnx(plain)
    assert len(plain_network.kinds) == 1
    assert not isinstance(plain_params.layers, jaxcache.Segments)


def test_network_forward_equals_the_model_and_the_hand_written_pass():
    model, network, params = _flux_tiny()
    x, t, cond = _inputs(model.config)
    # Each of the three computed as one compiled program: op by op, every call of the network
    # compiles its layer scans anew and each op compiles alone (twice this test's time on a CPU).
    got = jax.jit(network)(params, x, t, cond)
    want = nnx.jit(lambda model, x, t, cond: model(x, t, cond))(model, x, t, cond)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    # By hand: the submodules called one by one.
    double_def, double_state = nnx.split(model.blocks)
    single_def, single_state = nnx.split(model.single_blocks)

    @nnx.jit
    def by_hand_pass(model, x, t, cond):
        constant = model.condition_encoder(cond)
        (image, text), c = model.embedder(x, t, constant)
        for i in range(2):
            image, text = nnx.merge(double_def, layer_at(double_state, i))((image, text), c)
        tokens = jnp.concatenate([text, image], axis=1)
        for i in range(2):
            tokens = nnx.merge(single_def, layer_at(single_state, i))(tokens, c)
        n_text = text.shape[1]
        image, text = tokens[:, n_text:], tokens[:, :n_text]
        return model.final_layer((image, text), c)

    by_hand = by_hand_pass(model, x, t, cond)
    np.testing.assert_allclose(got, by_hand, rtol=0, atol=1e-6)
    np.testing.assert_allclose(want, by_hand, rtol=0, atol=1e-6)

    # The network's layers across the Segments are the model's blocks, in order.
    pairs = [(double_state, 0), (double_state, 1), (single_state, 0), (single_state, 1)]
    for i, (stack, j) in enumerate(pairs):
        mine = jax.tree.leaves(layer_at(params.layers, i))
        theirs = jax.tree.leaves(layer_at(stack, j))
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            np.testing.assert_array_equal(a, b)


def test_enter_and_leave_round_trip():
    image = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    text = -jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    tokens = MMDiTSingleBlock.enter((image, text), None)
    np.testing.assert_array_equal(tokens[:, :4], text)
    np.testing.assert_array_equal(tokens[:, 4:], image)
    back = MMDiTSingleBlock.leave(tokens, (image, text), None)
    np.testing.assert_array_equal(back[0], image)
    np.testing.assert_array_equal(back[1], text)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def test_single_block_computes_its_formula():
    model, _, _ = _flux_tiny()
    cfg = model.config
    graphdef, state = nnx.split(model.single_blocks)
    block = nnx.merge(graphdef, layer_at(state, 1))
    d, heads = cfg.width, cfg.heads
    dh, hidden = d // heads, int(d * cfg.mlp_ratio)
    n = 6
    kx, kc = jax.random.split(jax.random.key(3))
    x = rand.normal(kx, (1, n, d), jnp.float32)
    c = rand.normal(kc, (1, d), jnp.float32)
    got = np.asarray(block(x, c), np.float64)

    p = {k: np.asarray(v, np.float64) for k, v in {
        "ada_w": block.adaln.linear.kernel[...], "ada_b": block.adaln.linear.bias[...],
        "w1": block.linear1.kernel[...], "b1": block.linear1.bias[...],
        "w2": block.linear2.kernel[...], "b2": block.linear2.bias[...],
        "q_scale": block.q_norm.scale[...], "k_scale": block.k_norm.scale[...],
    }.items()}
    x64, c64 = np.asarray(x, np.float64)[0], np.asarray(c, np.float64)[0]
    silu = c64 / (1.0 + np.exp(-c64))
    shift, scale, gate = np.split(silu @ p["ada_w"] + p["ada_b"], 3)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    m = (x64 - mean) / np.sqrt(var + 1e-6) * (1.0 + scale) + shift
    fused = m @ p["w1"] + p["b1"]
    assert fused.shape == (n, 3 * d + hidden)
    q, k, v = (fused[:, i * d:(i + 1) * d].reshape(n, heads, dh) for i in range(3))

    def rms(a, s):
        return a / np.sqrt((a**2).mean(-1, keepdims=True) + 1e-6) * s

    q, k = rms(q, p["q_scale"]), rms(k, p["k_scale"])
    logits = np.einsum("thd,shd->hts", q, k) / math.sqrt(dh)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("hts,shd->thd", weights, v).reshape(n, d)
    mlp = _gelu_tanh(fused[:, 3 * d:])
    want = x64 + gate * (np.concatenate([attended, mlp], -1) @ p["w2"] + p["b2"])
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def _dense(m, k, n):
    return 2 * m * k * n


def test_flops_of_each_kind_are_its_matrix_products():
    model, network, params = _flux_tiny()
    cfg = model.config
    x, _, cond = _inputs(model.config)
    plan = jaxcache.CachePlan(network, cached_layers=3)  # the body spans both kinds
    work = network_work(network, plan.split(params), x, cond)
    b, d, hidden = BATCH, cfg.width, int(cfg.width * cfg.mlp_ratio)
    n_img, n_txt = cfg.num_image_tokens, cfg.caption_len
    n = n_img + n_txt
    attention = 2 * _dense(b * n, d, n)  # q k^T and weights @ v, over every head: 2 * N^2 * D
    double = 0
    for tokens in (n_img, n_txt):  # per stream: adaLN (6 vectors), qkv, output, two MLP layers
        double += (_dense(b, d, 6 * d) + _dense(b * tokens, d, 3 * d) + _dense(b * tokens, d, d)
                   + _dense(b * tokens, d, hidden) + _dense(b * tokens, hidden, d))
    double += attention
    single = (_dense(b, d, 3 * d) + _dense(b * n, d, 3 * d + hidden) + attention
              + _dense(b * n, d + hidden, d))
    assert list(work.layers) == [double, double, single, single]
    assert double != single


def test_cached_sampling_across_the_kinds():
    """A body that spans the double / single boundary: refreshing every step is uncached."""
    model, network, params = _flux_tiny()
    x, _, cond = _inputs(model.config)
    plan = jaxcache.CachePlan(network, cached_layers=3)
    seg = plan.split(params)
    common = dict(solver=jaxcache.FlowMatchEuler(), num_steps=4)
    uncached = jaxcache.sample(plan, seg, x, cond, **common)
    every = jaxcache.sample(plan, seg, x, cond, policy=jaxcache.IntervalPolicy(1),
                            reuse=jaxcache.TaylorForecast(1), **common)
    np.testing.assert_allclose(every.sample, uncached.sample, rtol=0, atol=1e-5)
    skipping = jaxcache.sample(plan, seg, x, cond, policy=jaxcache.IntervalPolicy(3),
                               reuse=jaxcache.TaylorForecast(1), **common)
    assert skipping.sample.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(skipping.sample)))
    assert int(skipping.layer_evaluations) < int(uncached.layer_evaluations)


def test_named_flux_and_qwen_image_configs():
    flux = get_config("mmdit", "flux")
    assert (flux.depth, flux.single_depth, flux.width, flux.heads) == (19, 38, 3072, 24)
    assert flux.num_layers == 57 and flux.mlp_ratio == 4.0
    assert (flux.image_shape, flux.patch_size, flux.num_image_tokens, flux.caption_len) == (
        (64, 64, 16), 2, 1024, 512)
    qwen = get_config("mmdit", "qwen-image")
    assert (qwen.depth, qwen.single_depth, qwen.width, qwen.heads) == (60, 0, 3072, 24)
    model = nnx.eval_shape(lambda: create_model("mmdit", "flux", rngs=nnx.Rngs(0)))
    assert model.num_layers == 57
    assert all(a.shape[0] == 19 for a in jax.tree.leaves(nnx.state(model.blocks)))
    assert all(a.shape[0] == 38 for a in jax.tree.leaves(nnx.state(model.single_blocks)))
    with pytest.raises(ValueError, match="only the mmdit"):
        create_model("dit", "tiny", single_depth=1, rngs=nnx.Rngs(0))
