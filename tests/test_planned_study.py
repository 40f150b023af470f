"""The planned families of the trade-off study (jaxcache.digits.planned), on a tiny model.

Each family gives one setting per budget and reuse mode, within the budget; the searched
("planned") schedules come from the measured search and, for the fitted forecast, with gains
fitted to the schedule they run with.
"""

import numpy as np
import pytest
from random_models import random_model

import jaxcache as jc
from jaxcache.digits import planned

STEPS = 6


@pytest.fixture(scope="module")
def settings():
    model = random_model("dit", channels=1, vocab_size=11, caption_len=1, depth=2,
                         image_size=16, patch_size=4)
    common = dict(seed=1, per_class=1, solver=jc.FlowMatchEuler(), modes=("taylor1",),
                  fit_iterations=2, router_iterations=2, learned_modes=("residual",))
    # The fitted forecast where it is the family's own recipe (the searched schedule); the
    # other step-mask families fit it alike (a fit per schedule), so once is enough here.
    return (planned.planned_settings(model, STEPS, (3,), families=("centered", "magcache"),
                                     fitted=False, **common)
            + planned.planned_settings(model, STEPS, (3,), families=("planned", "learned"),
                                       **common))


def test_every_family_gives_a_setting_per_budget_and_mode(settings):
    seen = {(s.family, s.mode, s.knob) for s in settings}
    assert {("centered", "taylor1", 3), ("magcache", "taylor1", 3), ("planned", "taylor1", 3),
            ("planned", "fitted1", 3), ("learned", "residual", 3)} <= seen


def test_step_mask_families_stay_within_the_interval_budget(settings):
    budget = {3: len(range(0, STEPS, 3))}
    for s in settings:
        if s.family == "learned":
            mask = np.asarray(s.policy.mask)
            assert mask.mean() <= budget[s.knob] / STEPS + 1e-9
            continue
        schedule = np.asarray(s.policy.static_schedule(STEPS))
        assert schedule[0] and schedule.sum() <= budget[s.knob], (s.family, s.mode, s.knob)


def test_the_searched_family_fits_gains_to_its_own_schedule(settings):
    for s in settings:
        if s.family == "planned" and s.mode == "fitted1":
            assert isinstance(s.reuse, jc.FittedForecast)
            assert isinstance(s.policy, jc.StepMaskPolicy)
            assert np.asarray(s.policy.static_schedule(STEPS)).sum() == len(
                range(0, STEPS, s.knob))


def test_unknown_families_are_refused_before_fitting():
    with pytest.raises(ValueError, match="unknown families or modes"):
        planned.planned_settings(None, STEPS, families=("nope",), seed=1)


@pytest.mark.parametrize("errors, want", [
    # (Taylor on its schedule, fitted gains on it, refitted gains on the moved schedule)
    ((-40.0, -37.0, -38.0), "taylor"),   # fitting made it worse: gains of one kept
    ((-40.0, -41.0, -40.5), "fitted"),   # fitting helped, moving did not
    ((-40.0, -41.0, -42.0), "moved"),    # the schedule searched again with the gains won
])
def test_the_fitted_row_keeps_what_measures_best_on_the_fitting_batch(errors, want):
    from types import SimpleNamespace

    taylor_error, fitted_error, moved_error = errors
    searched = jc.StepMaskPolicy((True, False, True, False, False, True))
    moved = jc.StepMaskPolicy((True, False, False, True, False, True))
    gains = {"fitted": jc.FittedForecast(gains=np.full((STEPS, 1), 2.0, np.float32), order=1),
             "moved": jc.FittedForecast(gains=np.full((STEPS, 1), 3.0, np.float32), order=1)}

    taylor = SimpleNamespace(policy=searched, error=taylor_error, start_error=taylor_error)

    def search(starts, reuse, max_rounds=None):
        if reuse is gains["fitted"]:  # from the searched schedule, moving to another
            return SimpleNamespace(policy=moved, error=-39.0, start_error=fitted_error)
        assert reuse is gains["moved"] and starts == moved and max_rounds == 0
        return SimpleNamespace(policy=moved, error=moved_error, start_error=moved_error)

    def fit(policy):
        return gains["fitted"] if policy == searched else gains["moved"]

    policy, reuse, _ = planned._searched_and_fitted(taylor, search, fit, STEPS)
    expected = {"taylor": (searched, 1.0), "fitted": (searched, 2.0), "moved": (moved, 3.0)}
    assert policy == expected[want][0]
    assert isinstance(reuse, jc.FittedForecast)
    np.testing.assert_array_equal(np.asarray(reuse.gains), expected[want][1])
