"""Tuning: settings fitted to a model, built on the sampler (a layer above the core).

Everything here runs :func:`jaxcache.sample` itself, the one compiled program, on the user's
model and inputs: each function takes a :class:`CalibrationRun`, passed as ``sample``'s own
first arguments (``plan, params, noise, cond, *, solver, num_steps, uncond=None,
guidance_scale=None, key=None``), then its own options (:mod:`jaxcache.tuning.run`). Nothing
in the core imports this package (``jaxcache.fit_forecast`` and
``jaxcache.calibrate_teacache`` are re-exported from it on first use).

* :func:`fit_forecast`: a :class:`~jaxcache.FittedForecast`'s gains, fitted with Optax through
  the compiled loop (:mod:`jaxcache.tuning.forecast`).
* :func:`calibrate_teacache`: TeaCache's rescaling polynomial from one full-compute run that
  records its per-step changes; :func:`teacache_calibration_data` and
  :func:`fit_teacache_coefficients` are its two halves (:mod:`jaxcache.tuning.teacache`).
* :func:`threshold_for`: a signal policy's threshold for a target fraction of computed steps
  or a layer-evaluation budget, by bisection on one compiled program
  (:mod:`jaxcache.tuning.threshold`).
* :func:`calibrate_magcache`: MagCache's magnitude ratios from one full-compute run that records
  the body's residuals, as a :class:`MagCacheCalibration` (saved and loaded, checked against the
  model and schedule, ``.policy(...)`` for a :class:`~jaxcache.MagCachePolicy`)
  (:mod:`jaxcache.tuning.magcache`).
* :func:`calibrate_sencache`: SenCache's sensitivities from one run that probes every step
  (``record=("sensitivity",)``), so that sampling runs no probe (:mod:`jaxcache.tuning.sencache`).
* :func:`plan_refreshes`: the refresh steps within a budget that minimise the modelled error
  against full compute (exact dynamic programming on :class:`StepErrors`), as a
  :class:`~jaxcache.StepMaskPolicy` (:mod:`jaxcache.tuning.planner`).
* :func:`measure_segments` and :func:`plan_path`: LeMiCa's planner, on the final sample's error
  measured per cached segment (one run each, one compiled program), and
  :func:`refine_schedule`, a local search that measures whole schedules
  (:mod:`jaxcache.tuning.segments`).
* :func:`train_router`: Learning-to-Cache, a logit per (step, body layer) trained with Optax
  through the sampler's gated loop (:class:`~jaxcache.LayerGates`), checkpointed and resumed
  exactly; the :class:`Router` thresholds to a :class:`~jaxcache.LayerMaskPolicy`
  (:mod:`jaxcache.tuning.router`).
"""

from jaxcache.tuning.forecast import fit_forecast
from jaxcache.tuning.magcache import MagCacheCalibration, calibrate_magcache, magnitude_ratios
from jaxcache.tuning.planner import StepErrors, plan_path, plan_refreshes, step_errors
from jaxcache.tuning.router import Router, train_router
from jaxcache.tuning.run import CalibrationRun
from jaxcache.tuning.segments import (
    RefinedSchedule,
    SegmentErrors,
    measure_segments,
    refine_schedule,
)
from jaxcache.tuning.sencache import SenCacheSensitivities, calibrate_sencache
from jaxcache.tuning.teacache import (
    calibrate_teacache,
    fit_teacache_coefficients,
    teacache_calibration_data,
)
from jaxcache.tuning.threshold import ThresholdChoice, threshold_for

__all__ = [
    "CalibrationRun",
    "MagCacheCalibration",
    "RefinedSchedule",
    "Router",
    "SegmentErrors",
    "SenCacheSensitivities",
    "StepErrors",
    "ThresholdChoice",
    "calibrate_magcache",
    "calibrate_sencache",
    "calibrate_teacache",
    "fit_forecast",
    "fit_teacache_coefficients",
    "magnitude_ratios",
    "measure_segments",
    "plan_path",
    "plan_refreshes",
    "refine_schedule",
    "step_errors",
    "teacache_calibration_data",
    "threshold_for",
    "train_router",
]
