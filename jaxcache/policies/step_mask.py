"""Refresh at the steps a mask marks: non-uniform, planned or learned schedules."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy

__all__ = ["StepMaskPolicy"]


@settings_dataclass(static=("mask",))
class StepMaskPolicy(RefreshPolicy):
    """Refresh exactly at the steps marked True.

    The schedule is known before sampling, so the loop compiles with no decision in it. A mask
    whose first entry is False runs the body without storing it until the first refresh, as
    the reference did with empty slots.

    Attributes:
      mask: one bool per step (stored as a tuple: static and hashable).
    """

    mask: tuple[bool, ...]

    def __post_init__(self):
        mask = self.mask
        if not isinstance(mask, (str, bytes)):
            mask = tuple(mask)
        if isinstance(mask, (str, bytes)) or any(isinstance(m, (str, bytes)) for m in mask):
            raise TypeError(
                f"StepMaskPolicy.mask must hold one bool per step, got {self.mask!r} (a string "
                "reads as True wherever it is non-empty)"
            )
        object.__setattr__(self, "mask", tuple(bool(m) for m in mask))
        if not self.mask:
            raise ValueError("StepMaskPolicy.mask must hold one bool per step; got an empty mask")

    def check(self, plan, num_steps):
        if num_steps != len(self.mask):
            raise ValueError(
                f"StepMaskPolicy.mask has {len(self.mask)} entries but num_steps={num_steps}"
            )

    def init(self, num_steps, signal=None):
        self.check(None, num_steps)
        return ()

    def static_schedule(self, num_steps: int) -> np.ndarray:
        self.check(None, num_steps)
        return np.asarray(self.mask, bool)

    def decide(self, state, step, signal):
        # A numpy constant, so the table is baked into the program (no host transfer).
        return jnp.asarray(np.asarray(self.mask, dtype=bool))[step], state
