"""Refresh policies: when the cached body is recomputed, one policy per module.

* :class:`RefreshPolicy`: the seam (``init``, ``decide``, ``static_schedule``, ``signal_kind``).
* Schedules known before sampling, compiled with no decision in the loop:
  :class:`IntervalPolicy` (the reference), :class:`StepMaskPolicy`, :class:`MagCachePolicy`
  (calibrated magnitude ratios); per step and body layer, :class:`LayerMaskPolicy`.
* :class:`LayerGates`: traced per-(step, layer) gates, the differentiable form of a layer mask
  (for training a router).
* Signal-driven, decided on the device per sample: :class:`FirstBlockPolicy` (First-Block
  Cache), :class:`TeaCachePolicy`, :class:`DBCachePolicy`; :class:`SenCachePolicy` reads only
  the sample and the time, so a skipped step skips the whole network. Fitting their
  settings to a model (TeaCache's calibration, a threshold for a compute budget) samples, so it
  lives in the tuning layer above the sampler, :mod:`jaxcache.tuning`.
* :class:`OnDevice`: forces a per-step decision on the device.
"""

from jaxcache.policies.base import SIGNAL_KINDS, RefreshPolicy
from jaxcache.policies.dbcache import DBCachePolicy, DBCacheState
from jaxcache.policies.first_block import FirstBlockPolicy, FirstBlockState
from jaxcache.policies.interval import IntervalPolicy
from jaxcache.policies.layer_mask import LayerGates, LayerMaskPolicy
from jaxcache.policies.magcache import MagCachePolicy, MagCacheState
from jaxcache.policies.on_device import OnDevice
from jaxcache.policies.sencache import SenCachePolicy, SenCacheState
from jaxcache.policies.signals import relative_l1
from jaxcache.policies.step_mask import StepMaskPolicy
from jaxcache.policies.teacache import FLUX_COEFFICIENTS, TeaCachePolicy, TeaCacheState

__all__ = [
    "FLUX_COEFFICIENTS",
    "SIGNAL_KINDS",
    "DBCachePolicy",
    "DBCacheState",
    "FirstBlockPolicy",
    "FirstBlockState",
    "IntervalPolicy",
    "LayerGates",
    "LayerMaskPolicy",
    "MagCachePolicy",
    "MagCacheState",
    "OnDevice",
    "RefreshPolicy",
    "SenCachePolicy",
    "SenCacheState",
    "StepMaskPolicy",
    "TeaCachePolicy",
    "TeaCacheState",
    "relative_l1",
]
