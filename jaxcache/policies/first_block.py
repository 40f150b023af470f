"""First-Block Cache: recompute when the first block's residual changes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy, check_setting
from jaxcache.policies.signals import last_computed_start, last_computed_update, relative_l1

__all__ = ["FirstBlockPolicy", "FirstBlockState"]


class FirstBlockState(NamedTuple):
    """First-Block Cache's state, per row.

    Attributes:
      previous: the signal at the row's last computed step.
      seen: ``[rows]`` bool, whether ``previous`` holds a value.
    """

    previous: jax.Array
    seen: jax.Array


@settings_dataclass()
class FirstBlockPolicy(RefreshPolicy):
    """First-Block Cache (ParaAttention; diffusers' ``FirstBlockCacheConfig``).

    The plan's head runs the first block (``first_layers=1``); its residual (output minus
    input, image stream) is compared with the residual at the row's last computed step by
    :func:`~jaxcache.policies.signals.relative_l1`. The body (the remaining blocks) is skipped
    while the change stays strictly below ``threshold``; pair it with
    :class:`~jaxcache.ResidualReuse` (the published rule: the remaining blocks' residual is
    added to the first block's output) or with a forecast. The reference value changes only on
    computed steps, so drift accumulates over consecutive skips. ``threshold = 0`` never skips.

    Attributes:
      threshold: the relative change below which the body is skipped (traced; diffusers'
        default 0.05, 0.08 recommended for FLUX).
      warmup_steps: steps at the start that always compute (traced).
    """

    threshold: float = 0.05
    warmup_steps: int = 0

    signal_kind = "head_residual"

    def __post_init__(self):
        check_setting(self.threshold, "FirstBlockPolicy.threshold", minimum=0.0)
        check_setting(self.warmup_steps, "FirstBlockPolicy.warmup_steps", integer=True, minimum=0)

    def init(self, num_steps, signal=None):
        return FirstBlockState(*last_computed_start(signal))

    def decide(self, state, step, signal):
        change = relative_l1(signal, state.previous)
        threshold = jnp.asarray(self.threshold, jnp.float32)
        refresh = (
            ~state.seen
            | (step < self.warmup_steps)
            | (threshold <= 0)
            | ~(change < threshold)  # NaN compares False: it computes
        )
        return refresh, FirstBlockState(
            *last_computed_update(state.previous, state.seen, refresh, signal))
