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
