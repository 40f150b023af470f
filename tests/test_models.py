"""Tests of the reference models in ``jaxcache.models`` (tiny configs only, CPU-fast)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcache.models import (
    CONFIGS,
    DiT,
    MMDiT,
    ModelConfig,
    create_model,
    get_config,
    layers,
)
from jaxcache.network import num_layers
from jaxcache.nnx import from_nnx

ARCHS = ("dit", "mmdit")
BATCH = 2


@functools.cache
def _tiny(arch: str, dtype: str = "float32"):
    """A tiny model, its Network split and a jitted Network forward (built once per session)."""
    model = create_model(arch, "tiny", rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
    network, params = from_nnx(model)
    return model, network, params, jax.jit(network)


def _inputs(cfg: ModelConfig, seed: int = 0):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = rand.normal(kx, (BATCH, *cfg.image_shape), jnp.float32)
    t = jnp.array([0.25, 0.75], jnp.float32)
    cond = rand.randint(kc, (BATCH, cfg.caption_len), 0, cfg.vocab_size, jnp.int32)
    return x, t, cond


def _rel(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_dtype_and_finite(arch):
    model, _, params, fwd = _tiny(arch)
    x, t, cond = _inputs(model.config)
    y = fwd(params, x, t, cond)
    assert y.shape == x.shape
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.std(y)) > 0.1  # non-trivial output from random weights


@pytest.mark.parametrize("arch", ARCHS)
def test_network_matches_model_call(arch):
    model, _, params, fwd = _tiny(arch)
    x, t, cond = _inputs(model.config)
    expected = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, x, t, cond)
    np.testing.assert_allclose(fwd(params, x, t, cond), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_depends_on_t_cond_and_x(arch):
    model, _, params, fwd = _tiny(arch)
    x, t, cond = _inputs(model.config)
    y = fwd(params, x, t, cond)
    assert _rel(fwd(params, x, t + 0.1, cond), y) > 1e-2
    assert _rel(fwd(params, x, t, (cond + 1) % model.config.vocab_size), y) > 1e-3
    assert _rel(fwd(params, x + 1.0, t, cond), y) > 1e-2
    # Samples of a batch are independent: changing sample 1's time leaves sample 0 alone.
    y2 = fwd(params, x, t.at[1].set(0.5), cond)
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-5, atol=1e-6)
    assert _rel(y2[1], y[1]) > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_piece_shapes(arch):
    model, network, params, _ = _tiny(arch)
    cfg = model.config
    x, t, cond = _inputs(cfg)
    n_img, d = cfg.num_image_tokens, cfg.width
    constant = jax.eval_shape(network.condition, params.condition, cond)
    assert constant.shape == (BATCH, cfg.caption_len, d)
    h, ctx = jax.eval_shape(network.embed, params.embed, x, t, constant)
    assert ctx.shape == (BATCH, d)
    if arch == "dit":
        assert h.shape == (BATCH, n_img + cfg.caption_len, d)
    else:
        assert isinstance(h, tuple) and len(h) == 2
        assert h[0].shape == (BATCH, n_img, d)
        assert h[1].shape == (BATCH, cfg.caption_len, d)
    layer0 = jax.tree.map(lambda a: a[0], params.layers)
    h_out = jax.eval_shape(network.layer, layer0, h, ctx)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), h_out) == jax.tree.map(
        lambda a: (a.shape, a.dtype), h
    )
    assert jax.eval_shape(network.final, params.final, h, ctx).shape == x.shape


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_stacked_on_a_leading_axis(arch):
    model, _, params, _ = _tiny(arch)
    depth = model.config.depth
    assert model.num_layers == depth == num_layers(params)
    leaves = jax.tree.leaves(params.layers)
    assert leaves and all(leaf.shape[0] == depth for leaf in leaves)
    # Each layer has its own random initialisation.
    kernels = [leaf for leaf in leaves if leaf.ndim == 3]
    assert all(not np.allclose(k[0], k[1]) for k in kernels)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_holds_only_params(arch):
    # Position embeddings are constants, not state: nothing to train, nothing to cache.
    model, *_ = _tiny(arch)
    n_all = len(jax.tree.leaves(nnx.state(model)))
    assert n_all == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_compute(arch):
    f32_model, _, params32, fwd32 = _tiny(arch)
    model, network, params, fwd = _tiny(arch, "bfloat16")
    assert model.config.dtype == jnp.bfloat16
    x, t, cond = _inputs(model.config)
    # Hidden states are bf16; the prediction is float32 by design.
    h, _ = jax.eval_shape(
        network.embed, params.embed, x, t, jax.eval_shape(network.condition, params.condition, cond)
    )
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(h))
    # Strict promotion catches implicit bf16/f32 mixing inside the model.
    with jax.numpy_dtype_promotion("strict"):
        y = fwd(params, x, t, cond)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    # Same float32 parameters (param_dtype unchanged), so outputs agree to bf16 precision.
    assert _rel(y, fwd32(params32, x, t, cond)) < 5e-2


def test_bfloat16_params():
    model = nnx.eval_shape(
        lambda: create_model(
            "mmdit", "tiny", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
        )
    )
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_scalar_t_broadcasts():
    np.testing.assert_array_equal(layers.broadcast_times(0.3, 3), np.full(3, 0.3, np.float32))
    model, network, params, _ = _tiny("dit")
    x, _, cond = _inputs(model.config)
    constant = jax.eval_shape(network.condition, params.condition, cond)
    _, ctx = jax.eval_shape(network.embed, params.embed, x, jnp.float32(0.3), constant)
    assert ctx.shape == (BATCH, model.config.width)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_inputs_raise(arch):
    model, network, params, _ = _tiny(arch)
    x, t, cond = _inputs(model.config)
    with pytest.raises(ValueError, match="token ids"):
        jax.eval_shape(network.condition, params.condition, cond.astype(jnp.float32))
    constant = jax.eval_shape(network.condition, params.condition, cond)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(network.embed, params.embed, x[:, :4], t, constant)
    with pytest.raises(ValueError, match="t must"):
        jax.eval_shape(network.embed, params.embed, x, t[:1], constant)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="valid: dit, mmdit"):
        get_config("unet", "tiny")
    with pytest.raises(ValueError, match="tiny, small, dit-xl, flux, qwen-image"):
        get_config("dit", "huge")
    with pytest.raises(ValueError, match="unknown arch"):
        create_model("unet", "tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown size"):
        create_model("mmdit", "xxl", rngs=nnx.Rngs(0))


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="divisible by heads"):
        create_model("dit", "tiny", rngs=nnx.Rngs(0), heads=3)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        create_model("dit", "tiny", rngs=nnx.Rngs(0), image_size=9)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        create_model("dit", "tiny", rngs=nnx.Rngs(0), num_blocks=3)
    with pytest.raises(ValueError, match="depth must be positive"):
        dataclasses.replace(get_config("dit", "tiny"), depth=0)
    with pytest.raises(ValueError, match="single_depth must be >= 0"):
        dataclasses.replace(get_config("mmdit", "tiny"), single_depth=-1)
    with pytest.raises(ValueError, match="only the mmdit architecture has single-stream"):
        create_model("dit", "tiny", rngs=nnx.Rngs(0), single_depth=2)
    with pytest.raises(ValueError, match="attn_implementation must be"):
        create_model("dit", "tiny", rngs=nnx.Rngs(0), attn_implementation="flash")


def test_attention_auto_is_xla_off_a_cuda_gpu():
    """The default ``"auto"`` picks XLA on a CPU (and for float32), bitwise as before."""
    cfg = get_config("dit", "tiny")
    assert cfg.attn_implementation == "auto"
    # The kernel is an execution choice, not the model: configs that differ only there match.
    assert dataclasses.replace(cfg, attn_implementation=None) == cfg
    q, k, v = rand.normal(jax.random.key(0), (3, 2, 5, 2, 8))
    for dtype in (jnp.float32, jnp.bfloat16):
        qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
        if jax.default_backend() != "gpu" or dtype == jnp.float32:
            assert layers.attention_implementation(qd, kd, vd) == "xla"
        auto = layers.attention(qd, kd, vd)
        with jax.numpy_dtype_promotion("standard"):
            xla = jax.nn.dot_product_attention(qd, kd, vd, implementation=None)
        if layers.attention_implementation(qd, kd, vd) == "xla":
            np.testing.assert_array_equal(np.asarray(auto, np.float32),
                                          np.asarray(xla, np.float32))
    assert layers.attention_implementation(q, k, v, "cudnn") == "cudnn"
    assert layers.attention_implementation(q, k, v, None) is None
    # The module's tiny MMDiT, and the same weights under a config that names XLA (its structure
    # from eval_shape: no initialisers run).
    model = _tiny("mmdit")[0]
    xla_def = nnx.graphdef(nnx.eval_shape(lambda: create_model(
        "mmdit", "tiny", rngs=nnx.Rngs(0), dtype=model.config.dtype, attn_implementation="xla")))
    xla_model = nnx.merge(xla_def, nnx.state(model))
    assert xla_model.config.attn_implementation == "xla" != model.config.attn_implementation
    x, t, cond = _inputs(model.config)
    forward = nnx.jit(lambda m, x, t, cond: m(x, t, cond))  # one program each, not op by op
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(forward(model, x, t, cond), forward(xla_model, x, t, cond))


def test_overrides():
    model = nnx.eval_shape(lambda: create_model("dit", "tiny", rngs=nnx.Rngs(0), depth=2))
    assert isinstance(model, DiT)
    assert model.num_layers == 2 == model.config.depth
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(nnx.state(model.blocks)))
    assert isinstance(nnx.eval_shape(lambda: MMDiT(get_config("mmdit", "tiny"), rngs=nnx.Rngs(0))),
                      MMDiT)


def test_named_configs():
    xl = get_config("dit", "dit-xl")
    assert (xl.width, xl.depth, xl.heads, xl.num_image_tokens) == (1152, 28, 16, 256)
    assert xl.image_shape == (32, 32, 4) and xl.patch_size == 2
    flux = get_config("mmdit", "flux")  # FLUX.1: 19 double- then 38 single-stream blocks
    assert (flux.width, flux.depth, flux.single_depth, flux.heads, flux.num_image_tokens,
            flux.caption_len) == (3072, 19, 38, 24, 1024, 512)
    qwen = get_config("mmdit", "qwen-image")  # Qwen-Image: 60 double-stream blocks
    assert (qwen.width, qwen.depth, qwen.single_depth, qwen.heads, qwen.num_image_tokens) == (
        3072, 60, 0, 24, 1024)
    # The single-stream DiT keeps its 60 blocks at both large sizes.
    assert get_config("dit", "flux") == get_config("dit", "qwen-image") == qwen
    tiny = get_config("dit", "tiny")
    assert (tiny.width, tiny.depth, tiny.heads, tiny.num_image_tokens) == (32, 4, 2, 16)
    assert set(CONFIGS) == set(ARCHS)
    for sizes in CONFIGS.values():
        assert list(sizes) == ["tiny", "small", "dit-xl", "flux", "qwen-image"]
        for name in ("tiny", "small", "dit-xl"):
            assert sizes[name] == CONFIGS["dit"][name]  # shared by both architectures
        for cfg in sizes.values():
            assert cfg.dtype == jnp.float32 and cfg.param_dtype == jnp.float32
    assert dataclasses.replace(tiny, dtype="bfloat16").dtype == jnp.bfloat16


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    grid=st.integers(1, 4),
    patch=st.integers(1, 3),
    channels=st.integers(1, 3),
)
def test_patchify_round_trip(batch, grid, patch, channels):
    size = grid * patch
    x = np.arange(batch * size * size * channels, dtype=np.float32)
    x = x.reshape(batch, size, size, channels)
    tokens = layers.patchify(x, patch)
    assert tokens.shape == (batch, grid * grid, patch * patch * channels)
    # Token (0, 0) is the top-left patch, rows of the patch first.
    np.testing.assert_array_equal(tokens[:, 0], x[:, :patch, :patch].reshape(batch, -1))
    np.testing.assert_array_equal(layers.unpatchify(tokens, patch, size, size), x)


def test_position_embeddings():
    emb2 = layers.sincos_2d(32, 4, 4)
    emb1 = layers.sincos_1d(32, 5)
    assert emb2.shape == (16, 32) and emb1.shape == (5, 32)
    assert emb2.dtype == emb1.dtype == np.float32
    assert len({row.tobytes() for row in emb2}) == 16  # every position is distinct
    with pytest.raises(ValueError):
        emb2[0, 0] = 1.0  # cached and shared: read-only


def test_from_nnx_shares_the_network_of_equal_structures():
    a = create_model("dit", "tiny", rngs=nnx.Rngs(0))
    b = create_model("dit", "tiny", rngs=nnx.Rngs(1))
    c = create_model("mmdit", "tiny", rngs=nnx.Rngs(0))
    net_a, params_a = from_nnx(a)
    net_b, params_b = from_nnx(b)
    assert net_a is net_b  # same structure: one compiled sampling program serves both
    assert from_nnx(c)[0] is not net_a
    # ... while each model keeps its own weights.
    assert any(
        not np.allclose(x, y)
        for x, y in zip(jax.tree.leaves(params_a.layers), jax.tree.leaves(params_b.layers))
    )
