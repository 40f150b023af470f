"""from_linen on layouts beyond one numbered list: several kinds of block (a FLUX-layout model,
double-stream then single-stream blocks) and blocks stacked with ``nn.scan``; and the refusals
(a scan stack of the wrong length or with inconsistent axes, a scan stack inside a list of names,
Blocks mixed with names, lists whose conversions do not give the hidden state back).

The models are tiny and written here; their weights are random and non-zero.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc

W = 16  # width
TOKENS, TEXT, CHANNELS, TEXT_DIM = 6, 3, 4, 5
BATCH = 2
CONTINUOUS = jc.TimeConvention.continuous()
T_SOLVER = jnp.asarray([0.8, 0.3], jnp.float32)


def time_features(t):
    """Sinusoidal features of ``t`` in [0, 1] (shared by the models and their glue)."""
    freqs = jnp.exp(-jnp.arange(4, dtype=jnp.float32))
    angles = 100.0 * t.astype(jnp.float32)[:, None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def modulate(x, vec, width, name):
    shift, scale = jnp.split(nn.Dense(2 * width, name=name)(nn.silu(vec)), 2, axis=-1)
    return nn.LayerNorm(use_bias=False, use_scale=False)(x) * (1 + scale[:, None]) + shift[:, None]


def host_init(model, *inputs, seed=0):
    """The model's variables, drawn on the host (numpy): nothing to compile for ``init``.

    Kernels scaled by 1 / sqrt(fan-in), everything else small and non-zero.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.1
        return jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree.map(draw, shapes)


def attention(q, k, v):
    weights = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bqk,bkd->bqd", weights, v)


# ---------------------------------------------------------------- a FLUX-layout Linen model


class DoubleBlock(nn.Module):
    """Image and text streams, each with its own weights, meeting in one joint attention."""

    width: int

    @nn.compact
    def __call__(self, img, txt, vec):
        qkv_i = nn.Dense(3 * self.width, name="img_qkv")(modulate(img, vec, self.width, "img_mod"))
        qkv_t = nn.Dense(3 * self.width, name="txt_qkv")(modulate(txt, vec, self.width, "txt_mod"))
        q, k, v = jnp.split(jnp.concatenate([qkv_t, qkv_i], axis=1), 3, axis=-1)
        joint = attention(q, k, v)
        txt = txt + nn.Dense(self.width, name="txt_proj")(joint[:, : txt.shape[1]])
        img = img + nn.Dense(self.width, name="img_proj")(joint[:, txt.shape[1]:])
        img = img + nn.Dense(self.width, name="img_mlp")(nn.gelu(img))
        txt = txt + nn.Dense(self.width, name="txt_mlp")(nn.gelu(txt))
        return img, txt


class SingleBlock(nn.Module):
    """One stream over the concatenated text and image tokens."""

    width: int

    @nn.compact
    def __call__(self, x, vec):
        xm = modulate(x, vec, self.width, "mod")
        q, k, v = jnp.split(nn.Dense(3 * self.width, name="qkv")(xm), 3, axis=-1)
        mlp = nn.gelu(nn.Dense(2 * self.width, name="mlp_in")(xm))
        out = jnp.concatenate([attention(q, k, v), mlp], axis=-1)
        return x + nn.Dense(self.width, name="out")(out)


class FinalLayer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, img, vec):
        return nn.Dense(CHANNELS, name="proj")(modulate(img, vec, self.width, "mod"))


class TinyFlux(nn.Module):
    width: int = W
    double: int = 2
    single: int = 2

    @nn.compact
    def __call__(self, x, t, txt):
        img = nn.Dense(self.width, name="img_in")(x)
        txt = nn.Dense(self.width, name="txt_in")(txt)
        vec = nn.Dense(self.width, name="time_in")(time_features(t))
        for _ in range(self.double):
            img, txt = DoubleBlock(self.width)(img, txt, vec)
        h = jnp.concatenate([txt, img], axis=1)
        for _ in range(self.single):
            h = SingleBlock(self.width)(h, vec)
        img = h[:, txt.shape[1]:]
        return FinalLayer(self.width)(img, vec)


# Glue, defined once (the network is shared between calls with the same functions).
def flux_condition(m, txt):
    return m.txt_in(txt)


def flux_embed(m, x, t, txt):
    return (m.img_in(x), txt), m.time_in(time_features(t))


def double_layer(block, h, vec):
    return block(h[0], h[1], vec)


def join(h, vec):
    img, txt = h
    return jnp.concatenate([txt, img], axis=1)


def split(x, h, vec):
    text = h[1].shape[1]
    return x[:, text:], x[:, :text]


def split_wrongly(x, h, vec):  # the text part first: the pair comes back in another order
    text = h[1].shape[1]
    return x[:, :text], x[:, text:]


def flux_final(m, h, vec):
    return m.FinalLayer_0(h[0], vec)


@pytest.fixture(scope="module")
def flux():
    model = TinyFlux()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, TOKENS, CHANNELS)), jnp.float32)
    txt = jnp.asarray(rng.normal(size=(BATCH, TEXT, TEXT_DIM)), jnp.float32)
    t = jnp.zeros((BATCH,), jnp.float32)
    variables = host_init(model, x, t, txt)
    return model, variables, x, txt


def _flux(model, variables, x, txt, **overrides):
    kwargs = dict(
        blocks=[jc.Blocks("DoubleBlock", layer=double_layer),
                jc.Blocks("SingleBlock", enter=join, leave=split)],
        condition=flux_condition, embed=flux_embed, final=flux_final, time=CONTINUOUS,
        dual_stream=True,
    )
    kwargs.update(overrides)
    return jc.from_linen(model, variables, (x, jnp.zeros((BATCH,)), txt), **kwargs)


def test_flux_layout_reads_two_kinds_and_matches_its_forward(flux):
    model, variables, x, txt = flux
    network, params = _flux(model, variables, x, txt)
    assert len(network.kinds) == 2
    assert isinstance(params.layers, jc.Segments) and params.layers.lengths() == (2, 2)
    assert params.layers.kinds == (0, 1)
    kernel = params.layers.pieces[1]["params"]["qkv"]["kernel"]
    np.testing.assert_array_equal(kernel[1], variables["params"]["SingleBlock_1"]["qkv"]["kernel"])
    assert not any("Block" in k for k in params.embed["params"])
    diff = jc.check_parity(network, params, lambda x, t, y: model.apply(variables, x, t, y),
                           x, T_SOLVER, txt, rtol=1e-4, atol=1e-5)
    assert diff < 1e-4
    again, _ = _flux(model, variables, x, txt)
    assert again is network  # one network per model structure and glue


def test_flux_layout_cached_sampling_and_interval_one_bitwise(flux):
    model, variables, x, txt = flux
    network, params = _flux(model, variables, x, txt)
    plan = jc.CachePlan(network, cached_layers=3, first_layers=1)  # the body spans both kinds
    seg = plan.split(params)
    kw = dict(solver=jc.FlowMatchEuler(), num_steps=4)
    uncached = jc.sample(plan, seg, x, txt, policy=None, **kw)
    every = jc.sample(plan, seg, x, txt, policy=jc.IntervalPolicy(1), **kw)
    cached = jc.sample(plan, seg, x, txt, policy=jc.IntervalPolicy(2), **kw)
    np.testing.assert_array_equal(np.asarray(every.sample), np.asarray(uncached.sample))
    assert np.all(np.isfinite(np.asarray(cached.sample)))
    assert float(jnp.max(jnp.abs(cached.sample - uncached.sample))) > 1e-6
    assert int(cached.layer_evaluations) == 4 * 4 - 2 * 3


def test_flux_layout_refusals(flux):
    model, variables, x, txt = flux
    t = jnp.zeros((BATCH,))
    with pytest.raises(TypeError, match="mixes jaxcache.Blocks with plain names"):
        _flux(model, variables, x, txt, blocks=[jc.Blocks("DoubleBlock"), "SingleBlock"])
    with pytest.raises(ValueError, match="give enter and leave together"):
        jc.Blocks("SingleBlock", enter=join)
    with pytest.raises(ValueError, match="'SingleBlock_0' is in two lists"):
        _flux(model, variables, x, txt,
              blocks=[jc.Blocks("DoubleBlock", layer=double_layer), jc.Blocks("SingleBlock"),
                      jc.Blocks(["SingleBlock_0"])])
    # The single-stream list without conversions: its blocks would get the (image, text) pair.
    network, params = _flux(model, variables, x, txt,
                            blocks=[jc.Blocks("DoubleBlock", layer=double_layer),
                                    jc.Blocks("SingleBlock")])
    with pytest.raises(ValueError, match=r"'SingleBlock' \(list 2 of 2\).*enter=, leave="):
        jax.eval_shape(network, params, x, t, txt)
    # A leave that hands the pair back in another form.
    network, params = _flux(model, variables, x, txt,
                            blocks=[jc.Blocks("DoubleBlock", layer=double_layer),
                                    jc.Blocks("SingleBlock", enter=join, leave=split_wrongly)])
    with pytest.raises(ValueError, match=r"'SingleBlock'.*leave returned .*\(2, 3, 16\)"):
        jax.eval_shape(network, params, x, t, txt)
    # The double blocks without their layer: called as block(h, ctx), they miss an argument.
    network, params = _flux(model, variables, x, txt,
                            blocks=[jc.Blocks("DoubleBlock"),
                                    jc.Blocks("SingleBlock", enter=join, leave=split)])
    with pytest.raises(TypeError):
        jax.eval_shape(network, params, x, t, txt)


# ------------------------------------------------------------------------------ nn.scan stacks


class ScanBlock(nn.Module):
    """A block written for nn.scan: ``(carry, vec) -> (carry, None)``."""

    width: int
    hidden: int = 2

    @nn.compact
    def __call__(self, h, vec):
        hm = modulate(h, vec, self.width, "mod")
        h = h + nn.Dense(self.width, name="out")(
            nn.gelu(nn.Dense(self.hidden * self.width, name="up")(hm)))
        return h, None


def _scanned(depth):
    return nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=depth, in_axes=nn.broadcast)


class ScanDiT(nn.Module):
    """Blocks as one nn.scan stack built inline (``scan=True``) or as a numbered list."""

    depth: int = 3
    scan: bool = True

    @nn.compact
    def __call__(self, x, t, y):
        h = nn.Dense(W, name="x_in")(x)
        vec = nn.Dense(W, name="t_in")(time_features(t)) + nn.Embed(10, W, name="y_in")(y)
        if self.scan:
            h, _ = _scanned(self.depth)(W, name="scanned_blocks")(h, vec)
        else:
            for _ in range(self.depth):
                h, _ = ScanBlock(W)(h, vec)
        return nn.Dense(CHANNELS, name="head")(h)


class SetupScanDiT(nn.Module):
    """The stack as an attribute made in ``setup``."""

    depth: int = 3

    def setup(self):
        self.x_in = nn.Dense(W)
        self.t_in = nn.Dense(W)
        self.y_in = nn.Embed(10, W)
        self.blocks = _scanned(self.depth)(W)
        self.head = nn.Dense(CHANNELS)

    def __call__(self, x, t, y):
        vec = self.t_in(time_features(t)) + self.y_in(y)
        h, _ = self.blocks(self.x_in(x), vec)
        return self.head(h)


class FunctionalScanDiT(nn.Module):
    """The functional form: ``nn.scan(fn, ...)(block, carry, ...)``."""

    @nn.compact
    def __call__(self, x, t, y):
        h = nn.Dense(W, name="x_in")(x)
        vec = nn.Dense(W, name="t_in")(time_features(t)) + nn.Embed(10, W, name="y_in")(y)
        body = nn.scan(lambda block, c, v: block(c, v), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=3, in_axes=nn.broadcast)
        h, _ = body(ScanBlock(W, name="fn_blocks"), h, vec)
        return nn.Dense(CHANNELS, name="head")(h)


def scan_condition(m, y):
    return m.y_in(y)


def scan_embed(m, x, t, y_emb):
    return m.x_in(x), m.t_in(time_features(t)) + y_emb


def scan_final(m, h, vec):
    return m.head(h)


def carry_layer(block, h, vec):
    return block(h, vec)[0]


def _inputs():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(BATCH, TOKENS, CHANNELS)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=BATCH), jnp.int32)
    return x, jnp.zeros((BATCH,)), y


def _scan_network(model, variables, blocks, **overrides):
    kwargs = dict(blocks=blocks, condition=scan_condition, embed=scan_embed, final=scan_final,
                  time=CONTINUOUS)
    kwargs.update(overrides)
    return jc.from_linen(model, variables, _inputs(), **kwargs)


@pytest.mark.parametrize("model, name", [
    (ScanDiT(), "scanned_blocks"),
    (SetupScanDiT(), "blocks"),
    (FunctionalScanDiT(), "fn_blocks"),
])
def test_scan_stack_reads_as_a_stack_and_matches_its_forward(model, name):
    x, t, y = _inputs()
    variables = host_init(model, x, t, y)
    assert variables["params"][name]["up"]["kernel"].shape == (3, W, 2 * W)
    network, params = _scan_network(model, variables, name)
    assert params.layers["params"]["out"]["kernel"].shape[0] == 3
    assert params.layers["params"]["up"]["kernel"] is variables["params"][name]["up"]["kernel"]
    assert name not in params.embed["params"]
    diff = jc.check_parity(network, params, lambda x, t, y: model.apply(variables, x, t, y),
                           x, T_SOLVER, y, rtol=1e-4, atol=1e-5)
    assert diff < 1e-4
    assert _scan_network(model, variables, jc.Blocks(name))[0] is not None


def test_scan_stack_samples_cached():
    model = ScanDiT()
    x, t, y = _inputs()
    variables = host_init(model, x, t, y)
    network, params = _scan_network(model, variables, "scanned_blocks")
    plan = jc.CachePlan(network, cached_layers=2)
    seg = plan.split(params)
    kw = dict(solver=jc.FlowMatchEuler(), num_steps=4)
    uncached = jc.sample(plan, seg, x, y, policy=None, **kw)
    cached = jc.sample(plan, seg, x, y, policy=jc.IntervalPolicy(2), **kw)
    assert np.all(np.isfinite(np.asarray(cached.sample)))
    assert float(jnp.max(jnp.abs(cached.sample - uncached.sample))) > 1e-6
    assert int(cached.layer_evaluations) == 4 * 3 - 2 * 2


def test_scan_stack_and_numbered_list_agree_on_the_same_parameters():
    x, t, y = _inputs()
    scanned, listed = ScanDiT(scan=True), ScanDiT(scan=False)
    scan_vars = host_init(scanned, x, t, y)
    params = dict(scan_vars["params"])
    stack = params.pop("scanned_blocks")
    for i in range(3):  # restack: layer i of the scan stack is ScanBlock_i
        params[f"ScanBlock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stack)
    list_vars = {"params": params}
    np.testing.assert_allclose(np.asarray(jax.jit(scanned.apply)(scan_vars, x, t, y)),
                               np.asarray(jax.jit(listed.apply)(list_vars, x, t, y)),
                               rtol=1e-5, atol=1e-6)
    scan_net, scan_params = _scan_network(scanned, scan_vars, "scanned_blocks")
    # The numbered blocks were written for nn.scan, so they return (carry, y): the default
    # layer block(h, ctx) is refused with what to pass instead.
    list_net, list_params = _scan_network(listed, list_vars, "ScanBlock")
    with pytest.raises(ValueError, match=r"returns a \(carry, y\) pair.*block\(h, ctx\)\[0\]"):
        jax.eval_shape(list_net, list_params, x, t, y)
    list_net, list_params = _scan_network(listed, list_vars, "ScanBlock", layer=carry_layer)
    jax.tree.map(np.testing.assert_array_equal, scan_params.layers, list_params.layers)
    out_scan = jax.jit(scan_net.__call__)(scan_params, x, T_SOLVER, y)
    out_list = jax.jit(list_net.__call__)(list_params, x, T_SOLVER, y)
    np.testing.assert_array_equal(np.asarray(out_scan), np.asarray(out_list))


def test_scan_stack_refusals():
    model = ScanDiT()
    x, t, y = _inputs()
    variables = host_init(model, x, t, y)
    stack = variables["params"]["scanned_blocks"]

    def with_stack(new_stack):
        return {"params": {**variables["params"], "scanned_blocks": new_stack}}

    # A scan stack given as a plain entry of a list of names.
    with pytest.raises(ValueError, match=r"'scanned_blocks' is an nn.scan stack of 3 blocks, "
                                         r"not one block; give its name alone"):
        _scan_network(model, variables, ["scanned_blocks"])
    with pytest.raises(ValueError, match="nn.scan stack of 3 blocks"):
        _scan_network(model, variables, jc.Blocks(("scanned_blocks",)))
    # Leading axes that disagree: one leaf cut to two layers.
    cut = jax.tree.map(lambda a: a, stack)
    cut = {**cut, "up": {**cut["up"], "bias": cut["up"]["bias"][:2]}}
    with pytest.raises(ValueError, match=r"share no leading layer axis.*\['up'\]\['bias'\] "
                                         r"\(2, 32\)"):
        _scan_network(model, with_stack(cut), "scanned_blocks")
    # A stack of four layers for a model that scans three.
    longer = jax.tree.map(lambda a: jnp.concatenate([a, a[:1]]), stack)
    with pytest.raises(ValueError, match=r"nn.scan stack of ScanBlock with length=3 in ScanDiT, "
                                         r"but its parameters hold 4 layers"):
        _scan_network(model, with_stack(longer), "scanned_blocks")
    # One unscanned submodule named as if it were a stack.
    with pytest.raises(ValueError, match="share no leading layer axis"):
        _scan_network(model, variables, "x_in")


class VmapDiT(nn.Module):
    @nn.compact
    def __call__(self, x, t, y):
        vec = nn.Dense(W, name="t_in")(time_features(t))
        side = nn.vmap(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(None, None), axis_size=3)
        h, _ = side(W, name="side")(nn.Dense(W, name="x_in")(x), vec)
        return nn.Dense(CHANNELS, name="head")(h.sum(0))


def test_vmap_stack_is_not_a_layer_stack():
    model = VmapDiT()
    x, t, y = _inputs()
    variables = host_init(model, x, t, y)
    with pytest.raises(ValueError, match="nn.vmap of ScanBlock: its 3 blocks run side by side"):
        jc.from_linen(model, variables, (x, t, y), blocks="side", time=CONTINUOUS,
                      embed=lambda m, x, t, c: (x, t), final=lambda m, h, c: h)


class ListSetting(nn.Module):
    """A scan-stack model with an unhashable setting (a list)."""

    axes: list

    @nn.compact
    def __call__(self, x, t, y):
        h = nn.Dense(W, name="x_in")(x)
        vec = nn.Dense(W, name="t_in")(time_features(t)) + nn.Embed(10, W, name="y_in")(y)
        h, _ = _scanned(3)(W, name="stack")(h, vec)
        return nn.Dense(CHANNELS, name="head")(h)


def test_unhashable_setting_gets_a_network_per_call():
    x, t, y = _inputs()
    model = ListSetting([1, 2])
    variables = host_init(model, x, t, y)
    first, _ = _scan_network(model, variables, "stack")
    again, _ = _scan_network(model, variables, "stack")
    assert again is not first
    hashable = ScanDiT()
    variables = host_init(hashable, x, t, y)
    assert (_scan_network(hashable, variables, "scanned_blocks")[0]
            is _scan_network(hashable, variables, "scanned_blocks")[0])
