"""Per-layer constants computed once per run, the layer index, and the input's shape in ``ctx``.

A toy network with cross-attention to constant text states, written twice: ``inline`` computes
each layer's text keys and values inside the layer at every step (as a port without the hook
does), ``hooked`` gives them as the layer's ``layer_constant``, which the sampler computes once
per run before the loop. The two sample alike on every cached path, and the compiled program of
the second holds its key/value projections outside every loop, once per stack.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.stack import LayerInputs, LayerList, bind_layers, run_layers

import toy_networks

B, N, T, D, LAYERS, VOCAB = 3, 6, 5, 8, 4, 10
STEPS = 6


# ------------------------------------------------------------------------- the network
def condition(p, cond):
    return p[cond]  # [B, T, D] text states


def embed(p, x, t, text):
    return x @ p + t[:, None, None], (t, text)  # ctx carries the text for the inline layer


def text_kv(p, text):
    return text @ p["wk"], text @ p["wv"]


def _attend(p, h, t, k, v):
    w = jax.nn.softmax(h @ jnp.swapaxes(k, 1, 2), axis=-1)
    return h + jnp.tanh(h @ p["w"] + w @ v + t[:, None, None])


def inline_layer(p, h, ctx):
    t, text = ctx
    return _attend(p, h, t, *text_kv(p, text))


def hooked_layer(p, h, ctx, *, layer_constant):
    t, _ = ctx
    return _attend(p, h, t, *layer_constant)


def final(p, h, ctx):
    return h @ p


def modulated_input(p, h, ctx):
    return h @ p["w"] * (1 + ctx[0][:, None, None])


INLINE = jc.Network(condition, embed, inline_layer, final, modulated_input=modulated_input)
HOOKED = jc.Network(condition, embed, hooked_layer, final, modulated_input=modulated_input,
                    layer_constant=text_kv)


@functools.cache
def _params():
    k = jax.random.split(jax.random.key(0), 6)
    n = lambda key, shape: rand.normal(key, shape) / 3  # noqa: E731
    return jc.NetworkParams(
        condition=rand.normal(k[0], (VOCAB, T, D)),
        embed=n(k[1], (D, D)),
        layers={"w": n(k[2], (LAYERS, D, D)), "wk": n(k[3], (LAYERS, D, D)),
                "wv": n(k[4], (LAYERS, D, D))},
        final=n(k[5], (D, D)),
    )


def _inputs(batch=B, seed=1):
    x = rand.normal(jax.random.key(seed), (batch, N, D))
    return x, jnp.arange(batch, dtype=jnp.int32) % VOCAB, (jnp.arange(batch) + 5) % VOCAB


def _sample(network, policy, plan_args=(2, 1), batch=B, guided=False, **kwargs):
    plan = jc.CachePlan(network, *plan_args)
    x, cond, uncond = _inputs(batch)
    guide = dict(uncond=uncond, guidance_scale=3.0) if guided else {}
    return jc.sample(plan, plan.split(_params()), x, cond, solver=jc.FlowMatchEuler(),
                     num_steps=STEPS, policy=policy, **guide, **kwargs)


MASK = np.array([[True, True], [False, True], [False, False], [True, False], [False, True],
                 [False, False]])


def _policy(name, steps=STEPS, mask=MASK):
    mask = np.resize(mask, (steps, mask.shape[1]))  # the pattern repeated for longer runs
    return {
        "uncached": lambda: None,
        "interval2": lambda: jc.IntervalPolicy(2),
        "on_device": lambda: jc.OnDevice(jc.IntervalPolicy(3)),
        "first_block": lambda: jc.FirstBlockPolicy(0.05),
        "teacache": lambda: jc.TeaCachePolicy(0.05),
        "layer_mask": lambda: jc.LayerMaskPolicy(mask),
        "layer_gates": lambda: jc.LayerGates(jnp.asarray(np.where(mask, 1.0, 0.25), jnp.float32)),
    }[name]()


# ------------------------------------------------------------------------- equal results
def test_forward_equals_recomputing_the_keys_and_values():
    x, cond, _ = _inputs()
    t = jnp.array([0.9, 0.5, 0.1])
    want = jax.jit(INLINE)(_params(), x, t, cond)
    got = jax.jit(HOOKED)(_params(), x, t, cond)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name", ["uncached", "interval2", "on_device", "teacache", "layer_mask", "layer_gates"]
)
def test_sampling_equals_recomputing_every_step(name):
    """Every cached path (no cache, a static schedule with guidance, device decisions per
    row, TeaCache's modulated input, per-layer masks and gates) samples alike both ways."""
    want = _sample(INLINE, _policy(name), guided=name == "interval2")
    got = _sample(HOOKED, _policy(name), guided=name == "interval2")
    np.testing.assert_allclose(got.sample, want.sample, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.layers_computed, want.layers_computed)
    assert float(jnp.max(jnp.abs(got.sample))) > 0.1  # nothing times zero


def test_interval_one_equals_uncached_and_a_cached_schedule_differs():
    uncached = _sample(HOOKED, None)
    one = _sample(HOOKED, jc.IntervalPolicy(1))
    np.testing.assert_array_equal(one.sample, uncached.sample)
    two = _sample(HOOKED, jc.IntervalPolicy(2))
    assert float(jnp.max(jnp.abs(two.sample - uncached.sample))) > 1e-4  # the cache reused


@pytest.mark.parametrize("policy, plan_args", [("interval2", (4, 0)), ("layer_mask", (2, 1))])
def test_unrolled_layers(policy, plan_args):
    """One array per layer (a LayerList per segment); a body of every layer (no head, no
    tail)."""
    got, want = (
        _sample(dataclasses.replace(net, layer_unroll=True), _policy(policy), plan_args)
        for net in (HOOKED, INLINE)
    )
    np.testing.assert_allclose(got.sample, want.sample, rtol=1e-6, atol=1e-6)


def test_remat_and_gradients_through_the_constants():
    """Differentiating through sampling reaches the key/value weights through the constants."""
    x, cond, _ = _inputs()

    def loss(params, network):
        plan = jc.CachePlan(network, 2, 1)
        out = jc.sample(plan, plan.split(params), x, cond, solver=jc.FlowMatchEuler(),
                        num_steps=2, remat=True)
        return jnp.sum(out.sample**2)

    grads = [jax.grad(loss)(_params(), net) for net in (INLINE, HOOKED)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(grads[1].layers["wk"]))) > 0


@pytest.mark.parametrize("policy", ["first_block"])  # decided per row, on the device
def test_a_batch_of_four_equals_the_four_alone(policy):
    together = _sample(HOOKED, _policy(policy), batch=4)
    x, cond, _ = _inputs(4)
    plan = jc.CachePlan(HOOKED, 2, 1)
    seg = plan.split(_params())
    for i in range(4):
        alone = jc.sample(plan, seg, x[i : i + 1], cond[i : i + 1], solver=jc.FlowMatchEuler(),
                          num_steps=STEPS, policy=_policy(policy))
        np.testing.assert_allclose(together.sample[i : i + 1], alone.sample, rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_array_equal(together.body_computed[:, 0, i],
                                      alone.body_computed[:, 0, 0])


# ------------------------------------------------------------------------- the program
def _text_projections(jaxpr, rows):
    """``(loop depth, weight shape)`` of every projection of the text states ``[rows, T, D]``."""
    return toy_networks.projections(jaxpr, (rows, T, D), D)


def _program(network, policy, steps=STEPS, plan_args=(2, 1)):
    plan = jc.CachePlan(network, *plan_args)
    seg = plan.split(_params())
    x, cond, _ = _inputs()
    kwargs = dict(solver=jc.FlowMatchEuler(), num_steps=steps, policy=policy)
    jaxpr = jax.make_jaxpr(lambda: jc.sample(plan, seg, x, cond, **kwargs))()
    return jaxpr.jaxpr, jc.lower(plan, seg, x, cond, **kwargs).as_text()


@pytest.mark.parametrize("name", ["uncached", "interval2", "on_device", "layer_mask"])
def test_the_program_computes_the_keys_and_values_once(name):
    """Without the hook every key/value projection sits inside the loop over steps; with it,
    none does: one batched projection per stack (head, body, tail) and per weight (k, v),
    before the loop, whatever the step count."""
    inline, inline_text = _program(INLINE, _policy(name))
    hooked, hooked_text = _program(HOOKED, _policy(name))
    before = _text_projections(inline, B)
    after = _text_projections(hooked, B)
    assert before and all(depth >= 1 for depth, _ in before)  # recomputed at every step
    assert sorted(after) == sorted([(0, (1, D, D))] * 4 + [(0, (2, D, D))] * 2), after
    longer, _ = _program(HOOKED, _policy(name, 2 * STEPS), steps=2 * STEPS)
    assert sorted(_text_projections(longer, B)) == sorted(after)
    # The same in the lowered program's text: a weight of one layer [D, D] projects the text
    # only without the hook; with it, every projection takes a stack of weights [L, D, D].
    one_layer = f"(tensor<{B}x{T}x{D}xf32>, tensor<{D}x{D}xf32>)"
    stacked = [f"(tensor<{B}x{T}x{D}xf32>, tensor<{n}x{D}x{D}xf32>)" for n in (1, 2)]
    assert one_layer in inline_text and not any(s in inline_text for s in stacked)
    assert one_layer not in hooked_text
    assert [hooked_text.count(s) for s in stacked] == [4, 2]


def test_flops_count_the_constants_once():
    """The counted compute puts each layer's keys and values with the condition path."""
    kv = 2 * (2 * B * T * D * D)  # two projections of one layer, once
    for name in ("uncached", "interval2"):
        inline, hooked = (_sample(net, _policy(name)) for net in (INLINE, HOOKED))
        evaluations = int(inline.layer_evaluations)
        assert float(inline.flops) - float(hooked.flops) == kv * (evaluations - LAYERS)
        assert (float(inline.uncached_flops) - float(hooked.uncached_flops)
                == kv * (STEPS * LAYERS - LAYERS))


# ------------------------------------------------------------------------- binding
def test_bind_layers_is_the_identity_without_a_hook_and_idempotent():
    plan = jc.CachePlan(INLINE, 2, 1)
    seg = plan.split(_params())
    assert plan.bind_layers(seg, None) is seg  # programs of existing networks are unchanged
    hooked = jc.CachePlan(HOOKED, 2, 1)
    constant = condition(_params().condition, _inputs()[1])
    bound = hooked.bind_layers(hooked.split(_params()), constant)
    assert all(isinstance(p, LayerInputs) for p in (bound.head, bound.body, bound.tail))
    again = hooked.bind_layers(bound, constant)
    assert all(a is b for a, b in zip((again.head, again.body, again.tail),
                                      (bound.head, bound.body, bound.tail)))
    k, v = bound.body.constant
    assert k.shape == (2, B, T, D)  # the body's two layers, stacked
    np.testing.assert_allclose(v[1], constant @ _params().layers["wv"][2], rtol=1e-6)


def _tagged(p, h, ctx, *, layer_constant, layer_index):
    return h


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 3), min_size=1, max_size=3).filter(lambda n: sum(n) > 0),
    cut=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    unstacked=st.booleans(),
)
def test_every_split_binds_each_layer_its_own_constant_and_index(lengths, cut, unstacked):
    """Whatever the pieces, the plan's cut and the layout (stacked or one array per layer),
    layer ``i`` of the network gets index ``i`` and the constant of its own parameters."""
    total = sum(lengths)
    first, cached = min(cut[0], total), min(cut[1], total - min(cut[0], total))
    kinds = tuple(jc.BlockKind(_tagged, name=f"k{k}", layer_constant=lambda p, c: p["w"] * c,
                               layer_index=True) for k in range(len(lengths)))
    network = jc.Network(lambda p, c: c, lambda p, x, t, c: (x, t), kinds, lambda p, h, c: h,
                         layer_unroll=True if unstacked else 1)
    weights = np.arange(1, total + 1, dtype=np.float32)
    starts = np.cumsum([0, *lengths])
    layers = jc.Segments([{"w": jnp.asarray(weights[a:b])} for a, b in zip(starts, starts[1:])],
                         range(len(lengths)))
    plan = jc.CachePlan(network, cached, first)
    bound = plan.bind_layers(plan.split(jc.NetworkParams(None, None, layers, None)),
                             jnp.float32(10.0))
    seen = []
    for stack in (bound.head, bound.body, bound.tail):
        for piece in stack.pieces:
            items = piece.layers if isinstance(piece, LayerList) else [
                jax.tree.map(lambda a, i=i: a[i], piece) for i in range(len(piece.params["w"]))
            ]
            seen += [(int(item.index), float(item.constant), float(item.params["w"]))
                     for item in items]
    assert seen == [(i, 10.0 * (i + 1), float(i + 1)) for i in range(total)]


def test_running_unbound_layers_says_how_to_bind():
    x, cond, _ = _inputs()
    constant = condition(_params().condition, cond)
    h, ctx = embed(_params().embed, x, jnp.full((B,), 0.5), constant)
    with pytest.raises(ValueError, match="bind_layers"):
        run_layers(HOOKED.kinds, _params().layers, h, ctx)
    bound = bind_layers(HOOKED.kinds, _params().layers, constant)
    np.testing.assert_allclose(run_layers(HOOKED.kinds, bound, h, ctx),
                               run_layers(INLINE.kinds, _params().layers, h, ctx), rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------- the layer index
def _indexed(p, h, ctx, *, layer_index):
    return h + jnp.tanh(h @ p["w"] + 0.1 * layer_index.astype(h.dtype))


def _index_in_params(p, h, ctx):
    return h + jnp.tanh(h @ p["w"] + 0.1 * p["i"])


def _double(p, h, ctx, *, layer_index):
    img, txt = h
    return (img + jnp.tanh(img @ p["w"] + 0.1 * layer_index.astype(img.dtype)),
            txt + jnp.tanh(txt @ p["w"] + jnp.mean(img, axis=1, keepdims=True)))


def _double_ref(p, h, ctx):
    img, txt = h
    return (img + jnp.tanh(img @ p["w"] + 0.1 * p["i"]),
            txt + jnp.tanh(txt @ p["w"] + jnp.mean(img, axis=1, keepdims=True)))


def _join(h, ctx):
    return jnp.concatenate([h[1], h[0]], axis=1)


def _part(s, h, ctx):
    return s[:, h[1].shape[1]:], s[:, : h[1].shape[1]]


def _kinds_network(indexed: bool, unroll=1):
    double, single = (_double, _indexed) if indexed else (_double_ref, _index_in_params)
    kinds = (jc.BlockKind(double, name="double", layer_index=indexed),
             jc.BlockKind(single, _join, _part, name="single", layer_index=indexed))
    return jc.Network(
        lambda p, c: p[c], lambda p, x, t, c: ((x @ p + t[:, None, None], c), t), kinds,
        lambda p, h, ctx: h[0] @ p, dual_stream=True, layer_unroll=unroll,
    )


@functools.cache
def _kinds_params():
    k = jax.random.split(jax.random.key(3), 5)
    w = rand.normal(k[0], (5, D, D)) / 3
    index = jnp.arange(5, dtype=jnp.float32)
    layers = jc.Segments([{"w": w[:2], "i": index[:2]}, {"w": w[2:], "i": index[2:]}], [0, 1])
    return jc.NetworkParams(rand.normal(k[1], (VOCAB, 2, D)), rand.normal(k[2], (D, D)) / 3,
                            layers, rand.normal(k[3], (D, D)) / 3)


MASK3 = np.array([[True, True, True], [False, True, False], [True, False, False],
                  [False, False, True], [True, True, False], [False, False, False]])


@pytest.mark.parametrize("policy, unroll", [("interval2", True), ("layer_mask", 1),
                                            ("layer_gates", 1)])
def test_the_layer_index_runs_across_kinds(policy, unroll):
    """``layer_index=`` is the layer's index in the network (double blocks 0-1, single 2-4)
    on every path: the same samples as a network reading its index from its parameters.

    The body is layers 1-3, across the boundary; the masks' columns split the single blocks'
    piece, whose part then runs by index from the whole stack."""
    x, cond = rand.normal(jax.random.key(4), (B, N, D)), jnp.array([1, 2, 3])
    outs = []
    for indexed in (True, False):
        plan = jc.CachePlan(_kinds_network(indexed, unroll), 3, 1)
        seg = plan.split(_kinds_params())
        outs.append(jc.sample(plan, seg, x, cond, solver=jc.FlowMatchEuler(), num_steps=STEPS,
                              policy=_policy(policy, mask=MASK3)))
    np.testing.assert_array_equal(outs[0].sample, outs[1].sample)
    assert float(jnp.max(jnp.abs(outs[0].sample))) > 0.1


def test_the_layer_index_in_a_plain_forward_and_its_type():
    seen = []

    def spy(p, h, ctx, *, layer_index):
        seen.append(layer_index)
        return h

    network = jc.Network(lambda p, c: c, lambda p, x, t, c: (x, t), spy, lambda p, h, c: h,
                         layer_index=True, layer_unroll=True)
    stack = LayerList([{"w": jnp.ones(2)}] * 3)
    network(jc.NetworkParams(None, None, stack, None), jnp.ones((1, 2)), jnp.ones(1), None)
    assert [int(i) for i in seen] == [0, 1, 2]
    assert all(i.dtype == jnp.int32 and i.shape == () for i in seen)


# ------------------------------------------------------------------------- the input's shape
def _video_network():
    def embed(p, x, t, c):  # [B, F, H, W, C] -> tokens; final needs (F, H, W) back
        return x.reshape(x.shape[0], -1, x.shape[-1]) @ p, (t, jc.Static(x.shape[1:4]))

    def layer(p, h, ctx):
        return h + jnp.tanh(h @ p["w"] + ctx[0][:, None, None])

    def final(p, h, ctx):
        frames, height, width = ctx[1].value
        return (h @ p).reshape(h.shape[0], frames, height, width, -1)

    return jc.Network(lambda p, c: c, embed, layer, final)


def test_final_reads_the_input_shape_from_ctx():
    network = _video_network()
    k = jax.random.split(jax.random.key(5), 3)
    params = jc.NetworkParams(None, rand.normal(k[0], (D, D)) / 3,
                              {"w": rand.normal(k[1], (LAYERS, D, D)) / 3},
                              rand.normal(k[2], (D, D)) / 3)
    plan = jc.CachePlan(network, 2, 1)
    seg = plan.split(params)
    for shape in ((2, 3, 4, D), (3, 2, 2, D)):  # two video sizes, one network
        x = rand.normal(jax.random.key(6), (2, *shape))
        policies = ((jc.IntervalPolicy(2), jc.FirstBlockPolicy(0.1)) if shape[0] == 2
                    else (jc.LayerMaskPolicy(MASK[:4]),))
        for policy in policies:
            out = jc.sample(plan, seg, x, jnp.zeros((2, 1)), solver=jc.FlowMatchEuler(),
                            num_steps=4, policy=policy)
            assert out.sample.shape == x.shape
            assert np.isfinite(float(out.flops)) and float(out.flops) > 0


def test_static_is_a_pytree_without_leaves():
    s = jc.Static((2, 3, 4))
    assert jax.tree.leaves(s) == [] and jax.tree.leaves({"a": s, "b": jnp.ones(2)})
    assert jax.eval_shape(lambda: (jnp.ones(2), s))[1] == s
    assert jax.jit(lambda: s)() == s and hash(s) == hash(jc.Static((2, 3, 4)))
    with pytest.raises(TypeError, match="hashable"):
        jc.Static([2, 3])


# ------------------------------------------------------------------------- adapters
class _CrossBlock(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Linear(D, D, rngs=rngs)
        self.wk = nnx.Linear(D, D, rngs=rngs)
        self.wv = nnx.Linear(D, D, rngs=rngs)

    def text_kv(self, text):
        return self.wk(text), self.wv(text)

    def __call__(self, h, t, kv=None, text=None):
        k, v = kv if kv is not None else self.text_kv(text)
        w = jax.nn.softmax(h @ jnp.swapaxes(k, 1, 2), axis=-1)
        return h + jnp.tanh(self.w(h) + w @ v + t[:, None, None])


class _CrossModel(nnx.Module):
    def __init__(self, rngs):
        self.text = nnx.Embed(VOCAB, T * D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)
        self.blocks = nnx.List([_CrossBlock(rngs) for _ in range(LAYERS)])
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x, t, y):
        text = self.text(y).reshape(y.shape[0], T, D)
        h = self.proj(x)
        for block in self.blocks:
            h = block(h, t, text=text)
        return self.out(h)


def _nnx_pieces():
    return dict(
        condition=lambda m, y: m.text(y).reshape(y.shape[0], T, D),
        embed=lambda m, x, t, text: (m.proj(x), t),
        final=lambda m, h, t: m.out(h),
        time=jc.TimeConvention.continuous(),
    )


@pytest.mark.parametrize("given", ["text_kv", "per_list"])
def test_from_nnx_takes_a_block_method_for_the_constants(given):
    model = _CrossModel(nnx.Rngs(0))
    layer = lambda b, h, t, *, layer_constant: b(h, t, kv=layer_constant)  # noqa: E731
    if given == "per_list":  # a function of the block, given for this list of blocks
        hook = lambda b, text: b.text_kv(text)  # noqa: E731
        kwargs = dict(blocks=jc.Blocks("blocks", layer=layer, layer_constant=hook))
    else:  # the block method's name, for every list
        kwargs = dict(blocks="blocks", layer=layer, layer_constant="text_kv")
    network, params = jc.from_nnx(model, **kwargs, **_nnx_pieces())
    assert network.kinds[0].layer_constant is not None
    x, y = rand.normal(jax.random.key(7), (B, N, D)), jnp.array([1, 2, 3])
    jc.check_parity(network, params, model, x, jnp.array([0.9, 0.5, 0.1]), y)
    plan = jc.CachePlan(network, 2, 1)
    _, text = _program_of(plan, params, x, y)
    assert f"tensor<{B}x{T}x{D}xf32>, tensor<{D}x{D}xf32>" not in text


def _program_of(plan, params, x, y):
    seg = plan.split(params)
    kwargs = dict(solver=jc.FlowMatchEuler(), num_steps=4, policy=jc.IntervalPolicy(2))
    return jc.sample(plan, seg, x, y, **kwargs), jc.lower(plan, seg, x, y, **kwargs).as_text()


class _LinenCross(nn.Module):
    def setup(self):
        self.dense, self.k, self.v = nn.Dense(D), nn.Dense(D), nn.Dense(D)

    def __call__(self, h, t, kv):
        k, v = kv
        w = jax.nn.softmax(h @ jnp.swapaxes(k, 1, 2), axis=-1)
        return h + jnp.tanh(self.dense(h) + w @ v + t[:, None, None])

    def text_kv(self, text):
        return self.k(text), self.v(text)


class _LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x, t, y):
        text = nn.Embed(VOCAB, T * D)(y).reshape(y.shape[0], T, D)
        h = nn.Dense(D)(x)
        for i in range(3):
            block = _LinenCross(name=f"Cross_{i}")
            h = block(h, t, block.text_kv(text))
        return nn.Dense(D)(h)


def test_from_linen_takes_a_block_method_for_the_constants():
    model = _LinenModel()
    x, y, t = rand.normal(jax.random.key(8), (B, N, D)), jnp.array([1, 2, 3]), jnp.full(B, 0.5)
    variables = model.init(jax.random.key(0), x, t, y)
    network, params = jc.from_linen(
        model, variables, (x, t, y), blocks="Cross",
        condition=lambda m, y: m.Embed_0(y).reshape(y.shape[0], T, D),
        embed=lambda m, x, t, text: (m.Dense_0(x), t),
        final=lambda m, h, t: m.Dense_1(h),
        layer=lambda b, h, t, *, layer_constant: b(h, t, layer_constant),
        layer_constant="text_kv", time=jc.TimeConvention.continuous(),
    )
    jc.check_parity(network, params, lambda x, t, y: model.apply(variables, x, t, y), x, t, y)
    out, text = _program_of(jc.CachePlan(network, 1, 1), params, x, y)
    assert f"tensor<{B}x{T}x{D}xf32>, tensor<{D}x{D}xf32>" not in text
    assert out.sample.shape == x.shape


# ------------------------------------------------------------------------- bad input
def test_a_layer_that_cannot_take_the_constant_is_refused_when_built():
    with pytest.raises(TypeError, match="layer_constant=..."):
        jc.Network(condition, embed, inline_layer, final, layer_constant=text_kv)
    with pytest.raises(TypeError, match="layer_index=..."):
        jc.BlockKind(inline_layer, layer_index=True)
    with pytest.raises(TypeError, match="callable"):
        jc.Network(condition, embed, hooked_layer, final, layer_constant="text_kv")
    with pytest.raises(TypeError, match="per|each kind"):
        jc.Network(condition, embed, (jc.BlockKind(hooked_layer, layer_constant=text_kv),),
                   final, layer_constant=text_kv)
    with pytest.raises(TypeError, match="method"):
        jc.Blocks("blocks", layer_constant=3)


def test_a_constant_that_is_not_arrays_is_refused():
    network = jc.Network(condition, embed, hooked_layer, final,
                         layer_constant=lambda p, text: ("keys", text))
    plan = jc.CachePlan(network, 2, 1)
    x, cond, _ = _inputs()
    with pytest.raises(ValueError, match=r"layer_constant returned a str at \[0\]"):
        jc.sample(plan, plan.split(_params()), x, cond, solver=jc.FlowMatchEuler(),
                  num_steps=2)


def test_constants_of_another_form_per_layer_in_one_stack_are_refused():
    """A hand-made stack of one array per layer whose layers' constants differ in shape: a
    scanned stack could not hold them (one vectorised call, one form)."""
    narrow = {"w": jnp.eye(D), "wk": jnp.eye(D), "wv": jnp.eye(D)}
    wide = {"w": jnp.eye(D), "wk": jnp.ones((D, 2 * D)), "wv": jnp.eye(D)}
    params = _params()._replace(layers=LayerList([narrow, wide]))
    x, cond, _ = _inputs()
    with pytest.raises(ValueError, match=r"layer 1 .* but layer 0"):
        jax.jit(HOOKED)(params, x, jnp.full((B,), 0.5), cond)
