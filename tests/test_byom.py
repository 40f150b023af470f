"""Bringing your own model: Linen and NNX models as written, the parity check, the time
convention, the worked examples of docs/bring-your-own-model.md, and the errors a new user
meets (each a message that names what was expected).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from pathlib import Path

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

import toy_networks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import linen_dit  # noqa: E402 (the example's public-style Linen DiT)

# The example's own tiny size, batch and keys (test_linen_example_runs): the example's run then
# finds the model's init and sampling programs compiled here.
TINY = dict(linen_dit.SIZES["tiny"])
BATCH = 2
INDEX = jc.TimeConvention.index(1000)

# ------------------------------------------------------------------------------ Linen DiT

_embed_traces: list[int] = []


def _counted_embed(m, x, t, y_emb):
    _embed_traces.append(1)
    return linen_dit.embed(m, x, t, y_emb)


@pytest.fixture(scope="module")
def linen():
    model = linen_dit.DiT(**TINY)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    noise = rand.normal(k1, (BATCH, 8, 8, 4))
    labels = rand.randint(k2, (BATCH,), 0, 10)
    variables = jax.jit(model.init)(k3, noise, jnp.zeros((BATCH,), jnp.int32), labels)
    return model, variables, noise, labels


def _wrap(model, variables, noise, labels, **overrides):
    kwargs = dict(blocks="DiTBlock", condition=linen_dit.condition, embed=linen_dit.embed,
                  final=linen_dit.final, time=INDEX)
    kwargs.update(overrides)
    t = jnp.zeros((noise.shape[0],), jnp.int32)
    return jc.from_linen(model, variables, (noise, t, labels), **kwargs)


def _forward(model, variables):
    return lambda x, t, y: model.apply(variables, x, t, y)[..., : model.in_channels]


T_SOLVER = jnp.asarray([0.999, 0.25], jnp.float32)  # steps 999 and 250


def test_linen_dit_glued_without_rewriting_matches_its_forward(linen):
    model, variables, noise, labels = linen
    variables = linen_dit.randomise(variables)
    network, params = _wrap(model, variables, noise, labels)
    diff = jc.check_parity(network, params, _forward(model, variables), noise, T_SOLVER, labels,
                           rtol=1e-4, atol=1e-5)
    assert diff < 1e-4
    # The blocks' parameters stacked in layer order; the rest keeps everything else.
    kernel = params.layers["params"]["Mlp_0"]["Dense_0"]["kernel"]
    assert kernel.shape[0] == TINY["depth"]
    for i in range(TINY["depth"]):
        np.testing.assert_array_equal(
            kernel[i], variables["params"][f"DiTBlock_{i}"]["Mlp_0"]["Dense_0"]["kernel"]
        )
    assert not any(k.startswith("DiTBlock") for k in params.embed["params"])
    assert "pos_embed" in params.embed["params"] and network.time == INDEX


def test_untrained_dit_outputs_zero_and_parity_warns(linen):
    model, variables, noise, labels = linen
    network, params = _wrap(model, variables, noise, labels)
    with pytest.warns(UserWarning, match="identically zero"):
        diff = jc.check_parity(network, params, _forward(model, variables), noise, T_SOLVER,
                               labels)
    assert diff == 0.0


def test_parity_raises_with_the_largest_difference(linen):
    model, variables, noise, labels = linen
    variables = linen_dit.randomise(variables)

    def embed_without_positions(m, x, t, y_emb):  # a planted glue bug
        return m.PatchEmbed_0(x), m.TimestepEmbedder_0(t) + y_emb

    network, params = _wrap(model, variables, noise, labels, embed=embed_without_positions)
    with pytest.raises(jc.ParityError, match=r"max \|difference\| = \d"):
        jc.check_parity(network, params, _forward(model, variables), noise, T_SOLVER, labels)
    with pytest.raises(jc.ParityError, match="shape"):
        jc.check_parity(network, params, lambda x, t, y: x[..., :1], noise, T_SOLVER, labels)


def test_parity_compiles_the_forward_unless_told_not_to():
    network, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()
    t = jnp.float32(0.4)
    traces = []

    def forward(x, t_model, y):
        traces.append(isinstance(x, jax.core.Tracer))
        return network(params, x, t_model, y)

    assert jc.check_parity(network, params, forward, noise, t, cond) == 0.0
    assert traces == [True]  # traced once by jax.jit

    def host_forward(x, t_model, y):  # numpy on the way: JAX cannot trace it
        return jnp.asarray(np.asarray(network(params, x, t_model, y)))

    with pytest.raises(jax.errors.TracerArrayConversionError):
        jc.check_parity(network, params, host_forward, noise, t, cond)
    assert jc.check_parity(network, params, host_forward, noise, t, cond,
                           jit_forward=False) == 0.0


def test_rebuilding_a_linen_network_reuses_the_program(linen):
    model, variables, noise, labels = linen
    first, params = _wrap(model, variables, noise, labels, embed=_counted_embed)
    again, new_params = _wrap(model, linen_dit.randomise(variables), noise, labels,
                              embed=_counted_embed)
    assert again is first
    counts = []
    for p in (params, new_params):
        network, _ = _wrap(model, variables, noise, labels, embed=_counted_embed)
        plan = jc.CachePlan(network, 1)
        jc.sample(plan, plan.split(p), noise, labels, solver=jc.DDIM(), num_steps=3,
                  policy=jc.IntervalPolicy(2))
        counts.append(len(_embed_traces))
    assert counts[0] > 0 and counts[0] == counts[1]


def test_linen_sampling_interval_one_bitwise_and_caching_acts(linen):
    model, variables, noise, labels = linen
    network, params = _wrap(model, linen_dit.randomise(variables), noise, labels)
    plan = jc.CachePlan(network, 2)
    seg = plan.split(params)
    kw = dict(solver=jc.DDIM(), num_steps=6, uncond=jnp.full_like(labels, 10),
              guidance_scale=3.0)
    uncached = jc.sample(plan, seg, noise, labels, policy=None, **kw)
    every = jc.sample(plan, seg, noise, labels, policy=jc.IntervalPolicy(1), **kw)
    cached = jc.sample(plan, seg, noise, labels, policy=jc.IntervalPolicy(3), **kw)
    np.testing.assert_array_equal(np.asarray(every.sample), np.asarray(uncached.sample))
    assert float(jnp.max(jnp.abs(cached.sample - uncached.sample))) > 1e-5
    assert int(cached.layer_evaluations) == 6 * TINY["depth"] - 4 * 2


def test_linen_dit_uncached_equals_its_own_sampling_loop(linen):
    model, variables, noise, labels = linen
    variables = linen_dit.randomise(variables)
    network, params = _wrap(model, variables, noise, labels)
    plan = jc.CachePlan(network, 0)
    out = jc.sample(plan, plan.split(params), noise, labels, solver=jc.DDIM(), num_steps=5,
                    uncond=jnp.full_like(labels, 10), guidance_scale=2.0)
    own = linen_dit.own_ddim_loop(model, 5, 2.0)(variables, noise, labels)
    np.testing.assert_allclose(np.asarray(out.sample), np.asarray(own), rtol=1e-4, atol=1e-4)


class VBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h, c):
        return nn.Dense(self.width)(h) + c[:, None, None]


class _Varied(nn.Module):
    """Blocks of different settings (widths), or of one setting on inputs of other widths."""

    widths: tuple = (8, 8, 8)

    @nn.compact
    def __call__(self, x, t, y):
        h = x
        for w in self.widths:
            h = VBlock(w)(h, t.astype(jnp.float32))
        return h


def _varied(widths, x_width=8):
    model = _Varied(widths)
    x = jnp.ones((2, 3, x_width))
    t = jnp.zeros((2,), jnp.int32)
    return model, model.init(jax.random.key(0), x, t, t), (x, t, t)


def _linen_kwargs(**overrides):
    kwargs = dict(blocks="VBlock", embed=lambda m, x, t, c: (x, t), final=lambda m, h, c: h,
                  time=jc.TimeConvention.continuous())
    kwargs.update(overrides)
    return kwargs


def test_linen_blocks_sort_numerically_past_ten():
    model, variables, inputs = _varied((8,) * 12)
    variables = linen_dit.randomise(variables)
    network, params = jc.from_linen(model, variables, inputs, **_linen_kwargs())
    kernels = params.layers["params"]["Dense_0"]["kernel"]
    for i in range(12):  # VBlock_10 and VBlock_11 come last, not after VBlock_1
        np.testing.assert_array_equal(kernels[i],
                                      variables["params"][f"VBlock_{i}"]["Dense_0"]["kernel"])
    jc.check_parity(network, params, lambda x, t, y: model.apply(variables, x, t, y), *inputs)


def test_linen_errors_name_what_was_expected():
    model, variables, inputs = _varied((8, 8, 8))
    jc.from_linen(model, variables, inputs, **_linen_kwargs())  # fine
    with pytest.raises(ValueError, match=r"blocks='Block' matches no submodule.*VBlock_0"):
        jc.from_linen(model, variables, inputs, **_linen_kwargs(blocks="Block"))
    with pytest.raises(ValueError, match=r"\['VBlock_7'\] are not submodules"):
        jc.from_linen(model, variables, inputs, **_linen_kwargs(blocks=["VBlock_0", "VBlock_7"]))
    with pytest.raises(TypeError, match=r"needs time=.*TimeConvention.continuous\(\)"):
        jc.from_linen(model, variables, inputs, **_linen_kwargs(time=None))
    with pytest.raises(TypeError, match="needs a flax.linen Module, got Linear"):
        jc.from_linen(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), variables, inputs, **_linen_kwargs())
    with pytest.raises(ValueError, match="that call failed"):
        jc.from_linen(model, variables, (inputs[0][:, :, :2], *inputs[1:]), **_linen_kwargs())
    model, variables, inputs = _varied((8, 16, 8))
    with pytest.raises(ValueError, match="VBlock_0 and VBlock_1 differ in their settings"):
        jc.from_linen(model, variables, inputs, **_linen_kwargs())
    # Equal settings, unequal parameter shapes: the first block reads a narrower input.
    model, variables, inputs = _varied((8, 8, 8), x_width=5)
    with pytest.raises(ValueError, match=r"VBlock_0 and VBlock_1 differ in parameter .*\(8, 8\)"):
        jc.from_linen(model, variables, inputs, **_linen_kwargs())
    # A list of names picks blocks in the order given.
    network, params = jc.from_linen(
        model, variables, inputs, **_linen_kwargs(blocks=["VBlock_1", "VBlock_2"],
                                                  embed=lambda m, x, t, c: (m.VBlock_0(x, t), t))
    )
    assert jax.tree.leaves(params.layers)[0].shape[0] == 2
    jc.check_parity(network, params, lambda x, t, y: model.apply(variables, x, t, y),
                    inputs[0], jnp.zeros((2,)), inputs[2])


# --------------------------------------------------------------------------------- NNX


class _NBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.mod = nnx.Linear(width, 2 * width, rngs=rngs)
        self.mlp = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.mod(nnx.silu(c))[:, None], 2, axis=-1)
        return x + nnx.gelu(self.mlp(x * (1 + scale) + shift))

    def modulated_input(self, x, c):
        shift, scale = jnp.split(self.mod(nnx.silu(c))[:, None], 2, axis=-1)
        return x * (1 + scale) + shift


class _NModel(nnx.Module):
    """Blocks in an nnx.List; patch, time and label embedding inline in __call__."""

    def __init__(self, depth=4, width=16, features=6, *, rngs: nnx.Rngs, list_blocks=True):
        self.proj_in = nnx.Linear(features, width, rngs=rngs)
        self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (5, width)))
        self.time_embed = nnx.Linear(1, width, rngs=rngs)
        self.label_embed = nnx.Embed(11, width, rngs=rngs)
        blocks = [_NBlock(width, rngs) for _ in range(depth)]
        if list_blocks:
            self.blocks = nnx.List(blocks)
        else:
            for i, block in enumerate(blocks):
                setattr(self, f"block{i}", block)
        self.depth = depth
        self.proj_out = nnx.Linear(width, features, rngs=rngs)

    def __call__(self, x, t, y):
        h = self.proj_in(x) + self.pos_embed[...]
        c = nnx.silu(self.time_embed(t[:, None])) + self.label_embed(y)
        blocks = self.blocks if hasattr(self, "blocks") else [
            getattr(self, f"block{i}") for i in range(self.depth)
        ]
        for block in blocks:
            h = block(h, c)
        return self.proj_out(h)


def _n_condition(m, y):
    return m.label_embed(y)


def _n_embed(m, x, t, label):
    return m.proj_in(x) + m.pos_embed[...], nnx.silu(m.time_embed(t[:, None])) + label


def _n_final(m, h, c):
    return m.proj_out(h)


N_KW = dict(condition=_n_condition, embed=_n_embed, final=_n_final,
            time=jc.TimeConvention.continuous())


def _n_inputs():
    x = rand.normal(jax.random.key(3), (3, 5, 6))
    return x, jnp.asarray([1.0, 0.5, 0.0], jnp.float32), jnp.asarray([1, 2, 10])


@pytest.mark.parametrize("as_list", [True, False], ids=["nnx_list", "attribute_names"])
def test_nnx_blocks_as_a_list_match_the_forward(as_list):
    model = _NModel(rngs=nnx.Rngs(0), list_blocks=as_list)
    blocks = "blocks" if as_list else [f"block{i}" for i in range(4)]
    network, params = jc.from_nnx(model, blocks=blocks, **N_KW)
    x, t, y = _n_inputs()
    jc.check_parity(network, params, model, x, t, y, rtol=1e-5, atol=1e-5)
    assert jax.tree.leaves(params.layers)[0].shape[0] == 4
    assert "blocks" not in params.embed and "block0" not in params.embed
    # Caching: interval 1 equals uncached, bitwise.
    plan = jc.CachePlan(network, 2)
    seg = plan.split(params)
    kw = dict(solver=jc.FlowMatchHeun(), num_steps=3)
    uncached = jc.sample(plan, seg, x, y, policy=None, **kw)
    every = jc.sample(plan, seg, x, y, policy=jc.IntervalPolicy(1), **kw)
    np.testing.assert_array_equal(np.asarray(every.sample), np.asarray(uncached.sample))


def test_nnx_list_network_is_shared_and_modulated_input_reaches_teacache():
    a, b = _NModel(rngs=nnx.Rngs(0)), _NModel(rngs=nnx.Rngs(1))
    net_a, params_a = jc.from_nnx(a, blocks="blocks", **N_KW)
    net_b, _ = jc.from_nnx(b, blocks="blocks", **N_KW)
    assert net_a is net_b
    modulated = jc.from_nnx(a, blocks="blocks", modulated_input=_NBlock.modulated_input, **N_KW)
    network, params = modulated
    assert network is not net_a and network.modulated_input is not None
    x, t, y = _n_inputs()
    plan = jc.CachePlan(network, 4)
    out = jc.sample(plan, plan.split(params), x, y, solver=jc.FlowMatchEuler(), num_steps=6,
                    policy=jc.TeaCachePolicy(0.3))
    assert out.sample.shape == x.shape


def test_nnx_stacked_blocks_with_the_same_functions():
    from jaxcache.models import layers

    class Stacked(_NModel):
        def __init__(self, rngs):
            super().__init__(rngs=rngs)
            self.blocks = layers.stack_blocks(lambda r: _NBlock(16, r), 4, rngs)

        def __call__(self, x, t, y):
            h = self.proj_in(x) + self.pos_embed[...]
            c = nnx.silu(self.time_embed(t[:, None])) + self.label_embed(y)
            return self.proj_out(layers.scan_blocks(self.blocks, h, c))

    model = Stacked(nnx.Rngs(0))
    network, params = jc.from_nnx(model, blocks="blocks", **N_KW)
    jc.check_parity(network, params, model, *_n_inputs())


def test_nnx_errors_name_what_was_expected():
    model = _NModel(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has no attribute 'layers'"):
        jc.from_nnx(model, blocks="layers", **N_KW)
    with pytest.raises(TypeError, match="needs time="):
        jc.from_nnx(model, blocks="blocks", **{**N_KW, "time": None})
    with pytest.raises(TypeError, match="needs embed="):
        jc.from_nnx(model, blocks="blocks", **{**N_KW, "final": None})
    with pytest.raises(TypeError, match="need blocks="):
        jc.from_nnx(model, embed=_n_embed)
    model.blocks[2] = _NBlock(8, nnx.Rngs(0))
    with pytest.raises(ValueError, match="blocks 0 and 2|blocks.0 and blocks.2"):
        jc.from_nnx(model, blocks="blocks", **N_KW)


class _Protocol(nnx.Module):
    def __init__(self, blocks):
        rngs = nnx.Rngs(0)
        self.condition_encoder = nnx.Linear(2, 2, rngs=rngs)
        self.embedder = nnx.Linear(2, 2, rngs=rngs)
        self.blocks = blocks
        self.final_layer = nnx.Linear(2, 2, rngs=rngs)


def test_from_nnx_protocol_checks_the_stacked_layer_axis():
    rngs = nnx.Rngs(0)
    as_list = _Protocol(nnx.List([_NBlock(4, rngs) for _ in range(3)]))
    with pytest.raises(TypeError, match=r"blocks is a list of 3 blocks.*nnx.vmap.*blocks='blocks'"):
        jc.from_nnx(as_list)

    class Dropping(nnx.Module):  # one unstacked block: scalar RNG state, no layer axis
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    with pytest.raises(TypeError, match=r"not a stack of blocks.*no leading layer axis.*nnx.vmap"):
        jc.from_nnx(_Protocol(Dropping(rngs)))
    with pytest.raises(TypeError, match="not a stack"):
        jc.from_nnx(_Protocol(nnx.Linear(4, 8, rngs=rngs)))


# ------------------------------------------------------------------------- time convention


@settings(max_examples=50, deadline=None)
@given(k=st.integers(0, 999))
def test_index_convention_round_trips_every_training_step(k):
    conv = jc.TimeConvention.index(1000)
    t = conv.to_solver(jnp.float32(k))
    assert float(conv.to_model(t)) == k
    assert float(conv.to_model(jnp.float32(k / 1000))) == k  # DDIM's grid, k / T in float32


def test_conventions_convert_before_embed_sees_t():
    seen = []

    def embed(p, x, t, c):
        seen.append(t)
        return x, None

    def net(time):
        return jc.Network(lambda p, c: c, embed, lambda p, h, c: h, lambda p, h, c: h, time=time)

    t = jnp.asarray([0.999, 0.5004], jnp.float32)
    for time, want in ((None, [0.999, 0.5004]), (jc.TimeConvention.index(1000), [999, 500]),
                       (jc.TimeConvention.scaled(1000.0), [999.0, 500.4])):
        network = net(time)
        network.embed(None, jnp.zeros(2), t, None)
        np.testing.assert_allclose(np.asarray(seen[-1]), want, rtol=1e-6)
    network = net(jc.TimeConvention.index(1000))
    assert network.embed is not embed
    # A network rebuilt from another's embed keeps its convention and converts once.
    rebuilt = jc.Network(network.condition, network.embed, network.layer, network.final)
    assert rebuilt.time == jc.TimeConvention.index(1000)
    rebuilt.embed(None, jnp.zeros(2), t, None)
    np.testing.assert_array_equal(np.asarray(seen[-1]), [999, 500])
    plain = dataclasses.replace(network, time=jc.TimeConvention.continuous())
    assert plain.embed is embed
    with pytest.raises(TypeError, match="TimeConvention"):
        net("index")
    with pytest.raises(ValueError, match="kind"):
        jc.TimeConvention("steps", 1000)


def test_sampler_checks_solver_times_against_the_convention():
    base, params = toy_networks.single_stream()
    noise, cond, _ = toy_networks.inputs()

    def run(time, solver):
        network = jc.Network(base.condition, base.embed, base.layer, base.final, time=time)
        plan = jc.CachePlan(network, 2)
        return jc.sample(plan, plan.split(params), noise, cond, solver=solver, num_steps=4)

    run(jc.TimeConvention.index(1000), jc.DDIM())
    run(jc.TimeConvention.index(500), jc.DPMSolverPP2M(num_train_steps=500))
    run(jc.TimeConvention.scaled(1000.0), jc.FlowMatchEuler())
    with pytest.raises(ValueError, match=r"integer training-step indices 0..999.*FlowMatchEuler"):
        run(jc.TimeConvention.index(1000), jc.FlowMatchEuler())
    with pytest.raises(ValueError, match="DDIM has num_train_steps=500; build the solver with"):
        run(jc.TimeConvention.index(1000), jc.DDIM(num_train_steps=500))


# --------------------------------------------------------------------- sampler input errors


def _plain():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(network, 2)
    return plan, plan.split(params)


def test_input_errors_name_what_was_expected():
    plan, seg = _plain()
    noise, cond, uncond = toy_networks.inputs()
    kw = dict(solver=jc.FlowMatchEuler(), num_steps=3)
    # Noise without a batch axis: its first axis is read as the batch, and the message says so.
    with pytest.raises(ValueError, match=r"batch axis of 8 \(the noise's\), got shape \(3,\)"
                                         r".*reads as 8 samples.*noise\[None\]"):
        jc.sample(plan, seg, noise[0], cond, **kw)
    with pytest.raises(ValueError, match=r"uncond must match cond.*\(3,\) int32.*\(3, 2\) int32"):
        jc.sample(plan, seg, noise, cond, uncond=jnp.zeros((3, 2), jnp.int32),
                  guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match=r"uncond must match cond.*int32.*float32"):
        jc.sample(plan, seg, noise, cond, uncond=jnp.zeros((3,), jnp.float32),
                  guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="uncond must have cond's structure"):
        jc.sample(plan, seg, noise, cond, uncond=(uncond, uncond), guidance_scale=2.0, **kw)
    with pytest.raises(TypeError, match=r"holds a int leaf.*jnp.asarray"):
        jc.sample(plan, seg, noise, [1, 2, 3], **kw)
    for scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
            jc.sample(plan, seg, noise, cond, uncond=uncond, guidance_scale=scale, **kw)
    with pytest.raises(ValueError, match="guidance_scale must be a Python number"):
        jc.sample(plan, seg, noise, cond, uncond=uncond, guidance_scale=True, **kw)
    # Guidance 0 (the unconditional prediction) and 1 (the conditional one) are allowed.
    jc.sample(plan, seg, noise, cond, uncond=uncond, guidance_scale=0, **kw)


def test_public_names():
    assert jc.lower is jc.sampler.lower
    for name in ("from_linen", "check_parity", "ParityError", "TimeConvention", "DDPM",
                 "EulerAncestral", "DPMSolverPP2M", "FlowMatchHeun"):
        assert name in jc.__all__ and hasattr(jc, name)


# ------------------------------------------------------------------ the worked examples (docs)


def _readme_section_code() -> list[str]:
    """docs/bring-your-own-model.md's ```python blocks, in order, but fragments marked
    ```python no-run (the rule of tests/test_docs.py, which leaves this page to the test below)."""
    text = (ROOT / "docs" / "bring-your-own-model.md").read_text()
    blocks = re.findall(r"^```(python[^\n]*)\n(.*?)^```", text, re.S | re.M)
    return [code for info, code in blocks if "no-run" not in info.split()[1:]]


def test_readme_worked_examples_run():
    blocks = _readme_section_code()
    assert len(blocks) >= 4
    namespace: dict = {}
    with warnings.catch_warnings():
        # The Linen example randomises its weights: no zero-output warning.
        warnings.filterwarnings("error", message=".*identically zero")
        for code in blocks:
            exec(compile(code, "docs/bring-your-own-model.md", "exec"), namespace)
    # Linen: 20 DDIM steps, 4 layers, 2 cached, refreshed every 2 steps (then the NNX example
    # redefines the names; its Heun run is kept as `heun`).
    heun = namespace["heun"]
    assert heun.refreshed.shape == (19,)
    assert int(heun.layer_evaluations) == 19 * 4 - 9 * 2
    assert namespace["out"].sample.shape == (4, 16, 16)
    assert namespace["compiled"] is not None


# ------------------------------------------------------------------------------ the example


def test_linen_example_runs():
    # The sampling settings of test_linen_sampling_interval_one_bitwise_and_caching_acts: the
    # same network, so the same compiled programs.
    result = linen_dit.main(["--size", "tiny", "--steps", "6", "--interval", "3", "--guidance",
                             "3.0", "--repeats", "1", "--batch", str(BATCH)])
    assert result["parity"] < 1e-4 and result["uncached_vs_own"] < 1e-3
    assert result["layer_evaluations"] == 6 * 4 - 4 * 2  # 4 layers, 2 cached, refreshes 0 and 3
