"""Per-(step, layer) plans: LayerMaskPolicy (a static mask, no decision in the loop) and
LayerGates (traced gates, differentiable), against the uncached loop, step masks, a loop written
out layer by layer, and each other."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_block_kinds as flux
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.evaluation.program import host_round_trips, normalized_size, runtime_decisions

import toy_networks

S = 8  # solver steps
FIRST, CACHED = 1, 4  # the toy plan: layer 0 is the head, layers 1-4 the body, layer 5 the tail
EULER = jc.FlowMatchEuler()
GATES_TOL = 1e-6  # gates of exact 0/1 against the mask: float32 rounding of the mixing


@functools.cache
def _unrolled(name):
    """A toy network with one weight array per layer (made once: programs are shared)."""
    network, _ = _NETWORKS[name]()
    return dataclasses.replace(network, layer_unroll=True)


_NETWORKS = {
    "single": toy_networks.single_stream,
    "dual": toy_networks.dual_stream,
    "flux": lambda: (flux.NETWORK, flux.PARAMS),
}


def _layout(name, unroll=False):
    network, params = _NETWORKS[name]()
    if unroll:
        network = _unrolled(name)
    # FLUX's tiny layout: 2 double + 2 single blocks; the body [1, 4) spans the boundary.
    plan = jc.CachePlan(network, 3, first_layers=1) if name == "flux" else jc.CachePlan(
        network, CACHED, first_layers=FIRST)
    return plan, params


def _inputs(name, batch=2, seed=3):
    if name == "flux":
        noise, cond = flux.inputs(batch, seed)
        return noise, cond, jnp.zeros_like(cond)
    return toy_networks.inputs(batch, seed)


def _run(name, policy, reuse=None, *, unroll=False, guided=False, batch=2, seed=3, steps=S,
         solver=EULER, key=None, **kw):
    plan, params = _layout(name, unroll)
    noise, cond, uncond = _inputs(name, batch, seed)
    guidance = dict(uncond=uncond, guidance_scale=3.0) if guided else {}
    return jc.sample(plan, plan.split(params), noise, cond, solver=solver, num_steps=steps,
                     policy=policy, reuse=reuse, key=key, **guidance, **kw)


def _mixed(steps, layers):
    """A mask with each kind of column: always; every 2nd step (layers 1-2, one run sharing a
    state); every 3rd from step 1, so the last layer runs unstored at step 0."""
    mask = np.ones((steps, layers), bool)
    mask[:, 1:] = (np.arange(steps) % 2 == 0)[:, None]
    mask[:, -1] = np.arange(steps) % 3 == 1
    return mask


def _assert_equal(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


MODES = {"output": jc.OutputReuse(), "residual": jc.ResidualReuse(),
         "taylor": jc.TaylorForecast(1), "all_layers": jc.OutputReuse(all_layers=True)}


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name, unroll, guided",
                         [("single", False, True), ("dual", False, False), ("flux", True, True)])
def test_an_all_true_mask_equals_uncached_bitwise(name, unroll, guided):
    plan, _ = _layout(name)
    every = jc.LayerMaskPolicy(np.ones((S, plan.cached_layers), bool))
    got = _run(name, every, jc.ResidualReuse(), unroll=unroll, guided=guided)
    want = _run(name, None, unroll=unroll, guided=guided)
    if (name, unroll) == ("flux", True):
        # The step-level cached loop is 1 ulp off the uncached one here already (XLA fuses the
        # unrolled double blocks' token means differently in the two programs): the mask
        # equals that loop bitwise, and the uncached one to float32 rounding.
        step = _run(name, jc.IntervalPolicy(1), jc.ResidualReuse(), unroll=unroll, guided=guided)
        _assert_equal(got.sample, step.sample)
        np.testing.assert_allclose(got.sample, want.sample, rtol=1e-5, atol=1e-5)
    else:
        _assert_equal(got.sample, want.sample)
    assert bool(jnp.all(got.layers_computed)) and bool(jnp.all(got.body_computed))
    assert float(got.flops) == float(want.flops)


# Rows all True or all False: the per-layer plan is the step mask (the leading False runs the
# body unstored, as a step mask does). For OutputReuse the last layer's stored output is the
# body's; for ResidualReuse layers that agree share one state, so the body's residual is kept.
STEP_ROWS = (False, True, False, False, True, False, True, False)


@pytest.mark.parametrize("name, mode, guided",
                         [("single", "output", True), ("single", "residual", True),
                          ("dual", "residual", False), ("flux", "output", False)])
def test_uniform_rows_equal_the_step_mask_bitwise(name, mode, guided):
    plan, _ = _layout(name)
    rows = np.broadcast_to(np.array(STEP_ROWS)[:, None], (S, plan.cached_layers))
    got = _run(name, jc.LayerMaskPolicy(rows), MODES[mode], guided=guided)
    want = _run(name, jc.StepMaskPolicy(STEP_ROWS), MODES[mode], guided=guided)
    _assert_equal(got.sample, want.sample)
    for field in ("refreshed", "layers_computed", "body_computed", "flops"):
        _assert_equal(getattr(got, field), getattr(want, field))
    assert not bool(jnp.all(got.layers_computed))  # the mask skipped


def test_a_two_stage_solver_counts_evaluations():
    # Heun evaluates 2 n - 1 times in n steps; the mask has a row per evaluation.
    solver, steps = jc.FlowMatchHeun(), 4
    evaluations = len(solver.times(steps)[0])
    rows = np.resize(STEP_ROWS, evaluations)
    layered = np.broadcast_to(rows[:, None], (evaluations, CACHED))
    kw = dict(solver=solver, steps=steps)
    got = _run("single", jc.LayerMaskPolicy(layered), jc.ResidualReuse(), **kw)
    want = _run("single", jc.StepMaskPolicy(tuple(rows)), jc.ResidualReuse(), **kw)
    _assert_equal(got.sample, want.sample)
    assert got.layers_computed.shape == (evaluations, toy_networks.LAYERS)


def test_an_ancestral_solver_folds_its_key_per_evaluation():
    kw = dict(solver=jc.EulerAncestral(), key=jax.random.key(7), guided=True)
    every = _run("single", jc.LayerMaskPolicy(np.ones((S, CACHED), bool)), **kw)
    _assert_equal(every.sample, _run("single", None, **kw).sample)


# --------------------------------------------------------------- a loop written layer by layer
def _by_hand(mask, mode, noise, cond, steps=S):
    """The sampler restated: a Python loop over steps and layers, one reuse record per layer
    (its input and output at each computed step), the empty-slot rule, Euler steps."""
    network, params = toy_networks.single_stream()
    condition, embed, layer, final = (jax.jit(f) for f in (
        network.condition, network.embed, network.layer, network.final))
    times, next_times = EULER.times(steps)
    history = [[] for _ in range(mask.shape[1])]  # per body layer: (t, input, output)
    constant = condition(params.condition, cond)
    x = noise
    for i, (t, t_next) in enumerate(zip(times, next_times)):
        h, ctx = embed(params.embed, x, jnp.full((x.shape[0],), t, jnp.float32), constant)
        for index in range(toy_networks.LAYERS):
            p = jax.tree.map(lambda a, index=index: a[index], params.layers)
            j = index - FIRST
            if not 0 <= j < mask.shape[1] or mask[i, j] or not history[j]:
                out = layer(p, h, ctx)
                if 0 <= j < mask.shape[1] and mask[i, j]:
                    history[j].append((t, h, out))
                h = out
                continue
            t1, in1, out1 = history[j][-1]
            if mode == "residual":
                h = h + (out1 - in1)
            elif mode == "taylor" and len(history[j]) > 1:
                t0, _, out0 = history[j][-2]
                h = out1 + (t - t1) * ((out1 - out0) / (t1 - t0))
            else:
                h = out1
        x = x + (t_next - t) * final(params.final, h, ctx)
    return x


@pytest.mark.parametrize("mode", ["output", "residual", "taylor"])
def test_a_layer_plan_matches_the_loop_written_layer_by_layer(mode):
    mask = _mixed(S, CACHED)
    noise, cond, _ = toy_networks.inputs(2)
    got = _run("single", jc.LayerMaskPolicy(mask), MODES[mode])
    want = _by_hand(mask, mode, noise, cond)
    np.testing.assert_allclose(got.sample, want, rtol=1e-6, atol=1e-6)
    uncached = _run("single", None)
    assert float(jnp.max(jnp.abs(got.sample - uncached.sample))) > 1e-4  # the plan acted


def test_what_ran_and_what_it_cost():
    mask = _mixed(S, CACHED)
    got = _run("single", jc.LayerMaskPolicy(mask), jc.ResidualReuse())
    ran = mask.copy()
    ran[0, -1] = True  # the last layer first stores at step 1: at step 0 it runs unstored
    layers = np.ones((S, toy_networks.LAYERS), bool)
    layers[:, FIRST:FIRST + CACHED] = ran
    _assert_equal(got.layers_computed, layers)
    _assert_equal(got.refreshed, ran.any(axis=1))
    _assert_equal(got.body_computed, np.broadcast_to(ran.all(axis=1)[:, None, None], (S, 1, 2)))
    # Every toy layer costs the same: each skipped layer saves one layer's FLOPs.
    one_skip = np.ones((S, CACHED), bool)
    one_skip[1:, 2] = False
    saved = got.uncached_flops - _run("single", jc.LayerMaskPolicy(one_skip)).flops
    per_layer = float(saved) / (S - 1)
    assert per_layer > 0
    np.testing.assert_allclose(float(got.uncached_flops - got.flops), (~ran).sum() * per_layer,
                               rtol=1e-6)
    np.testing.assert_allclose(float(got.ideal_speedup), float(got.uncached_flops / got.flops))
    # One state per run of layers whose columns agree, per guidance branch.
    assert len(got.caches) == 1 and len(got.caches[0]) == 3
    # Rematerialised (for a backward pass), the same sample.
    remat = _run("single", jc.LayerMaskPolicy(mask), jc.ResidualReuse(), remat=True)
    np.testing.assert_allclose(remat.sample, got.sample, rtol=1e-6, atol=1e-6)


def test_a_batch_equals_its_samples_alone():
    policy = jc.LayerMaskPolicy(_mixed(S, CACHED))
    together = _run("single", policy, jc.TaylorForecast(1), guided=True, batch=4)
    noise, cond, uncond = toy_networks.inputs(4)
    plan, params = _layout("single")
    for i in range(4):
        alone = jc.sample(plan, plan.split(params), noise[i : i + 1], cond[i : i + 1],
                          uncond=uncond[i : i + 1], guidance_scale=3.0, solver=EULER,
                          num_steps=S, policy=policy, reuse=jc.TaylorForecast(1))
        np.testing.assert_allclose(together.sample[i], alone.sample[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------- FLUX: a body across the kinds, both stacks
@pytest.mark.parametrize("unroll, mode", [(True, "all_layers"), (False, "taylor")])
def test_flux_layout_mask_equals_its_gates(unroll, mode):
    # Body layers 1 (double) and 2 (single) share a column: one state across the boundary;
    # layer 3 (the second single block) stands alone, a part of the scanned single stack.
    mask = np.ones((S, 3), bool)
    mask[:, :2] = (np.arange(S) % 2 == 0)[:, None]
    mask[:, 2] = np.arange(S) % 3 == 1
    got = _run("flux", jc.LayerMaskPolicy(mask), MODES[mode], unroll=unroll, guided=True)
    gated = _run("flux", jc.LayerGates(mask.astype(np.float32)), MODES[mode], unroll=unroll,
                 guided=True)
    np.testing.assert_allclose(got.sample, gated.sample, rtol=GATES_TOL, atol=GATES_TOL)
    assert len(got.caches[0]) == 2  # one state across the boundary, one for layer 3


# --------------------------------------------------------------------------------- gates
@settings(max_examples=8, deadline=None)
@given(st.lists(st.booleans(), min_size=S * CACHED, max_size=S * CACHED))
def test_gates_of_zero_and_one_follow_the_loop_written_by_hand(bits):
    # Gates are traced: every example runs the one compiled program.
    mask = np.array(bits).reshape(S, CACHED)
    noise, cond, _ = toy_networks.inputs(2)
    got = _run("single", jc.LayerGates(mask.astype(np.float32)), jc.ResidualReuse())
    np.testing.assert_allclose(got.sample, _by_hand(mask, "residual", noise, cond),
                               rtol=1e-6, atol=1e-6)


def test_gates_of_one_equal_uncached_and_count_every_layer():
    got = _run("single", jc.LayerGates(np.ones((S, CACHED), np.float32)), jc.TaylorForecast(1),
               guided=True)
    want = _run("single", None, guided=True)
    np.testing.assert_allclose(got.sample, want.sample, rtol=GATES_TOL, atol=GATES_TOL)
    assert bool(jnp.all(got.layers_computed)) and float(got.flops) == float(want.flops)
    assert len(got.caches) == 2 and len(got.caches[0]) == CACHED  # a state per layer


def test_gradients_through_the_gates():
    # A forecast's state has float leaves (mixed) and an int count (taken where g >= 0.5);
    # remat=True (as a router trains) keeps one step's activations for the backward pass.
    plan, params = _layout("single")
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    target = _run("single", None).sample

    def loss(gates):
        out = jc.sample(plan, seg, noise, cond, solver=EULER, num_steps=S,
                        policy=jc.LayerGates(gates), reuse=jc.TaylorForecast(1), remat=True)
        return jnp.mean((out.sample - target) ** 2)

    # Away from 0.5, where the count (a non-float leaf) switches: the loss is smooth there.
    gates = jnp.full((S, CACHED), 0.7, jnp.float32)
    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one program for every call below
    value, grad = value_and_grad(gates)
    assert grad.shape == (S, CACHED) and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0
    # A step against the gradient lowers the loss (towards computing: the uncached target).
    lower, _ = value_and_grad(gates - 0.05 * grad / jnp.max(jnp.abs(grad)))
    assert float(lower) < float(value)
    # The gradient is the loss's slope: a central difference along it agrees.
    step = 1e-2 * grad / jnp.linalg.norm(grad)
    slope = (value_and_grad(gates + step)[0] - value_and_grad(gates - step)[0]) / 2
    np.testing.assert_allclose(float(slope), float(jnp.vdot(grad, step)), rtol=2e-2)


# ---------------------------------------------------------------------------- the program
def _lower(policy, steps=S, reuse=None):
    plan, params = _layout("single")
    noise, cond, uncond = toy_networks.inputs(2)
    return jc.lower(plan, plan.split(params), noise, cond, uncond=uncond, guidance_scale=2.0,
                    solver=EULER, num_steps=steps, policy=policy, reuse=reuse)


def _interval_like(steps):
    """Layers 0-1 every step, 2 every 2nd, 3 every 4th: an interval plan per layer."""
    index = np.arange(steps)[:, None]
    return jc.LayerMaskPolicy(index % np.array([1, 1, 2, 4]) == 0)


@pytest.mark.parametrize("policy", ["mask", "gates"])
def test_no_decision_and_no_host_round_trip(policy):
    policy = {"mask": _interval_like(S),
              "gates": jc.LayerGates(np.full((S, CACHED), 0.5, np.float32))}[policy]
    lowered = _lower(policy, reuse=jc.TaylorForecast(1))
    compiled = lowered.compile().as_text()
    assert host_round_trips(lowered.as_text()) == [] and host_round_trips(compiled) == []
    assert runtime_decisions(compiled) == []


def test_the_program_does_not_grow_with_the_step_count():
    # 13 and 97 steps end on the same partial period (4) of the interval-like plan.
    sizes = {steps: normalized_size(_lower(_interval_like(steps), steps).as_text())
             for steps in (13, 97)}
    assert sizes[13] == sizes[97], sizes


def test_new_inputs_and_new_gates_do_not_recompile():
    network, params = toy_networks.single_stream()
    counted, traces = toy_networks.trace_counted(network)
    plan = jc.CachePlan(counted, CACHED, first_layers=FIRST)
    seg = plan.split(params)
    for policy in (jc.LayerMaskPolicy(_mixed(S, CACHED)),
                   jc.LayerGates(np.full((S, CACHED), 0.3, np.float32))):
        counts = []
        for seed in range(3):
            noise, cond, _ = toy_networks.inputs(2, seed=seed)
            if isinstance(policy, jc.LayerGates):  # new gate values each call
                policy = jc.LayerGates(np.full((S, CACHED), 0.3 * seed, np.float32))
            jc.sample(plan, seg, noise, cond, solver=EULER, num_steps=S, policy=policy)
            counts.append(len(traces))
        assert counts[0] > 0 and counts[0] == counts[1] == counts[2], counts
        traces.clear()


# ------------------------------------------------------------------------------ bad input
def test_bad_masks_and_gates_raise_clear_errors():
    plan, params = _layout("single")
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)

    def sample(policy, steps=S, solver=EULER, reuse=None):
        return jc.sample(plan, seg, noise, cond, solver=solver, num_steps=steps, policy=policy,
                         reuse=reuse)

    with pytest.raises(TypeError, match="string"):
        jc.LayerMaskPolicy("TTFF")
    with pytest.raises(TypeError, match=r"row 0 must be a sequence"):
        jc.LayerMaskPolicy(["TF", "FT"])
    with pytest.raises(ValueError, match="empty"):
        jc.LayerMaskPolicy([])
    with pytest.raises(ValueError, match="empty rows"):
        jc.LayerMaskPolicy([[], []])
    with pytest.raises(ValueError, match=r"ragged: its rows have \[2, 3\]"):
        jc.LayerMaskPolicy([[True, False], [True, False, True]])
    with pytest.raises(TypeError, match=r"0.5 of type float at \[1\]\[0\].*LayerGates"):
        jc.LayerMaskPolicy([[True, False], [0.5, True]])
    with pytest.raises(TypeError, match="dtype float32"):
        jc.LayerMaskPolicy(np.ones((S, CACHED), np.float32))
    with pytest.raises(ValueError, match="must be 2-D"):
        jc.LayerMaskPolicy(np.ones(S, bool))
    assert jc.LayerMaskPolicy(np.eye(2, dtype=int)).mask == ((True, False), (False, True))
    with pytest.raises(ValueError, match=r"shape \(8, 3\).*\(evaluations, cached_layers\) = "
                                          r"\(8, 4\).*layers \[1, 5\)"):
        sample(jc.LayerMaskPolicy(np.ones((S, 3), bool)))
    with pytest.raises(ValueError, match=r"shape \(8, 4\).*= \(6, 4\)"):
        sample(jc.LayerMaskPolicy(np.ones((S, CACHED), bool)), steps=6)
    with pytest.raises(ValueError, match=r"\(15, 4\).*FlowMatchHeun makes 15 in 8 steps"):
        sample(jc.LayerMaskPolicy(np.ones((S, CACHED), bool)), solver=jc.FlowMatchHeun())
    with pytest.raises(ValueError, match=r"in \[0, 1\]: 1 of 32 do not, the first 1.5 at "
                                          r"\[step, layer\] = \[2, 1\]"):
        jc.LayerGates(_with(2, 1, 1.5))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        jc.LayerGates(np.full((S, CACHED), -0.1, np.float32))
    with pytest.raises(TypeError, match="bool plan use LayerMaskPolicy"):
        jc.LayerGates(np.ones((S, CACHED), bool))
    with pytest.raises(ValueError, match=r"LayerGates.gates has shape \(6, 4\)"):
        sample(jc.LayerGates(np.ones((6, CACHED), np.float32)))
    # A per-layer plan never runs as a per-step one.
    with pytest.raises(ValueError, match="decides per \\(step, layer\\)"):
        sample(jc.OnDevice(jc.LayerMaskPolicy(np.ones((S, CACHED), bool))))
    # A forecast needs what it stores, per run of layers that it reuses.
    sparse = np.ones((S, CACHED), bool)
    sparse[1:, 3] = False
    with pytest.raises(ValueError, match=r"refreshes only 1 times.*body layers \[3, 4\)"):
        sample(jc.LayerMaskPolicy(sparse), reuse=jc.TaylorForecast(1))


def _with(step, layer, value):
    gates = np.zeros((S, CACHED), np.float32)
    gates[step, layer] = value
    return gates
