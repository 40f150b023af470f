"""Refresh policies: when the cached body is recomputed, one policy per module.

* :class:`RefreshPolicy`: the seam (``init``, ``decide``, ``static_schedule``, ``signal_kind``).
* Schedules known before sampling: :class:`IntervalPolicy` (the reference),
  :class:`StepMaskPolicy`.
* :class:`OnDevice`: forces a per-step decision on the device.
"""

from jaxcache.policies.base import SIGNAL_KINDS, RefreshPolicy
from jaxcache.policies.interval import IntervalPolicy
from jaxcache.policies.on_device import OnDevice
from jaxcache.policies.step_mask import StepMaskPolicy

__all__ = [
    "SIGNAL_KINDS",
    "IntervalPolicy",
    "OnDevice",
    "RefreshPolicy",
    "StepMaskPolicy",
]
