"""Networks of several kinds of block: a tiny FLUX layout (2 double + 2 single blocks).

The double-stream blocks work on the pair ``(image, text)``; the single-stream blocks on the
concatenated tokens ``concat(text, image)``. Layer indices run across both kinds (0-1 double,
2-3 single), so a cached body may span the boundary. Built here from plain functions, and as an
NNX model in the forms ports use (a list, an ``nnx.Sequential``, dotted paths, unhashable
settings).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from flax import nnx

import jaxcache as jc
from jaxcache.stack import LayerList

B, T_IMG, T_TXT, D, IN = 2, 8, 4, 8, 4
DOUBLE, SINGLE = 2, 2
STEPS = 6


# ------------------------------------------------------------------------- the network
def condition(p, cond):
    return p["text"][cond]  # [B, T_TXT, D]


def embed(p, x, t, constant):
    return (x @ p["patch"] + t[:, None, None], constant), t


def double_layer(p, h, t):
    img, txt = h
    img_mix, txt_mix = jnp.mean(img, axis=1, keepdims=True), jnp.mean(txt, axis=1, keepdims=True)
    img = img + jnp.tanh(img @ p["wi"] + txt_mix + t[:, None, None])
    txt = txt + jnp.tanh(txt @ p["wt"] + img_mix)
    return img, txt


def single_layer(p, s, t):
    # Tokens mix through the first (text) token, not a mean over the joined sequence: XLA may
    # reassociate a reduction over a concatenation differently in two programs (1 ulp seen on
    # CPU), which would blur the bitwise checks below; test_a_token_mean_... covers that case.
    mix = s[:, :1]
    return s + jnp.tanh(s @ p["w"] @ p["w"] + mix * p["g"] + t[:, None, None])


def join(h, t):
    img, txt = h
    return jnp.concatenate([txt, img], axis=1)


def split(s, h, t):
    n_txt = h[1].shape[1]
    return s[:, n_txt:], s[:, :n_txt]


def final(p, h, t):
    return h[0] @ p


def modulated_input(p, h, t):
    return h[0] * (1 + t[:, None, None]) @ p["wi"]


KINDS = (jc.BlockKind(double_layer, name="double"),
         jc.BlockKind(single_layer, enter=join, leave=split, name="single"))


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 8)
    n = lambda key, shape, s=1 / 3: rand.normal(key, shape) * s  # noqa: E731
    double = {"wi": n(k[0], (DOUBLE, D, D)), "wt": n(k[1], (DOUBLE, D, D))}
    single = {"w": n(k[2], (SINGLE, D, D)), "g": n(k[3], (SINGLE, D))}
    return jc.NetworkParams(
        condition={"text": n(k[4], (5, T_TXT, D), 1.0)},
        embed={"patch": n(k[5], (IN, D))},
        layers=jc.Segments([double, single], [0, 1]),
        final=n(k[6], (D, IN)),
    )


NETWORK = jc.Network(condition, embed, KINDS, final, dual_stream=True,
                     modulated_input=modulated_input)
PARAMS = make_params()


def inputs(batch=B, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (rand.normal(k1, (batch, T_IMG, IN)),
            rand.randint(k2, (batch,), 0, 5))


def by_hand(params, x, t, cond):
    """The forward pass written out, block by block."""
    double, single = params.layers.pieces
    txt = params.condition["text"][cond]
    img = x @ params.embed["patch"] + t[:, None, None]
    for i in range(DOUBLE):
        p = jax.tree.map(lambda a, i=i: a[i], double)
        img_mix = jnp.mean(img, axis=1, keepdims=True)
        txt_mix = jnp.mean(txt, axis=1, keepdims=True)
        img, txt = (img + jnp.tanh(img @ p["wi"] + txt_mix + t[:, None, None]),
                    txt + jnp.tanh(txt @ p["wt"] + img_mix))
    s = jnp.concatenate([txt, img], axis=1)
    for i in range(SINGLE):
        p = jax.tree.map(lambda a, i=i: a[i], single)
        s = s + jnp.tanh(s @ p["w"] @ p["w"] + s[:, :1] * p["g"] + t[:, None, None])
    return s[:, T_TXT:] @ params.final


def run(plan, noise, cond, policy=None, reuse=None, **kw):
    return jc.sample(plan, plan.split(PARAMS), noise, cond, solver=jc.FlowMatchEuler(),
                     num_steps=STEPS, policy=policy, reuse=reuse, **kw)


# ------------------------------------------------------------------------------ tests
def test_forward_equals_the_computation_by_hand():
    x, cond = inputs()
    t = jnp.array([0.3, 0.7])
    # Both compiled whole (op by op, each op and each layer scan compiles alone).
    np.testing.assert_allclose(jax.jit(NETWORK)(PARAMS, x, t, cond),
                               jax.jit(by_hand)(PARAMS, x, t, cond), rtol=1e-6, atol=1e-6)
    assert jc.network.num_layers(PARAMS) == DOUBLE + SINGLE
    assert NETWORK.kinds == KINDS


@pytest.mark.parametrize("first,cached", [(0, 4), (1, 3), (2, 2), (3, 1)])
def test_interval_one_equals_uncached_bitwise(first, cached):
    plan = jc.CachePlan(NETWORK, cached_layers=cached, first_layers=first)
    noise, cond = inputs()
    want = run(plan, noise, cond).sample
    for reuse in (None, jc.ResidualReuse(), jc.TaylorForecast(1)):
        got = run(plan, noise, cond, jc.IntervalPolicy(1), reuse).sample
        if first > DOUBLE:
            # A head that ends inside the single-stream blocks leaves them (split) and the body
            # enters them again (join): XLA's CPU backend fuses that pair differently in the
            # two programs, and 1 ulp of the sample differs (2.4e-7 seen). The plans users run
            # (First-Block, DBCache's Fn inside the double blocks) keep the head in the first
            # kind and are bitwise.
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)


def test_a_token_mean_over_the_joined_sequence_equals_uncached_to_float_tolerance():
    def mean_single(p, s, t):
        return s + jnp.tanh(s @ p["w"] + jnp.mean(s, axis=1, keepdims=True) * p["g"])

    kinds = (KINDS[0], jc.BlockKind(mean_single, enter=join, leave=split))
    network = jc.Network(condition, embed, kinds, final, dual_stream=True)
    noise, cond = inputs()
    for first, cached in ((3, 1), (1, 3), (0, 4)):
        plan = jc.CachePlan(network, cached_layers=cached, first_layers=first)
        seg = plan.split(PARAMS)
        kw = dict(solver=jc.FlowMatchEuler(), num_steps=STEPS)
        np.testing.assert_allclose(
            jc.sample(plan, seg, noise, cond, policy=jc.IntervalPolicy(1), **kw).sample,
            jc.sample(plan, seg, noise, cond, **kw).sample, rtol=1e-6, atol=1e-6)


def test_split_spans_the_boundary_between_kinds():
    plan = jc.CachePlan(NETWORK, cached_layers=2, first_layers=1)
    seg = plan.split(PARAMS)
    assert (seg.head.kinds, seg.head.lengths()) == ((0,), (1,))
    assert (seg.body.kinds, seg.body.lengths()) == ((0, 1), (1, 1))
    assert (seg.tail.kinds, seg.tail.lengths()) == ((1,), (1,))
    np.testing.assert_array_equal(seg.body.pieces[0]["wi"][0], PARAMS.layers.pieces[0]["wi"][1])
    np.testing.assert_array_equal(seg.body.pieces[1]["w"][0], PARAMS.layers.pieces[1]["w"][0])
    unrolled = jc.CachePlan(dataclasses.replace(NETWORK, layer_unroll=True), 2, 1).split(PARAMS)
    assert all(isinstance(p, LayerList) for p in unrolled.body.pieces)


def _reference_interval(plan, noise, cond, interval):
    """The cached loop by hand: the body's output stored at refreshes, reused between."""
    seg = plan.split(PARAMS)
    solver = jc.FlowMatchEuler()
    times, next_times = solver.times(STEPS)
    constant = condition(seg.condition, cond)
    x, stored = noise, None
    for i, (t, t_next) in enumerate(zip(times, next_times)):
        t_rows = jnp.full((noise.shape[0],), t, jnp.float32)
        _, h, ctx = plan.run_head(seg, x, t_rows, constant)
        if i % interval == 0:
            stored = plan.run_body(seg, h, ctx)
        prediction = plan.run_tail(seg, stored, ctx)
        x = x + (t_next - t) * prediction
    return x


@pytest.mark.parametrize("first,cached", [(1, 2), (0, 3), (1, 3)])
def test_a_body_spanning_the_boundary_reuses_its_output(first, cached):
    plan = jc.CachePlan(NETWORK, cached_layers=cached, first_layers=first)
    noise, cond = inputs()
    got = run(plan, noise, cond, jc.IntervalPolicy(2))
    np.testing.assert_allclose(got.sample, _reference_interval(plan, noise, cond, 2),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(got.sample, run(plan, noise, cond).sample, atol=1e-4)


POLICIES = {
    "interval": lambda: jc.IntervalPolicy(2),
    "on-device": lambda: jc.OnDevice(jc.IntervalPolicy(2)),
    "step-mask": lambda: jc.StepMaskPolicy([True, False, True, True, False, False]),
    "first-block": lambda: jc.FirstBlockPolicy(0.6),
    "dbcache": lambda: jc.DBCachePolicy(0.6, warmup_steps=1),
    "teacache": lambda: jc.TeaCachePolicy(0.5),
}
REUSE = {
    "output": lambda: jc.OutputReuse(),
    "all-layers": lambda: jc.OutputReuse(all_layers=True),
    "residual": lambda: jc.ResidualReuse(),
    "taylor": lambda: jc.TaylorForecast(1),
    "hermite": lambda: jc.HermiteForecast(2),
    "fitted": lambda: jc.FittedForecast.taylor(STEPS, 1),
}


# Every policy with residual reuse, and every reuse mode under the interval (a reuse mode's
# state does not depend on the policy that calls it).
SETTINGS = ([(p, "residual") for p in sorted(POLICIES)]
            + [("interval", r) for r in sorted(REUSE) if r != "residual"])


@pytest.mark.parametrize("policy,reuse", SETTINGS)
def test_every_policy_and_reuse_mode_spans_the_kinds(policy, reuse):
    # First-Block and DBCache keep the first block; the body covers every other block.
    first = 0 if policy in ("interval", "on-device", "step-mask", "teacache") else 1
    plan = jc.CachePlan.around(NETWORK, DOUBLE + SINGLE, first=first)
    noise, cond = inputs()
    out = run(plan, noise, cond, POLICIES[policy](), REUSE[reuse]())
    assert np.all(np.isfinite(out.sample))
    computed = np.asarray(out.layers_computed)
    assert computed.shape == (STEPS, DOUBLE + SINGLE)
    assert computed[:, :first].all()  # the head always runs
    assert 0 < np.sum(out.refreshed) < STEPS, "the policy should skip some steps here"
    full = run(plan, noise, cond)
    assert float(out.flops) < float(full.flops)


def test_signal_policies_that_always_refresh_equal_uncached():
    noise, cond = inputs()
    for policy, first in ((jc.FirstBlockPolicy(0.0), 1), (jc.DBCachePolicy(0.0), 1),
                          (jc.TeaCachePolicy(0.0), 0)):
        plan = jc.CachePlan.around(NETWORK, DOUBLE + SINGLE, first=first)
        got = run(plan, noise, cond, policy, jc.ResidualReuse())
        assert bool(np.all(got.refreshed)), type(policy).__name__
        np.testing.assert_array_equal(got.sample, run(plan, noise, cond).sample)


def test_a_batch_of_four_equals_the_four_alone():
    plan = jc.CachePlan.around(NETWORK, DOUBLE + SINGLE, first=1)
    noise, cond = inputs(batch=4, seed=3)
    policy, reuse = jc.FirstBlockPolicy(0.5), jc.ResidualReuse()
    together = run(plan, noise, cond, policy, reuse)
    for i in range(4):
        alone = run(plan, noise[i : i + 1], cond[i : i + 1], policy, reuse)
        np.testing.assert_allclose(together.sample[i : i + 1], alone.sample,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(together.body_computed[:, 0, i],
                                      alone.body_computed[:, 0, 0])


def test_guided_sampling_spans_the_kinds():
    plan = jc.CachePlan(NETWORK, cached_layers=3, first_layers=1)
    noise, cond = inputs()
    uncond = jnp.zeros_like(cond)
    full = run(plan, noise, cond, uncond=uncond, guidance_scale=3.0)
    same = run(plan, noise, cond, jc.IntervalPolicy(1), uncond=uncond, guidance_scale=3.0)
    np.testing.assert_array_equal(same.sample, full.sample)
    cached = run(plan, noise, cond, jc.IntervalPolicy(3), uncond=uncond, guidance_scale=3.0)
    assert np.all(np.isfinite(cached.sample))


def test_work_is_counted_per_block_kind_by_hand():
    rows = B
    double = 2 * rows * T_IMG * D * D + 2 * rows * T_TXT * D * D
    single = 2 * 2 * rows * (T_TXT + T_IMG) * D * D  # two products per single block
    step = 2 * rows * T_IMG * IN * D + 2 * rows * T_IMG * D * IN  # patch embed, final
    plan = jc.CachePlan(NETWORK, cached_layers=3, first_layers=1)
    noise, cond = inputs()
    out = run(plan, noise, cond, jc.IntervalPolicy(3))
    refreshes = int(np.sum(out.refreshed))
    assert refreshes == 2
    full = STEPS * (step + DOUBLE * double + SINGLE * single)
    # The head (one double block) runs every step; the body (double, single, single) only at
    # refreshes.
    done = STEPS * (step + double) + refreshes * (double + 2 * single)
    assert float(out.uncached_flops) == pytest.approx(full, rel=1e-6)
    assert float(out.flops) == pytest.approx(done, rel=1e-6)
    assert float(out.ideal_speedup) == pytest.approx(full / done, rel=1e-6)
    assert int(out.layer_evaluations) == STEPS * 1 + refreshes * 3
    # The evaluation helper agrees, and refuses an unweighted count for unequal layers.
    from jaxcache.evaluation.flops import ideal_speedup

    seg = plan.split(PARAMS)
    assert ideal_speedup(NETWORK, seg, noise, cond, num_steps=STEPS,
                         layers_computed=out.layers_computed) == pytest.approx(full / done)
    with pytest.raises(ValueError, match="differ in cost"):
        ideal_speedup(NETWORK, seg, noise, cond, num_steps=STEPS, layer_evaluations=10)


# --------------------------------------------------------------------------- bad input
def test_a_plan_past_the_last_block_is_refused_before_compiling():
    with pytest.raises(ValueError, match="exceeds the network's 4 layers"):
        jc.CachePlan(NETWORK, cached_layers=4, first_layers=1).split(PARAMS)
    with pytest.raises(ValueError, match="leaves nothing to cache"):
        jc.CachePlan.around(NETWORK, 4, first=3, last=1)


def test_layers_that_do_not_fit_the_kinds_are_refused():
    plain = PARAMS._replace(layers=PARAMS.layers.pieces[0])
    with pytest.raises(ValueError, match="must be a jaxcache.Segments"):
        jc.CachePlan(NETWORK, 2).split(plain)
    three = PARAMS._replace(layers=jc.Segments(PARAMS.layers.pieces, [0, 2]))
    with pytest.raises(ValueError, match=r"kinds \[2\].*2 kind"):
        jc.CachePlan(NETWORK, 2).split(three)
    with pytest.raises(ValueError, match="one kind index per piece"):
        jc.Segments(PARAMS.layers.pieces, [0])
    with pytest.raises(ValueError, match="enter and leave together"):
        jc.BlockKind(single_layer, enter=join)
    with pytest.raises(TypeError, match="tuple of jaxcache.BlockKind"):
        jc.Network(condition, embed, (KINDS[0], single_layer), final, dual_stream=True)


def test_two_kinds_that_cannot_pass_state_are_refused_before_compiling():
    def bad_leave(s, h, t):  # forgets to split: returns one sequence for the pair
        return s

    kinds = (KINDS[0], jc.BlockKind(single_layer, enter=join, leave=bad_leave, name="single"))
    network = jc.Network(condition, embed, kinds, final, dual_stream=True)
    noise, cond = inputs()
    with pytest.raises(ValueError, match="block kind 'single': its leave returned"):
        jc.lower(jc.CachePlan(network, 2), jc.CachePlan(network, 2).split(PARAMS), noise, cond,
                 solver=jc.FlowMatchEuler(), num_steps=STEPS)


# ---------------------------------------------------------------- the NNX forms of a port
class DoubleBlock(nnx.Module):
    def __init__(self, rngs):
        self.wi = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.wt = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, img, txt, t):
        img_mix = jnp.mean(img, axis=1, keepdims=True)
        txt_mix = jnp.mean(txt, axis=1, keepdims=True)
        return (img + jnp.tanh(self.wi(img) + txt_mix + t[:, None, None]),
                txt + jnp.tanh(self.wt(txt) + img_mix))


class SingleBlock(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.g = nnx.Param(jax.random.normal(rngs.params(), (D,)))

    def __call__(self, s, t):
        mix = s[:, :1]
        return s + jnp.tanh(self.w(self.w(s)) + mix * self.g[...] + t[:, None, None])


class TinyFlux(nnx.Module):
    """A port as written: blocks in a list and a Sequential, settings a list and a dict."""

    def __init__(self, *, sequential: bool, rngs):
        self.axes_dim = [2, 2, 4]  # unhashable static settings, as ports keep them
        self.config = {"depth": DOUBLE + SINGLE}
        self.text = nnx.Embed(5, T_TXT * D, rngs=rngs)
        self.patch = nnx.Linear(IN, D, use_bias=False, rngs=rngs)
        self.double_blocks = nnx.List([DoubleBlock(rngs) for _ in range(DOUBLE)])
        singles = [SingleBlock(rngs) for _ in range(SINGLE)]
        self.single_blocks = nnx.Sequential(*singles) if sequential else nnx.List(singles)
        self.out = nnx.Linear(D, IN, use_bias=False, rngs=rngs)

    def __call__(self, x, t, cond):
        txt = self.text(cond).reshape(-1, T_TXT, D)
        img = self.patch(x) + t[:, None, None]
        for block in self.double_blocks:
            img, txt = block(img, txt, t)
        s = jnp.concatenate([txt, img], axis=1)
        blocks = (self.single_blocks.layers if isinstance(self.single_blocks, nnx.Sequential)
                  else self.single_blocks)
        for block in blocks:
            s = block(s, t)
        return self.out(s[:, T_TXT:])


def port_blocks(single_path="single_blocks"):
    return [
        jc.Blocks("double_blocks", layer=lambda b, h, t: b(h[0], h[1], t)),
        jc.Blocks(single_path, layer=lambda b, s, t: b(s, t), enter=join, leave=split),
    ]


def port_network(model, blocks):
    return jc.from_nnx(
        model, blocks=blocks, time=jc.TimeConvention.continuous(), dual_stream=True,
        condition=lambda m, cond: m.text(cond).reshape(-1, T_TXT, D),
        embed=lambda m, x, t, c: ((m.patch(x) + t[:, None, None], c), t),
        final=lambda m, h, t: m.out(h[0]),
    )


@pytest.mark.parametrize("sequential", [False, True])
def test_an_nnx_port_with_two_block_lists_reads_as_one_network(sequential):
    model = TinyFlux(sequential=sequential, rngs=nnx.Rngs(0))
    network, params = port_network(model, port_blocks())
    assert isinstance(params.layers, jc.Segments)
    assert params.layers.lengths() == (DOUBLE, SINGLE)
    x, cond = inputs()
    t = jnp.array([0.2, 0.9])
    jc.check_parity(network, params, model, x, t, cond, rtol=1e-6, atol=1e-6)
    # The port's blocks read as the same computation as the plain-function network.
    ported = jc.NetworkParams(
        condition={"text": model.text.embedding[...].reshape(5, T_TXT, D)},
        embed={"patch": model.patch.kernel[...]},
        layers=jc.Segments([{"wi": params.layers.pieces[0]["wi"]["kernel"][...],
                             "wt": params.layers.pieces[0]["wt"]["kernel"][...]},
                            {"w": params.layers.pieces[1]["w"]["kernel"][...],
                             "g": params.layers.pieces[1]["g"][...]}], [0, 1]),
        final=model.out.kernel[...],
    )
    np.testing.assert_allclose(jax.jit(network)(params, x, t, cond),
                               jax.jit(NETWORK)(ported, x, t, cond), rtol=1e-6, atol=1e-6)
    plan = jc.CachePlan.around(network, DOUBLE + SINGLE, first=1)
    seg = plan.split(params)
    kw = dict(solver=jc.FlowMatchEuler(), num_steps=STEPS)
    np.testing.assert_array_equal(
        jc.sample(plan, seg, x, cond, policy=jc.IntervalPolicy(1), **kw).sample,
        jc.sample(plan, seg, x, cond, **kw).sample)


def test_list_sequential_and_dotted_paths_read_to_the_same_parameters():
    listed = TinyFlux(sequential=False, rngs=nnx.Rngs(0))
    chained = TinyFlux(sequential=True, rngs=nnx.Rngs(0))
    _, a = port_network(listed, port_blocks())
    _, b = port_network(chained, port_blocks())
    _, c = port_network(chained, port_blocks("single_blocks.layers"))
    names = [[f"single_blocks.{i}" for i in range(SINGLE)]]
    _, d = port_network(listed, port_blocks(*[tuple(n) for n in names]))
    for other in (b, c, d):
        jax.tree.map(np.testing.assert_array_equal, a.layers, other.layers)


def test_mixing_blocks_and_names_is_refused():
    model = TinyFlux(sequential=False, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="mixes jaxcache.Blocks with plain names"):
        port_network(model, [jc.Blocks("double_blocks"), "single_blocks"])
    with pytest.raises(ValueError, match="differ in structure"):
        port_network(model, ["double_blocks.0", "single_blocks.0"])
