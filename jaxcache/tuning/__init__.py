"""Tuning: settings fitted to a model, built on the sampler (a layer above the core).

Everything here runs :func:`jaxcache.sample` itself, the one compiled program, on the user's
model and inputs; nothing in the core imports this package (``jaxcache.fit_forecast`` and
``jaxcache.calibrate_teacache`` are re-exported from it on first use).

* :func:`fit_forecast`: a :class:`~jaxcache.FittedForecast`'s gains, fitted with Optax through
  the compiled loop (:mod:`jaxcache.tuning.forecast`).
* :func:`calibrate_teacache`: TeaCache's rescaling polynomial from one full-compute run that
  records its per-step changes; :func:`teacache_calibration_data` and
  :func:`fit_teacache_coefficients` are its two halves (:mod:`jaxcache.tuning.teacache`).
* :func:`threshold_for`: a signal policy's threshold for a target fraction of computed steps
  or a layer-evaluation budget, by bisection on one compiled program
  (:mod:`jaxcache.tuning.threshold`).
"""

from jaxcache.tuning.forecast import fit_forecast
from jaxcache.tuning.teacache import (
    calibrate_teacache,
    fit_teacache_coefficients,
    teacache_calibration_data,
)
from jaxcache.tuning.threshold import ThresholdChoice, threshold_for

__all__ = [
    "ThresholdChoice",
    "calibrate_teacache",
    "fit_forecast",
    "fit_teacache_coefficients",
    "teacache_calibration_data",
    "threshold_for",
]
