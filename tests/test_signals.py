"""Signals as objects: each checks itself against the plan and builds its per-step function."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc
from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.signals import (
    SIGNALS,
    HeadResidual,
    Signal,
    check_signal,
    last_computed_start,
    last_computed_update,
    relative_l1,
    signal_function,
    signal_of,
)

import toy_networks as toy


class EmbeddingMean(Signal):
    """A signal of one's own: the embedding's mean per row (needs no head layer)."""

    name = "embedding_mean"

    def function(self, plan, params):
        return lambda embedded, h, ctx: jnp.mean(embedded, axis=-1, keepdims=True)


@settings_dataclass()
class ChangeOfMean(jc.RefreshPolicy):
    """Computes when the embedding's mean moved by more than ``threshold`` since last step."""

    threshold: float = 0.0
    signal_kind = EmbeddingMean()

    def init(self, num_steps, signal=None):
        return last_computed_start(signal)

    def decide(self, state, step, signal):
        previous, seen = state
        refresh = ~seen | ~(relative_l1(signal, previous) < self.threshold)
        return refresh, last_computed_update(previous, seen, refresh, signal)


def test_a_signal_of_ones_own_runs_through_the_sampler_unchanged():
    network, params = toy.single_stream()
    noise, cond, _ = toy.inputs()
    plan = jc.CachePlan(network, toy.LAYERS)
    seg = plan.split(params)
    common = dict(solver=jc.FlowMatchEuler(), num_steps=6)
    plain = jc.sample(plan, seg, noise, cond, **common)
    every = jc.sample(plan, seg, noise, cond, policy=ChangeOfMean(0.0), **common)
    np.testing.assert_array_equal(every.sample, plain.sample)  # threshold 0 computes each step
    lazy = jc.sample(plan, seg, noise, cond, policy=ChangeOfMean(1e9), **common)
    assert np.asarray(lazy.refreshed).tolist() == [True] + [False] * 5


def test_built_in_signals_check_the_plan_and_name_the_reader():
    network, params = toy.single_stream()
    no_head = jc.CachePlan(network, toy.LAYERS)
    with pytest.raises(ValueError, match="FirstBlockPolicy reads the residual of the layers"):
        check_signal(jc.FirstBlockPolicy(0.1), no_head)
    with pytest.raises(ValueError, match="TeaCachePolicy reads the first layer's"):
        check_signal(jc.TeaCachePolicy(0.1), no_head)  # this network has no modulated_input
    check_signal(jc.IntervalPolicy(2), no_head)  # reads nothing: nothing to check
    assert isinstance(signal_of("head_residual"), HeadResidual)
    assert sorted(SIGNALS) == ["head_residual", "modulated_input"]


def test_head_residual_is_the_head_output_minus_the_embedding():
    network, params = toy.single_stream()
    plan = jc.CachePlan(network, toy.LAYERS - 1, first_layers=1)
    fn = signal_function("head_residual", plan, plan.split(params))
    embedded, h = jnp.ones((2, 3)), jnp.full((2, 3), 2.5)
    np.testing.assert_array_equal(fn(embedded, h, None), np.full((2, 3), 1.5, np.float32))


def test_unknown_signal_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown signal_kind 'first_block'"):
        signal_of("first_block")
    with pytest.raises(TypeError, match="signal_kind must be None, a signal's name or a Signal"):
        signal_of(3)


def test_last_computed_keeps_the_signal_of_rows_that_computed_only():
    signal = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)
    previous, seen = last_computed_start(signal)
    previous, seen = last_computed_update(previous, seen, jnp.array([True, False, True]), signal)
    np.testing.assert_array_equal(previous, [[0, 1], [0, 0], [4, 5]])
    assert np.asarray(seen).tolist() == [True, False, True]
