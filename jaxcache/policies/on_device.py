"""A wrapper that hides a policy's schedule, so every decision is made on the device."""

from __future__ import annotations

from typing import Any

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy

__all__ = ["OnDevice"]


@settings_dataclass()
class OnDevice(RefreshPolicy):
    """``policy`` with its schedule hidden, so every decision is made on the device each step.

    Static schedules normally compile to a loop with no decision in it; this wrapper forces the
    per-step device-side decision that signal-driven policies need (to measure its cost, or to
    test that path).

    Attributes:
      policy: the wrapped policy.
    """

    policy: Any

    def __post_init__(self):
        # Only a class is refused: JAX rebuilds this wrapper from the wrapped policy's leaves.
        if isinstance(self.policy, type):
            raise TypeError(
                f"OnDevice wraps a policy instance, got the class {self.policy.__name__}: pass "
                f"an instance, OnDevice({self.policy.__name__}(...))"
            )

    @property
    def signal_kind(self):  # type: ignore[override]
        return self.policy.signal_kind

    def check(self, plan, num_steps):
        self.policy.check(plan, num_steps)

    def init(self, num_steps, signal=None):
        if signal is None:
            return self.policy.init(num_steps)
        return self.policy.init(num_steps, signal)

    def decide(self, state, step, signal):
        return self.policy.decide(state, step, signal)

