"""Refresh policies: when the cached layers are recomputed.

A policy is pure data (a frozen, hashable dataclass, so it can be a static argument of ``jit``)
with two pure functions:

* ``init(num_steps) -> state``: the policy's state before the first step (validated against the
  number of steps at trace time).
* ``decide(state, step, signal) -> (refresh, state)``: ``refresh`` is a boolean array, never a
  Python bool, so the decision stays inside the compiled program. ``signal`` is what the plan's
  head produced this step (static policies ignore it).

Static policies (the reference's interval, explicit step masks) ignore the signal; dynamic
policies read it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache.step_cache import _check_interval

PyTree = Any

__all__ = ["RefreshPolicy", "IntervalPolicy", "OnDevice", "StepMaskPolicy"]


class RefreshPolicy(abc.ABC):
    """Decides, on the device, whether a step recomputes the cached layers."""

    @abc.abstractmethod
    def init(self, num_steps: int) -> PyTree:
        """The state before step 0.

        Args:
          num_steps: the number of denoising steps (static).
        """

    def static_schedule(self, num_steps: int) -> np.ndarray | None:
        """The refresh decision of every step, if it is known before sampling; else None.

        The sampler compiles a known periodic schedule (refresh when ``step % k == 0``) to a
        loop with no decision in it; policies that read signals or state return None.
        """
        return None

    @abc.abstractmethod
    def decide(self, state: PyTree, step: jax.Array, signal: PyTree) -> tuple[jax.Array, PyTree]:
        """Whether to refresh at ``step``.

        Args:
          state: the policy state.
          step: the step index, an int32 scalar array.
          signal: the head's signal for this step, or None.

        Returns:
          ``(refresh, new_state)`` with ``refresh`` a boolean scalar array.
        """


@dataclasses.dataclass(frozen=True)
class IntervalPolicy(RefreshPolicy):
    """The reference policy: refresh when ``step % interval == 0``.

    Step 0 always refreshes; ``interval=1`` refreshes every step (the cached loop then equals
    the uncached loop).

    Attributes:
      interval: the refresh interval, a positive int.
    """

    interval: int

    def __post_init__(self):
        _check_interval(self.interval)

    def init(self, num_steps: int) -> tuple[()]:
        return ()

    def static_schedule(self, num_steps: int) -> np.ndarray:
        return np.arange(num_steps) % self.interval == 0

    def decide(self, state, step, signal):
        return jnp.asarray(step) % self.interval == 0, state


@dataclasses.dataclass(frozen=True)
class StepMaskPolicy(RefreshPolicy):
    """Refresh exactly at the steps marked True (non-uniform or learned schedules).

    Attributes:
      mask: one bool per step, as a tuple (static and hashable).
    """

    mask: tuple[bool, ...]

    def __post_init__(self):
        object.__setattr__(self, "mask", tuple(bool(m) for m in self.mask))
        if not self.mask:
            raise ValueError("StepMaskPolicy.mask must hold one bool per step; got an empty mask")

    def init(self, num_steps: int) -> tuple[()]:
        if num_steps != len(self.mask):
            raise ValueError(
                f"StepMaskPolicy.mask has {len(self.mask)} entries but num_steps={num_steps}"
            )
        return ()

    def static_schedule(self, num_steps: int) -> np.ndarray:
        self.init(num_steps)
        return np.asarray(self.mask, bool)

    def decide(self, state, step, signal):
        # A numpy constant, so the table is baked into the program (no host transfer).
        table = jnp.asarray(np.asarray(self.mask, dtype=bool))
        return table[step], state


@dataclasses.dataclass(frozen=True)
class OnDevice(RefreshPolicy):
    """``policy`` with its schedule hidden, so every decision is made on the device each step.

    Static schedules normally compile to a loop with no decision in it; this wrapper forces the
    per-step device-side decision that signal-driven policies need (to measure its cost, or to
    test that path).

    Attributes:
      policy: the wrapped policy.
    """

    policy: RefreshPolicy

    def init(self, num_steps: int) -> PyTree:
        return self.policy.init(num_steps)

    def decide(self, state, step, signal):
        return self.policy.decide(state, step, signal)
