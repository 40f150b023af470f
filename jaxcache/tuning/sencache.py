"""SenCache's sensitivities calibrated once for a model, from one recorded sampling run.

:class:`~jaxcache.SenCachePolicy` predicts the network's change from its inputs' drift,
``S = a_x |dx| + a_t |dt|``. Left without sensitivities it estimates ``a_x`` and ``a_t`` in
every run from its warm-up steps (one extra network evaluation per warm-up step after the
first). :func:`calibrate_sencache` measures them once instead, on a batch of the user's own,
the way the paper calibrates them: one :func:`jaxcache.sample` run that computes every step and
probes each one (``f(x_i, t_{i-1})`` beside ``f(x_i, t_i)``), recording what each probe measured
(``record=("sensitivity",)``); the means over steps and rows are the sensitivities to give the
policy, so that sampling runs no probe.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxcache.policies.sencache import SenCachePolicy
from jaxcache.tuning.run import CalibrationRun, takes_a_run

PyTree = Any

__all__ = ["SenCacheSensitivities", "calibrate_sencache"]


class SenCacheSensitivities(NamedTuple):
    """What :func:`calibrate_sencache` measured.

    Attributes:
      x: ``a_x``, the prediction's relative change per unit of the sample's relative change
        (the mean over every probed step and row).
      t: ``a_t``, its relative change per unit of time (likewise).
      per_step: ``[evaluations, 2, rows]`` float64, each probe's ``(a_x, a_t)`` per row (NaN
        at evaluation 0, which has no previous step to probe from).
    """

    x: float
    t: float
    per_step: np.ndarray

    def policy(self, tolerance: float, **settings: Any) -> SenCachePolicy:
        """A :class:`~jaxcache.SenCachePolicy` with these sensitivities (no probe runs).

        Args:
          tolerance: the policy's tolerance.
          **settings: its other settings (``max_skips=``, ``warmup_steps=``, ...).
        """
        return SenCachePolicy(tolerance, sensitivity_x=self.x, sensitivity_t=self.t, **settings)


@takes_a_run
def calibrate_sencache(run: CalibrationRun) -> SenCacheSensitivities:
    """SenCache's sensitivities ``a_x``, ``a_t`` for this model, from one full-compute run.

    The run computes every step (tolerance 0) and probes every one after the first, so each
    step gives a finite-difference pair per row (guidance branches are rows); the
    sensitivities are the means. Calibrate on samples of the kind you will sample (the same
    solver, step count and guidance): the drift per step depends on them.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`): any
        plan of the model (SenCache skips the whole network), at least 2 steps.

    Returns:
      A :class:`SenCacheSensitivities`; ``.policy(tolerance)`` gives the policy.

    Raises:
      ValueError, TypeError: for settings the sampler refuses (before anything compiles), or
        a run that measured no finite sensitivity.

    Example:
      >>> found = tuning.calibrate_sencache(plan, seg, noise, cond, solver=solver,
      ...                                   num_steps=20)                    # doctest: +SKIP
      >>> policy = found.policy(tolerance=0.1)                            # doctest: +SKIP
    """
    probing = SenCachePolicy(0.0, warmup_steps=max(run.evaluations, 2), final_steps=0)
    out = run.sample(policy=probing, record=("sensitivity",))
    per_step = np.asarray(out.sensitivities, np.float64)
    finite = np.isfinite(per_step)
    if not finite[:, 0].any() or not finite[:, 1].any():
        raise ValueError("calibrate_sencache: no probe measured a finite sensitivity (a run "
                         "of fewer than 2 evaluations, or non-finite samples)")
    x = float(np.mean(per_step[:, 0][finite[:, 0]]))
    t = float(np.mean(per_step[:, 1][finite[:, 1]]))
    return SenCacheSensitivities(x, t, per_step)
