"""The compiled program is called by name (jaxcache.lower(...).compile()), never by position."""

from __future__ import annotations

import numpy as np
import pytest

import jaxcache as jc

import toy_networks as toy

STEPS = 6


def _lowered(**kwargs):
    network, params = toy.single_stream()
    noise, cond, uncond = toy.inputs()
    plan = jc.CachePlan(network, toy.LAYERS - 1, first_layers=1)
    seg = plan.split(params)
    args = dict(solver=jc.FlowMatchEuler(), num_steps=STEPS, policy=jc.FirstBlockPolicy(0.2),
                reuse=jc.ResidualReuse(), uncond=uncond, guidance_scale=2.0)
    args.update(kwargs)
    return plan, seg, noise, cond, jc.lower(plan, seg, noise, cond, **args), args


def test_a_compiled_program_called_with_nothing_runs_what_it_was_lowered_with():
    plan, seg, noise, cond, lowered, args = _lowered()
    compiled = lowered.compile()
    want = jc.sample(plan, seg, noise, cond, **args)
    got = compiled()
    np.testing.assert_array_equal(got.sample, want.sample)
    assert "key" in compiled.names and "plan" not in compiled.names  # static: not callable


def test_named_changes_replace_only_what_they_name():
    plan, seg, noise, cond, lowered, args = _lowered()
    compiled = lowered.compile()
    other = jc.FirstBlockPolicy(0.0)  # same structure: the same program, another threshold
    got = compiled(policy=other, noise=noise * 2)
    want = jc.sample(plan, seg, noise * 2, cond, **dict(args, policy=other))
    np.testing.assert_array_equal(got.sample, want.sample)


def test_unknown_names_are_refused_and_the_text_is_jaxs():
    *_, lowered, _ = _lowered()
    compiled = lowered.compile()
    with pytest.raises(TypeError, match=r"takes \[.*'policy'.*\] by name, got \['threshold'\]"):
        compiled(threshold=0.3)
    assert "stablehlo" in lowered.as_text() or "func" in lowered.as_text()
    assert compiled.as_text()
