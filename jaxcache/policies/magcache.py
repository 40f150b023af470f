"""MagCache: skip while the accumulated change of the body's residual magnitude stays small.

MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache") reads
one number per step from a calibration run: the magnitude ratio ``ratios[t] = ||r_t|| /
||r_{t-1}||`` of the body's residual between consecutive steps, averaged over tokens
(:func:`jaxcache.tuning.calibrate_magcache` measures it on any model). While steps are skipped
it multiplies the ratios since the last computed step and adds ``|1 - product|`` to an error;
a step computes once the error would reach the threshold or the skips would exceed a limit.
The decisions depend only on the step index and the calibration, so the schedule is known
before sampling: the loop compiles with no decision in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy

__all__ = ["MagCachePolicy", "MagCacheState"]


class MagCacheState(NamedTuple):
    """MagCache's state on the device (for :class:`~jaxcache.OnDevice`).

    Attributes:
      ratio: ``[branches]`` float32, the product of the magnitude ratios since the last
        computed step (1 right after it).
      error: ``[branches]`` float32, the accumulated ``|1 - ratio|`` since the last computed step.
      skips: int32, steps skipped since the last computed step.
    """

    ratio: jax.Array
    error: jax.Array
    skips: jax.Array


@settings_dataclass(static=("ratios", "threshold", "max_skips", "warmup", "layout"))
class MagCachePolicy(RefreshPolicy):
    """MagCache: skip the body while the accumulated magnitude-ratio error stays below a threshold.

    At every step ``t`` after the warm-up, each guidance branch multiplies its running ratio by
    ``ratios[branch, t]`` and adds ``|1 - ratio|`` to its error; the step is skipped while every
    branch's error stays strictly below ``threshold`` and the skips in a row stay at most
    ``max_skips``; otherwise it computes, and every branch's ratio, error and skip count reset.
    The published rule keeps one accumulator per guidance branch; here both branches run as
    one batch, so a step computes for both when either asks (refreshing the other branch costs
    nothing more). Step 0 and the warm-up steps always compute.

    The published rule reuses the residual of the whole block stack: use a plan whose body
    covers every layer (``CachePlan(network, N)``) with :class:`~jaxcache.ResidualReuse` (or a
    forecast), as the ratios were measured on that body.

    Every setting is static: the schedule they give is the compiled program's structure
    (:meth:`static_schedule`, computed on the host), so the loop holds no decision and a new
    threshold compiles a new program. :meth:`decide` applies the same rule on the device, in
    the same float32 arithmetic, for :class:`~jaxcache.OnDevice`.

    Defaults are the authors' Wan 2.1 script's (``magcache_thresh=0.12``, ``magcache_K=2``,
    ``retention_ratio=0.2``); their FLUX script uses 0.24, 5 and 0.1.

    Attributes:
      ratios: the calibrated magnitude ratios, one per model evaluation (``[evaluations]``) or
        per guidance branch (``[branches, evaluations]``, conditional first); entry 0 is
        unused (step 0 always computes). :meth:`jaxcache.tuning.MagCacheCalibration.policy`
        builds the policy from a calibration.
      threshold: the accumulated error at which a step computes (``> 0``).
      max_skips: the most steps skipped in a row (the paper's ``K``; ``>= 0``).
      warmup: the steps at the start that always compute: a float in ``[0, 1]`` is a fraction
        of the evaluations (the published ``retention_ratio``: ``int(warmup * evaluations +
        0.5)`` steps), an int a count of steps.
      layout: ``(first_layers, cached_layers)`` of the plan the ratios were measured on, so
        :meth:`check` refuses another body; None checks nothing.

    Example:
      >>> calibration = jaxcache.tuning.calibrate_magcache(          # doctest: +SKIP
      ...     plan, seg, noise, cond, solver=jaxcache.FlowMatchEuler(), num_steps=20)
      >>> out = jaxcache.sample(plan, seg, noise, cond,               # doctest: +SKIP
      ...                       solver=jaxcache.FlowMatchEuler(), num_steps=20,
      ...                       policy=calibration.policy(threshold=0.12),
      ...                       reuse=jaxcache.ResidualReuse())
    """

    ratios: Any
    threshold: float = 0.12
    max_skips: int = 2
    warmup: float | int = 0.2
    layout: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "ratios", _ratios(self.ratios))
        threshold = self.threshold
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(
            threshold, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"MagCachePolicy.threshold must be a Python number (static: it shapes the "
                f"schedule), got {threshold!r}"
            )
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(
                f"MagCachePolicy.threshold must be a finite number > 0 (the accumulated error "
                f"at which a step computes; 0.12 in the published Wan 2.1 script), got "
                f"{threshold!r}"
            )
        object.__setattr__(self, "threshold", float(threshold))
        object.__setattr__(self, "max_skips", _count(self.max_skips, "max_skips"))
        warmup = self.warmup
        if isinstance(warmup, (float, np.floating)):
            if not 0 <= warmup <= 1:
                raise ValueError(
                    f"MagCachePolicy.warmup as a float is a fraction of the evaluations, in "
                    f"[0, 1] (the published retention_ratio, e.g. 0.2); got {warmup!r} (give an "
                    "int for a count of steps)"
                )
            object.__setattr__(self, "warmup", float(warmup))
        else:
            object.__setattr__(self, "warmup", _count(warmup, "warmup"))
        if self.layout is not None:
            layout = tuple(self.layout)
            if len(layout) != 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0
                for v in layout
            ):
                raise ValueError(
                    "MagCachePolicy.layout must be (first_layers, cached_layers), two ints >= 0, "
                    f"or None; got {self.layout!r}"
                )
            object.__setattr__(self, "layout", tuple(int(v) for v in layout))

    @property
    def evaluations(self) -> int:
        """The model evaluations the ratios were calibrated for."""
        return len(self.ratios[0])

    def warmup_steps(self, num_steps: int) -> int:
        """The steps at the start that always compute (at least step 0)."""
        if isinstance(self.warmup, float):
            steps = int(self.warmup * num_steps + 0.5)
        else:
            steps = self.warmup
        return max(1, min(steps, num_steps))

    def check(self, plan, num_steps):
        if num_steps != self.evaluations:
            raise ValueError(
                f"MagCachePolicy: the ratios were calibrated for {self.evaluations} model "
                f"evaluations, but this run makes num_steps={num_steps}; calibrate for the "
                "solver and step count you sample with (jaxcache.tuning.calibrate_magcache)"
            )
        if plan is not None and self.layout is not None:
            got = (plan.first_layers, plan.cached_layers)
            if got != self.layout:
                raise ValueError(
                    f"MagCachePolicy: the ratios were measured on a body of first_layers="
                    f"{self.layout[0]}, cached_layers={self.layout[1]}, but the plan has "
                    f"first_layers={got[0]}, cached_layers={got[1]}; calibrate with this plan"
                )

    def init(self, num_steps, signal=None):
        self.check(None, num_steps)
        branches = len(self.ratios)
        return MagCacheState(
            ratio=jnp.ones((branches,), jnp.float32),
            error=jnp.zeros((branches,), jnp.float32),
            skips=jnp.zeros((), jnp.int32),
        )

    def static_schedule(self, num_steps: int) -> np.ndarray:
        self.check(None, num_steps)
        table = np.asarray(self.ratios, np.float32)
        threshold = np.float32(self.threshold)
        warm = self.warmup_steps(num_steps)
        ratio = np.ones(len(table), np.float32)
        error = np.zeros(len(table), np.float32)
        skips = 0
        mask = np.ones(num_steps, bool)
        # The same float32 operations as `decide`, in the same order, so both agree exactly.
        for t in range(warm, num_steps):
            product = ratio * table[:, t]
            total = error + np.abs(np.float32(1) - product)
            if bool(np.all(total < threshold)) and skips + 1 <= self.max_skips:
                ratio, error, skips = product, total, skips + 1
                mask[t] = False
            else:
                ratio = np.ones_like(ratio)
                error = np.zeros_like(error)
                skips = 0
        return mask

    def decide(self, state, step, signal):
        # A numpy constant: the table is baked into the program (no host transfer).
        table = jnp.asarray(np.asarray(self.ratios, np.float32))
        warm = step < self.warmup_steps(self.evaluations)
        product = state.ratio * table[:, step]
        total = state.error + jnp.abs(jnp.float32(1) - product)
        skip = (
            ~warm
            & jnp.all(total < jnp.float32(self.threshold))
            & (state.skips + 1 <= self.max_skips)
        )
        refresh = ~skip
        return refresh, MagCacheState(
            ratio=jnp.where(refresh, jnp.float32(1), product),
            error=jnp.where(refresh, jnp.float32(0), total),
            skips=jnp.where(refresh, 0, state.skips + 1),
        )


def _count(value: Any, name: str) -> int:
    """``value`` as an int >= 0, else a TypeError/ValueError naming ``MagCachePolicy.name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"MagCachePolicy.{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"MagCachePolicy.{name} must be an int >= 0, got {value}")
    return int(value)


def _ratios(value: Any) -> tuple[tuple[float, ...], ...]:
    """The ratios as a static, hashable table ``[branches][evaluations]`` of Python floats."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(
            f"MagCachePolicy.ratios must be numbers, one per model evaluation, got {value!r}"
        )
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            "MagCachePolicy.ratios must be known before sampling (numbers, not a traced "
            "array): they decide the schedule the program is compiled with"
        )
    if isinstance(value, Sequence) and value and isinstance(value[0], (str, bytes)):
        raise TypeError(f"MagCachePolicy.ratios must be numbers, got {value!r}")
    try:
        table = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"MagCachePolicy.ratios must be numbers, [evaluations] or [branches, evaluations], "
            f"got {value!r}"
        ) from None
    if table.ndim == 1:
        table = table[None]
    if table.ndim != 2 or table.shape[1] < 1 or not 1 <= table.shape[0] <= 2:
        raise ValueError(
            f"MagCachePolicy.ratios must be [evaluations] or [branches, evaluations] with 1 or "
            f"2 branches (conditional, unconditional), got shape {np.shape(value)}"
        )
    if not np.all(np.isfinite(table)) or np.any(table < 0):
        raise ValueError(
            "MagCachePolicy.ratios must be finite and >= 0 (ratios of residual norms), got "
            f"{table.tolist()!r}"
        )
    return tuple(tuple(float(v) for v in row) for row in table)
