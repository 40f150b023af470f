"""MagCache (jaxcache.policies.magcache) and its calibration (jaxcache.tuning.magcache).

* ``sample(..., record=("body_residual",))`` against a plain Python loop over the plan's pieces.
* The rule: the host schedule against the published loop written out anew (hypothesis), by hand
  on a small case, and the device's decisions (``OnDevice``) against the host schedule, in a
  scan and through the sampler; the program of the host schedule holds no decision.
* The calibration: the ratios against norms computed here, per guidance branch; save and load;
  refused for another step count, solver or plan; bad settings refused before compiling.
"""

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxcache as jc
from jaxcache import tuning
from jaxcache.evaluation.program import host_round_trips, runtime_decisions
from jaxcache.policies.magcache import MagCachePolicy

import toy_networks

DEPTH = toy_networks.LAYERS
SOLVER = jc.FlowMatchEuler(shift=3.0)
STEPS = 12
SCALE = 2.0


def _single():
    network, params = toy_networks.single_stream()
    plan = jc.CachePlan(network, DEPTH)
    return plan, plan.split(params)


def _hand_loop(plan, seg, noise, cond, uncond=None, scale=None):
    """The body's residual at every evaluation of an uncached Euler run, by a Python loop."""
    times, next_times = SOLVER.times(STEPS)
    rows_cond = cond if uncond is None else jnp.concatenate([cond, uncond])
    constant = plan.network.condition(seg.condition, rows_cond)
    x, residuals = noise, []
    for t, t_next in zip(times, next_times):
        rows = x if uncond is None else jnp.concatenate([x, x])
        _, h, ctx = plan.run_head(seg, rows, jnp.full((rows.shape[0],), t, jnp.float32),
                                  constant)
        out = plan.run_body(seg, h, ctx)
        residuals.append(jax.tree.map(lambda o, i: np.asarray(o - i, np.float64), out, h))
        prediction = plan.run_tail(seg, out, ctx)
        if uncond is not None:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + scale * (positive - negative)
        x = x + (t_next - t) * prediction
    return jax.tree.map(lambda *r: np.stack(r), *residuals)


# ----------------------------------------------------------------- the recorded residuals
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_recorded_body_residuals_match_a_python_loop(guided):
    plan, seg = _single()
    noise, cond, uncond = toy_networks.inputs(3)
    kwargs = dict(uncond=uncond, guidance_scale=SCALE) if guided else {}
    out = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                    record=("body_residual",), **kwargs)
    want = _hand_loop(plan, seg, noise, cond, *((uncond, SCALE) if guided else ()))
    got = np.asarray(out.body_residuals)
    assert got.dtype == np.float32 and got.shape == (STEPS, 3 * (2 if guided else 1), 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Evaluation 0 needs no trajectory: the head and the body by hand, one array each.
    constant = plan.network.condition(seg.condition, cond)
    _, h, ctx = plan.run_head(seg, noise, jnp.full((3,), SOLVER.times(STEPS)[0][0]), constant)
    np.testing.assert_allclose(got[0, :3], plan.run_body(seg, h, ctx) - h, rtol=1e-6, atol=1e-6)


def test_recorded_residuals_of_a_dual_stream_body_keep_both_streams():
    network, params = toy_networks.dual_stream()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, _ = toy_networks.inputs(2)
    out = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                    record=("body_residual",))
    image, text = out.body_residuals
    assert image.shape == (STEPS, 2, 8) and text.shape == (STEPS, 2, 3, 8)
    want_image, want_text = _hand_loop(plan, seg, noise, cond)
    np.testing.assert_allclose(image, want_image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text, want_text, rtol=1e-5, atol=1e-5)
    calibration = tuning.calibrate_magcache(plan, seg, noise, cond, solver=SOLVER,
                                            num_steps=STEPS)
    assert calibration.features == (8,)  # the image stream's
    np.testing.assert_allclose(calibration.ratios, _ratios_by_hand(want_image, 1), rtol=1e-5)


# ----------------------------------------------------------------- the rule
def _published(ratios, threshold, max_skips, warmup, steps):
    """The published decision loop (the authors' Wan 2.1 forward), one accumulator per branch,
    both branches computing when either asks; float32 like the policy."""
    retention = int(warmup * steps + 0.5) if isinstance(warmup, float) else warmup
    table = np.asarray(ratios, np.float32).reshape(-1, steps)
    acc_ratio = [np.float32(1.0)] * len(table)
    acc_err = [np.float32(0.0)] * len(table)
    acc_steps = 0
    computed = []
    for cnt in range(steps):
        if cnt == 0 or cnt < retention:
            computed.append(True)
            continue
        new_ratio = [acc_ratio[j] * table[j, cnt] for j in range(len(table))]
        new_err = [acc_err[j] + np.abs(np.float32(1.0) - new_ratio[j]) for j in range(len(table))]
        if all(e < np.float32(threshold) for e in new_err) and acc_steps + 1 <= max_skips:
            acc_ratio, acc_err, acc_steps = new_ratio, new_err, acc_steps + 1
            computed.append(False)
        else:
            acc_ratio = [np.float32(1.0)] * len(table)
            acc_err = [np.float32(0.0)] * len(table)
            acc_steps = 0
            computed.append(True)
    return np.asarray(computed)


def test_the_rule_by_hand():
    # Ratios 0.95 after step 0: one skip costs 0.05, a second 0.05 + 0.0975 = 0.1475.
    ratios = [1.0] + [0.95] * 9
    policy = MagCachePolicy(ratios, threshold=0.12, max_skips=2, warmup=2)
    assert policy.static_schedule(10).tolist() == [True, True, False, True, False, True, False,
                                                   True, False, True]
    # A threshold above 0.1475 allows two skips in a row; max_skips=2 then caps the run.
    policy = MagCachePolicy(ratios, threshold=0.2, max_skips=2, warmup=1)
    assert policy.static_schedule(10).tolist() == [True, False, False, True, False, False,
                                                   True, False, False, True]
    policy = MagCachePolicy(ratios, threshold=10.0, max_skips=1, warmup=0.2)  # 2 warm-up steps
    assert policy.static_schedule(10).tolist() == [True, True] + [False, True] * 4
    assert MagCachePolicy(ratios, max_skips=0).static_schedule(10).all()


def test_guidance_branches_keep_their_own_errors_and_compute_together():
    steady, drifting = [1.0] + [0.99] * 9, [1.0] + [0.96] * 9
    alone = MagCachePolicy(steady, threshold=0.05, max_skips=3, warmup=1).static_schedule(10)
    both = MagCachePolicy([steady, drifting], threshold=0.05, max_skips=3,
                          warmup=1).static_schedule(10)
    assert alone.tolist() == [True, False, False] * 3 + [True]
    assert alone.sum() < both.sum()  # the drifting branch asks for more computed steps
    assert both.tolist() == _published([steady, drifting], 0.05, 3, 1, 10).tolist()
    assert both.tolist() == [True] + [False, True] * 4 + [False]


ratio_tables = st.integers(3, 16).flatmap(
    lambda steps: st.lists(
        st.lists(st.floats(0.5, 1.5, width=32), min_size=steps, max_size=steps),
        min_size=1, max_size=2,
    )
)


@settings(max_examples=60, deadline=None)
@given(
    ratios=ratio_tables,
    threshold=st.floats(1e-3, 1.0),
    max_skips=st.integers(0, 5),
    warmup=st.one_of(st.floats(0.0, 1.0), st.integers(0, 6)),
)
def test_the_host_schedule_is_the_published_rule(ratios, threshold, max_skips, warmup):
    steps = len(ratios[0])
    policy = MagCachePolicy(ratios, threshold=threshold, max_skips=max_skips, warmup=warmup)
    mask = policy.static_schedule(steps)
    assert mask.tolist() == _published(ratios, threshold, max_skips, warmup, steps).tolist()
    assert mask[0]


def _device_mask(policy, steps):
    """The device's decisions of every step, in one scan (as OnDevice's loop makes them)."""

    @jax.jit
    def run():
        def step(state, i):
            refresh, state = policy.decide(state, i, None)
            return state, jnp.asarray(refresh, bool)

        return jax.lax.scan(step, policy.init(steps), jnp.arange(steps, dtype=jnp.int32))[1]

    return np.asarray(run())


@settings(max_examples=15, deadline=None)
@given(
    ratios=ratio_tables,
    threshold=st.floats(1e-3, 1.0),
    max_skips=st.integers(0, 4),
    warmup=st.one_of(st.floats(0.0, 0.5), st.integers(0, 3)),
)
def test_the_device_decides_as_the_host_schedule(ratios, threshold, max_skips, warmup):
    steps = len(ratios[0])
    policy = MagCachePolicy(ratios, threshold=threshold, max_skips=max_skips, warmup=warmup)
    assert _device_mask(policy, steps).tolist() == policy.static_schedule(steps).tolist()


@pytest.fixture(scope="module")
def calibrated():
    plan, seg = _single()
    noise, cond, uncond = toy_networks.inputs(3)
    calibration = tuning.calibrate_magcache(plan, seg, noise, cond, solver=SOLVER,
                                            num_steps=STEPS, uncond=uncond, guidance_scale=SCALE)
    return plan, seg, noise, cond, uncond, calibration


def _threshold_for_skips(calibration, wanted=4):
    """A threshold at which the calibrated policy skips at least ``wanted`` steps."""
    for threshold in np.geomspace(1e-3, 10, 60):
        policy = calibration.policy(threshold=float(threshold), max_skips=3, warmup=1)
        if (~policy.static_schedule(calibration.evaluations)).sum() >= wanted:
            return policy
    raise AssertionError("no threshold skips enough steps")


def test_on_device_and_the_host_schedule_sample_alike(calibrated):
    plan, seg, noise, cond, uncond, calibration = calibrated
    policy = _threshold_for_skips(calibration)
    common = dict(solver=SOLVER, num_steps=STEPS, reuse=jc.ResidualReuse(), uncond=uncond,
                  guidance_scale=SCALE)
    host = jc.sample(plan, seg, noise, cond, policy=policy, **common)
    device = jc.sample(plan, seg, noise, cond, policy=jc.OnDevice(policy), **common)
    mask = policy.static_schedule(STEPS)
    assert np.asarray(host.refreshed).tolist() == mask.tolist()
    assert np.asarray(device.refreshed).tolist() == mask.tolist()
    assert np.asarray(device.body_computed).all(axis=(1, 2)).tolist() == mask.tolist()
    np.testing.assert_allclose(device.sample, host.sample, rtol=1e-6, atol=1e-6)
    uncached = jc.sample(plan, seg, noise, cond, **{k: v for k, v in common.items()
                                                    if k != "reuse"})
    assert not np.allclose(host.sample, uncached.sample, atol=1e-6)  # it did skip


def test_the_host_schedule_compiles_without_decisions(calibrated):
    plan, seg, noise, cond, uncond, calibration = calibrated
    policy = _threshold_for_skips(calibration)
    common = dict(solver=SOLVER, num_steps=STEPS, reuse=jc.ResidualReuse(), uncond=uncond,
                  guidance_scale=SCALE)
    lowered = jc.lower(plan, seg, noise, cond, policy=policy, **common)
    compiled = lowered.compile().as_text()
    assert host_round_trips(lowered.as_text()) == [] and host_round_trips(compiled) == []
    assert runtime_decisions(compiled) == []
    on_device = jc.lower(plan, seg, noise, cond, policy=jc.OnDevice(policy), **common)
    assert runtime_decisions(on_device.compile().as_text())  # the check can see a decision


def test_a_threshold_that_skips_nothing_samples_as_uncached(calibrated):
    plan, seg, noise, cond, uncond, calibration = calibrated
    common = dict(solver=SOLVER, num_steps=STEPS, uncond=uncond, guidance_scale=SCALE)
    policy = calibration.policy(threshold=1e-9, warmup=0)
    assert policy.static_schedule(STEPS).all()
    cached = jc.sample(plan, seg, noise, cond, policy=policy, reuse=jc.ResidualReuse(), **common)
    uncached = jc.sample(plan, seg, noise, cond, **common)
    np.testing.assert_array_equal(cached.sample, uncached.sample)


# ----------------------------------------------------------------- the calibration
def _ratios_by_hand(residuals, branches):
    """``mean ||r_t|| / ||r_{t-1}||`` per branch, norms over features, written out anew."""
    steps, rows = residuals.shape[:2]
    per = rows // branches
    out = np.ones((branches, steps))
    for j, t in itertools.product(range(branches), range(1, steps)):
        quotients = [np.sqrt(np.sum(residuals[t, i] ** 2, axis=-1))
                     / np.sqrt(np.sum(residuals[t - 1, i] ** 2, axis=-1))
                     for i in range(j * per, (j + 1) * per)]
        out[j, t] = np.mean(quotients)
    return out


def test_the_calibration_measures_each_branch(calibrated):
    plan, seg, noise, cond, uncond, calibration = calibrated
    residuals = _hand_loop(plan, seg, noise, cond, uncond, SCALE)
    assert calibration.ratios.shape == (2, STEPS) and calibration.branches == 2
    np.testing.assert_allclose(calibration.ratios, _ratios_by_hand(residuals, 2), rtol=1e-5)
    assert not np.allclose(calibration.ratios[0], calibration.ratios[1])  # branches apart
    assert calibration.identity() == {
        "num_steps": STEPS, "evaluations": STEPS, "solver": repr(SOLVER), "depth": DEPTH,
        "first_layers": 0, "cached_layers": DEPTH, "features": [8], "branches": 2,
    }
    policy = calibration.policy(threshold=0.3)
    assert policy.ratios == tuple(tuple(r) for r in calibration.ratios.tolist())
    assert policy.layout == (0, DEPTH)


def test_save_and_load_round_trip_and_refuse_another_schedule(calibrated, tmp_path):
    plan, seg, noise, cond, uncond, calibration = calibrated
    path = tmp_path / "magcache.npz"
    calibration.save(path)
    loaded = tuning.MagCacheCalibration.load(path, plan, seg, solver=SOLVER, num_steps=STEPS)
    np.testing.assert_array_equal(loaded.ratios, calibration.ratios)
    np.testing.assert_array_equal(loaded.errors.reuse, calibration.errors.reuse)
    np.testing.assert_array_equal(loaded.errors.forecast, calibration.errors.forecast)
    np.testing.assert_array_equal(loaded.errors.times, calibration.errors.times)
    assert loaded.identity() == calibration.identity()
    assert loaded.policy(0.2) == calibration.policy(0.2)
    with pytest.raises(ValueError, match=r"made for num_steps=12, but got num_steps=20"):
        tuning.MagCacheCalibration.load(path, num_steps=20)
    with pytest.raises(ValueError, match=r"made for solver=.FlowMatchEuler\(shift=3.0.*but got "
                                         r"solver=.FlowMatchEuler\(shift=1.0"):
        tuning.MagCacheCalibration.load(path, solver=jc.FlowMatchEuler())
    other = jc.CachePlan(plan.network, DEPTH - 2, first_layers=1)
    with pytest.raises(ValueError, match=r"first_layers=0, cached_layers=6, but got "
                                         r"first_layers=1, cached_layers=4"):
        tuning.MagCacheCalibration.load(path, other)
    np.savez(tmp_path / "other.npz", ratios=np.ones(3))
    with pytest.raises(ValueError, match="not a jaxcache MagCache calibration"):
        tuning.MagCacheCalibration.load(tmp_path / "other.npz")


def test_a_policy_is_refused_for_another_length_or_body_before_compiling(calibrated):
    plan, seg, noise, cond, uncond, calibration = calibrated
    network, traces = toy_networks.trace_counted(plan.network)
    counted = jc.CachePlan(network, DEPTH)
    policy = calibration.policy()
    with pytest.raises(ValueError, match=r"calibrated for 12 model evaluations, but this run "
                                         r"makes num_steps=20"):
        jc.sample(counted, seg, noise, cond, solver=SOLVER, num_steps=20, policy=policy)
    heads = jc.CachePlan(network, DEPTH - 1, first_layers=1)
    with pytest.raises(ValueError, match=r"measured on a body of first_layers=0, "
                                         r"cached_layers=6, but the plan has first_layers=1"):
        jc.sample(heads, heads.split(toy_networks.single_stream()[1]), noise, cond,
                  solver=SOLVER, num_steps=STEPS, policy=policy)
    assert traces == []  # refused before anything was traced


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(threshold=0.0), ValueError, r"threshold must be a finite number > 0"),
        (dict(threshold=-0.1), ValueError, r"threshold must be a finite number > 0"),
        (dict(threshold=float("nan")), ValueError, r"threshold must be a finite number > 0"),
        (dict(threshold=float("inf")), ValueError, r"threshold must be a finite number > 0"),
        (dict(threshold="0.1"), TypeError, r"threshold must be a Python number"),
        (dict(threshold=True), TypeError, r"threshold must be a Python number"),
        (dict(max_skips=-1), ValueError, r"max_skips must be an int >= 0, got -1"),
        (dict(max_skips=1.5), TypeError, r"max_skips must be an int >= 0"),
        (dict(warmup=1.5), ValueError, r"warmup as a float is a fraction"),
        (dict(warmup=-2), ValueError, r"warmup must be an int >= 0"),
        (dict(ratios=[[1.0, 0.9]] * 3), ValueError, r"1 or 2 branches"),
        (dict(ratios=[1.0, float("nan")]), ValueError, r"finite and >= 0"),
        (dict(ratios=[1.0, -0.5]), ValueError, r"finite and >= 0"),
        (dict(ratios="1.0"), TypeError, r"ratios must be numbers"),
        (dict(layout=(0,)), ValueError, r"layout must be \(first_layers, cached_layers\)"),
    ],
)
def test_bad_settings_are_refused_with_what_was_expected(kwargs, error, match):
    settings_ = dict(ratios=[1.0, 0.9, 0.9]) | kwargs
    with pytest.raises(error, match=match):
        MagCachePolicy(**settings_)


def test_the_policy_is_exported():
    assert jc.MagCachePolicy is MagCachePolicy and jc.policies.MagCachePolicy is MagCachePolicy
