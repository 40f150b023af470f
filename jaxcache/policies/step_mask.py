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

    @classmethod
    def centered(
        cls, num_steps: int, refreshes: int, *, center: float = 0.5, power: float = 1.4
    ) -> StepMaskPolicy:
        """Refreshes spaced densely around a central step and sparsely away from it.

        After DeepCache's non-uniform strategy (its features change least away from the middle
        of sampling, so refreshes gather at ``center``): the refresh steps are
        ``c + sign(x) |x|^p`` for ``x`` evenly spaced in ``[-c^(1/p), (T - c)^(1/p)]``, rounded
        down, with ``c = center * T``; step 0 always refreshes. When rounding merges steps the
        power falls by 0.02 until there are exactly ``refreshes`` (power 1 spaces them evenly).

        Args:
          num_steps: model evaluations ``T``.
          refreshes: how many steps refresh, in ``[1, T]``.
          center: where refreshes gather, a fraction of the run in ``[0, 1]``.
          power: how strongly they gather (``> 1``; 1 is even spacing).

        Raises:
          ValueError: for a refresh count outside ``[1, T]``, a center outside ``[0, 1]`` or a
            power below 1.
        """
        if not (isinstance(num_steps, int) and num_steps >= 1):
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if not (isinstance(refreshes, int) and 1 <= refreshes <= num_steps):
            raise ValueError(f"refreshes must be an int in [1, {num_steps}], got {refreshes!r}")
        if not 0.0 <= center <= 1.0:
            raise ValueError(f"center must be a fraction of the run in [0, 1], got {center!r}")
        if not power >= 1.0:
            raise ValueError(f"power must be >= 1 (1 spaces refreshes evenly), got {power!r}")
        c = center * num_steps
        p = float(power)
        while True:
            x = np.linspace(-(c ** (1 / p)), (num_steps - c) ** (1 / p), refreshes + 1)
            steps = np.floor(c + np.sign(x) * np.abs(x) ** p).astype(int)
            chosen = np.unique(np.clip(np.concatenate([[0], steps[1:-1]]), 0, num_steps - 1))
            if len(chosen) == refreshes or p <= 1.0:
                break
            p = max(1.0, p - 0.02)
        if len(chosen) != refreshes:  # even spacing merged steps too: spread them evenly
            chosen = np.unique(np.linspace(0, num_steps, refreshes, endpoint=False).astype(int))
        mask = np.zeros(num_steps, bool)
        mask[chosen] = True
        return cls(tuple(mask))

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
