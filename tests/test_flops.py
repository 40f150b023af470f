"""Tests of ``jaxcache.evaluation.flops``: matrix FLOPs against hand counts, ideal speedup."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.evaluation.flops import ideal_speedup, jaxpr_flops, matmul_flops

import toy_networks as toy

F32 = jnp.float32
dims = st.integers(min_value=1, max_value=9)


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, F32)


# ------------------------------------------------------------------------------ matmul_flops


@settings(max_examples=20, deadline=None)
@given(m=dims, k=dims, n=dims)
def test_matmul_is_2mkn(m, k, n):
    assert matmul_flops(jnp.matmul, _spec(m, k), _spec(k, n)) == 2 * m * k * n


@settings(max_examples=20, deadline=None)
@given(b=dims, m=dims, k=dims, n=dims)
def test_batched_dot_general(b, m, k, n):
    def f(x, y):
        return jnp.einsum("bmk,bkn->bmn", x, y)

    assert matmul_flops(f, _spec(b, m, k), _spec(b, k, n)) == 2 * b * m * k * n
    # vmap of a plain matmul is the same batched product.
    assert matmul_flops(jax.vmap(jnp.matmul), _spec(b, m, k), _spec(b, k, n)) == 2 * b * m * k * n


def test_two_contracting_dimensions():
    def f(x, y):
        return jax.lax.dot_general(x, y, (((1, 2), (0, 1)), ((), ())))

    assert matmul_flops(f, _spec(3, 4, 5), _spec(4, 5, 7)) == 2 * 3 * 7 * (4 * 5)


def test_elementwise_work_and_no_work_count_zero():
    assert matmul_flops(lambda x: jnp.tanh(x) * 2 + x, _spec(16, 16)) == 0
    assert matmul_flops(lambda x: jnp.sum(x, axis=0), _spec(16, 16)) == 0


def test_accepts_arrays_and_keyword_arguments():
    def f(x, *, w):
        return x @ w

    assert matmul_flops(f, jnp.ones((2, 3)), w=jnp.ones((3, 4))) == 2 * 2 * 3 * 4


def test_conv_nchw():
    # [N=2, C=3, 10x9] images, [O=5, I=3, 3x2] kernel, VALID, stride 1: 8x8 outputs, each a
    # dot product of length C * kh * kw = 18.
    def f(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID")

    assert matmul_flops(f, _spec(2, 3, 10, 9), _spec(5, 3, 3, 2)) == 2 * (2 * 5 * 8 * 8) * 18


def test_conv_nhwc_strided_and_padded():
    # NHWC [1, 8, 8, 4], HWIO [3, 3, 4, 6], stride 2, SAME: 4x4 outputs of 6 channels, each a
    # dot product of length 3 * 3 * 4 (padding zeros are multiplied too).
    def f(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    assert matmul_flops(f, _spec(1, 8, 8, 4), _spec(3, 3, 4, 6)) == 2 * (4 * 4 * 6) * (3 * 3 * 4)


def test_grouped_conv():
    # 6 input channels in 3 groups of 2; 9 output channels, 3 per group: each output reads only
    # its group's 2 channels through a 3x3 window.
    def f(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", feature_group_count=3)

    assert matmul_flops(f, _spec(1, 6, 5, 5), _spec(9, 2, 3, 3)) == 2 * (9 * 3 * 3) * (2 * 3 * 3)


@pytest.mark.parametrize("length", [1, 4, 13])
def test_scan_multiplies_by_its_length(length):
    def f(h, ws):
        def body(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(body, h, ws)[0]

    assert matmul_flops(f, _spec(2, 8), _spec(length, 8, 8)) == length * 2 * 2 * 8 * 8


def test_nested_scan_multiplies_both_lengths():
    def f(h, w):
        def inner(h, _):
            return h @ w, None

        def outer(h, _):
            return jax.lax.scan(inner, h, None, length=5)[0], None

        return jax.lax.scan(outer, h, None, length=3)[0]

    assert matmul_flops(f, _spec(2, 4), _spec(4, 4)) == 3 * 5 * (2 * 2 * 4 * 4)


def test_fori_loop_with_static_bounds_is_a_scan():
    def f(h, w):
        return jax.lax.fori_loop(0, 6, lambda i, h: h @ w, h)

    assert matmul_flops(f, _spec(3, 4), _spec(4, 4)) == 6 * 2 * 3 * 4 * 4


def test_cond_takes_the_more_expensive_branch():
    def f(p, x, w):
        cheap = lambda x: x @ w  # noqa: E731
        costly = lambda x: (x @ w) @ w  # noqa: E731
        return jax.lax.cond(p, cheap, costly, x), jax.lax.cond(p, costly, cheap, x)

    one = 2 * 2 * 4 * 4
    pred = jax.ShapeDtypeStruct((), jnp.bool_)
    assert matmul_flops(f, pred, _spec(2, 4), _spec(4, 4)) == 2 * (2 * one)


def test_switch_takes_the_most_expensive_branch():
    def f(i, x, w):
        branches = [lambda x, n=n: _repeat_matmul(x, w, n) for n in (1, 3, 2)]
        return jax.lax.switch(i, branches, x)

    index = jax.ShapeDtypeStruct((), jnp.int32)
    assert matmul_flops(f, index, _spec(2, 4), _spec(4, 4)) == 3 * (2 * 2 * 4 * 4)


def _repeat_matmul(x, w, n):
    for _ in range(n):
        x = x @ w
    return x


def _while(x, w):
    return jax.lax.while_loop(lambda c: jnp.sum(c) < 10, lambda c: c @ w, x)


@pytest.mark.parametrize(
    "f",
    [
        _while,
        jax.jit(_while),
        lambda x, w: jax.lax.cond(jnp.sum(x) > 0, _while, lambda x, w: x, x, w),
        lambda x, w: jax.lax.scan(lambda h, _: (_while(h, w), None), x, None, length=2)[0],
    ],
    ids=["plain", "in-jit", "in-cond", "in-scan"],
)
def test_while_loop_raises(f):
    with pytest.raises(ValueError, match="while"):
        matmul_flops(f, _spec(2, 4), _spec(4, 4))


def test_nested_jit_is_counted():
    @jax.jit
    def inner(x, w):
        return x @ w

    @jax.jit
    def middle(x, w):
        return inner(inner(x, w), w)

    def outer(x, w):
        return middle(x, w) @ w

    assert matmul_flops(outer, _spec(2, 4), _spec(4, 4)) == 3 * (2 * 2 * 4 * 4)


def test_remat_and_custom_derivatives_are_counted():
    @jax.custom_jvp
    def f(x, w):
        return x @ w

    f.defjvp(lambda primals, tangents: (f(*primals), tangents[0] @ primals[1]))

    @jax.custom_vjp
    def g(x, w):
        return x @ w

    g.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, ct: (ct @ res[1].T, res[0].T @ ct))

    def h(x, w):
        return jax.checkpoint(lambda x: f(x, w) @ w)(g(x, w))

    assert matmul_flops(h, _spec(2, 4), _spec(4, 4)) == 3 * (2 * 2 * 4 * 4)


def test_jaxpr_flops_on_a_jaxpr():
    jaxpr = jax.make_jaxpr(lambda x, y: x @ y)(jnp.ones((3, 5)), jnp.ones((5, 2)))
    assert jaxpr_flops(jaxpr.jaxpr) == 2 * 3 * 5 * 2


# ----------------------------------------------------------------------------- ideal_speedup

STEPS = 10
BATCH = 3
# The toy single-stream network's pieces, counted by hand on [BATCH, D] rows:
F_CONDITION = 0  # a table lookup
F_EMBED = 2 * BATCH * toy.D * toy.D  # x @ p
F_LAYER = 2 * BATCH * toy.D * toy.D  # h @ w
F_FINAL = 2 * BATCH * toy.D * toy.D  # h @ p


def _toy_pieces():
    network, params = toy.single_stream()
    noise = jnp.zeros((BATCH, toy.D), F32)  # only shapes matter
    cond = jnp.ones((BATCH,), jnp.int32)
    return network, params, noise, cond, jnp.zeros((BATCH,), jnp.int32)


def test_toy_network_pieces_match_hand_counts():
    network, params, noise, cond, _ = _toy_pieces()
    noise, cond = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (noise, cond))
    t = jax.ShapeDtypeStruct((BATCH,), F32)
    constant = jax.eval_shape(network.condition, params.condition, cond)
    h, ctx = jax.eval_shape(network.embed, params.embed, noise, t, constant)
    layer0 = jax.tree.map(lambda a: a[0], params.layers)
    assert matmul_flops(network.condition, params.condition, cond) == F_CONDITION
    assert matmul_flops(network.embed, params.embed, noise, t, constant) == F_EMBED
    assert matmul_flops(network.layer, layer0, h, ctx) == F_LAYER
    assert matmul_flops(network.final, params.final, h, ctx) == F_FINAL
    total = F_CONDITION + F_EMBED + toy.LAYERS * F_LAYER + F_FINAL
    assert matmul_flops(network, params, noise, t, cond) == total


@pytest.mark.parametrize("cached_layers", [0, 1, 3, toy.LAYERS])
def test_ideal_speedup_is_one_when_every_layer_runs(cached_layers):
    network, params, noise, cond, uncond = _toy_pieces()
    seg = jc.CachePlan(network, cached_layers).split(params)
    every = STEPS * toy.LAYERS
    kw = dict(num_steps=STEPS, layer_evaluations=every)
    assert ideal_speedup(network, seg, noise, cond, **kw) == 1.0
    assert ideal_speedup(network, seg, noise, cond, uncond=uncond, **kw) == 1.0


@pytest.mark.parametrize("cached_layers", [2, 4, toy.LAYERS])
def test_ideal_speedup_with_half_the_body_skipped(cached_layers):
    network, params, noise, cond, uncond = _toy_pieces()
    seg = jc.CachePlan(network, cached_layers).split(params)
    computed_steps = STEPS // 2
    tail = toy.LAYERS - cached_layers
    evaluations = STEPS * tail + computed_steps * cached_layers
    per_step = F_EMBED + F_FINAL
    uncached = F_CONDITION + STEPS * (per_step + toy.LAYERS * F_LAYER)
    cached = F_CONDITION + STEPS * per_step + evaluations * F_LAYER
    got = ideal_speedup(network, seg, noise, cond, num_steps=STEPS, layer_evaluations=evaluations)
    assert got == pytest.approx(uncached / cached, rel=1e-12)
    assert got > 1.0
    # Guidance doubles every piece's rows (the lookup costs nothing): the ratio is unchanged.
    guided = ideal_speedup(
        network, seg, noise, cond, num_steps=STEPS, layer_evaluations=evaluations, uncond=uncond
    )
    assert guided == pytest.approx(got, rel=1e-12)


def test_ideal_speedup_when_no_layer_runs():
    # The bound of caching every layer: each step costs only the embedding and final projection.
    network, params, noise, cond, _ = _toy_pieces()
    seg = jc.CachePlan(network, toy.LAYERS).split(params)
    got = ideal_speedup(network, seg, noise, cond, num_steps=STEPS, layer_evaluations=0)
    per_step = F_EMBED + F_FINAL
    assert got == pytest.approx((per_step + toy.LAYERS * F_LAYER) / per_step, rel=1e-12)


@pytest.mark.parametrize("first_layers, cached_layers", [(1, 3), (2, 4), (1, 0), (toy.LAYERS, 0)])
def test_ideal_speedup_counts_head_layers(first_layers, cached_layers):
    network, params, noise, cond, _ = _toy_pieces()
    seg = jc.CachePlan(network, cached_layers, first_layers=first_layers).split(params)
    every = STEPS * toy.LAYERS  # SampleResult.layer_evaluations counts head layers too
    assert ideal_speedup(network, seg, noise, cond, num_steps=STEPS, layer_evaluations=every) == 1.0
    # Half the body skipped: the head and the tail still run every step.
    evaluations = STEPS * (toy.LAYERS - cached_layers) + STEPS // 2 * cached_layers
    per_step = F_EMBED + F_FINAL
    uncached = STEPS * (per_step + toy.LAYERS * F_LAYER)
    cached = STEPS * per_step + evaluations * F_LAYER
    got = ideal_speedup(network, seg, noise, cond, num_steps=STEPS, layer_evaluations=evaluations)
    assert got == pytest.approx(uncached / cached, rel=1e-12)


def test_ideal_speedup_accepts_shapes_only():
    network, params, noise, cond, uncond = _toy_pieces()
    seg = jc.CachePlan(network, 4).split(params)
    kw = dict(num_steps=STEPS, layer_evaluations=STEPS * 2 + 3 * 4)
    want = ideal_speedup(network, seg, noise, cond, **kw)
    noise, cond = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (noise, cond))
    assert ideal_speedup(network, seg, noise, cond, **kw) == want


def test_ideal_speedup_accepts_shapes_only_with_guidance():
    network, params, noise, cond, uncond = _toy_pieces()
    seg = jc.CachePlan(network, 4).split(params)
    kw = dict(num_steps=STEPS, layer_evaluations=STEPS * 2 + 3 * 4)
    want = ideal_speedup(network, seg, noise, cond, uncond=uncond, **kw)
    noise, cond, uncond = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (noise, cond, uncond))
    assert ideal_speedup(network, seg, noise, cond, uncond=uncond, **kw) == want
