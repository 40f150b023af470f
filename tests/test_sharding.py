"""Cached sampling sharded over 8 devices equals one device (docs/sharding.md).

The test process has one device, and JAX fixes its device count when it starts, so the sharded
checks run in one subprocess for this module (tests/sharding_checks.py, 8 simulated CPU
devices), which prints a JSON result per check; the tests below assert on them. What needs no
mesh (arguments refused, the helpers on one device) runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc
from jaxcache.policies.signals import relative_l1, sequence_axes
from jaxcache.sharding import collectives, manual_axes, param_specs, traffic, vary

import toy_networks

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = {"interval", "on_device", "step_mask", "first_block", "dbcache", "teacache"}
STATIC = {"interval", "step_mask"}
MODES = {"output", "residual", "taylor", "hermite", "fitted"}
TOLERANCE = 1e-5  # relative to the sample's largest value


@pytest.fixture(scope="module")
def checks():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(HERE, "sharding_checks.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines()
             if line.startswith("SHARDING_CHECKS_JSON=")]
    if done.returncode or not lines:
        pytest.fail(f"tests/sharding_checks.py failed (exit {done.returncode}):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    results = json.loads(lines[-1].split("=", 1)[1])
    results["_meta"]["wall_seconds"] = round(wall, 1)
    print(f"sharding checks: {wall:.1f} s in the subprocess")
    return results


def _get(checks, name):
    result = checks[name]
    assert "error" not in result, f"{name} raised:\n{result['error']}"
    return result


def _cases(checks, prefix):
    return {name: _get(checks, name) for name in checks if name.startswith(prefix + "/")}


def test_the_checks_ran_on_eight_devices(checks):
    meta = checks["_meta"]
    assert meta["devices"] == 8, meta
    errors = {k: v["error"] for k, v in checks.items() if "error" in v}
    assert not errors, "\n\n".join(f"{k}:\n{v}" for k, v in errors.items())


@pytest.mark.parametrize("setting", ["jit", "shard_map_data", "shard_map_seq"])
def test_every_policy_and_mode_equals_one_device(checks, setting):
    cases = _cases(checks, setting)
    seen_policies = {name.split("/")[1] for name in cases}
    seen_modes = {name.split("/")[2] for name in cases}
    assert seen_policies == POLICIES and seen_modes == MODES, (seen_policies, seen_modes)
    assert {name.split("/")[3] for name in cases} == {"guided", "plain"}
    for name, result in cases.items():
        assert result["rel_diff"] < TOLERANCE, (name, result["rel_diff"])
        assert result["body_computed_equal"], name
        assert result["host_round_trips"] == [], (name, result["host_round_trips"])


def test_signal_policies_both_skip_and_compute(checks):
    # Otherwise equality would hold trivially: every signal-driven case takes both branches.
    for name, result in checks.items():
        if name.split("/")[0] in {"jit", "shard_map_data", "shard_map_seq"} and \
                name.split("/")[1] in POLICIES - STATIC - {"on_device"}:
            assert 0 < result["computed"] < result["decisions"], (name, result)


@pytest.mark.parametrize("name", [
    "shard_map_seq_unchecked/first_block/residual/plain",
    "shard_map_toy/first_block/taylor/plain",
    "shard_map_solver/dpm_2m/hermite",
    "jit_tokens/first_block/output/guided",
    "params/teacache/hermite/guided",
    "params/interval/output/plain",
    "flux_layout/dbcache/residual/guided",
])
def test_more_settings_equal_one_device(checks, name):
    result = _get(checks, name)
    assert result["rel_diff"] < TOLERANCE, result["rel_diff"]
    assert result.get("body_computed_equal", True)


def test_parameters_split_over_a_model_axis(checks):
    result = _get(checks, "params/teacache/hermite/guided")
    assert "P(None, None, 'model')" in result["weight_specs"], result["weight_specs"]
    assert result["host_round_trips"] == []
    # XLA gathers the split features for the next matrix product, inside the loop.
    assert any(c["op"] == "all-gather" and c["in_loop"] for c in result["collectives"])


def test_a_sequence_split_under_jit_keeps_its_sharding(checks):
    result = _get(checks, "jit_tokens/first_block/output/guided")
    assert result["sample_spec"] == "P('data', 'seq')"
    assert result["host_round_trips"] == []


def test_jit_returns_caches_split_over_the_batch(checks):
    for name, result in _cases(checks, "jit").items():
        leaves = result["cache_leaves"]
        assert leaves, name
        assert all(leaf["axis"] == "data" for leaf in leaves), (name, leaves)
        assert result["sample_spec"] == "P('data',)", name


def test_data_parallel_shard_map_has_no_collectives(checks):
    for name, result in _cases(checks, "shard_map_data").items():
        assert result["manual_axes"] == ["data"]
        assert result["collectives"] == [], (name, result["collectives"])


def test_data_parallel_jit_communicates_only_the_batch_wide_decision(checks):
    static = _get(checks, "jit_collectives/interval")
    assert static["collectives"] == [] and not static["decides"]
    for name, result in _cases(checks, "jit").items():
        if name.endswith("/plain"):
            found = [(c["op"], c["source"], c["in_loop"]) for c in result["collectives"]]
            if name.split("/")[1] in STATIC:
                assert found == [], (name, found)
            else:  # any row computes -> the body runs: one all-reduce of a predicate per step
                assert found == [("all-reduce", "reduce_or", True)], (name, found)
                assert result["collectives"][0]["bytes"] <= 2
                assert result["decides"]
        else:
            # Guidance runs both branches as one batch: jit's propagation moves rows between
            # devices to concatenate the branches and to split the prediction, every step
            # (all-to-all and collective-permutes of sample-sized blocks); the only reduction
            # is the batch-wide decision's predicate. (Which JAX operation XLA's metadata
            # names for a permute differs between versions: the ops are checked.)
            for c in result["collectives"]:
                if c["in_loop"]:
                    assert c["op"] in {"all-to-all", "collective-permute", "all-reduce"}, (name, c)
                    if c["op"] == "all-reduce":
                        assert c["source"] == "reduce_or" and c["bytes"] <= 2, (name, c)


def test_sequence_parallel_collectives_are_the_layers_the_signal_and_the_branch(checks):
    for name, result in _cases(checks, "shard_map_seq").items():
        policy = name.split("/")[1]
        ops = {c["op"] for c in result["collectives"]}
        assert ops == {"all-reduce"}, (name, ops)
        branch = [c for c in result["collectives"] if c["source"] == "pmax"]
        if policy in STATIC:
            assert branch == [], name
        else:  # one pmax of the body's trip count per step, 4 bytes
            assert len(branch) == 1 and branch[0]["in_loop"] and branch[0]["bytes"] == 4, name
        others = {c["source"] for c in result["collectives"] if c["source"] != "pmax"}
        assert others <= {"psum_invariant", "pmean", "psum"}, (name, others)


def test_devices_whose_local_signals_disagree_take_the_same_branch(checks):
    result = _get(checks, "sequence_axis/local_signals_disagree")
    assert result["local_decisions_differ"], result  # decided locally, they would differ
    assert result["wholes_agree"] and result["whole_matches_single"], result
    assert result["devices_agree"] and result["body_computed_equal"], result
    assert result["rel_diff"] < TOLERANCE
    would = result["local_step1_would_compute"]
    assert any(would) and not all(would)
    assert result["step1_computed"][0] == (result["single_change_row0"] >= result["threshold"])


def test_an_ancestral_solver_draws_its_own_noise_on_each_device(checks):
    result = _get(checks, "shard_map_solver/ancestral_draws_per_device")
    assert result["distinct_rows"] == 8 and result["finite"]


def test_sizes_the_mesh_does_not_divide_are_named(checks):
    result = _get(checks, "errors/sizes")
    assert "batch is 6" in result["batch"] and "'data' (8)" in result["batch"], result["batch"]
    assert "token count is 10" in result["tokens"] and "'seq' (4)" in result["tokens"]
    # JAX's own refusals (jit in_shardings, shard_map in_specs) are ValueErrors with the sizes.
    assert "6" in result["jax_jit"] and "8" in result["jax_jit"], result["jax_jit"]
    assert "divisible" in result["jax_shard_map"], result["jax_shard_map"]


def test_the_example_runs_and_matches_one_device(checks):
    result = _get(checks, "example")
    assert len([k for k in result if k != "seconds"]) == 3
    for name, entry in result.items():
        if name != "seconds":
            assert entry["max_diff"] < 1e-4, (name, entry)


# ------------------------------------------------------------------- no mesh needed
def _toy_plan():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan.around(network, toy_networks.LAYERS, first=1)
    return plan, plan.split(params)


def test_sequence_axis_outside_shard_map_is_refused_while_tracing():
    plan, seg = _toy_plan()
    noise, cond, _ = toy_networks.inputs(2)
    with pytest.raises(ValueError, match="shard_map") as info:
        jc.sample(plan, seg, noise, cond, solver=jc.FlowMatchEuler(), num_steps=3,
                  policy=jc.FirstBlockPolicy(0.1), sequence_axis="seq")
    assert "'seq'" in str(info.value) and "drop sequence_axis" in str(info.value)


@pytest.mark.parametrize("bad", [3, ("seq", 3), (), ["seq", "seq"]])
def test_sequence_axis_must_name_axes(bad):
    plan, seg = _toy_plan()
    noise, cond, _ = toy_networks.inputs(2)
    with pytest.raises((TypeError, ValueError), match="sequence_axis"):
        jc.lower(plan, seg, noise, cond, solver=jc.FlowMatchEuler(), num_steps=3,
                 policy=jc.FirstBlockPolicy(0.1), sequence_axis=bad)


def test_outside_shard_map_nothing_is_cast():
    tree = {"a": jnp.zeros(3), "b": None}
    assert vary(tree, ()) is tree
    assert manual_axes(jnp.zeros(3)) == ()


def test_relative_l1_reduces_only_where_asked():
    a, b = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    plain = relative_l1(a, b)
    with sequence_axes(None):
        assert jnp.array_equal(relative_l1(a, b), plain)
    with sequence_axes("seq"):  # a reduction over an unbound axis must be asked for
        with pytest.raises(NameError):
            jax.jit(relative_l1)(a, b)
    assert jnp.array_equal(relative_l1(a, b, axis_name=()), plain)


def test_one_device_programs_have_no_collectives():
    plan, seg = _toy_plan()
    noise, cond, uncond = toy_networks.inputs(2)
    text = jc.lower(plan, seg, noise, cond, solver=jc.FlowMatchEuler(), num_steps=4,
                    policy=jc.FirstBlockPolicy(0.1), uncond=uncond,
                    guidance_scale=2.0).compile().as_text()
    assert collectives(text) == []
    assert traffic(text, 4) == {"per_step": {}, "once": {}}


def test_param_specs_split_matrices_on_their_last_dimension():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    specs = param_specs({"w": jnp.zeros((3, 4, 8)), "b": jnp.zeros((8,))}, mesh, "model")
    assert specs["w"] == jax.sharding.PartitionSpec(None, None, "model")
    assert specs["b"] == jax.sharding.PartitionSpec()
