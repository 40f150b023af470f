"""The tuning layer (jaxcache.tuning): settings fitted to a model with the sampler itself.

* ``threshold_for``: a signal policy's threshold for a target fraction of computed steps or a
  layer budget, within one step of the target, by bisection on one compiled program (traces
  counted).
* ``sample(..., record=...)``: the per-step changes of the policy's signal and of the network's
  prediction, checked against a plain Python loop over the network's pieces, and against the
  policy's own decisions; opt in, leaving the sample as it was.
* TeaCache's calibration, now one recorded ``sample`` run: the same pairs as the hand-written
  loop it replaced (numbers recorded from that implementation), guided, on a two-stage solver,
  and against an independent Python loop.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc
from jaxcache import tuning

import toy_networks

DEPTH = toy_networks.LAYERS
SOLVER = jc.FlowMatchEuler(shift=3.0)
STEPS = 12
SCALE = 3.0


def _network():
    network, params = toy_networks.single_stream()
    network = jc.Network(
        network.condition, network.embed, network.layer, network.final,
        modulated_input=lambda p, h, t: h @ p["w"] + t[:, None] * p["b"],
    )
    return network, params


def _plan(network, policy):
    if isinstance(policy, jc.FirstBlockPolicy):
        return jc.CachePlan.around(network, DEPTH, first=1)
    return jc.CachePlan(network, DEPTH)


def _rel_l1(current, previous):
    """Per-row ``mean|current - previous| / mean|previous|``, float64, written out anew."""
    current = np.asarray(current, np.float64).reshape(len(current), -1)
    previous = np.asarray(previous, np.float64).reshape(len(previous), -1)
    scale = np.maximum(np.mean(np.abs(previous), axis=1), 1e-12)
    return np.mean(np.abs(current - previous), axis=1) / scale


def _layer_params(params, i):
    return jax.tree.map(lambda a: a[i], params.layers)


# ------------------------------------------------------------------------ the calibration run
TUNING_FUNCTIONS = ("fit_forecast", "calibrate_teacache", "teacache_calibration_data",
                    "threshold_for", "calibrate_magcache", "measure_segments", "refine_schedule",
                    "train_router", "calibrate_sencache")


@pytest.mark.parametrize("name", TUNING_FUNCTIONS)
def test_every_tuning_function_takes_the_sampling_arguments_first(name):
    # One block, as jaxcache.sample's, then the function's own keywords (its signature for
    # help() and editors says so); an option it does not have is refused by name.
    import inspect

    function = getattr(tuning, name)
    parameters = inspect.signature(function).parameters
    assert list(parameters)[:9] == ["plan", "params", "noise", "cond", "solver", "num_steps",
                                    "uncond", "guidance_scale", "key"]
    assert all(p.kind is p.KEYWORD_ONLY for p in list(parameters.values())[4:])
    assert function.on_run.__name__ == name
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    noise, cond, _ = toy_networks.inputs(2)
    with pytest.raises(TypeError, match=f"{name}.*unexpected keyword argument 'bogus'"):
        function(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                 bogus=1)


def test_the_run_samples_as_sample_does():
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(2)
    run = tuning.CalibrationRun(plan, seg, noise, cond, SOLVER, STEPS, uncond, SCALE)
    assert run.evaluations == STEPS
    got = run.sample(policy=jc.IntervalPolicy(2)).sample
    want = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, uncond=uncond,
                     guidance_scale=SCALE, policy=jc.IntervalPolicy(2)).sample
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------------ threshold search
@pytest.mark.parametrize("policy", [jc.TeaCachePolicy(0.1), jc.FirstBlockPolicy(0.1)],
                         ids=["teacache", "first_block"])
def test_threshold_search_hits_the_target_within_one_step_without_recompiling(policy):
    network, params = _network()
    counted, traces = toy_networks.trace_counted(network)
    plan = _plan(counted, policy)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(3)
    common = dict(solver=SOLVER, num_steps=STEPS, reuse=jc.ResidualReuse(), uncond=uncond,
                  guidance_scale=SCALE)
    jc.sample(plan, seg, noise, cond, policy=policy, **common)  # compiles the program once
    compiled = len(traces)
    assert compiled > 0
    probes = 0
    for target in (0.75, 0.5, 0.35):
        found = tuning.threshold_for(plan, seg, noise, cond, policy=policy,
                                     target_fraction=target, **common)
        assert target - 1 / STEPS <= found.fraction <= target, (target, found)
        probes += len(found.probes)
        # The chosen policy reproduces the fraction, and the counts agree with the sampler's.
        out = jc.sample(plan, seg, noise, cond, policy=found.policy, **common)
        assert float(np.mean(np.asarray(out.refreshed))) == found.fraction
        assert found.layer_evaluations == int(out.layer_evaluations)
        assert found.policy == dataclasses.replace(policy, threshold=found.threshold)
    assert probes > 9
    assert len(traces) == compiled, "a probe's threshold recompiled the program"


def test_a_fresh_search_compiles_one_program():
    network, params = _network()
    single, single_traces = toy_networks.trace_counted(network)
    searched, search_traces = toy_networks.trace_counted(network)
    noise, cond, _ = toy_networks.inputs(2)
    policy = jc.TeaCachePolicy(0.2)
    common = dict(solver=SOLVER, num_steps=STEPS)
    plan = jc.CachePlan(single, DEPTH)
    jc.sample(plan, plan.split(params), noise, cond, policy=policy, **common)
    plan = jc.CachePlan(searched, DEPTH)
    found = tuning.threshold_for(plan, plan.split(params), noise, cond, policy=policy,
                                 target_fraction=0.5, **common)
    assert len(found.probes) >= 3
    assert len(search_traces) == len(single_traces) > 0


def test_layer_budgets_per_batch_and_per_sample():
    network, params = _network()
    policy = jc.FirstBlockPolicy(0.1)
    plan = _plan(network, policy)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(3)
    common = dict(policy=policy, solver=SOLVER, num_steps=STEPS, reuse=jc.ResidualReuse(),
                  uncond=uncond, guidance_scale=SCALE)
    full = STEPS * DEPTH
    body = plan.cached_layers  # one more computed step costs the body's layers
    for per_sample in (False, True):
        budget = 0.6 * full
        found = tuning.threshold_for(plan, seg, noise, cond, layer_budget=budget,
                                     per_sample=per_sample, **common)
        assert budget - body <= found.layer_evaluations <= budget, found
        out = jc.sample(plan, seg, noise, cond, **dict(common, policy=found.policy))
        computed = out.body_computed if per_sample else out.refreshed
        fraction = float(np.mean(np.asarray(computed)))
        assert fraction == found.fraction
        assert found.layer_evaluations == pytest.approx(
            STEPS * (DEPTH - body) + fraction * STEPS * body)
    # A budget at or above full compute is met at threshold 0.
    found = tuning.threshold_for(plan, seg, noise, cond, layer_budget=2 * full, **common)
    assert (found.threshold, found.fraction, found.layer_evaluations) == (0.0, 1.0, full)


def test_sencache_tolerance_is_searched_and_counts_the_whole_network():
    # SenCache's knob is its tolerance (the early one kept in the same ratio); a skip skips
    # every layer, the head's too, so the layer count is the fraction of all of them.
    network, params = _network()
    plan = jc.CachePlan.around(network, DEPTH, first=1)  # a head: a skip skips it as well
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(3)
    policy = jc.SenCachePolicy(0.1, early_tolerance=0.05, max_skips=STEPS)
    common = dict(solver=SOLVER, num_steps=STEPS, uncond=uncond, guidance_scale=SCALE)
    found = tuning.threshold_for(plan, seg, noise, cond, policy=policy, target_fraction=0.5,
                                 **common)
    assert 0.5 - 1 / STEPS <= found.fraction <= 0.5, found
    assert found.policy.tolerance == found.threshold > 0
    assert found.policy.early_tolerance == pytest.approx(found.threshold / 2)
    out = jc.sample(plan, seg, noise, cond, policy=found.policy, **common)
    assert float(np.mean(np.asarray(out.refreshed))) == found.fraction
    assert found.layer_evaluations == int(out.layer_evaluations) == round(
        found.fraction * STEPS * DEPTH)


def test_threshold_search_refuses_what_cannot_work():
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    common = dict(solver=SOLVER, num_steps=STEPS)
    with pytest.raises(ValueError, match="known before sampling"):
        tuning.threshold_for(plan, seg, noise, cond, policy=jc.IntervalPolicy(2),
                             target_fraction=0.5, **common)
    with pytest.raises(TypeError, match="has none"):
        tuning.threshold_for(plan, seg, noise, cond, policy=jc.OnDevice(jc.IntervalPolicy(2)),
                             target_fraction=0.5, **common)
    policy = jc.TeaCachePolicy(0.1)
    with pytest.raises(ValueError, match="one of target_fraction= and layer_budget="):
        tuning.threshold_for(plan, seg, noise, cond, policy=policy, **common)
    with pytest.raises(ValueError, match="one of"):
        tuning.threshold_for(plan, seg, noise, cond, policy=policy, target_fraction=0.5,
                             layer_budget=10, **common)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="target_fraction must be in"):
            tuning.threshold_for(plan, seg, noise, cond, policy=policy, target_fraction=bad,
                                 **common)
    with pytest.raises(ValueError, match="leaves nothing for the body"):
        tuning.threshold_for(jc.CachePlan(network, 3), jc.CachePlan(network, 3).split(params),
                             noise, cond, policy=policy, layer_budget=STEPS * 3, **common)
    with pytest.raises(ValueError, match="caches no layer"):
        tuning.threshold_for(jc.CachePlan(network, 0), jc.CachePlan(network, 0).split(params),
                             noise, cond, policy=policy, target_fraction=0.5, **common)
    # TeaCache always computes its first and last step: 1 / 12 is out of reach.
    with pytest.raises(ValueError, match="least fraction reached is 0.1667"):
        tuning.threshold_for(plan, seg, noise, cond, policy=policy, target_fraction=1 / STEPS,
                             **common)


# ------------------------------------------------------------------------ recorded signals
def _hand_changes(noise, cond, uncond, scale, solver=SOLVER, steps=STEPS):
    """Per evaluation and row, by a Python loop over the network's pieces (uncached, guided):
    the change of the modulated input, of the first block's residual and of the prediction."""
    network, params = _network()
    pieces = [jax.jit(f) for f in (network.condition, network.embed, network.layer,
                                   network.final, network.modulated_input)]
    condition, embed, layer, final, modulated_input = pieces
    times, next_times = solver.times(steps)
    constant = condition(params.condition, jnp.concatenate([cond, uncond]))
    x, state = noise, solver.init_state(noise)
    changes = {"modulated": [], "residual": [], "output": []}
    previous = {}
    for i in range(len(times)):
        rows = jnp.concatenate([x, x])
        t = jnp.full((rows.shape[0],), times[i], jnp.float32)
        embedded, ctx = embed(params.embed, rows, t, constant)
        h = layer(_layer_params(params, 0), embedded, ctx)
        values = {"modulated": modulated_input(_layer_params(params, 0), embedded, ctx),
                  "residual": np.asarray(h, np.float64) - np.asarray(embedded, np.float64)}
        for j in range(1, DEPTH):
            h = layer(_layer_params(params, j), h, ctx)
        values["output"] = out = final(params.final, h, ctx)
        for name, value in values.items():
            changes[name].append(np.full(len(rows), np.nan) if i == 0
                                 else _rel_l1(value, previous[name]))
        previous = values
        positive, negative = jnp.split(out, 2)
        x, state = solver.advance(state, x, negative + scale * (positive - negative), times[i],
                                  next_times[i], index=i)
    return {name: np.stack(v) for name, v in changes.items()}, np.asarray(x)


@pytest.mark.parametrize("policy", [jc.TeaCachePolicy(0.0), jc.FirstBlockPolicy(0.0)],
                         ids=["teacache", "first_block"])
def test_recorded_signals_are_the_policy_measure_on_a_python_loop(policy):
    network, params = _network()
    plan = _plan(network, policy)
    noise, cond, uncond = toy_networks.inputs(3)
    out = jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                    policy=policy, uncond=uncond, guidance_scale=SCALE,
                    record=("signal", "output_change"))
    want, final_x = _hand_changes(noise, cond, uncond, SCALE)
    kind = "modulated" if isinstance(policy, jc.TeaCachePolicy) else "residual"
    assert out.signals.shape == out.output_changes.shape == (STEPS, 6)
    assert out.signals.dtype == jnp.float32
    assert np.all(np.isnan(out.signals[0])) and np.all(np.isnan(out.output_changes[0]))
    np.testing.assert_allclose(out.signals[1:], want[kind][1:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.output_changes[1:], want["output"][1:], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.sample), final_x, rtol=1e-4, atol=1e-5)


def test_recorded_signals_drive_the_policy_decisions():
    # With skips, TeaCache's decisions follow from the recorded signals alone: accumulate the
    # rescaled change, compute at the first and last step and when the sum reaches the
    # threshold (which resets it).
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    noise, cond, uncond = toy_networks.inputs(3)
    policy = jc.TeaCachePolicy(0.6, coefficients=(0.5, 1.0, 0.0))
    out = jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                    policy=policy, reuse=jc.ResidualReuse(), uncond=uncond,
                    guidance_scale=SCALE, record=("signal",))
    assert out.output_changes is None
    signals = np.asarray(out.signals, np.float64)
    computed = np.asarray(out.body_computed).reshape(STEPS, -1)
    want = np.zeros_like(computed)
    accumulated = np.zeros(computed.shape[1])
    for i in range(STEPS):
        if i:
            accumulated += np.polyval(policy.coefficients, signals[i])
        refresh = (i in (0, STEPS - 1)) | ~(accumulated < policy.threshold)
        want[i] = refresh
        accumulated = np.where(refresh, 0.0, accumulated)
    assert 0 < want.sum() < want.size  # it did skip
    np.testing.assert_array_equal(computed, want)


@pytest.mark.parametrize("policy", [None, jc.IntervalPolicy(3), jc.FirstBlockPolicy(0.2)],
                         ids=["uncached", "interval", "first_block"])
def test_recording_is_opt_in_and_leaves_the_sample_alone(policy):
    network, params = _network()
    plan = _plan(network, policy)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(2)
    common = dict(solver=SOLVER, num_steps=STEPS, policy=policy, uncond=uncond,
                  guidance_scale=SCALE)
    plain = jc.sample(plan, seg, noise, cond, **common)
    assert plain.signals is None and plain.output_changes is None
    recorded = jc.sample(plan, seg, noise, cond, record=("output_change",), **common)
    np.testing.assert_array_equal(np.asarray(recorded.sample), np.asarray(plain.sample))
    np.testing.assert_array_equal(np.asarray(recorded.body_computed),
                                  np.asarray(plain.body_computed))
    changes = np.asarray(recorded.output_changes)
    assert changes.shape == (STEPS, 4) and np.all(np.isnan(changes[0]))
    assert np.all(np.isfinite(changes[1:])) and np.all(changes[1:] >= 0)
    if policy is None:  # uncached: the hand loop's prediction changes
        want, _ = _hand_changes(noise, cond, uncond, SCALE)
        np.testing.assert_allclose(changes[1:], want["output"][1:], rtol=1e-4, atol=1e-6)
    # Recording changes the program only when asked.
    lowered = jc.lower(plan, seg, noise, cond, **common).as_text()
    assert jc.lower(plan, seg, noise, cond, record=(), **common).as_text() == lowered
    assert jc.lower(plan, seg, noise, cond, record=("output_change",), **common).as_text() \
        != lowered


def test_record_refuses_what_it_cannot_record():
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    common = dict(solver=SOLVER, num_steps=4)
    with pytest.raises(ValueError, match="policy=None reads none"):
        jc.sample(plan, seg, noise, cond, record=("signal",), **common)
    with pytest.raises(ValueError, match="IntervalPolicy reads none"):
        jc.sample(plan, seg, noise, cond, policy=jc.IntervalPolicy(2), record=("signal",),
                  **common)
    with pytest.raises(ValueError, match="unknown"):
        jc.sample(plan, seg, noise, cond, record=("signals",), **common)


# ------------------------------------------------------------------- TeaCache calibration
# Recorded from the implementation before jaxcache.tuning (its own scan over the network's
# pieces, jaxcache 0.2.0 at d22f94a): teacache_calibration_data on _network(), inputs(2),
# CachePlan(network, 6).
OLD_GUIDED_EULER = (  # FlowMatchEuler(shift=3.0), 5 steps, guidance 3.0: 4 rows x 4 steps
    [0.5371430516242981, 0.2856185734272003, 0.24852237105369568, 0.31780725717544556],
    [0.33324477076530457, 0.3152795732021332, 0.40503397583961487, 0.32557716965675354],
)
OLD_GUIDED_HEUN = (  # FlowMatchHeun(), 3 steps (5 evaluations), guidance 2.0
    [1.812773585319519, 1.0667020082473755, 0.8387243151664734, 1.1869173049926758],
    [0.7074713110923767, 0.8133938908576965, 0.7159777283668518, 0.8962709307670593],
)
# calibrate_teacache on inputs(4)[:2], FlowMatchEuler(shift=3.0), 8 steps, unguided.
OLD_COEFFICIENTS = (14.657520329305743, -24.79759452715897, 14.077339780983706,
                    -2.647989606830139, 0.2668250589749506)


@pytest.mark.parametrize(
    "solver, steps, scale, old",
    [(SOLVER, 5, 3.0, OLD_GUIDED_EULER), (jc.FlowMatchHeun(), 3, 2.0, OLD_GUIDED_HEUN)],
    ids=["euler", "heun"],
)
def test_calibration_on_the_sampler_gives_the_old_pairs(solver, steps, scale, old):
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    noise, cond, uncond = toy_networks.inputs(2)
    x, y = tuning.teacache_calibration_data(plan, plan.split(params), noise, cond,
                                            solver=solver, num_steps=steps, uncond=uncond,
                                            guidance_scale=scale)
    evaluations = len(solver.times(steps)[0])
    assert x.dtype == y.dtype == np.float64 and x.shape == y.shape == (4 * (evaluations - 1),)
    np.testing.assert_allclose(x[:4], old[0], rtol=1e-5)
    np.testing.assert_allclose(y[:4], old[1], rtol=1e-5)
    # ... and every pair is an independent loop's, evaluation-major, the conditional rows first.
    want, _ = _hand_changes(noise, cond, uncond, scale, solver=solver, steps=steps)
    np.testing.assert_allclose(x, want["modulated"][1:].ravel(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y, want["output"][1:].ravel(), rtol=1e-4, atol=1e-6)


def test_calibrate_teacache_keeps_its_coefficients():
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    noise, cond, _ = toy_networks.inputs(4)
    got = jc.calibrate_teacache(plan, plan.split(params), noise, cond, solver=SOLVER,
                                num_steps=8)
    np.testing.assert_allclose(got, OLD_COEFFICIENTS, rtol=1e-3)
    assert jc.calibrate_teacache is tuning.calibrate_teacache
    assert jc.fit_forecast is tuning.fit_forecast
