"""Reuse modes: what a skipped step uses in place of the cached body's output.

* :class:`OutputReuse`: the body's stored output (the reference).
* :class:`ResidualReuse`: the stored residual added to the body's current input.
* :class:`TaylorForecast`: TaylorSeer, a forecast from the last computed steps in the solver's
  time; :class:`HermiteForecast`: HiCache, the same ladder in a scaled Hermite basis;
  :class:`FittedForecast`: TaylorSeer with a gain per step fitted to a model
  (:func:`jaxcache.fit_forecast`, in the tuning layer above the sampler).
"""

from jaxcache.reuse.base import Position, ReuseMode, select_rows
from jaxcache.reuse.fitted import FittedForecast
from jaxcache.reuse.forecast import ForecastState, HermiteForecast, TaylorForecast
from jaxcache.reuse.output import OutputReuse
from jaxcache.reuse.residual import ResidualReuse, ResidualState

__all__ = [
    "FittedForecast",
    "ForecastState",
    "HermiteForecast",
    "OutputReuse",
    "Position",
    "ResidualReuse",
    "ResidualState",
    "ReuseMode",
    "TaylorForecast",
    "select_rows",
]
