"""DBCache (cache-dit): the first ``Fn`` blocks decide, the last ``Bn`` blocks always run."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy, check_setting
from jaxcache.policies.signals import last_computed_start, last_computed_update, relative_l1

__all__ = ["DBCachePolicy", "DBCacheState"]


class DBCacheState(NamedTuple):
    """DBCache's state, per row.

    Attributes:
      previous: the head's residual at the row's last computed step.
      seen: ``[rows]`` bool, whether ``previous`` holds a value.
      cached: ``[rows]`` int32, steps skipped so far in this run.
      consecutive: ``[rows]`` int32, steps skipped since the last computed one.
    """

    previous: jax.Array
    seen: jax.Array
    cached: jax.Array
    consecutive: jax.Array


@settings_dataclass()
class DBCachePolicy(RefreshPolicy):
    """DBCache: the residual of the first ``Fn`` blocks decides whether the middle is skipped.

    Build the plan with ``CachePlan.around(network, depth, first=Fn, last=Bn)``: the first
    ``Fn`` layers are the head (always run; their residual, image stream, is the signal), the
    middle is the body, the last ``Bn`` layers and the final projection the tail (always run,
    on the reused middle's output). The body is skipped while the relative L1 change of the
    signal against the row's last computed step stays strictly below ``threshold``, except
    during warm-up and when a limit is reached. cache-dit reuses the middle's residual
    (:class:`~jaxcache.ResidualReuse`); any reuse mode works. ``threshold = 0`` never skips.

    All settings are traced numbers (a new value reuses the compiled program).

    Attributes:
      threshold: cache-dit's ``residual_diff_threshold`` (default 0.08).
      warmup_steps: steps at the start that compute (``max_warmup_steps``, default 8) ...
      warmup_interval: ... every ``warmup_interval``-th of them (1: all; 2: steps 0, 2, 4 ...
        compute and the others are decided by the signal), as cache-dit.
      max_cached_steps: at most this many skipped steps per run (-1: no limit).
      max_consecutive_cached_steps: at most this many skipped steps in a row (-1: no limit).
        Counted exactly (reset by a computed step), where cache-dit's counter only resets at
        its limit.
    """

    threshold: float = 0.08
    warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_consecutive_cached_steps: int = -1

    signal_kind = "head_residual"

    def __post_init__(self):
        check_setting(self.threshold, "DBCachePolicy.threshold", minimum=0.0)
        for name, minimum in (("warmup_steps", 0), ("warmup_interval", 1),
                              ("max_cached_steps", -1), ("max_consecutive_cached_steps", -1)):
            check_setting(getattr(self, name), f"DBCachePolicy.{name}", integer=True,
                          minimum=minimum)

    def init(self, num_steps, signal=None):
        previous, seen = last_computed_start(signal)
        rows = signal.shape[:1]
        return DBCacheState(previous, seen, cached=jnp.zeros(rows, jnp.int32),
                            consecutive=jnp.zeros(rows, jnp.int32))

    def decide(self, state, step, signal):
        threshold = jnp.asarray(self.threshold, jnp.float32)
        limit = jnp.asarray(self.max_cached_steps, jnp.int32)
        run_limit = jnp.asarray(self.max_consecutive_cached_steps, jnp.int32)
        interval = jnp.asarray(self.warmup_interval, jnp.int32)
        warm = (step < self.warmup_steps) & (step % interval == 0)
        refresh = (
            warm
            | ~state.seen
            | (threshold <= 0)
            | ((limit >= 0) & (state.cached >= limit))
            | ((run_limit >= 0) & (state.consecutive >= run_limit))
            | ~(relative_l1(signal, state.previous) < threshold)
        )
        previous, seen = last_computed_update(state.previous, state.seen, refresh, signal)
        skipped = (~refresh).astype(jnp.int32)
        return refresh, DBCacheState(
            previous=previous,
            seen=seen,
            cached=state.cached + skipped,
            consecutive=jnp.where(refresh, 0, state.consecutive + 1),
        )
