"""TeaCache: recompute when the accumulated, rescaled change of the modulated input is large.

The calibration its users ask for with every new model (:func:`jaxcache.calibrate_teacache`,
fitting the rescaling polynomial from a full-compute run of any network) samples, so it lives in
the tuning layer above the sampler: :mod:`jaxcache.tuning.teacache`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy, check_setting
from jaxcache.policies.signals import relative_l1

__all__ = ["FLUX_COEFFICIENTS", "TeaCachePolicy", "TeaCacheState"]

#: The published FLUX.1 rescaling polynomial (highest power first), for FLUX-like models.
FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


class TeaCacheState(NamedTuple):
    """TeaCache's state, per row.

    Attributes:
      previous: the signal at the previous step (updated every step).
      accumulated: ``[rows]`` float32, the rescaled change since the last computed step.
      last_step: the index of the run's last step (which always computes), int32.
    """

    previous: jax.Array
    accumulated: jax.Array
    last_step: jax.Array


@settings_dataclass()
class TeaCachePolicy(RefreshPolicy):
    """TeaCache (ali-vilab): accumulate the rescaled change of the first block's modulated input.

    Each step the relative L1 change ``x`` of the first layer's timestep-modulated input
    against the previous step is rescaled by the polynomial ``P`` (``coefficients``, highest
    power first) and added to an accumulator; the body is skipped while the accumulator stays
    strictly below ``threshold``, and a computed step resets it. The first and the last step
    always compute. The published rule caches the residual of the whole block stack: use a
    plan with the body covering every layer and :class:`~jaxcache.ResidualReuse` (or a
    forecast). ``threshold = 0`` never skips.

    Attributes:
      threshold: the accumulated change that forces a computed step (traced; 0.6 for FLUX at
        2x in the published scripts, 0.15 for HunyuanVideo).
      coefficients: the rescaling polynomial, highest power first (traced; their number is
        static). ``(1.0, 0.0)`` uses the raw change; :func:`jaxcache.calibrate_teacache` fits
        them for a model; :data:`FLUX_COEFFICIENTS` are the published FLUX.1 ones.
    """

    threshold: float = 0.1
    coefficients: tuple[float, ...] = (1.0, 0.0)

    signal_kind = "modulated_input"

    def __post_init__(self):
        check_setting(self.threshold, "TeaCachePolicy.threshold", minimum=0.0)
        coefficients = self.coefficients
        if coefficients is None or isinstance(coefficients, (str, bytes, bool, int, float)):
            raise TypeError(
                "TeaCachePolicy.coefficients must be a sequence of numbers, highest power first "
                f"(e.g. (1.0, 0.0)), got {coefficients!r}"
            )
        if isinstance(coefficients, list):
            for c in coefficients:
                check_setting(c, "TeaCachePolicy.coefficients")
        if isinstance(coefficients, np.ndarray):
            check_setting(coefficients, "TeaCachePolicy.coefficients")
        if isinstance(coefficients, (list, np.ndarray)):
            coefficients = tuple(float(c) for c in np.asarray(coefficients).ravel())
            object.__setattr__(self, "coefficients", coefficients)
        if isinstance(coefficients, tuple):
            if not coefficients:
                raise ValueError("TeaCachePolicy.coefficients must hold at least one number")
            for c in coefficients:
                check_setting(c, "TeaCachePolicy.coefficients")

    def init(self, num_steps, signal=None):
        return TeaCacheState(
            previous=jnp.zeros(signal.shape, jnp.float32),
            accumulated=jnp.zeros(signal.shape[:1], jnp.float32),
            last_step=jnp.asarray(num_steps - 1, jnp.int32),
        )

    def rescale(self, change: jax.Array) -> jax.Array:
        """``P(change)``, the polynomial of the coefficients (Horner's rule, float32)."""
        out = jnp.zeros_like(change)
        for c in self.coefficients:
            out = out * change + jnp.asarray(c, jnp.float32)
        return out

    def decide(self, state, step, signal):
        accumulated = state.accumulated + self.rescale(relative_l1(signal, state.previous))
        threshold = jnp.asarray(self.threshold, jnp.float32)
        refresh = (
            (step == 0) | (step == state.last_step) | (threshold <= 0)
            | ~(accumulated < threshold)
        )
        return refresh, TeaCacheState(
            previous=signal.astype(jnp.float32),
            accumulated=jnp.where(refresh, 0.0, accumulated),
            last_step=state.last_step,
        )
