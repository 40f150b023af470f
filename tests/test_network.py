"""Tests of ``jaxcache.network`` and ``jaxcache.stack``: a model as four pure pieces.

The reference models are built from their config with ``nnx.eval_shape`` and filled with seeded
random weights: the same classes, structure and parameter layout as ``create_model(...)``, without
compiling the dozens of small initialiser programs (which cost tens of seconds on a loaded CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model

import jaxcache as jc
from jaxcache.network import Network, NetworkParams, num_layers
from jaxcache.nnx import from_nnx
from jaxcache.stack import layer_at, run_layers, stack_length

import toy_networks as toy

ARCHS = ("dit", "mmdit")
BATCH = 2

# ------------------------------------------------------------------------------- run_layers


def _affine_layer(p, h, ctx):
    return jnp.tanh(h @ p["w"] + ctx * p["b"])


def _affine_stack(length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(length, 4, 4)) / 2, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(length, 4)), jnp.float32),
    }
    return params, jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), jnp.float32(0.5)


def _python_loop(layer, params, h, ctx):
    outputs = []
    for i in range(stack_length(params)):
        h = layer(jax.tree.map(lambda a, i=i: a[i], params), h, ctx)
        outputs.append(h)
    return h, outputs


def _never_called(p, h, ctx):
    raise AssertionError("an empty stack runs no layer")


@pytest.mark.parametrize("empty", [{}, None, (), {"w": jnp.zeros((0, 4, 4))}])
def test_run_layers_empty_stack_returns_h_unchanged(empty):
    h = (jnp.ones((3, 4)), jnp.zeros((3, 2, 4)))
    assert stack_length(empty) == 0
    assert run_layers(_never_called, empty, h, None) is h
    state = {"seen": jnp.zeros(())}
    out, out_state = run_layers(
        _never_called, empty, h, None, observe=lambda s, i, h: 1 / 0, state=state
    )
    assert out is h and out_state is state


@pytest.mark.parametrize("length", [1, 5])
def test_run_layers_observe_sees_each_index_and_output(length):
    params, h, ctx = _affine_stack(length, seed=length)
    assert stack_length(params) == length
    calls = []

    def observe(state, index, out):
        calls.append((index.shape, index.dtype))
        count, indices, seen = state
        return count + 1, indices.at[count].set(index), seen.at[count].set(out)

    @jax.jit
    def run(params, h, ctx):
        state = (jnp.int32(0), jnp.full((length,), -1, jnp.int32), jnp.zeros((length, *h.shape)))
        loop = _python_loop(_affine_layer, params, h, ctx)
        plain = run_layers(_affine_layer, params, h, ctx)
        return loop, plain, run_layers(_affine_layer, params, h, ctx, observe=observe, state=state)

    (want, outputs), plain, (out, (count, indices, seen)) = run(params, h, ctx)
    assert calls == [((), jnp.int32)]  # traced once, in the scan body
    np.testing.assert_allclose(np.asarray(want), np.asarray(plain), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(out))
    assert int(count) == length
    np.testing.assert_array_equal(np.asarray(indices), np.arange(length))
    np.testing.assert_allclose(np.asarray(seen), np.stack(outputs), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen[-1]), np.asarray(out))


def test_run_layers_threads_a_pytree_hidden_state():
    params, h, ctx = _affine_stack(3)

    def pair_layer(p, h, ctx):
        a, b = h
        return _affine_layer(p, a, ctx), b + jnp.sum(a)

    def observe(total, index, out):
        return total + out[1] * (index + 1).astype(jnp.float32)

    @jax.jit
    def run(params, h2, ctx):
        loop = _python_loop(pair_layer, params, h2, ctx)
        return loop, run_layers(pair_layer, params, h2, ctx, observe=observe, state=jnp.float32(0))

    (want, outputs), (got, total) = run(params, (h, jnp.float32(0.0)), ctx)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5)
    expected = sum(float(o[1]) * (i + 1) for i, o in enumerate(outputs))
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


# ------------------------------------------------------------------------------ the Network


def _toy_inputs():
    rng = np.random.default_rng(3)
    noise = jnp.asarray(rng.normal(size=(3, toy.D)), jnp.float32)
    cond = jnp.asarray([1, 4, 9], jnp.int32)
    return noise, jnp.asarray([0.2, 0.5, 0.9], jnp.float32), cond


@pytest.mark.parametrize("make", [toy.single_stream, toy.dual_stream])
def test_network_call_is_the_pieces_in_a_python_loop(make):
    network, params = make()
    noise, t, cond = _toy_inputs()

    @jax.jit
    def run(params, noise, t, cond):
        constant = network.condition(params.condition, cond)
        h, ctx = network.embed(params.embed, noise, t, constant)
        h, _ = _python_loop(network.layer, params.layers, h, ctx)
        return network.final(params.final, h, ctx), network(params, noise, t, cond)

    want, got = run(params, noise, t, cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert num_layers(params) == toy.LAYERS


def test_num_layers_needs_a_layer():
    _, params = toy.single_stream()
    with pytest.raises(ValueError, match="at least one layer"):
        num_layers(params._replace(layers={}))


def test_network_params_fields():
    assert NetworkParams._fields == ("condition", "embed", "layers", "final")
    network, _ = toy.single_stream()
    assert network.dual_stream is False and network.modulated_input is None
    assert toy.dual_stream()[0].dual_stream is True


# --------------------------------------------------------------------------------- from_nnx


def _reference(arch: str, seed: int = 0, **overrides):
    """A reference model of the tiny config with seeded random weights (see the module doc)."""
    return random_model(arch, "tiny", seed, **overrides)


def _model_inputs(config):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(BATCH, *config.image_shape)), jnp.float32)
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    cond = jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, config.caption_len)), jnp.int32)
    return x, t, cond


def _own_and_composed(arch: str):
    """The model's own call and the four pieces composed, as functions of the model's state."""
    model = _reference(arch)
    network, _ = from_nnx(model)
    graphdef, state = nnx.split(model)

    def own(state, x, t, cond):
        return nnx.merge(graphdef, state)(x, t, cond)

    def composed(state, x, t, cond):
        params = _pieces_of(state)
        constant = network.condition(params.condition, cond)
        h, ctx = network.embed(params.embed, x, t, constant)
        h = run_layers(network.layer, params.layers, h, ctx)
        return network.final(params.final, h, ctx)

    return model, state, own, composed


def _pieces_of(state):
    return NetworkParams(
        state["condition_encoder"], state["embedder"], state["blocks"], state["final_layer"]
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_from_nnx_params_are_the_submodule_states(arch):
    model = _reference(arch)
    network, params = from_nnx(model)
    assert isinstance(network, Network) and isinstance(params, NetworkParams)
    _, state = nnx.split(model)
    want = _pieces_of(state)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))


@pytest.mark.parametrize("arch", ARCHS)
def test_from_nnx_pieces_compose_to_the_model_call_program(arch):
    # The same program, equation for equation: compiled, it gives the same bits.
    model, state, own, composed = _own_and_composed(arch)
    args = (state, *_model_inputs(model.config))
    assert str(jax.make_jaxpr(composed)(*args)) == str(jax.make_jaxpr(own)(*args))


def test_from_nnx_pieces_compose_to_the_model_call_bitwise():
    # Run once on the dual-stream model (every piece exchanges pairs there).
    model, state, own, composed = _own_and_composed("mmdit")
    network, params = from_nnx(model)
    x, t, cond = _model_inputs(model.config)

    @jax.jit
    def run(state, params, x, t, cond):
        return own(state, x, t, cond), network(params, x, t, cond)

    want, got = jax.device_get(run(state, params, x, t, cond))
    assert want.shape == (BATCH, *model.config.image_shape) and want.dtype == np.float32
    assert np.std(want) > 0.01
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_nnx_layers_are_stacked_and_stream_flag_is_read(arch):
    model = _reference(arch)
    network, params = from_nnx(model)
    assert num_layers(params) == model.num_layers == model.config.depth
    for leaf in jax.tree.leaves(params.layers):
        assert leaf.shape[0] == model.config.depth
    assert network.dual_stream is (arch == "mmdit")


def test_from_nnx_shares_the_network_of_equal_structures():
    for arch in ARCHS:
        a, b = _reference(arch, seed=0), _reference(arch, seed=1)
        net_a, params_a = from_nnx(a)
        net_b, params_b = from_nnx(b)
        assert net_a is net_b  # one compiled program serves both
        assert from_nnx(a)[0] is net_a
        assert not np.array_equal(
            jax.tree.leaves(params_a.layers)[0], jax.tree.leaves(params_b.layers)[0]
        )
    assert from_nnx(_reference("dit"))[0] is not from_nnx(_reference("mmdit"))[0]
    assert from_nnx(_reference("dit", depth=2))[0] is not from_nnx(_reference("dit"))[0]


class _Partial(nnx.Module):
    def __init__(self):
        self.condition_encoder = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        self.embedder = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        self.blocks = lambda h, c: h  # not an NNX module


def test_from_nnx_names_the_missing_pieces():
    with pytest.raises(TypeError, match=r"_Partial lacks \['blocks', 'final_layer'\]"):
        from_nnx(_Partial())
    with pytest.raises(TypeError, match="condition_encoder"):
        from_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_from_nnx_without_modulated_input():
    class NoSignal(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.condition_encoder = nnx.Linear(2, 2, rngs=rngs)
            self.embedder = nnx.Linear(2, 2, rngs=rngs)
            self.blocks = nnx.Linear(2, 2, rngs=rngs)
            self.final_layer = nnx.Linear(2, 2, rngs=rngs)

    network, _ = from_nnx(NoSignal())
    assert network.modulated_input is None and network.dual_stream is False


def _numpy_layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_modulated_input_is_the_attention_branch_input(arch):
    model = _reference(arch)
    network, params = from_nnx(model)
    assert network.modulated_input is not None
    cfg = model.config
    rng = np.random.default_rng(2)
    image = rng.normal(size=(BATCH, cfg.num_image_tokens, cfg.width))
    text = rng.normal(size=(BATCH, cfg.caption_len, cfg.width))
    ctx = rng.normal(size=(BATCH, cfg.width))
    # The hidden state the block reads: (image, text) for MMDiT, the joint sequence for DiT.
    h = (image, text) if arch == "mmdit" else np.concatenate([image, text], axis=1)
    layer0 = layer_at(params.layers, 0)
    as_f32 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float32))
    signal = np.asarray(jax.jit(network.modulated_input)(layer0, as_f32(h), as_f32(ctx)))
    # adaLN of the attention branch: SiLU -> Linear to 6 D, the first two chunks are its shift
    # and scale; on the image stream of a dual-stream block.
    adaln = params.layers["img"]["adaln"] if arch == "mmdit" else params.layers["adaln"]
    kernel = np.asarray(adaln["linear"]["kernel"][...][0], np.float64)
    bias = np.asarray(adaln["linear"]["bias"][...][0], np.float64)
    c = np.asarray(ctx, np.float64)
    mod = (c / (1 + np.exp(-c))) @ kernel + bias
    shift, scale = mod[:, : cfg.width], mod[:, cfg.width : 2 * cfg.width]
    tokens = np.asarray(h[0] if arch == "mmdit" else h, np.float64)
    expected = _numpy_layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None]
    assert signal.shape == tokens.shape
    np.testing.assert_allclose(signal, expected, rtol=1e-4, atol=1e-4)


def test_public_names():
    assert jc.from_nnx is from_nnx and jc.Network is Network and jc.NetworkParams is NetworkParams


# ------------------------------------------------------------------------------ layer_unroll


@pytest.mark.parametrize("unroll", [True, 2])
def test_unrolled_layer_stack_samples_the_same_with_fewer_loops(unroll):
    import dataclasses

    network, params = toy.single_stream()
    unrolled = dataclasses.replace(network, layer_unroll=unroll)
    noise, cond, _ = toy.inputs()
    common = dict(solver=jc.FlowMatchEuler(), num_steps=6, policy=jc.IntervalPolicy(2))
    runs = {}
    loops = {}
    for name, net in (("scan", network), ("unrolled", unrolled)):
        plan = jc.CachePlan(net, 2)
        seg = plan.split(params)
        runs[name] = jc.sample(plan, seg, noise, cond, **common).sample
        text = jc.lower(plan, seg, noise, cond, **common).as_text()
        loops[name] = text.count("stablehlo.while")
    np.testing.assert_allclose(np.asarray(runs["unrolled"]), np.asarray(runs["scan"]),
                               rtol=1e-6, atol=1e-6)
    if unroll is True:  # no loop over layers is left, only the steps' loops
        assert loops["unrolled"] < loops["scan"]


def test_fully_unrolled_network_keeps_one_array_per_layer():
    """layer_unroll=True: split gives LayerLists, so the program slices no stacked weight."""
    import dataclasses

    from jaxcache.stack import LayerList

    network, params = toy.single_stream()
    unrolled = dataclasses.replace(network, layer_unroll=True)
    noise, cond, _ = toy.inputs()
    depth = jc.network.num_layers(params)
    common = dict(solver=jc.FlowMatchEuler(), num_steps=6)
    for first, policy in ((0, jc.IntervalPolicy(2)), (1, jc.FirstBlockPolicy(0.05))):
        runs, slices = {}, {}
        for name, net in (("scan", network), ("unrolled", unrolled)):
            plan = jc.CachePlan.around(net, depth, first=first) if first else jc.CachePlan(net, 2)
            seg = plan.split(params)
            runs[name] = jc.sample(plan, seg, noise, cond, policy=policy, **common)
            text = jc.lower(plan, seg, noise, cond, policy=policy, **common).as_text()
            slices[name] = text.count("stablehlo.dynamic_slice")
        seg = jc.CachePlan(unrolled, 2, first_layers=first).split(params)
        assert all(isinstance(s, LayerList) for s in (seg.head, seg.body, seg.tail))
        assert (len(seg.head), len(seg.body)) == (first, 2)
        assert slices["unrolled"] < slices["scan"]  # the scan's per-layer weight slices
        np.testing.assert_allclose(np.asarray(runs["unrolled"].sample),
                                   np.asarray(runs["scan"].sample), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(runs["unrolled"].refreshed),
                                      np.asarray(runs["scan"].refreshed))
        # The FLOP count (and so every ideal speedup) reads a LayerList like a stack.
        from jaxcache.evaluation.flops import step_flops

        scan_seg = jc.CachePlan(network, 2, first_layers=first).split(params)
        assert step_flops(unrolled, seg, noise, cond) == step_flops(network, scan_seg, noise, cond)
    # Interval 1 still equals uncached sampling bitwise.
    plan = jc.CachePlan(unrolled, 2)
    seg = plan.split(params)
    exact = jc.sample(plan, seg, noise, cond, policy=jc.IntervalPolicy(1), **common).sample
    uncached = jc.sample(plan, seg, noise, cond, **common).sample
    np.testing.assert_array_equal(np.asarray(exact), np.asarray(uncached))


def test_unrolled_split_can_donate_the_stack():
    import dataclasses

    network, params = toy.single_stream()
    params = jax.tree.map(jnp.array, params)  # our own copy to donate
    unrolled = dataclasses.replace(network, layer_unroll=True)
    seg = jc.CachePlan(unrolled, 2).split(params, donate=True)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params.layers))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((seg.body, seg.tail)))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "yes"])
def test_layer_unroll_must_be_a_bool_or_a_positive_int(bad):
    import dataclasses

    network, _ = toy.single_stream()
    with pytest.raises(ValueError, match="layer_unroll"):
        dataclasses.replace(network, layer_unroll=bad)


# -------------------------------------------------------------------------- compiler_options


def test_compiler_options_reach_the_sampling_program_only():
    import dataclasses

    network, params = toy.single_stream()
    noise, cond, _ = toy.inputs()
    common = dict(solver=jc.FlowMatchEuler(), num_steps=4, policy=jc.IntervalPolicy(2))

    def run(net):
        plan = jc.CachePlan(net, 2)
        return jc.sample(plan, plan.split(params), noise, cond, **common).sample

    same = dataclasses.replace(network, compiler_options={"xla_cpu_enable_fast_math": False})
    assert same.compiler_options == (("xla_cpu_enable_fast_math", False),)
    assert hash(same.compiler_options) is not None
    np.testing.assert_array_equal(np.asarray(run(same)), np.asarray(run(network)))
    # An option XLA does not know fails the compile: the options are really passed.
    unknown = dataclasses.replace(network, compiler_options={"xla_no_such_option": True})
    with pytest.raises(Exception, match="xla_no_such_option"):
        run(unknown)
    run(network)  # the default program is unaffected


@pytest.mark.parametrize("bad", [{"xla_cpu_enable_fast_math": None}, {1: True}, "fast"])
def test_compiler_options_must_map_names_to_values(bad):
    import dataclasses

    network, _ = toy.single_stream()
    with pytest.raises(TypeError, match="compiler_options"):
        dataclasses.replace(network, compiler_options=bad)
