"""Policies by name with their plans (jaxcache.evaluation.named) and the bench's settings object."""

from __future__ import annotations

import dataclasses

import pytest

import jaxcache as jc
from jaxcache.evaluation.bench import BenchSettings, run_benchmark
from jaxcache.evaluation.named import POLICIES, named_plan, named_policy

import toy_networks as toy


@pytest.mark.parametrize(
    "name, first, cached, policy",
    [
        ("interval", 0, toy.LAYERS, jc.IntervalPolicy(3)),
        ("first-block", 1, toy.LAYERS - 1, jc.FirstBlockPolicy(0.1)),
        ("teacache", 0, toy.LAYERS, jc.TeaCachePolicy(0.1)),
        ("dbcache", 2, toy.LAYERS - 3, jc.DBCachePolicy(0.1, warmup_steps=2)),
    ],
)
def test_each_name_pairs_its_policy_with_the_plan_of_its_published_rule(name, first, cached,
                                                                        policy):
    network, _ = toy.single_stream()
    plan = named_plan(name, network, toy.LAYERS, first=2, last=1)
    assert (plan.first_layers, plan.cached_layers) == (first, cached)
    assert named_policy(name, interval=3, threshold=0.1, warmup=2) == policy


def test_interval_plan_caches_the_first_layers_asked_for():
    network, _ = toy.single_stream()
    assert named_plan("interval", network, toy.LAYERS, cached_layers=2).cached_layers == 2
    with pytest.raises(ValueError, match=r"cached layers must be in \[1, 6\], got 7"):
        named_plan("interval", network, toy.LAYERS, cached_layers=7)


def test_teacache_coefficients_and_the_on_device_interval():
    assert named_policy("teacache", coefficients=[2.0, 0.0]).coefficients == (2.0, 0.0)
    assert named_policy("interval", interval=2, on_device=True) == jc.OnDevice(
        jc.IntervalPolicy(2))
    with pytest.raises(ValueError, match="on_device applies to the interval only"):
        named_policy("first-block", on_device=True)


def test_unknown_names_are_refused_with_the_choices():
    network, _ = toy.single_stream()
    with pytest.raises(ValueError, match="unknown policy 'fbc'"):
        named_plan("fbc", network, toy.LAYERS)
    with pytest.raises(ValueError, match="unknown policy 'fbc'"):
        named_policy("fbc")
    assert POLICIES[:4] == ("interval", "first-block", "teacache", "dbcache")


def test_bench_settings_are_checked_when_made_and_run_benchmark_takes_only_them():
    with pytest.raises(ValueError, match="policy must be one of"):
        BenchSettings(policy="fbc")
    with pytest.raises(ValueError, match="reuse must be one of"):
        BenchSettings(reuse="forecast")
    with pytest.raises(ValueError, match="decide must be"):
        BenchSettings(decide="host")
    with pytest.raises(TypeError, match="run_benchmark takes a BenchSettings"):
        run_benchmark({"model": "dit"})
    base = BenchSettings(size="tiny", steps=4)
    assert dataclasses.replace(base, policy="teacache").steps == 4


def test_staggered_layer_mask_refreshes_each_layer_every_interval_steps():
    from jaxcache.evaluation.named import staggered_layer_mask

    mask = staggered_layer_mask(7, 4, 3)
    assert mask[0].all()
    for j in range(4):  # after step 0, layer j computes where (i + j) % 3 == 0
        assert [i for i in range(1, 7) if mask[i, j]] == [i for i in range(1, 7)
                                                          if (i + j) % 3 == 0]
    assert staggered_layer_mask(5, 2, 1).all()
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        staggered_layer_mask(5, 2, 0)


def test_planned_names_are_fitted_not_built_by_name():
    with pytest.raises(ValueError, match="magcache is fitted to the model"):
        named_policy("magcache")


@pytest.mark.parametrize("policy", ["magcache", "planned", "layer-mask"])
def test_the_bench_fits_planned_schedules_to_its_model(policy):
    r = run_benchmark(BenchSettings(size="tiny", steps=8, policy=policy, refresh_target=0.5,
                                    interval=2, repeats=1, hand_loop=False))
    if policy == "layer-mask":  # every step computes some layer, about half of them
        assert r["layer_evaluations"] == 8 * r["depth"] - 7 * r["depth"] // 2
    else:
        assert r["refresh_fraction"] <= 0.5 and r["refreshes"] >= 1
