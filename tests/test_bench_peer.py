"""The bench times the JAX peer's caches: the Wan model, CFG-Cache, SenCache, per-step constants.

Tiny models, a few steps, one timed run each: the figures are not timings worth reading, only
checks that every option runs, reports sane fields and that each host loop computes what the
one-program run computes. Bad settings are refused before anything compiles.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib

import pytest

import jaxcache as jc
from jaxcache.evaluation import bench, loops
from jaxcache.evaluation.bench import BenchSettings, build_model, run_benchmark
from jaxcache.evaluation.named import named_plan, named_policy

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAN = dict(model="wan", size="tiny", steps=4, batch=1, guidance=5.0, repeats=1, hand_loop=False)


@functools.cache
def _wan():
    return build_model("wan", "tiny", "float32")


def _sane(r, cached=True):
    for key in ("uncached_s", "cached_s", "speedup", "efficiency"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    if cached:
        assert r["ideal_speedup"] >= 1.0, r["ideal_speedup"]


def test_wan_cfg_cache_on_the_interval_its_host_loop_and_the_text_keys_and_values_per_step():
    r = run_benchmark(BenchSettings(**WAN, interval=2, cached_layers=3, reuse="taylor",
                                    cfg_cache=3, host_loop=True, constants_per_step=True),
                      built=_wan())
    _sane(r)
    assert (r["model"], r["policy"], r["decide"], r["reuse"]) == ("wan", "interval", "static",
                                                                  "taylor")
    # Full steps at 0 and 3, refreshes at 0 and 2: step 2 refreshes the conditional rows alone.
    assert (r["cfg_cache"], r["cfg_warmup"], r["cfg_cache_steps"]) == (3, 1, 2)
    assert r["refreshes"] == 2 and r["layer_evaluations"] == 2 * 3
    assert r["ideal_speedup"] > 2.0, r["ideal_speedup"]
    # The peer's loop of jitted full and cache steps (known schedules) computes the same sample.
    assert r["host_loop_refreshes"] == 2 and r["host_loop_max_abs_diff"] < 1e-4
    assert math.isfinite(r["host_over_compiled"]) and r["host_over_compiled"] > 0
    # The port's layers project the text at every call: the same sample, its own time.
    assert r["per_step_constants_max_abs_diff"] < 1e-4
    assert math.isfinite(r["constants_once_speedup"]) and r["per_step_constants_s"] > 0
    assert "K/V per step" in bench._table(r) and "2 cache steps" in bench._table(r)


def test_cfg_cache_alone_and_its_host_loop():
    r = run_benchmark(BenchSettings(**WAN, policy="none", cfg_cache=2, host_loop=True),
                      built=_wan())  # its uncached program is the one above's
    _sane(r)
    assert (r["policy"], r["decide"], r["reuse"], r["threshold"]) == ("none", None, None, None)
    # Full steps at 0 and 2, the conditional branch alone at 1 and 3: half a guided step each.
    assert r["cfg_cache_steps"] == 2 and r["refresh_fraction"] == 1.0
    assert 1.2 < r["ideal_speedup"] < 1.34, r["ideal_speedup"]
    assert r["layer_evaluations"] == r["uncached_layer_evaluations"] == 4 * 3
    assert r["host_loop_refreshes"] == 4 and r["host_loop_max_abs_diff"] < 1e-4
    assert "no layer cache" in bench._table(r)


def test_sencache_tolerance_searched_and_decided_on_the_host():
    r = run_benchmark(BenchSettings(**{**WAN, "steps": 6}, policy="sencache",
                                    refresh_target=0.5, host_loop=True), built=_wan())
    _sane(r)
    assert (r["policy"], r["reuse"], r["decide"], r["cfg_cache_steps"]) == (
        "sencache", "output", "device", 0)
    # Two warm-up steps and the last always run; the tolerance found skips the three between.
    assert r["refresh_fraction"] == 0.5 and r["threshold"] > 0
    # A skip skips every layer; the warm-up probe (one more evaluation) is in the FLOPs.
    assert r["layer_evaluations"] == 3 * 3 and 1.2 < r["ideal_speedup"] < 1.5
    assert r["host_loop_refreshes"] == 3 and r["host_loop_max_abs_diff"] < 1e-5


def test_sencache_by_name():
    network, _ = _wan()
    plan = named_plan("sencache", network, 3)
    assert (plan.first_layers, plan.cached_layers) == (0, 3)
    assert named_policy("sencache", threshold=0.2) == jc.SenCachePolicy(0.2)
    assert "sencache" in bench.POLICIES and "none" in bench.POLICIES


@pytest.mark.parametrize("changes, message", [
    (dict(cfg_cache=2), "needs guidance above 1"),
    (dict(cfg_cache=2, guidance=1.0), "needs guidance above 1"),
    (dict(cfg_cache=0, guidance=5.0), "cfg_cache must be an int >= 1"),
    (dict(cfg_cache=2, guidance=5.0, cfg_warmup=0), "cfg_warmup must be an int >= 1"),
    (dict(cfg_cache=2, guidance=5.0, policy="sencache"), "does not combine them"),
    (dict(cfg_cache=2, guidance=5.0, policy="first-block", host_loop=True),
     "host_loop with cfg_cache runs schedules known on the host"),
    (dict(cfg_cache=2, guidance=5.0, policy="teacache", refresh_target=0.5),
     "threshold_for searches without CFG-Cache"),
    (dict(policy="none", host_loop=True), "set cfg_cache"),
    (dict(policy="layer-mask", host_loop=True), "no host loop here"),
    (dict(model="dit", size="wan-1.3b"), "unknown size 'wan-1.3b' for 'dit'"),
    (dict(solver="ddim", shift=3.0), "shift applies to the flow solvers"),
])
def test_bad_settings_are_refused_when_made(changes, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**{**dict(size="tiny"), **changes})


def test_constants_per_step_needs_a_network_with_constants(capsys):
    network = jc.Network(condition=lambda p, c: c, embed=lambda p, x, t, c: (x, None),
                         layer=lambda p, h, ctx: h, final=lambda p, h, ctx: h)
    with pytest.raises(ValueError, match="per-layer constants"):
        loops.constants_per_step_network(network)
    assert bench.main(["--size", "tiny", "--frames", "4"]) == 2
    assert "no config fields ['frames']" in capsys.readouterr().err
    assert bench.main(["--model", "wan", "--size", "tiny", "--cfg-cache", "2"]) == 2
    assert "needs guidance above 1" in capsys.readouterr().err


def test_the_peer_suites_rows_are_valid_settings():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks/gpu_suite.py")
    suite_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite_module)
    # Every suite's every row is a setting the bench accepts (a bad row would cost a device
    # call before it failed).
    for suite in suite_module.SUITES.values():
        for _, row in suite["rows"]:
            BenchSettings(*suite["model"], **suite["common"], **row, hand_loop=False)
    for name in ("wan-peer", "dit-peer"):
        suite = suite_module.SUITES[name]
        rows = [BenchSettings(*suite["model"], **suite["common"], **row, hand_loop=False)
                for _, row in suite["rows"]]
        assert any(r.cfg_cache and r.policy == "none" and r.host_loop for r in rows), name
        assert any(r.policy == "sencache" and r.host_loop for r in rows), name
        assert all(r.guidance and r.steps == 50 and r.dtype == "bfloat16" for r in rows), name
    wan = suite_module.SUITES["wan-peer"]
    assert wan["model"] == ("wan", "wan-1.3b") and wan["common"]["batch"] == 1
    assert any(row.get("constants_per_step") for _, row in wan["rows"])
