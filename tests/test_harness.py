"""Tests for the digit studies' evaluation harness (jaxcache.digits.harness)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from random_models import random_model

from jaxcache import CachePlan, SampleResult, StepMaskPolicy
from jaxcache.digits import harness
from jaxcache.digits.harness import REUSE_MODES, Body, Setting
from jaxcache.evaluation import metrics

STEPS, DEPTH = 4, 3


@pytest.fixture(scope="module")
def evaluator():
    # A 16x16 tiny model (the classifier's size), 3 layers, 4 digits: the figures are not the
    # point, the accounting is.
    model = random_model("dit", channels=1, vocab_size=11, caption_len=1, depth=DEPTH,
                         image_size=16, patch_size=4)
    return harness.Evaluator(model, [0, 1, 2, 3], repeats=1)


MASK = (True, True, False, True)  # the forecast of order 1 needs two computed steps first
SETTINGS = (
    Setting.full(STEPS),
    Setting.fewer_steps(STEPS // 2),
    Setting.interval(2, "reuse", num_steps=STEPS, cached_layers=2),
    Setting("step mask", "taylor1", STEPS, Body(), StepMaskPolicy(MASK), REUSE_MODES["taylor1"]),
)


@pytest.fixture(scope="module")
def rows(evaluator):
    return dict(zip(("full", "fewer", "interval", "mask"), evaluator.evaluate(SETTINGS)))


def test_full_compute_scores_inf_against_itself(rows):
    full = rows["full"]
    assert (full.family, full.cached_layers, full.num_steps) == ("full", 0, STEPS)
    assert math.isinf(full.psnr) and full.ssim == 1.0 and full.relative_l1 == 0.0
    assert full.ideal_speedup == 1.0 and full.speedup == 1.0
    assert full.speedup_min <= 1.0 <= full.speedup_max
    assert full.layer_evaluations == full.batch_layer_evaluations == STEPS * DEPTH
    assert full.computed_per_step == (1.0,) * STEPS
    as_json = full.as_json()
    assert as_json["psnr"] is None and as_json["ssim"] == 1.0  # JSON has no infinity


def test_fewer_steps_ideal_speedup_is_the_steps_ratio(evaluator, rows):
    fewer = rows["fewer"]
    assert fewer.layer_evaluations == (STEPS // 2) * DEPTH and fewer.cached_layers == 0
    # The steps ratio, less the condition path, which runs once either way.
    work = evaluator.work
    per_step = work.step + float(np.sum(work.layers))
    assert fewer.ideal_speedup == pytest.approx(
        (work.condition + STEPS * per_step) / (work.condition + STEPS // 2 * per_step), rel=1e-12
    )
    assert 0.99 * 2 < fewer.ideal_speedup <= 2.0
    # The sampler's own count of the two runs agrees.
    full_run, fewer_run = evaluator.run(SETTINGS[0]), evaluator.run(SETTINGS[1])
    assert fewer.ideal_speedup == pytest.approx(float(full_run.flops) / float(fewer_run.flops),
                                                rel=1e-6)
    assert fewer.psnr < math.inf


def test_interval_layer_evaluations_are_the_hand_count(evaluator, rows):
    row = rows["interval"]
    # 4 steps, refreshes at 0 and 2: the 2 cached layers are skipped at steps 1 and 3.
    assert row.layer_evaluations == STEPS * DEPTH - 2 * 2 == 8
    assert row.batch_layer_evaluations == 8
    assert row.cached_layers == 2 and row.knob == 2 and row.mode == "reuse"
    assert row.computed_per_step == (1.0, 0.0, 1.0, 0.0)
    work = evaluator.work
    skipped = 2 * float(np.sum(work.layers[:2]))  # layers 0 and 1 at two steps
    full = work.total(STEPS)
    assert row.ideal_speedup == pytest.approx(full / (full - skipped), rel=1e-12)


def test_a_step_mask_policy_is_a_setting_like_any_other(evaluator, rows):
    row = rows["mask"]
    assert row.layer_evaluations == row.batch_layer_evaluations == sum(MASK) * DEPTH
    assert row.computed_per_step == tuple(float(m) for m in MASK)
    # Scored as by hand: the same run against full compute.
    own = jnp.clip(evaluator.run(SETTINGS[3]).sample, -1, 1)
    full = jnp.clip(evaluator.run(SETTINGS[0]).sample, -1, 1)
    psnr, ssim, rel = metrics.mean_image_scores(own, full)
    assert (row.psnr, row.ssim, row.relative_l1) == (psnr, ssim, rel)
    assert math.isfinite(row.psnr) and row.ideal_speedup > 1.0


def _result(layers_computed, body_computed) -> SampleResult:
    layers_computed = np.asarray(layers_computed, bool)
    return SampleResult(sample=None, refreshed=layers_computed.any(axis=1),
                        layers_computed=layers_computed, caches=None,
                        body_computed=None if body_computed is None
                        else np.asarray(body_computed, bool))


def test_a_per_layer_mask_counts_what_ran_layer_by_layer(evaluator):
    # A static per-(step, layer) mask: every row alike, the body's layers differ by step.
    plan = CachePlan(evaluator.network, 3)
    layers = [[1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]]
    body = np.asarray(layers, bool).any(axis=1)[:, None, None].repeat(4, axis=2)
    counted = harness.layers_per_sample(_result(layers, body), plan).layers
    np.testing.assert_array_equal(counted, np.asarray(layers, float))
    assert counted.sum() == 6  # not 3 layers x 4 steps the body "ran" at


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_sample_counts_its_own_decisions(evaluator, data):
    # Rows that decided differently (a signal policy): a sample's layer evaluations are the
    # mean over the rows of each row's own count, as if sampled alone.
    steps = data.draw(st.integers(1, 6))
    first = data.draw(st.integers(0, DEPTH - 1))
    cached = data.draw(st.integers(1, DEPTH - first))
    branches, batch = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    decided = np.asarray(data.draw(st.lists(st.booleans(), min_size=steps * branches * batch,
                                            max_size=steps * branches * batch)))
    decided = decided.reshape(steps, branches, batch)
    plan = CachePlan(evaluator.network, cached, first_layers=first)
    ran = np.ones((steps, DEPTH), bool)
    ran[:, first : first + cached] = decided.any(axis=(1, 2))[:, None]  # the batch ran the body
    counted = harness.layers_per_sample(_result(ran, decided), plan).layers
    own = [(DEPTH - cached) * steps + cached * decided[:, b, r].sum()
           for b in range(branches) for r in range(batch)]
    assert counted.sum() == pytest.approx(np.mean(own))
    if (decided == decided[:, :1, :1]).all():  # alike: exactly what ran
        np.testing.assert_array_equal(counted, ran.astype(float))


def test_full_compute_is_timed_first_and_last(evaluator, monkeypatch):
    calls, now = [], [0.0]
    real = harness.Evaluator.program

    def program(setting):
        run = real(evaluator, setting)

        def timed():
            calls.append(setting.family)
            # Full compute drifts slower during the sweep: 2 s at first, 3 s at the end.
            full_calls = calls.count("full")
            now[0] += (2.0 if full_calls <= 4 else 3.0) if setting.family == "full" else 1.0
            return run()

        return timed

    monkeypatch.setattr(evaluator, "program", program)
    monkeypatch.setattr(evaluator, "clock", lambda: now[0])
    monkeypatch.setattr(evaluator, "repeats", 2)
    full, cached = evaluator.evaluate(SETTINGS[::2])
    # Each compiles once; then each back to back (a warm call, then 2 timed), full again last.
    assert calls == ["full", "interval", *["full"] * 3, *["interval"] * 3, *["full"] * 3]
    # Full compute's timed runs: 2, 2 (first), 3, 3 (last); its median 2.5 s.
    assert (full.seconds, full.speedup) == (2.5, 1.0)
    assert (full.speedup_min, full.speedup_max) == (2.5 / 3.0, 2.5 / 2.0)
    assert (cached.seconds, cached.speedup, cached.speedup_min, cached.speedup_max) == (
        1.0, 2.5, 2.5, 2.5)


def test_bad_settings_are_refused_before_anything_runs(evaluator, monkeypatch):
    ran = []
    monkeypatch.setattr(evaluator, "program", lambda s: lambda: ran.append(s))
    with pytest.raises(ValueError, match="the first setting must be full compute"):
        evaluator.evaluate([SETTINGS[2], SETTINGS[0]])
    with pytest.raises(ValueError, match="settings is empty"):
        evaluator.evaluate([])
    with pytest.raises(ValueError, match="must be Setting instances"):
        evaluator.evaluate([SETTINGS[0], (2, 2, "reuse")])
    with pytest.raises(ValueError, match=r"cached layers must be in \[1, 3\].*got 5"):
        evaluator.evaluate([SETTINGS[0], Setting.interval(2, num_steps=STEPS, cached_layers=5)])
    assert ran == []


def test_settings_check_their_fields():
    with pytest.raises(ValueError, match="reuse must be one of"):
        Setting.interval(2, "taylor9", num_steps=STEPS)
    with pytest.raises(ValueError, match="without a policy samples uncached"):
        Setting("full", "-", STEPS, reuse=REUSE_MODES["taylor1"])
    with pytest.raises(TypeError, match="Setting.policy must be a RefreshPolicy instance"):
        Setting("mask", "-", STEPS, policy=StepMaskPolicy)
    with pytest.raises(ValueError, match="Setting.num_steps must be an int >= 1"):
        Setting.full(0)
    with pytest.raises(ValueError, match="label a reuse mode"):
        Setting.interval(2, REUSE_MODES["taylor1"], num_steps=STEPS)
    # Equal settings compare equal (the plan builder is a value).
    assert Setting.interval(2, num_steps=STEPS) == Setting.interval(2, num_steps=STEPS)


def test_cfg_cache_steps_count_one_half(evaluator):
    # CFG-Cache's cache steps run the conditional rows only: half of a guided step, in layer
    # evaluations and in FLOPs (layers, embedding and final projection alike).
    from jaxcache import CFGCache

    alone = Setting("cfg-cache", "-", STEPS, guidance=CFGCache(interval=2))
    cached = Setting("cfg-cache", "taylor1", STEPS, Body(), StepMaskPolicy(MASK),
                     REUSE_MODES["taylor1"], guidance=CFGCache(interval=2))
    full, own, both = evaluator.evaluate([Setting.full(STEPS), alone, cached])
    share = np.array([1.0, 0.5, 1.0, 0.5])  # full steps 0 and 2
    np.testing.assert_array_equal(evaluator.run(alone).guidance_computed, share == 1.0)
    assert own.layer_evaluations == pytest.approx(DEPTH * share.sum())
    work = evaluator.work
    by_hand = work.condition + share.sum() * (work.step + work.layers.sum())
    assert own.ideal_speedup == pytest.approx(work.total(STEPS) / by_hand)
    # With a step mask on top: the body's layers where the mask ran, halved on cache steps.
    assert both.layer_evaluations == pytest.approx(DEPTH * (share * np.array(MASK)).sum())
    assert own.computed_per_step == tuple(share)
    assert math.isfinite(own.psnr) and full.ideal_speedup == 1.0


def test_a_whole_network_skip_counts_every_layer_and_the_step(evaluator):
    # SenCache skips the whole network per row: a row's share covers every layer and the
    # embedding and final projection, whether the rows decided alike or not.
    plan = CachePlan(evaluator.network, DEPTH)
    decided = np.array([[[1, 1]], [[0, 1]], [[0, 0]]], bool)  # [evaluations, branches, batch]
    ran = decided.any(axis=(1, 2))[:, None].repeat(DEPTH, axis=1)
    counted = harness.layers_per_sample(_result(ran, decided), plan, whole_network=True)
    np.testing.assert_array_equal(counted.steps, [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(counted.layers.sum(axis=1), DEPTH * counted.steps)
    alike = decided[:, :, :1]
    counted = harness.layers_per_sample(_result(ran[[0, 2]], alike[[0, 2]]), plan,
                                        whole_network=True)
    np.testing.assert_array_equal(counted.steps, [1.0, 0.0])


def test_cfg_cache_needs_guidance():
    from jaxcache import CFGCache

    with pytest.raises(TypeError, match="CFGCache instance"):
        Setting("cfg-cache", "-", STEPS, guidance=2.0)
    model = random_model("dit", channels=1, vocab_size=11, caption_len=1, depth=1,
                         image_size=16, patch_size=4)
    unguided = harness.Evaluator(model, [0], repeats=1, guidance=None)
    with pytest.raises(ValueError, match="needs guidance"):
        unguided.evaluate([Setting.full(STEPS), Setting("c", "-", STEPS, guidance=CFGCache())])


def test_the_peer_study_pairs_each_cfg_cache_row_with_fewer_steps_at_its_compute():
    import jaxcache as jc
    from jaxcache.digits import peer

    solver = jc.FlowMatchEuler()
    settings = peer.cfg_cache_settings(20, solver, intervals=(2, 5), layer_intervals=(2, 3))
    cfg = [s for s in settings if s.guidance is not None]
    # Alone: full steps at 0, 2, 4, ... (10 of 20, the rest half) = 15 of 20 guided steps;
    # every 5th: 4 full, 16 half = 12. On the interval layer cache, CFG-Cache's interval does
    # not divide the layer cache's: interval 2 with CFG every 3rd = 4 full refreshes + 6 half;
    # interval 3 with CFG every 2nd = 4 full + 3 half.
    assert [(s.family, s.knob, s.guidance.interval) for s in cfg] == [
        ("cfg-cache", 2, 2), ("cfg-cache", 5, 5),
        ("cfg-cache 3 + interval", 2, 3), ("cfg-cache 2 + interval", 3, 2)]
    shares = [peer.guided_compute(s.guidance, 20, None if s.policy is None else
                                  s.policy.static_schedule(20)) for s in cfg]
    assert shares == [15 / 20, 12 / 20, 7 / 20, 5.5 / 20]
    assert [s.num_steps for s in settings if s.family == "fewer steps"] == [15, 12, 7, 6]
    with pytest.raises(ValueError, match="unknown reuse modes"):
        peer.cfg_cache_settings(20, solver, layer_modes=("nope",))
