"""The reference policy: refresh every ``interval`` steps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy
from jaxcache.step_cache import check_interval

__all__ = ["IntervalPolicy"]


@settings_dataclass(static=("interval",))
class IntervalPolicy(RefreshPolicy):
    """The reference policy: refresh when ``step % interval == 0``.

    Step 0 always refreshes; ``interval=1`` refreshes every step (the cached loop then equals
    the uncached loop). The schedule is known before sampling, so the loop compiles with no
    decision in it.

    Attributes:
      interval: the refresh interval, a positive int (static).
    """

    interval: int

    def __post_init__(self):
        check_interval(self.interval)

    def init(self, num_steps, signal=None):
        return ()

    def static_schedule(self, num_steps: int) -> np.ndarray:
        return np.arange(num_steps) % self.interval == 0

    def decide(self, state, step, signal):
        return jnp.asarray(step) % self.interval == 0, state
