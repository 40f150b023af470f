"""Schedules built from a rule: DeepCache's non-uniform refreshes (StepMaskPolicy.centered)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60).flatmap(lambda t: st.tuples(st.just(t), st.integers(1, t))),
       st.floats(0.0, 1.0), st.floats(1.0, 3.0))
def test_centered_refreshes_exactly_as_many_steps_as_asked_with_step_zero(tn, center, power):
    steps, refreshes = tn
    mask = np.asarray(jc.StepMaskPolicy.centered(steps, refreshes, center=center,
                                                 power=power).mask)
    assert mask.shape == (steps,) and mask.sum() == refreshes and mask[0]


def test_refreshes_gather_around_the_center():
    mask = np.asarray(jc.StepMaskPolicy.centered(50, 12, center=0.5, power=1.6).mask)
    gaps = np.diff(np.flatnonzero(mask))
    middle = gaps[len(gaps) // 2 - 1: len(gaps) // 2 + 1]
    assert middle.max() < gaps[0] and middle.max() < gaps[-1]


def test_power_one_spaces_refreshes_evenly():
    mask = np.asarray(jc.StepMaskPolicy.centered(20, 5, power=1.0).mask)
    assert np.flatnonzero(mask).tolist() == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=10, refreshes=0), r"refreshes must be an int in \[1, 10\]"),
    (dict(num_steps=10, refreshes=11), r"refreshes must be an int in \[1, 10\]"),
    (dict(num_steps=10, refreshes=3, center=1.5), "center must be a fraction"),
    (dict(num_steps=10, refreshes=3, power=0.5), "power must be >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jc.StepMaskPolicy.centered(**kwargs)
