"""CFG-Cache: the unconditional branch of classifier-free guidance, estimated on cache steps.

FasterCache (Lv et al., ICLR 2025) observed that the gap between the two guidance branches,
``uncond - cond``, changes slowly from step to step, and more slowly in some frequencies than in
others. Its CFG-Cache runs both branches on *full* steps and only the conditional branch on
*cache* steps, where the unconditional prediction is estimated from the conditional one and the
gap measured at the last full step:

* On a full step the gap ``delta = uncond - cond`` is split by an FFT over the latent's spatial
  axes into a low band (the frequencies within a radius of zero) and a high band (the rest).
* On a cache step each band is multiplied by its weight at this step's time, and the weighted
  bands are kept (a run of cache steps in a band's range compounds its weight, as the published
  rule does); the estimate is ``cond + low + high``. The low band is boosted early in the
  trajectory, the high band late.

The gap is taken between the network's predictions (the final projection's outputs), so a
cache step saves half the batch of the whole network: its rows, not its layers. The sampler
runs a cache step on ``B`` rows instead of ``2B`` (:func:`jaxcache.sample`'s ``guidance=``) and
composes it with any step-level layer cache, whose conditional rows keep caching on their own.
Which steps are full is known before sampling, so the loop holds no decision for it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int
from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import check_setting

__all__ = ["CFGCache", "CFGCacheState", "frequency_bands", "low_frequency_mask"]


class CFGCacheState(NamedTuple):
    """What CFG-Cache carries through the loop, per sample (float32, shaped like one branch's
    prediction).

    Attributes:
      low: the low band of the gap ``uncond - cond`` at the last full step, weighted by every
        cache step since.
      high: the high band, likewise.
    """

    low: jax.Array
    high: jax.Array


@settings_dataclass(static=("interval", "warmup_steps", "final_steps", "schedule", "axes"))
class CFGCache:
    """FasterCache's CFG-Cache: cache steps run the conditional branch alone.

    Pass it to :func:`jaxcache.sample` as ``guidance=`` beside ``uncond=`` and
    ``guidance_scale=`` (above 1). Evaluation ``i`` is a *full* step (both branches run) when
    ``i < warmup_steps``, when ``i % interval == 0`` or when it is one of the last
    ``final_steps``; ``schedule=`` gives the full steps instead. Every other evaluation is a
    *cache* step: ``B`` rows run instead of ``2B`` and the unconditional prediction is
    estimated (see the module docstring).

    FasterCache's published settings: a gap refreshed every 5 steps after about a third of the
    run (its Mochi script: 22 of 64 steps; diffusers' default: no cache step before ``t <
    0.641``), low and high bands split at a fifth of the smaller spatial side, weights of 1.1
    for the low band while ``0.1 <= t <= 0.9`` and for the high band while ``t <= 0.3``
    (diffusers' defaults, from the paper; the Mochi script uses 1.05 and 1.2).

    Attributes:
      interval: full steps recur every ``interval`` evaluations after the warm-up (static).
      warmup_steps: evaluations run in full from the start (static, at least 1: step 0 has no
        gap to estimate from).
      final_steps: evaluations run in full at the end (static).
      schedule: None, or one bool per evaluation, True where both branches run (static; it
        replaces the three settings above).
      axes: the sample's spatial axes, split into frequencies by the FFT (static; the batch axis
        0 is never one). ``(1, 2)`` for ``[batch, height, width, channels]`` latents, ``(2,
        3)`` for ``[batch, frames, height, width, channels]`` video (each frame on its own, as
        FasterCache does), ``(1,)`` for a 1-D signal.
      radius: the low band's radius as a fraction of the smallest spatial side: the
        frequencies within ``floor(radius * min side)`` of zero (traced; FasterCache's 1/5).
      low_weight: the low band's weight per cache step inside ``low_range`` (traced).
      high_weight: the high band's weight per cache step inside ``high_range`` (traced).
      low_range: ``(lo, hi)``: the solver times ``lo <= t <= hi`` at which the low band is
        weighted (traced; 1 is noise, so early steps have large ``t``).
      high_range: the same for the high band (traced).

    Example:
      >>> out = jaxcache.sample(plan, seg, noise, cond, uncond=uncond, guidance_scale=5.0,
      ...                       solver=jaxcache.FlowMatchEuler(), num_steps=30,
      ...                       guidance=jaxcache.CFGCache(interval=3, warmup_steps=10))
      ...                       # doctest: +SKIP
    """

    interval: int = 5
    warmup_steps: int = 1
    final_steps: int = 0
    schedule: tuple[bool, ...] | None = None
    axes: tuple[int, ...] = (1, 2)
    radius: float = 0.2
    low_weight: float = 1.1
    high_weight: float = 1.1
    low_range: tuple[float, float] = (0.1, 0.9)
    high_range: tuple[float, float] = (0.0, 0.3)

    def __post_init__(self):
        check_int(self.interval, "CFGCache.interval")
        check_int(self.warmup_steps, "CFGCache.warmup_steps")
        check_int(self.final_steps, "CFGCache.final_steps", minimum=0)
        if self.schedule is not None:
            schedule = self.schedule
            if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__len__"):
                raise TypeError(
                    f"CFGCache.schedule must be a sequence of bools (True where both branches "
                    f"run), got {schedule!r}"
                )
            values = np.asarray(schedule)
            if values.ndim != 1 or values.dtype != bool:
                raise TypeError(
                    "CFGCache.schedule must be a 1-D sequence of bools, one per model "
                    f"evaluation, got an array of shape {values.shape} and dtype {values.dtype}"
                )
            object.__setattr__(self, "schedule", tuple(bool(v) for v in values))
        axes = self.axes
        if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
            axes = (int(axes),)
        if (not isinstance(axes, (tuple, list)) or not axes
                or any(isinstance(a, bool) or not isinstance(a, (int, np.integer))
                       for a in axes)):
            raise TypeError(
                f"CFGCache.axes must be a non-empty tuple of ints (the sample's spatial axes), "
                f"got {self.axes!r}"
            )
        object.__setattr__(self, "axes", tuple(int(a) for a in axes))
        check_setting(self.radius, "CFGCache.radius", minimum=0.0)
        check_setting(self.low_weight, "CFGCache.low_weight", minimum=0.0)
        check_setting(self.high_weight, "CFGCache.high_weight", minimum=0.0)
        for name in ("low_range", "high_range"):
            pair = getattr(self, name)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    f"CFGCache.{name} must be a pair (lo, hi) of solver times, got {pair!r}"
                )
            for value in pair:
                check_setting(value, f"CFGCache.{name}")
            object.__setattr__(self, name, tuple(pair))

    # --------------------------------------------------------------------- the schedule
    def full_steps(self, num_steps: int) -> np.ndarray:
        """``[num_steps]`` bool: the evaluations where both branches run.

        Args:
          num_steps: the run's model evaluations.
        """
        if self.schedule is not None:
            return np.asarray(self.schedule, bool)
        step = np.arange(num_steps)
        return ((step < self.warmup_steps) | (step % self.interval == 0)
                | (step >= num_steps - self.final_steps))

    def check(self, num_steps: int, noise_shape: tuple[int, ...], guidance_scale: Any) -> None:
        """Raises a ValueError when this run cannot use CFG-Cache, before anything compiles.

        Args:
          num_steps: the run's model evaluations.
          noise_shape: the sample's shape, ``[batch, ...]``.
          guidance_scale: the run's guidance scale (None: no guidance).
        """
        if guidance_scale is None:
            raise ValueError(
                "CFGCache estimates the unconditional branch of classifier-free guidance: pass "
                "uncond= and guidance_scale= (above 1) as well"
            )
        if not guidance_scale > 1:
            raise ValueError(
                f"CFGCache needs guidance_scale > 1, got {guidance_scale!r}: at 1 or below the "
                "guided prediction is the conditional one, or mixes toward the unconditional "
                "one, and there is no guidance to save; drop guidance="
            )
        if self.schedule is not None and len(self.schedule) != num_steps:
            raise ValueError(
                f"CFGCache.schedule has {len(self.schedule)} entries, but this run makes "
                f"{num_steps} model evaluations: give one bool per evaluation"
            )
        full = self.full_steps(num_steps)
        if not full[0]:
            raise ValueError(
                "CFGCache.schedule must run step 0 in full: a cache step estimates the "
                "unconditional branch from the gap measured at the last full step, and before "
                "step 0 there is none"
            )
        cache_steps = np.flatnonzero(~full)
        if len(cache_steps) and not full[1:].any():
            raise ValueError(
                f"this CFGCache never computes the unconditional branch after step 0 in "
                f"{num_steps} evaluations (interval={self.interval}, "
                f"warmup_steps={self.warmup_steps}, final_steps={self.final_steps}): every "
                "later step would reuse step 0's gap. Lower the interval, lengthen the warm-up "
                "or give schedule="
            )
        ndim = len(noise_shape)
        for axis in self.axes:
            if not -ndim <= axis < ndim or axis % ndim == 0:
                raise ValueError(
                    f"CFGCache.axes={self.axes} must name spatial axes of the sample, of shape "
                    f"{tuple(noise_shape)}: axes 1..{ndim - 1} (or negative), never the batch "
                    "axis 0"
                )
        normalized = [a % ndim for a in self.axes]
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"CFGCache.axes={self.axes} names an axis twice")

    def spatial_axes(self, ndim: int) -> tuple[int, ...]:
        """The spatial axes as non-negative indices for a sample of ``ndim`` axes."""
        return tuple(sorted(a % ndim for a in self.axes))

    # --------------------------------------------------------------------- the estimate
    def init(self, prediction: jax.ShapeDtypeStruct) -> CFGCacheState:
        """The state before step 0: zero bands shaped like one branch's prediction."""
        zeros = jnp.zeros(prediction.shape, jnp.float32)
        return CFGCacheState(zeros, zeros)

    def store(self, state: CFGCacheState, positive: jax.Array, negative: jax.Array
              ) -> CFGCacheState:
        """The state after a full step: the gap's bands (``positive`` is the conditional
        prediction, ``negative`` the unconditional one)."""
        delta = negative.astype(jnp.float32) - positive.astype(jnp.float32)
        low, high = frequency_bands(delta, self.radius, self.spatial_axes(delta.ndim))
        return CFGCacheState(low, high)

    def weights(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The low and high bands' weights at solver time ``t`` (float32 scalars)."""
        t = jnp.asarray(t, jnp.float32)

        def weight(value, bounds):
            lo, hi = (jnp.asarray(b, jnp.float32) for b in bounds)
            inside = (lo <= t) & (t <= hi)
            return jnp.where(inside, jnp.asarray(value, jnp.float32), jnp.float32(1.0))

        return weight(self.low_weight, self.low_range), weight(self.high_weight, self.high_range)

    def estimate(self, state: CFGCacheState, positive: jax.Array, t: jax.Array
                 ) -> tuple[jax.Array, CFGCacheState]:
        """A cache step: ``(unconditional estimate, state)`` from the conditional prediction.

        The bands are weighted at ``t`` and kept so; the estimate is ``positive + low + high``
        in float32, cast to the prediction's dtype.
        """
        w_low, w_high = self.weights(t)
        state = CFGCacheState(state.low * w_low, state.high * w_high)
        negative = positive.astype(jnp.float32) + state.low + state.high
        return negative.astype(positive.dtype), state


def low_frequency_mask(shape: tuple[int, ...], axes: tuple[int, ...], radius: Any) -> jax.Array:
    """True at the FFT frequencies (unshifted order) within ``floor(radius * min side)`` of zero.

    FasterCache draws a disc around the centre of the ``fftshift``-ed spectrum; here the same
    disc is drawn in the FFT's own order (frequency ``k`` of an axis of ``n`` sits
    ``((k + n // 2) mod n) - n // 2`` from zero), so no shift is needed. Symmetric under
    ``k -> -k``, so a real signal's low band is real.

    Args:
      shape: the array's shape.
      axes: the axes the FFT runs over.
      radius: the radius as a fraction of the smallest of those axes (may be traced).

    Returns:
      A bool array that broadcasts against ``shape`` (size 1 on the other axes).
    """
    sides = [shape[a] for a in axes]
    r = jnp.floor(jnp.asarray(radius, jnp.float32) * np.float32(min(sides)))
    squared = np.zeros([shape[a] if a in axes else 1 for a in range(len(shape))], np.float32)
    for a in axes:
        n = shape[a]
        d = (np.arange(n) + n // 2) % n - n // 2
        squared = squared + (d.astype(np.float32) ** 2).reshape(
            [n if b == a else 1 for b in range(len(shape))]
        )
    return jnp.asarray(squared) <= r * r


def frequency_bands(delta: jax.Array, radius: Any, axes: tuple[int, ...]
                    ) -> tuple[jax.Array, jax.Array]:
    """``(low, high)``: ``delta`` split by an FFT over ``axes``, ``low + high == delta``.

    Args:
      delta: a real array (float32).
      radius: the low band's radius, a fraction of the smallest of ``axes`` (may be traced).
      axes: the spatial axes.

    Returns:
      The low band (the inverse FFT of the spectrum inside :func:`low_frequency_mask`, real
      part) and the high band ``delta - low``, float32.
    """
    delta = delta.astype(jnp.float32)
    mask = low_frequency_mask(delta.shape, axes, radius)
    spectrum = jnp.fft.fftn(delta, axes=axes)
    low = jnp.real(jnp.fft.ifftn(jnp.where(mask, spectrum, 0), axes=axes)).astype(jnp.float32)
    return low, delta - low
