"""CFG-Cache (FasterCache): cache steps run the conditional rows alone and estimate the
unconditional prediction from the gap's low and high frequencies at the last full step. Checked
against uncached guidance, an independent numpy FFT, a loop written out by hand, the program's
text and FLOPs, and the batch against its samples alone."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.evaluation.program import host_round_trips, normalized_size, runtime_decisions
from jaxcache.guidance import CFGCacheState, frequency_bands

D, H, W, LAYERS, VOCAB = 8, 6, 5, 5, 10
STEPS, SCALE = 8, 3.0
EULER = jc.FlowMatchEuler()
# Full steps 0, 2, 4, 6; cache steps 1, 3, 5, 7 (a periodic schedule: a small program).
CFG = jc.CFGCache(interval=2)


def _network(gap=False):
    """A toy DiT on ``[batch, H, W, D]`` latents. ``gap=True``: the condition enters only as a
    term added to the prediction (a fixed spatial pattern scaled per channel), so the gap
    between the branches is the same at every step."""
    return _NETWORKS[gap]


def _build(gap):
    def condition(p, cond):
        return p["table"][cond]  # [B, D]

    def embed(p, x, t, c):
        h = x @ p
        if not gap:
            h = h + c[:, None, None, :]
        return h + t[:, None, None, None], (t, c)

    def layer(p, h, ctx):
        t = ctx[0]
        return h + jnp.tanh(h @ p["w"] + t[:, None, None, None] * p["b"])

    def final(p, h, ctx):
        out = h @ p["out"]
        if gap:
            out = out + p["pattern"][None, :, :, None] * ctx[1][:, None, None, :]
        return out

    k = jax.random.split(jax.random.key(7), 7)
    params = jc.NetworkParams(
        condition={"table": rand.normal(k[0], (VOCAB, D))},
        embed=rand.normal(k[1], (D, D)) / 3,
        layers={"w": rand.normal(k[2], (LAYERS, D, D)) / 3,
                "b": rand.normal(k[3], (LAYERS, D))},
        final={"out": rand.normal(k[4], (D, D)) / 3, "pattern": rand.normal(k[5], (H, W))},
    )
    return jc.Network(condition, embed, layer, final), params


_NETWORKS = {gap: _build(gap) for gap in (False, True)}


def _inputs(batch=3, seed=3):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    noise = rand.normal(k1, (batch, H, W, D))
    cond = rand.randint(k2, (batch,), 1, VOCAB)
    uncond = rand.randint(k3, (batch,), 0, VOCAB)
    return noise, cond, uncond


def _run(guidance=CFG, policy=None, reuse=None, cached=3, gap=False, batch=3, seed=3,
         steps=STEPS, lower=False, **kw):
    network, params = _network(gap)
    plan = jc.CachePlan(network, cached)
    noise, cond, uncond = _inputs(batch, seed)
    run = jc.lower if lower else jc.sample
    return run(plan, plan.split(params), noise, cond, uncond=uncond, guidance_scale=SCALE,
               solver=EULER, num_steps=steps, policy=policy, reuse=reuse, guidance=guidance, **kw)


def _equal(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


ALL_FULL = jc.CFGCache(interval=1)
POLICIES = {
    "uncached": (None, None),
    "interval": (jc.IntervalPolicy(2), jc.TaylorForecast(1)),
    "on_device": (jc.OnDevice(jc.IntervalPolicy(3)), jc.ResidualReuse()),
    "layer_mask": (jc.LayerMaskPolicy(np.arange(STEPS)[:, None] % 2 == np.arange(3) % 2),
                   jc.OutputReuse(all_layers=True)),
}


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_steps_everywhere_equal_guidance_without_cfg_cache_bitwise(name):
    policy, reuse = POLICIES[name]
    plain = _run(None, policy, reuse)
    full = _run(ALL_FULL, policy, reuse)
    _equal(full.sample, plain.sample)
    _equal(full.body_computed, plain.body_computed)
    _equal(full.guidance_computed, np.ones(STEPS, bool))
    assert float(full.flops) == float(plain.flops)


def test_a_gap_that_never_changes_is_estimated_exactly():
    # The gap uncond - cond is the same at every step: with weights 1 the estimate is the
    # unconditional prediction (to float32 rounding of the FFT) ...
    ones = jc.CFGCache(interval=3, warmup_steps=2, low_weight=1.0, high_weight=1.0)
    uncached = _run(None, gap=True)
    cached = _run(ones, gap=True)
    np.testing.assert_allclose(cached.sample, uncached.sample, rtol=1e-5, atol=1e-5)
    assert not bool(jnp.all(cached.guidance_computed))
    # ... and weights other than 1 inside their time ranges change it, each band on its own.
    for weights in ({"low_weight": 1.5}, {"high_weight": 1.5}):
        boosted = jc.CFGCache(interval=3, warmup_steps=2, low_range=(0.0, 1.0),
                              high_range=(0.0, 1.0), **{"low_weight": 1.0, "high_weight": 1.0,
                                                        **weights})
        assert float(jnp.max(jnp.abs(_run(boosted, gap=True).sample - uncached.sample))) > 1e-3


def test_new_weights_and_radius_reuse_the_program():
    network, params = _network()
    traces = []

    def layer(p, h, ctx):
        traces.append(1)
        return network.layer(p, h, ctx)

    counted = jc.Network(network.condition, network.embed, layer, network.final)
    plan = jc.CachePlan(counted, 3)
    seg = plan.split(params)
    noise, cond, uncond = _inputs()
    outs = []
    for value in (0.1, 0.3):
        cfg = jc.CFGCache(interval=3, warmup_steps=2, radius=value, low_weight=1 + value,
                          high_weight=1 + 2 * value, low_range=(value, 1.0))
        outs.append(jc.sample(plan, seg, noise, cond, uncond=uncond, guidance_scale=SCALE,
                              solver=EULER, num_steps=STEPS, guidance=cfg).sample)
        if value == 0.1:
            first = len(traces)
    assert first > 0 and len(traces) == first, "a new weight or radius retraced the program"
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-4  # ... and they act


# ------------------------------------------------------------------------------ the split
def _numpy_bands(delta, radius, axes):
    """FasterCache's split, restated in numpy: a disc about the centre of the shifted spectrum
    (radius ``floor(radius * min side)``), each band transformed back on its own."""
    sides = [delta.shape[a] for a in axes]
    r = int(np.floor(np.float32(radius) * np.float32(min(sides))))
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in sides], indexing="ij")
    disc = sum(g.astype(np.int64) ** 2 for g in grids) <= r * r
    shape = [delta.shape[a] if a in axes else 1 for a in range(delta.ndim)]
    disc = disc.reshape(shape)
    spectrum = np.fft.fftshift(np.fft.fftn(delta.astype(np.float64), axes=axes), axes=axes)

    def back(part):
        return np.real(np.fft.ifftn(np.fft.ifftshift(part, axes=axes), axes=axes))

    return back(spectrum * disc), back(spectrum * ~disc)


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from([((2, 6, 5, 3), (1, 2)), ((1, 8, 8, 2), (1, 2)), ((2, 3, 7, 4, 2), (2, 3)),
                     ((3, 16), (1,)), ((1, 5, 9, 1), (1, 2))]),
    st.floats(0.0, 0.7),
    st.integers(0, 2**31 - 1),
)
# Radii whose disc holds diagonal frequencies (floor(radius * side) >= 2), on every layout.
@example(((2, 6, 5, 3), (1, 2)), 0.45, 0)
@example(((1, 8, 8, 2), (1, 2)), 0.7, 1)
@example(((2, 3, 7, 4, 2), (2, 3)), 0.6, 2)
@example(((3, 16), (1,)), 0.3, 3)
def test_frequency_split_matches_an_independent_numpy_fft(case, radius, seed):
    shape, axes = case
    delta = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    low, high = frequency_bands(jnp.asarray(delta), radius, axes)
    want_low, want_high = _numpy_bands(delta, radius, axes)
    np.testing.assert_allclose(low, want_low, atol=2e-5)
    np.testing.assert_allclose(high, want_high, atol=2e-5)


def test_the_split_is_per_sample_and_the_zero_radius_keeps_the_mean():
    delta = np.random.default_rng(0).normal(size=(3, 6, 5, 2)).astype(np.float32)
    low, _ = frequency_bands(jnp.asarray(delta), 0.0, (1, 2))
    # Radius 0: the low band is the zero frequency, each sample's and channel's spatial mean.
    np.testing.assert_allclose(low, np.broadcast_to(delta.mean(axis=(1, 2), keepdims=True),
                                                    delta.shape), atol=1e-6)
    low, high = frequency_bands(jnp.asarray(delta), 0.3, (1, 2))
    one, _ = frequency_bands(jnp.asarray(delta[1:2]), 0.3, (1, 2))
    np.testing.assert_allclose(low[1:2], one, atol=1e-6)
    np.testing.assert_allclose(low + high, delta, atol=1e-6)


def test_cache_steps_weight_each_band_and_compound():
    cfg = jc.CFGCache(low_weight=2.0, high_weight=3.0, low_range=(0.5, 1.0),
                      high_range=(0.0, 0.5))
    state = CFGCacheState(jnp.ones((1, 4)), jnp.full((1, 4), 10.0))
    positive = jnp.zeros((1, 4))
    # Early (t = 0.8): the low band is weighted; it stays so, and compounds at the next step.
    negative, state = cfg.estimate(state, positive, jnp.float32(0.8))
    np.testing.assert_allclose(negative, 2.0 + 10.0)
    negative, state = cfg.estimate(state, positive, jnp.float32(0.6))
    np.testing.assert_allclose(negative, 4.0 + 10.0)
    # Late (t = 0.2): the high band is weighted.
    negative, state = cfg.estimate(state, positive + 1.0, jnp.float32(0.2))
    np.testing.assert_allclose(negative, 1.0 + 4.0 + 30.0)


# ------------------------------------------------------------------------------ the program
def _dot_batches(text):
    """The rows of every matrix product of the network's activations (``[rows, H, W, D]``) in a
    lowered program."""
    found = re.findall(rf"stablehlo\.dot_general[^\n]*?: \(tensor<(\d+)x{H}x{W}x{D}xf32>", text)
    return sorted({int(b) for b in found})


def test_cache_steps_run_on_the_conditional_rows_only():
    batch = 3
    with_cfg = _run(CFG, batch=batch, lower=True).as_text()
    without = _run(None, batch=batch, lower=True).as_text()
    # Every layer runs on 2B rows without CFG-Cache; with it, the cache steps' on B.
    assert _dot_batches(without) == [2 * batch]
    assert _dot_batches(with_cfg) == [batch, 2 * batch]
    # FLOPs: every piece of the toy is linear in its rows, and its condition path (a table
    # look-up) has no matrix product, so a cache step costs half an evaluation.
    out = _run(CFG, batch=batch)
    half = int(np.sum(~np.asarray(out.guidance_computed)))
    assert half == 4
    np.testing.assert_allclose(float(out.flops),
                               float(out.uncached_flops) * (1 - half / (2 * STEPS)), rtol=1e-6)
    # The unconditional rows report not computed on cache steps.
    computed = np.asarray(out.body_computed)
    _equal(computed[:, 1, :], np.broadcast_to(np.asarray(out.guidance_computed)[:, None],
                                              (STEPS, batch)))
    assert computed[:, 0, :].all()


def test_each_evaluation_runs_the_rows_its_kind_says_at_run_time():
    # The final projection reports its rows from inside the running program.
    network, params = _network()
    seen = []

    def final(p, h, ctx):
        jax.debug.callback(lambda rows: seen.append(int(rows)), jnp.int32(h.shape[0]))
        return network.final(p, h, ctx)

    reporting = jc.Network(network.condition, network.embed, network.layer, final)
    plan = jc.CachePlan(reporting, 3)
    noise, cond, uncond = _inputs(3)
    out = jc.sample(plan, plan.split(params), noise, cond, uncond=uncond, guidance_scale=SCALE,
                    solver=EULER, num_steps=STEPS, policy=jc.IntervalPolicy(2), guidance=CFG)
    jax.block_until_ready(out.sample)
    full = np.asarray(out.guidance_computed)
    assert sorted(seen) == sorted(np.where(full, 6, 3).tolist())


@pytest.mark.parametrize("policy", [None, jc.IntervalPolicy(3)], ids=["uncached", "interval"])
def test_a_known_schedule_compiles_without_decisions(policy):
    lowered = _run(CFG, policy=policy, reuse=jc.TaylorForecast(1), lower=True)
    compiled = lowered.compile().as_text()
    assert host_round_trips(lowered.as_text()) == [] and host_round_trips(compiled) == []
    assert runtime_decisions(compiled) == []
    # The program does not grow with the step count (both end on the same partial group).
    sizes = {steps: normalized_size(_run(CFG, policy=policy, reuse=jc.TaylorForecast(1),
                                         steps=steps, lower=True).as_text())
             for steps in (14, 98)}
    assert sizes[14] == sizes[98], sizes


# ------------------------------------------------------------------------------ composition
def _reference(guidance, interval, batch=3, seed=3):
    """CFG-Cache over an interval layer cache, written out as a loop: each branch keeps its
    body output (plain reuse); the unconditional branch runs, and refreshes, only on full
    steps; its estimate uses the numpy split."""
    network, params = _network()
    noise, cond, uncond = _inputs(batch, seed)
    times, next_times = EULER.times(STEPS)
    full = guidance.full_steps(STEPS)
    cached = 3
    constants = {0: network.condition(params.condition, cond),
                 1: network.condition(params.condition, uncond)}
    layers = [jax.tree.map(lambda a, j=j: a[j], params.layers) for j in range(LAYERS)]
    stored = {0: None, 1: None}
    bands = None
    x = noise
    for i, (t, t_next) in enumerate(zip(times, next_times)):
        prediction = {}
        for branch in (0, 1) if full[i] else (0,):
            h, ctx = network.embed(params.embed, x, jnp.full((batch,), t), constants[branch])
            if i % interval == 0:
                for j in range(cached):
                    h = network.layer(layers[j], h, ctx)
                stored[branch] = h
            else:
                h = stored[branch]
            for j in range(cached, LAYERS):
                h = network.layer(layers[j], h, ctx)
            prediction[branch] = np.asarray(network.final(params.final, h, ctx), np.float64)
        if full[i]:
            negative = prediction[1]
            bands = list(_numpy_bands(prediction[1] - prediction[0], guidance.radius, (1, 2)))
        else:
            for k, (weight, (lo, hi)) in enumerate(
                [(guidance.low_weight, guidance.low_range),
                 (guidance.high_weight, guidance.high_range)]
            ):
                bands[k] = bands[k] * (weight if lo <= t <= hi else 1.0)
            negative = prediction[0] + bands[0] + bands[1]
        guided = negative + SCALE * (prediction[0] - negative)
        x = x + (t_next - t) * jnp.asarray(guided, jnp.float32)
    return x


@pytest.mark.parametrize("interval", [1, 2])
def test_composes_with_an_interval_cache_as_a_loop_written_out(interval):
    cfg = jc.CFGCache(interval=3, warmup_steps=2, low_weight=1.2, high_weight=1.3,
                      low_range=(0.3, 1.0), high_range=(0.0, 0.6))
    out = _run(cfg, jc.IntervalPolicy(interval))
    np.testing.assert_allclose(out.sample, _reference(cfg, interval), rtol=2e-5, atol=2e-5)
    # The conditional rows follow the layer schedule; the unconditional ones run only where
    # both the schedule and CFG-Cache say so.
    schedule = np.arange(STEPS) % interval == 0
    _equal(out.refreshed, schedule)
    full = np.asarray(out.guidance_computed)
    computed = np.asarray(out.body_computed)
    _equal(computed[:, 0, 0], schedule)
    _equal(computed[:, 1, 0], schedule & full)


_EVERY_OTHER = np.arange(STEPS) % 2 == 0


@pytest.mark.parametrize(
    "policy",
    [jc.OnDevice(jc.IntervalPolicy(2)),
     jc.LayerMaskPolicy(np.broadcast_to(_EVERY_OTHER[:, None], (STEPS, 3)))],
    ids=["on_device", "layer_mask"],
)
def test_the_layer_cache_paths_agree_under_cfg_cache(policy):
    # One schedule through the known, device-decided and per-layer loops.
    reference = _run(CFG, jc.IntervalPolicy(2))
    out = _run(CFG, policy)
    np.testing.assert_allclose(out.sample, reference.sample, rtol=1e-6, atol=1e-6)
    _equal(out.body_computed, reference.body_computed)
    np.testing.assert_allclose(float(out.flops), float(reference.flops), rtol=1e-6)


@pytest.mark.parametrize(
    "policy, reuse",
    [(jc.FirstBlockPolicy(0.3), jc.ResidualReuse()), POLICIES["layer_mask"]],
    ids=["first_block", "layer_mask"],
)
def test_a_batch_of_four_equals_the_four_alone(policy, reuse):
    network, params = _network()
    plan = (jc.CachePlan.around(network, LAYERS, first=1) if policy is not None
            and policy.signal_kind else jc.CachePlan(network, 3))
    seg = plan.split(params)
    noise, cond, uncond = _inputs(4, seed=11)

    def run(rows):
        return jc.sample(plan, seg, noise[rows], cond[rows], uncond=uncond[rows],
                         guidance_scale=SCALE, solver=EULER, num_steps=STEPS, policy=policy,
                         reuse=reuse, guidance=CFG)

    together = run(slice(None))
    computed = np.asarray(together.body_computed)
    if isinstance(policy, jc.FirstBlockPolicy):  # the threshold acts, and rows differ
        assert 0 < computed.mean() < 1 and (computed != computed[:, :1, :1]).any()
    for i in range(4):
        alone = run(slice(i, i + 1))
        np.testing.assert_allclose(together.sample[i], alone.sample[0], rtol=2e-5, atol=2e-5)
        _equal(computed[:, :, i], np.asarray(alone.body_computed)[:, :, 0])


# A cross-attention toy on ``[batch, tokens, D]``: the text keys and values computed in the
# layer at every step (inline), or as its per-layer constant, once per run (hooked). Cache steps
# must bind the constants of the conditional rows alone.
def _text_kv(p, text):
    return text @ p["wk"], text @ p["wv"]


def _attend(p, h, t, k, v):
    w = jax.nn.softmax(h @ jnp.swapaxes(k, 1, 2), axis=-1)
    return h + jnp.tanh(h @ p["w"] + w @ v + t[:, None, None])


def _cross_network(hooked):
    def embed(p, x, t, text):
        return x @ p + t[:, None, None], (t, text)

    def inline(p, h, ctx):
        return _attend(p, h, ctx[0], *_text_kv(p, ctx[1]))

    def with_constant(p, h, ctx, *, layer_constant):
        return _attend(p, h, ctx[0], *layer_constant)

    def final(p, h, ctx):
        return h @ p

    condition = lambda p, cond: p[cond]  # noqa: E731  [B, text tokens, D]
    if hooked:
        return jc.Network(condition, embed, with_constant, final, layer_constant=_text_kv)
    return jc.Network(condition, embed, inline, final)


_CROSS = {hooked: _cross_network(hooked) for hooked in (False, True)}


def test_cache_steps_bind_the_conditional_rows_per_layer_constants():
    k = jax.random.split(jax.random.key(1), 6)
    params = jc.NetworkParams(
        condition=rand.normal(k[0], (VOCAB, 5, D)), embed=rand.normal(k[1], (D, D)) / 3,
        layers={name: rand.normal(key, (4, D, D)) / 3
                for name, key in zip(("w", "wk", "wv"), k[2:5])},
        final=rand.normal(k[5], (D, D)) / 3,
    )
    noise = rand.normal(k[0], (3, 6, D))
    cond, uncond = jnp.array([1, 2, 3]), jnp.array([0, 0, 4])
    cfg = jc.CFGCache(interval=3, warmup_steps=2, axes=(1,))
    outs = {}
    for hooked, network in _CROSS.items():
        plan = jc.CachePlan(network, 2)
        outs[hooked] = jc.sample(plan, plan.split(params), noise, cond, uncond=uncond,
                                 guidance_scale=SCALE, solver=EULER, num_steps=STEPS,
                                 policy=jc.IntervalPolicy(2), guidance=cfg)
    np.testing.assert_allclose(outs[True].sample, outs[False].sample, rtol=1e-5, atol=1e-5)
    _equal(outs[True].body_computed, outs[False].body_computed)


# ------------------------------------------------------------------------------ schedules
def test_the_schedule_follows_fastercache_settings():
    cfg = jc.CFGCache(interval=5, warmup_steps=4, final_steps=2)
    _equal(cfg.full_steps(16), [s < 4 or s % 5 == 0 or s >= 14 for s in range(16)])
    given_schedule = (True, False, True, False)
    _equal(jc.CFGCache(schedule=given_schedule).full_steps(4), given_schedule)
    out = _run(jc.CFGCache(schedule=(True, True, False, False, True, False, False, True)))
    _equal(out.guidance_computed, [1, 1, 0, 0, 1, 0, 0, 1])


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guidance_scale=1.0), "guidance_scale > 1"),
        (dict(guidance_scale=None, uncond=None), "uncond= and guidance_scale="),
        (dict(guidance=jc.CFGCache(interval=20)), "never computes the unconditional branch"),
        (dict(guidance=jc.CFGCache(schedule=(False,) + (True,) * 7)), "step 0"),
        (dict(guidance=jc.CFGCache(schedule=(True,) * 5)), "5 entries"),
        (dict(guidance=jc.CFGCache(axes=(0, 1))), "never the batch"),
        (dict(guidance=jc.CFGCache(axes=(1, 4))), "spatial axes"),
        (dict(guidance=jc.CFGCache(axes=(1, -3))), "twice"),
        (dict(record=("output_change",)), "record="),
        (dict(sequence_axis="tokens"), "sequence_axis"),
        (dict(policy=jc.SenCachePolicy(0.1)), "do not combine"),
        (dict(policy=jc.LayerGates(np.ones((STEPS, 3), np.float32))), "LayerMaskPolicy"),
        (dict(guidance=jc.IntervalPolicy(2)), "CFGCache or None"),
        (dict(guidance=jc.CFGCache), "instance"),
    ],
)
def test_bad_input_is_refused_before_compiling(kwargs, match):
    network, params = _network()
    plan = jc.CachePlan(network, 3)
    noise, cond, uncond = _inputs()
    args = dict(uncond=uncond, guidance_scale=SCALE, guidance=CFG, solver=EULER,
                num_steps=STEPS)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        jc.lower(plan, plan.split(params), noise, cond, **args)


@pytest.mark.parametrize(
    "kwargs",
    [dict(interval=0), dict(warmup_steps=0), dict(radius=-0.1), dict(low_weight="1"),
     dict(low_range=(0.1,)), dict(axes=()), dict(schedule="yes"), dict(schedule=((1, 0),))],
)
def test_bad_settings_are_refused_when_made(kwargs):
    with pytest.raises((ValueError, TypeError)):
        jc.CFGCache(**kwargs)
