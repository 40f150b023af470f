"""The compiled sampler's program: no host round trips, no decisions for known schedules, a size
that does not grow with the step count, no recompiles for new policy settings."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jaxcache as jc
from jaxcache.evaluation.program import host_round_trips, normalized_size, runtime_decisions

import toy_networks

DEPTH = toy_networks.LAYERS


def _network():
    network, params = toy_networks.single_stream()
    # The toy layer's own modulated input, so TeaCache has its signal.
    network = jc.Network(
        network.condition, network.embed, network.layer, network.final,
        modulated_input=lambda p, h, t: h @ p["w"] + t[:, None] * p["b"],
    )
    return network, params


def _plans(network):
    return {
        "interval": jc.CachePlan(network, 3),
        "mask": jc.CachePlan(network, 3),
        "on_device": jc.CachePlan(network, 3),
        "first_block": jc.CachePlan.around(network, DEPTH, first=1),
        "teacache": jc.CachePlan(network, DEPTH),
        "dbcache": jc.CachePlan.around(network, DEPTH, first=2, last=1),
    }


def _policy(name, steps):
    return {
        "interval": lambda: jc.IntervalPolicy(3),
        "mask": lambda: jc.StepMaskPolicy(tuple(s % 4 in (0, 1) for s in range(steps))),
        "on_device": lambda: jc.OnDevice(jc.IntervalPolicy(3)),
        "first_block": lambda: jc.FirstBlockPolicy(0.1),
        "teacache": lambda: jc.TeaCachePolicy(0.1),
        "dbcache": lambda: jc.DBCachePolicy(0.1, warmup_steps=2),
    }[name]()


MODES = {
    "output": jc.OutputReuse(),
    "all_layers": jc.OutputReuse(all_layers=True),
    "residual": jc.ResidualReuse(),
    "taylor": jc.TaylorForecast(1),
    "hermite": jc.HermiteForecast(2),
}
POLICIES = ["interval", "mask", "on_device", "first_block", "teacache", "dbcache"]
MODES_CYCLE = sorted(MODES)
STATIC = {"interval", "mask"}


def _lower(policy_name, mode, steps=12, policy=None, guided=True, unrolled=False):
    network, params = _network()
    if unrolled:  # one weight array per layer, straight-line layer code
        network = dataclasses.replace(network, layer_unroll=True)
    plan = _plans(network)[policy_name]
    noise, cond, uncond = toy_networks.inputs(2)
    kwargs = dict(uncond=uncond, guidance_scale=2.0) if guided else {}
    return jc.lower(
        plan, plan.split(params), noise, cond, solver=jc.FlowMatchEuler(), num_steps=steps,
        policy=policy or _policy(policy_name, steps), reuse=mode, **kwargs,
    )


# Every policy with one mode, and every mode with a known and a device-decided policy.
CASES = sorted(
    {(policy, MODES_CYCLE[i % len(MODES_CYCLE)]) for i, policy in enumerate(POLICIES)}
    | {(policy, mode) for policy in ("interval", "first_block") for mode in MODES}
)


@pytest.mark.parametrize("policy, mode", CASES)
def test_no_host_round_trip_and_decisions_only_where_needed(policy, mode):
    lowered = _lower(policy, MODES[mode])
    assert host_round_trips(lowered.as_text()) == []
    compiled = lowered.compile().as_text()
    assert host_round_trips(compiled) == []
    decisions = runtime_decisions(compiled)
    if policy in STATIC:
        # A schedule known before sampling compiles to straight-line groups.
        assert decisions == [], decisions
    else:
        assert decisions, "a device-decided policy must decide in the program"


@pytest.mark.parametrize("policy, mode", [("interval", "taylor"), ("teacache", "output")])
def test_unrolled_layer_stacks_keep_the_program_checks(policy, mode):
    lowered = _lower(policy, MODES[mode], unrolled=True)
    compiled = lowered.compile().as_text()
    assert host_round_trips(lowered.as_text()) == [] and host_round_trips(compiled) == []
    assert (runtime_decisions(compiled) == []) == (policy in STATIC)
    sizes = {steps: normalized_size(_lower(policy, MODES[mode], steps, unrolled=True).as_text())
             for steps in (13, 97)}
    assert sizes[13] == sizes[97], sizes


def test_the_host_check_catches_a_planted_callback():
    class Chatty(jc.IntervalPolicy):
        def decide(self, state, step, signal):
            jax.debug.callback(lambda s: None, step)
            return super().decide(state, step, signal)

    jax.tree_util.register_dataclass(Chatty, data_fields=[], meta_fields=["interval"])
    lowered = _lower("on_device", jc.OutputReuse(), policy=jc.OnDevice(Chatty(3)))
    found = host_round_trips(lowered.as_text())
    assert found and "callback" in found[0]


def test_the_decision_check_catches_a_bypassed_fast_path(monkeypatch):
    # With the known schedule hidden, the interval policy falls back to per-step decisions:
    # the check that guards the fast path must notice.
    assert runtime_decisions(_lower("interval", jc.TaylorForecast(1)).compile().as_text()) == []
    monkeypatch.setattr(jc.IntervalPolicy, "static_schedule", lambda self, n: None)
    assert runtime_decisions(_lower("interval", jc.TaylorForecast(1)).compile().as_text())


@pytest.mark.parametrize(
    "policy, mode",
    [("interval", "output"), ("mask", "taylor"), ("first_block", "taylor"),
     ("teacache", "output")],
)
def test_program_size_does_not_grow_with_steps(policy, mode):
    # 13 and 97 steps end on the same partial group of the interval (3) and the mask (4).
    sizes = {steps: normalized_size(_lower(policy, MODES[mode], steps).as_text())
             for steps in (13, 97)}
    assert sizes[13] == sizes[97], sizes


@pytest.mark.parametrize(
    "make",
    [
        lambda v: jc.FirstBlockPolicy(v),
        lambda v: jc.TeaCachePolicy(v, coefficients=(v, 1.0, 0.0)),
        lambda v: jc.DBCachePolicy(v, warmup_steps=int(10 * v), max_cached_steps=int(20 * v)),
    ],
    ids=["first_block", "teacache", "dbcache"],
)
def test_new_thresholds_do_not_recompile(make):
    network, params = _network()
    counted, traces = toy_networks.trace_counted(network)
    policy = make(0.1)
    plan = {"FirstBlockPolicy": jc.CachePlan.around(counted, DEPTH, first=1),
            "TeaCachePolicy": jc.CachePlan(counted, DEPTH),
            "DBCachePolicy": jc.CachePlan.around(counted, DEPTH, first=2)}[type(policy).__name__]
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    outs = []
    for value in (0.1, 0.2, 0.4):
        outs.append(jc.sample(plan, seg, noise, cond, solver=jc.FlowMatchEuler(), num_steps=10,
                              policy=make(value), reuse=jc.TaylorForecast(1)))
        if value == 0.1:
            first = len(traces)
    assert first > 0 and len(traces) == first, "a new threshold retraced the program"
    # ... and the thresholds did act: higher thresholds skip more.
    computed = [int(jnp.sum(o.body_computed)) for o in outs]
    assert computed[0] >= computed[1] >= computed[2] and computed[0] > computed[2], computed
