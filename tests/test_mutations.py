"""Tests that catch two mutations the rest of the suite let through.

* Guidance branches that take the OR of their two decisions: with a signal-driven policy the
  conditional and unconditional rows of a guided run must decide apart. A guided run whose
  branches decide differently is compared with a plain Python loop over the network's pieces
  that decides each row by the published rule (First-Block Cache, TeaCache).
* A wrong guidance combine in TeaCache calibration (now one uncached ``jaxcache.sample`` run
  that records per-step changes, in ``jaxcache.tuning.teacache``): its pairs are compared with a
  plain Python loop over network calls that records the same pairs, and its trajectory with
  ``jaxcache.sample(..., policy=None)``.

Each was checked by applying the mutation by hand and watching these tests fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc
from jaxcache.tuning import teacache_calibration_data

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


@functools.cache
def _pieces():
    network, params = _network()
    jitted = tuple(jax.jit(f) for f in (network.condition, network.embed, network.layer,
                                        network.final, network.modulated_input))
    return network, params, jitted


def _layer_params(params, i):
    return jax.tree.map(lambda a: a[i], params.layers)


def _rel_l1(current, previous):
    """Per-row ``mean|current - previous| / mean|previous|``, float64, written out anew."""
    current = np.asarray(current, np.float64).reshape(len(current), -1)
    previous = np.asarray(previous, np.float64).reshape(len(previous), -1)
    scale = np.maximum(np.mean(np.abs(previous), axis=1), 1e-12)
    return np.mean(np.abs(current - previous), axis=1) / scale


def _layers(layer, params, h, ctx, start, stop):
    for i in range(start, stop):
        h = layer(_layer_params(params, i), h, ctx)
    return h


# ------------------------------------------------------------------- per-branch decisions
class _FirstBlockRule:
    """First-Block Cache's rule, per row: compute while the head residual's change since the
    row's last computed step is not strictly below the threshold."""

    first = 1

    def __init__(self, threshold):
        self.threshold = threshold
        self.previous = None
        self.changes = []

    def decide(self, step, embedded, h, ctx, modulated):
        signal = np.asarray(h, np.float64) - np.asarray(embedded, np.float64)
        if self.previous is None:
            refresh = np.ones(len(signal), bool)
            self.previous = signal
        else:
            change = _rel_l1(signal, self.previous)
            self.changes.append(change)
            refresh = ~(change < self.threshold)
            self.previous = np.where(refresh[:, None], signal, self.previous)
        return refresh


class _TeaCacheRule:
    """TeaCache's rule with coefficients (1, 0), per row: accumulate the modulated input's
    change against the previous step; compute at the first and last step and when the sum
    reaches the threshold, which resets it."""

    first = 0

    def __init__(self, threshold):
        self.threshold = threshold
        self.previous = None
        self.accumulated = None
        self.changes = []

    def decide(self, step, embedded, h, ctx, modulated):
        signal = np.asarray(modulated, np.float64)
        previous = np.zeros_like(signal) if self.previous is None else self.previous
        accumulated = (np.zeros(len(signal)) if self.accumulated is None else self.accumulated)
        accumulated = accumulated + _rel_l1(signal, previous)
        if step not in (0, STEPS - 1):
            self.changes.append(accumulated)
        refresh = (step == 0) | (step == STEPS - 1) | ~(accumulated < self.threshold)
        self.accumulated = np.where(refresh, 0.0, accumulated)
        self.previous = signal
        return refresh


def _hand_guided(rule, noise, cond, uncond):
    """A guided run with output reuse, each row deciding alone: ``(x, computed [steps, rows])``.

    A Python loop over the network's pieces. The body is computed for every row and each row
    then takes its own value (computed, or what it stored at its last refresh).
    """
    network, params, (condition, embed, layer, final, modulated_input) = _pieces()
    first = rule.first
    stop = DEPTH  # the body covers every layer after the head
    times, next_times = SOLVER.times(STEPS)
    constant = condition(params.condition, jnp.concatenate([cond, uncond]))
    x = noise
    stored_out, stored = None, np.zeros(2 * len(noise), bool)
    computed = []
    for i in range(STEPS):
        rows = jnp.concatenate([x, x])
        t = jnp.full((rows.shape[0],), times[i], jnp.float32)
        embedded, ctx = embed(params.embed, rows, t, constant)
        h = _layers(layer, params, embedded, ctx, 0, first)
        modulated = modulated_input(_layer_params(params, 0), embedded, ctx)
        refresh = rule.decide(i, embedded, h, ctx, modulated)
        compute = refresh | ~stored
        body = np.asarray(_layers(layer, params, h, ctx, first, stop))
        stored_out = body if stored_out is None else stored_out
        out = np.where(compute[:, None], body, stored_out)
        stored_out = np.where(refresh[:, None], body, stored_out)
        stored = stored | refresh
        prediction = np.asarray(final(params.final, jnp.asarray(out), ctx))
        positive, negative = np.split(prediction, 2)
        guided = negative + SCALE * (positive - negative)
        x = SOLVER.step(x, jnp.asarray(guided, jnp.float32), times[i], next_times[i])
        computed.append(compute)
    return np.asarray(x), np.asarray(computed)


# Thresholds at which the two branches of this run decide differently (found by the hand loop;
# the test checks that every measured change stays clear of the threshold, so the compiled run
# cannot round to another decision).
CASES = {
    "first_block": (_FirstBlockRule, lambda net: jc.CachePlan.around(net, DEPTH, first=1),
                    jc.FirstBlockPolicy, 0.1),
    "teacache": (_TeaCacheRule, lambda net: jc.CachePlan(net, DEPTH),
                 lambda thr: jc.TeaCachePolicy(thr, coefficients=(1.0, 0.0)), 0.8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_guidance_branches_decide_apart(case):
    make_rule, make_plan, make_policy, threshold = CASES[case]
    noise, cond, uncond = toy_networks.inputs(3)
    rule = make_rule(threshold)
    want_x, want = _hand_guided(rule, noise, cond, uncond)
    changes = np.concatenate(rule.changes)
    margin = np.min(np.abs(changes - threshold) / threshold)
    assert margin > 1e-3, f"a change lies within {margin:.2g} of the threshold: pick another"
    batch = noise.shape[0]
    want_cond, want_uncond = want[:, :batch], want[:, batch:]
    # The case is one where the branches decide differently, and somewhere skip.
    assert np.any(want_cond != want_uncond)
    assert not np.all(want)

    network, params = _network()
    plan = make_plan(network)
    got = jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=STEPS,
                    policy=make_policy(threshold), reuse=jc.OutputReuse(), uncond=uncond,
                    guidance_scale=SCALE)
    computed = np.asarray(got.body_computed)
    assert computed.shape == (STEPS, 2, batch)
    assert np.any(computed[:, 0, :] != computed[:, 1, :])
    np.testing.assert_array_equal(computed[:, 0, :], want_cond)
    np.testing.assert_array_equal(computed[:, 1, :], want_uncond)
    np.testing.assert_array_equal(np.asarray(got.refreshed), np.any(want, axis=1))
    np.testing.assert_allclose(np.asarray(got.sample), want_x, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- TeaCache calibration
def _hand_calibration(noise, cond, uncond, scale):
    """TeaCache's calibration pairs of a guided full-compute run, by a Python loop."""
    network, params, (condition, embed, layer, final, modulated_input) = _pieces()
    times, next_times = SOLVER.times(STEPS)
    constant = condition(params.condition, jnp.concatenate([cond, uncond]))
    x = noise
    xs, ys, previous_signal, previous_out = [], [], None, None
    for i in range(STEPS):
        rows = jnp.concatenate([x, x])
        t = jnp.full((rows.shape[0],), times[i], jnp.float32)
        embedded, ctx = embed(params.embed, rows, t, constant)
        signal = modulated_input(_layer_params(params, 0), embedded, ctx)
        out = final(params.final, _layers(layer, params, embedded, ctx, 0, DEPTH), ctx)
        if i:
            xs.append(_rel_l1(signal, previous_signal))
            ys.append(_rel_l1(out, previous_out))
        previous_signal, previous_out = signal, out
        positive, negative = jnp.split(out, 2)
        x = SOLVER.step(x, negative + scale * (positive - negative), times[i], next_times[i])
    return np.concatenate(xs), np.concatenate(ys), np.asarray(x)


def test_teacache_calibration_follows_the_guided_trajectory():
    network, params = _network()
    plan = jc.CachePlan(network, DEPTH)
    seg = plan.split(params)
    noise, cond, uncond = toy_networks.inputs(3)
    x, y = teacache_calibration_data(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                                     uncond=uncond, guidance_scale=SCALE)
    want_x, want_y, final_x = _hand_calibration(noise, cond, uncond, SCALE)
    assert x.shape == want_x.shape == (6 * (STEPS - 1),)
    np.testing.assert_allclose(x, want_x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-6)
    # The hand loop is the sampler's uncached guided run.
    uncached = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                         uncond=uncond, guidance_scale=SCALE)
    np.testing.assert_allclose(np.asarray(uncached.sample), final_x, rtol=1e-4, atol=1e-5)
    # The pairs depend on the trajectory, so a wrong combine shows: another scale differs.
    other_x, _, _ = _hand_calibration(noise, cond, uncond, 1.0)
    assert np.max(np.abs(other_x - want_x) / want_x) > 1e-2
