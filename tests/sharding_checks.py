"""Sharded cached sampling on 8 simulated CPU devices, against one device: run as a script.

``python tests/sharding_checks.py`` runs every check below in this one process (JAX fixes its
device count when it starts, and the test process has one device) and prints one line,
``SHARDING_CHECKS_JSON=<json>``: a result per check, which tests/test_sharding.py asserts on.
A check that raises records its traceback instead of stopping the others.

The settings:

* ``jit``: ``jax.jit`` with ``NamedSharding`` in/out shardings, the batch split over ``data``
  (8 devices); sharding propagation does the rest.
* ``shard_map_data``: ``jax.shard_map`` over ``data`` (8 devices), each device sampling its
  block of the batch.
* ``shard_map_seq``: ``jax.shard_map`` over a ``(data 2) x (seq 4)`` mesh: the batch over
  ``data``, each sample's tokens over ``seq``, with ``sequence_axis="seq"``; the network's
  layers mix tokens through a mean over the tokens that is a ``lax.pmean`` over ``seq``.
* ``params``: ``jax.jit`` on a ``(data 2) x (model 4)`` mesh, the split parameters' matrices
  split on their last dimension over ``model``.

Every policy (interval, OnDevice(interval), step mask, First-Block Cache, DBCache, TeaCache) and
every reuse mode (output, residual, Taylor, Hermite, fitted Taylor) runs in each setting, paired
so that each setting covers all of both, half of the pairs with guidance.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import jaxcache as jc  # noqa: E402
from jaxcache.evaluation.program import host_round_trips, runtime_decisions  # noqa: E402
from jaxcache.policies.signals import relative_l1, signal_function  # noqa: E402
from jaxcache.sharding import (  # noqa: E402
    collectives,
    manual_axes,
    place,
    place_params,
    traffic,
)

import toy_networks  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")  # as the test suite

START = time.perf_counter()
STEPS = 6
RESULTS: dict[str, dict] = {}


def check(name):
    """Records a check's result dict (or its traceback) under ``name``."""

    def wrap(fn):
        start = time.perf_counter()
        try:
            result = fn()
        except Exception:  # recorded for the test to show
            result = {"error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 2)
        RESULTS[name] = result
        return fn

    return wrap


# ---------------------------------------------------------------------- the networks
# A token network: [batch, tokens, features]. Its layers mix tokens only through a mean over
# the tokens; with ``axis`` (inside shard_map, tokens split over that mesh axis) the mean is a
# pmean of the local means, which with equal blocks is the same mean: both forms compute the
# same thing.
B, T, D, IN, L, VOCAB = 8, 16, 12, 4, 4, 10


def token_network(axis=None):
    def token_mean(h):
        m = jnp.mean(h, axis=1, keepdims=True)
        return m if axis is None else jax.lax.pmean(m, axis)

    def condition(p, cond):
        return p[cond]  # [rows, D]

    def embed(p, x, t, c):
        return x @ p + c[:, None, :] + t[:, None, None], t

    def layer(p, h, t):
        return h + jnp.tanh(h @ p["w"] + token_mean(h) @ p["u"] + t[:, None, None] * p["b"])

    def final(p, h, t):
        return h @ p

    def modulated_input(p, h, t):
        return (h * (1 + t[:, None, None])) @ p["w"]

    return jc.Network(condition, embed, layer, final, modulated_input=modulated_input)


def token_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    return jc.NetworkParams(
        condition=jax.random.normal(k[0], (VOCAB, D)),
        embed=jax.random.normal(k[1], (IN, D)) / 2,
        layers={"w": jax.random.normal(k[2], (L, D, D)) / 3,
                "u": jax.random.normal(k[3], (L, D, D)) / 3,
                "b": jax.random.normal(k[4], (L, D))},
        final=jax.random.normal(k[5], (D, IN)) / 3,
    )


def token_inputs(batch=B, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    noise = jax.random.normal(k1, (batch, T, IN))
    cond = jax.random.randint(k2, (batch,), 1, VOCAB)
    return noise, cond, jnp.zeros((batch,), jnp.int32)


PARAMS = token_params()

POLICIES = {  # name: (plan for a network, policy)
    "interval": (lambda n: jc.CachePlan(n, 2), lambda: jc.IntervalPolicy(2)),
    "on_device": (lambda n: jc.CachePlan(n, 2), lambda: jc.OnDevice(jc.IntervalPolicy(2))),
    "step_mask": (lambda n: jc.CachePlan(n, 3),
                  lambda: jc.StepMaskPolicy((True, True, False, True, False, False))),
    "first_block": (lambda n: jc.CachePlan.around(n, L, first=1),
                    lambda: jc.FirstBlockPolicy(0.15)),
    "dbcache": (lambda n: jc.CachePlan.around(n, L, first=1, last=1),
                lambda: jc.DBCachePolicy(0.15, warmup_steps=1)),
    "teacache": (lambda n: jc.CachePlan(n, L), lambda: jc.TeaCachePolicy(0.25)),
}
STATIC = {"interval", "step_mask"}
MODES = {
    "output": lambda: jc.OutputReuse(),
    "residual": lambda: jc.ResidualReuse(),
    "taylor": lambda: jc.TaylorForecast(1),
    "hermite": lambda: jc.HermiteForecast(2),
    "fitted": lambda: jc.FittedForecast.taylor(STEPS, 1),
}


def pairs(offset):
    """Each policy with one mode (every mode covered), guidance on every other pair."""
    names = sorted(MODES)
    return [(p, names[(i + offset) % len(names)], (i + offset) % 2 == 0)
            for i, p in enumerate(POLICIES)]


def run(plan, params, noise, cond, uncond, policy, mode, guided, **kw):
    extra = dict(uncond=uncond, guidance_scale=2.0) if guided else {}
    return jc.sample(plan, params, noise, cond, solver=jc.FlowMatchEuler(), num_steps=STEPS,
                     policy=policy, reuse=mode, **extra, **kw)


def compare(sharded, reference, computed=None, reference_computed=None):
    diff = float(jnp.max(jnp.abs(sharded - reference)))
    # Relative to the sample's scale (a noise-prediction solver's samples reach ~1e3 here).
    out = {"max_diff": diff, "rel_diff": diff / max(1.0, float(jnp.max(jnp.abs(reference))))}
    if computed is not None:
        computed = np.asarray(computed)
        want = np.asarray(reference_computed)
        out["body_computed_equal"] = bool(np.array_equal(computed, np.broadcast_to(want,
                                                                                    computed.shape)))
        out["computed"] = int(np.sum(want))
        out["decisions"] = int(want.size)
    return out


def compiled_run(fn, *args):
    """Compiles ``fn`` once for ``args`` and runs it: ``(outputs, lowered text, compiled text)``.

    (Calling a jitted function and then ``fn.lower(...).compile()`` would compile twice.)
    """
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    return compiled(*args), lowered.as_text(), compiled.as_text()


def summary(compiled_text):
    return [c._asdict() for c in collectives(compiled_text)]


def mesh_of(shape, names):
    return Mesh(np.array(jax.devices()).reshape(shape), names)


DATA = mesh_of((8,), ("data",))
DATA_SEQ = mesh_of((2, 4), ("data", "seq"))
DATA_MODEL = mesh_of((2, 4), ("data", "model"))
SEQ = mesh_of((8,), ("seq",))


def reference(name, mode, guided, network=None, batch=B):
    make_plan, make_policy = POLICIES[name]
    plan = make_plan(network or token_network())
    noise, cond, uncond = token_inputs(batch)
    out = run(plan, plan.split(PARAMS), noise, cond, uncond, make_policy(), MODES[mode](), guided)
    return out, (noise, cond, uncond)


# ---------------------------------------------------------------------- jit, data parallel
def jit_case(name, mode, guided):
    ref, (noise, cond, uncond) = reference(name, mode, guided)
    make_plan, make_policy = POLICIES[name]
    plan = make_plan(token_network())
    seg = plan.split(PARAMS)
    batch = NamedSharding(DATA, P("data"))

    def f(noise, cond, uncond):
        out = run(plan, seg, noise, cond, uncond, make_policy(), MODES[mode](), guided)
        return out.sample, out.body_computed, out.caches

    fn = jax.jit(f, in_shardings=(batch, batch, batch))
    args = [jax.device_put(a, batch) for a in (noise, cond, uncond)]
    (sample, computed, caches), lowered, compiled = compiled_run(fn, *args)
    result = compare(sample, ref.sample, computed, ref.body_computed)
    result["sample_spec"] = str(sample.sharding.spec)
    # The conditional branch's cache: every leaf with a batch axis has it split over "data".
    specs = []
    for leaf in jax.tree.leaves(caches[0]):
        if hasattr(leaf, "sharding") and B in leaf.shape:
            dim = leaf.shape.index(B)
            spec = tuple(leaf.sharding.spec) + (None,) * leaf.ndim
            specs.append({"shape": list(leaf.shape), "dim": dim, "axis": str(spec[dim])})
    result["cache_leaves"] = specs
    result["host_round_trips"] = host_round_trips(lowered) + host_round_trips(compiled)
    result["collectives"] = summary(compiled)
    result["traffic"] = traffic(compiled, STEPS)
    result["decides"] = bool(runtime_decisions(compiled))
    return result


for name, mode, guided in pairs(0):
    check(f"jit/{name}/{mode}/{'guided' if guided else 'plain'}")(
        lambda name=name, mode=mode, guided=guided: jit_case(name, mode, guided))

# Unguided jit: the collectives of a static schedule (the device-decided ones are in pairs(0)).
check("jit_collectives/interval")(lambda: jit_case("interval", "residual", False))


# ---------------------------------------------------------------------- shard_map
def shard_map_case(name, mode, guided, sequence):
    mesh = DATA_SEQ if sequence else DATA
    batch = 4 if sequence else B
    ref, (noise, cond, uncond) = reference(name, mode, guided, batch=batch)
    make_plan, make_policy = POLICIES[name]
    plan = make_plan(token_network("seq" if sequence else None))
    seg = plan.split(PARAMS)
    kw = {"sequence_axis": "seq"} if sequence else {}
    seen = {}

    def f(noise, cond, uncond):
        seen["axes"] = manual_axes(noise)
        out = run(plan, seg, noise, cond, uncond, make_policy(), MODES[mode](), guided, **kw)
        return out.sample, out.body_computed[None]

    x_spec = P("data", "seq") if sequence else P("data")
    # body_computed is [steps, branches, batch] per device; each device's copy is gathered on
    # a new leading axis (devices along "seq" hold the same rows and must agree).
    computed_spec = P("seq", None, None, "data") if sequence else P(None, None, None, "data")
    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(x_spec, P("data"), P("data")),
                               out_specs=(x_spec, computed_spec)))
    (sample, computed), lowered, compiled = compiled_run(fn, noise, cond, uncond)
    result = compare(sample, ref.sample, computed, ref.body_computed[None])
    result["manual_axes"] = list(seen["axes"])
    result["host_round_trips"] = host_round_trips(lowered) + host_round_trips(compiled)
    result["collectives"] = summary(compiled)
    result["traffic"] = traffic(compiled, STEPS)
    return result


for name, mode, guided in pairs(1):
    check(f"shard_map_data/{name}/{mode}/{'guided' if guided else 'plain'}")(
        lambda name=name, mode=mode, guided=guided: shard_map_case(name, mode, guided, False))
for name, mode, guided in pairs(2):
    check(f"shard_map_seq/{name}/{mode}/{'guided' if guided else 'plain'}")(
        lambda name=name, mode=mode, guided=guided: shard_map_case(name, mode, guided, True))


@check("shard_map_seq_unchecked/first_block/residual/plain")
def _unchecked():
    # shard_map(check_vma=False): no axis is recorded on the values (nothing to cast), and
    # sequence_axis still reduces the signal and agrees the branch.
    ref, (noise, cond, _) = reference("first_block", "residual", False, batch=4)
    plan = POLICIES["first_block"][0](token_network("seq"))
    seg = plan.split(PARAMS)

    def f(noise, cond):
        out = run(plan, seg, noise, cond, None, jc.FirstBlockPolicy(0.15), jc.ResidualReuse(),
                  False, sequence_axis="seq")
        return out.sample, out.body_computed[None]

    fn = jax.jit(jax.shard_map(f, mesh=DATA_SEQ, in_specs=(P("data", "seq"), P("data")),
                               out_specs=(P("data", "seq"), P("seq", None, None, "data")),
                               check_vma=False))
    sample, computed = fn(noise, cond)
    return compare(sample, ref.sample, computed, ref.body_computed[None])


# ---------------------------------------------------------------------- toy_networks, shard_map
@check("shard_map_toy/first_block/taylor/plain")
def _toy():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan.around(network, toy_networks.LAYERS, first=1)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(8)
    policy, mode = jc.FirstBlockPolicy(0.1), jc.TaylorForecast(1)
    ref = run(plan, seg, noise, cond, None, policy, mode, False)

    def f(noise, cond):
        out = run(plan, seg, noise, cond, None, policy, mode, False)
        return out.sample, out.body_computed[None]

    fn = jax.jit(jax.shard_map(f, mesh=DATA, in_specs=P("data"),
                               out_specs=(P("data"), P(None, None, None, "data"))))
    sample, computed = fn(noise, cond)
    return compare(sample, ref.sample, computed, ref.body_computed[None])


# ---------------------------------------------------------------------- stateful solvers
@check("shard_map_solver/dpm_2m/hermite")
def _dpm():
    plan = jc.CachePlan.around(token_network(), L, first=1)
    seg = plan.split(PARAMS)
    noise, cond, _ = token_inputs()
    kw = dict(solver=jc.DPMSolverPP2M(), num_steps=STEPS, policy=jc.FirstBlockPolicy(0.15),
              reuse=jc.HermiteForecast(2))
    ref = jc.sample(plan, seg, noise, cond, **kw)
    fn = jax.jit(jax.shard_map(lambda n, c: jc.sample(plan, seg, n, c, **kw).sample, mesh=DATA,
                               in_specs=P("data"), out_specs=P("data")))
    return compare(fn(noise, cond), ref.sample)


@check("shard_map_solver/ancestral_draws_per_device")
def _ancestral():
    # Every device gets the same block of noise; an ancestral solver must still draw its own
    # noise on each device (one key everywhere would repeat one draw across the batch).
    plan = jc.CachePlan(token_network(), 2)
    seg = plan.split(PARAMS)
    noise, cond, _ = token_inputs(1)
    noise, cond = jnp.tile(noise, (8, 1, 1)), jnp.tile(cond, 8)
    kw = dict(solver=jc.EulerAncestral(), num_steps=STEPS, policy=jc.IntervalPolicy(2),
              key=jax.random.key(0))
    fn = jax.jit(jax.shard_map(lambda n, c: jc.sample(plan, seg, n, c, **kw).sample, mesh=DATA,
                               in_specs=P("data"), out_specs=P("data")))
    out = np.asarray(fn(noise, cond))
    distinct = len({out[i].tobytes() for i in range(8)})
    return {"distinct_rows": distinct, "finite": bool(np.all(np.isfinite(out)))}


# ---------------------------------------------------------------------- jit, sequence split
@check("jit_tokens/first_block/output/guided")
def _jit_tokens():
    ref, (noise, cond, uncond) = reference("first_block", "output", True, batch=4)
    plan = POLICIES["first_block"][0](token_network())
    seg = plan.split(PARAMS)
    xs, rows = NamedSharding(DATA_SEQ, P("data", "seq")), NamedSharding(DATA_SEQ, P("data"))

    def f(noise, cond, uncond):
        out = run(plan, seg, noise, cond, uncond, jc.FirstBlockPolicy(0.15), jc.OutputReuse(),
                  True)
        return out.sample, out.body_computed

    fn = jax.jit(f, in_shardings=(xs, rows, rows), out_shardings=(xs, None))
    (sample, computed), _, compiled = compiled_run(fn, noise, cond, uncond)
    result = compare(sample, ref.sample, computed, ref.body_computed)
    result["sample_spec"] = str(sample.sharding.spec)
    result["host_round_trips"] = host_round_trips(compiled)
    result["collectives"] = summary(compiled)
    result["traffic"] = traffic(compiled, STEPS)
    return result


# ---------------------------------------------------------------------- the decision agrees
@check("sequence_axis/local_signals_disagree")
def _disagree():
    # Tokens split 8 ways. At step 1, First-Block Cache compares the first block's residual
    # with step 0's; each device's own tokens give it another relative change. The threshold
    # is put between those local values (so local decisions would differ), as far as possible
    # from the whole row's value; with sequence_axis every device decides on the whole row.
    batch = 2
    noise, cond, uncond = token_inputs(batch, seed=5)
    times, next_times = jc.FlowMatchEuler().times(STEPS)

    def changes(network, axis):
        plan = jc.CachePlan.around(network, L, first=1)
        seg = plan.split(PARAMS)
        signal_of = signal_function("head_residual", plan, seg)

        def f(noise, cond):
            constant = network.condition(seg.condition, cond)
            t0 = jnp.full((noise.shape[0],), times[0], jnp.float32)
            emb, h, ctx = plan.run_head(seg, noise, t0, constant)
            first = signal_of(emb, h, ctx)
            pred = plan.run_tail(seg, plan.run_body(seg, h, ctx), ctx)
            x1 = noise + (next_times[0] - times[0]) * pred
            t1 = jnp.full((noise.shape[0],), times[1], jnp.float32)
            emb, h, ctx = plan.run_head(seg, x1, t1, constant)
            second = signal_of(emb, h, ctx)
            local = relative_l1(second, first, axis_name=())
            whole = relative_l1(second, first, axis_name=axis)
            return local[None], whole[None]

        return f

    local, whole = jax.jit(jax.shard_map(changes(token_network("seq"), "seq"), mesh=SEQ,
                                         in_specs=(P(None, "seq"), P()),
                                         out_specs=(P("seq"), P("seq"))))(noise, cond)
    _, single = jax.jit(changes(token_network(), ()))(noise, cond)
    local, whole, single = np.asarray(local), np.asarray(whole), np.asarray(single)[0]
    row = np.sort(local[:, 0])
    middles = (row[1:] + row[:-1]) / 2
    # Prefer a threshold above the row's value: all devices skip though some would compute.
    above = middles[middles > single[0] * 1.01]
    candidates = above if len(above) else middles
    threshold = float(candidates[np.argmax(np.abs(candidates - single[0]))])

    plan1 = jc.CachePlan.around(token_network(), L, first=1)
    plan8 = jc.CachePlan.around(token_network("seq"), L, first=1)
    policy = jc.FirstBlockPolicy(threshold)
    ref = run(plan1, plan1.split(PARAMS), noise, cond, uncond, policy, jc.ResidualReuse(), False)

    def f(noise, cond):
        out = run(plan8, plan8.split(PARAMS), noise, cond, None, policy, jc.ResidualReuse(),
                  False, sequence_axis="seq")
        return out.sample, out.body_computed[None]

    fn = jax.jit(jax.shard_map(f, mesh=SEQ, in_specs=(P(None, "seq"), P()),
                               out_specs=(P(None, "seq"), P("seq"))))
    sample, computed = fn(noise, cond)
    result = compare(sample, ref.sample, computed, ref.body_computed[None])
    computed = np.asarray(computed)
    result.update(
        threshold=threshold,
        local_changes_row0=[float(v) for v in local[:, 0]],
        whole_change_row0=float(whole[0, 0]),
        single_change_row0=float(single[0]),
        wholes_agree=bool(np.allclose(whole, whole[:1], rtol=0, atol=0)),
        whole_matches_single=bool(np.allclose(whole[0], single, rtol=1e-5)),
        local_decisions_differ=bool(np.any(local[:, 0] < threshold)
                                    and np.any(local[:, 0] >= threshold)),
        devices_agree=bool(all(np.array_equal(computed[0], c) for c in computed)),
        step1_computed=[bool(v) for v in np.asarray(ref.body_computed)[1, 0]],
        local_step1_would_compute=[bool(v) for v in local[:, 0] >= threshold],
    )
    return result


# ---------------------------------------------------------------------- parameters split
@check("params/teacache/hermite/guided")
def _params():
    ref, (noise, cond, uncond) = reference("teacache", "hermite", True)
    plan = POLICIES["teacache"][0](token_network())
    seg = place_params(plan.split(PARAMS), DATA_MODEL, "model")
    rows = NamedSharding(DATA_MODEL, P("data"))

    def f(seg, noise, cond, uncond):
        out = run(plan, seg, noise, cond, uncond, jc.TeaCachePolicy(0.25), jc.HermiteForecast(2),
                  True)
        return out.sample, out.body_computed

    fn = jax.jit(f, out_shardings=(rows, None))
    args = (seg, *(jax.device_put(a, rows) for a in (noise, cond, uncond)))
    (sample, computed), _, compiled = compiled_run(fn, *args)
    result = compare(sample, ref.sample, computed, ref.body_computed)
    result["weight_specs"] = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(seg)})
    result["host_round_trips"] = host_round_trips(compiled)
    result["collectives"] = summary(compiled)
    result["traffic"] = traffic(compiled, STEPS)
    return result


@check("params/interval/output/plain")
def _params_static():
    ref, (noise, cond, uncond) = reference("interval", "output", False)
    plan = POLICIES["interval"][0](token_network())
    seg = place_params(plan.split(PARAMS), DATA_MODEL, "model")
    rows = NamedSharding(DATA_MODEL, P("data"))
    fn = jax.jit(lambda seg, n, c: run(plan, seg, n, c, None, jc.IntervalPolicy(2),
                                       jc.OutputReuse(), False).sample, out_shardings=rows)
    args = (seg, jax.device_put(noise, rows), jax.device_put(cond, rows))
    sample, _, compiled = compiled_run(fn, *args)
    result = compare(sample, ref.sample)
    result["collectives"] = summary(compiled)
    result["traffic"] = traffic(compiled, STEPS)
    return result


# ---------------------------------------------------------------------- FLUX layout
# The few pieces of tests/test_block_kinds.py's tiny FLUX layout (2 double + 2 single blocks).
FB, T_IMG, T_TXT, FD, FIN = 8, 8, 4, 8, 4


def _f_condition(p, cond):
    return p["text"][cond]


def _f_embed(p, x, t, constant):
    return (x @ p["patch"] + t[:, None, None], constant), t


def _f_double(p, h, t):
    img, txt = h
    img_mix, txt_mix = jnp.mean(img, axis=1, keepdims=True), jnp.mean(txt, axis=1, keepdims=True)
    img = img + jnp.tanh(img @ p["wi"] + txt_mix + t[:, None, None])
    txt = txt + jnp.tanh(txt @ p["wt"] + img_mix)
    return img, txt


def _f_single(p, s, t):
    return s + jnp.tanh(s @ p["w"] @ p["w"] + s[:, :1] * p["g"] + t[:, None, None])


def _f_join(h, t):
    return jnp.concatenate([h[1], h[0]], axis=1)


def _f_split(s, h, t):
    n_txt = h[1].shape[1]
    return s[:, n_txt:], s[:, :n_txt]


def _f_final(p, h, t):
    return h[0] @ p


def _f_modulated(p, h, t):
    return h[0] * (1 + t[:, None, None]) @ p["wi"]


def flux_network():
    kinds = (jc.BlockKind(_f_double, name="double"),
             jc.BlockKind(_f_single, enter=_f_join, leave=_f_split, name="single"))
    network = jc.Network(_f_condition, _f_embed, kinds, _f_final, dual_stream=True,
                         modulated_input=_f_modulated)
    k = jax.random.split(jax.random.key(0), 8)
    n = lambda key, shape, s=1 / 3: jax.random.normal(key, shape) * s  # noqa: E731
    params = jc.NetworkParams(
        condition={"text": n(k[4], (5, T_TXT, FD), 1.0)},
        embed={"patch": n(k[5], (FIN, FD))},
        layers=jc.Segments([{"wi": n(k[0], (2, FD, FD)), "wt": n(k[1], (2, FD, FD))},
                            {"w": n(k[2], (2, FD, FD)), "g": n(k[3], (2, FD))}], [0, 1]),
        final=n(k[6], (FD, FIN)),
    )
    return network, params


@check("flux_layout/dbcache/residual/guided")
def _flux():
    network, params = flux_network()
    plan = jc.CachePlan.around(network, 4, first=1, last=1)  # the body spans the two kinds
    seg = plan.split(params)
    k1, k2 = jax.random.split(jax.random.key(1))
    noise = jax.random.normal(k1, (FB, T_IMG, FIN))
    cond = jax.random.randint(k2, (FB,), 0, 5)
    uncond = jnp.zeros((FB,), jnp.int32)
    policy, mode = jc.DBCachePolicy(0.1, warmup_steps=1), jc.ResidualReuse()
    ref = run(plan, seg, noise, cond, uncond, policy, mode, True)

    def f(noise, cond, uncond):
        out = run(plan, seg, noise, cond, uncond, policy, mode, True)
        return out.sample, out.body_computed[None]

    shard_map_fn = jax.jit(jax.shard_map(f, mesh=DATA, in_specs=P("data"),
                                         out_specs=(P("data"), P(None, None, None, "data"))))
    sample, computed = shard_map_fn(noise, cond, uncond)
    return compare(sample, ref.sample, computed, ref.body_computed[None])


# ---------------------------------------------------------------------- sizes that do not divide
@check("errors/sizes")
def _errors():
    out = {}
    noise = jnp.zeros((6, T, IN))
    for key, spec, mesh in (("batch", P("data"), DATA), ("tokens", P(None, "seq"), DATA_SEQ)):
        try:
            place(noise if key == "batch" else jnp.zeros((4, 10, IN)), mesh, spec, "noise")
            out[key] = None
        except ValueError as error:
            out[key] = str(error)
    # Where JAX itself refuses: jit's in_shardings and shard_map's in_specs.
    plan = jc.CachePlan(token_network(), 2)
    seg = plan.split(PARAMS)
    cond = jnp.ones((6,), jnp.int32)

    def f(n, c):
        return jc.sample(plan, seg, n, c, solver=jc.FlowMatchEuler(), num_steps=2,
                         policy=jc.IntervalPolicy(2)).sample

    rows = NamedSharding(DATA, P("data"))
    for key, call in (
        ("jax_jit", lambda: jax.jit(f, in_shardings=(rows, rows))(noise, cond)),
        ("jax_shard_map", lambda: jax.jit(jax.shard_map(
            f, mesh=DATA, in_specs=P("data"), out_specs=P("data")))(noise, cond)),
    ):
        try:
            call()
            out[key] = None
        except ValueError as error:
            out[key] = f"{type(error).__name__}: {error}"
    return out


# ---------------------------------------------------------------------- the example
@check("example")
def _example():
    namespace = runpy.run_path(os.path.join(ROOT, "examples", "sharded.py"))
    return namespace["main"](verbose=False)


def main():
    RESULTS["_meta"] = {"jax": jax.__version__, "devices": jax.device_count(),
                        "seconds": round(time.perf_counter() - START, 2)}
    print("SHARDING_CHECKS_JSON=" + json.dumps(RESULTS))


if __name__ == "__main__":
    main()
