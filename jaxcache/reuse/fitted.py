"""Fitted forecast: TaylorSeer's forecast with a gain per step and order, fitted to a model.

A Taylor forecast extrapolates every skipped step the same way, while a trained model's
features do not move the same way at every step (on the shipped digit models they change most
at the first and last steps). :class:`FittedForecast` multiplies the weight of each Taylor term
by a gain per step, ``gains[step, j - 1]`` for the order-``j`` term:

    forecast(step) = D_0 + sum_j gains[step, j - 1] * w_j(t) * D_j

with ``D_j`` and ``w_j`` the Newton differences and weights of :class:`TaylorForecast`. Gains of
one are TaylorSeer exactly; HiCache's order-1 rule is one gain ``2 scale**2`` for every step.
:func:`jaxcache.fit_forecast` (:mod:`jaxcache.tuning.forecast`, the tuning layer above the
sampler) fits the gains for one model, schedule and step count with Optax. The gains are traced
numbers: new values reuse the compiled program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._dataclass import settings_dataclass
from jaxcache.reuse.base import Position
from jaxcache.reuse.forecast import (
    MAX_ORDER,
    ForecastState,
    Ladder,
    newton_gaps,
    newton_weights,
)

__all__ = ["FittedForecast"]


@settings_dataclass(static=("order", "dtype", "residual"))
class FittedForecast(Ladder):
    """TaylorSeer with a fitted gain per step and order (see the module docstring).

    Attributes:
      gains: ``[evaluations, order]`` float32, the gain of each Taylor term at each model
        evaluation (the step count for one-stage solvers; a traced array: new gains reuse the
        compiled program). Build it with :func:`jaxcache.fit_forecast`, or from ones
        (:meth:`taylor`) for TaylorSeer exactly.
      order: 1 or 2, the Taylor order the gains scale.
      dtype: dtype of the stored differences (see :class:`~jaxcache.TaylorForecast`).
      residual: forecast the body's residual (output minus input) instead of its output.

    Example:
      >>> reuse = jaxcache.fit_forecast(plan, seg, noise, cond,             # doctest: +SKIP
      ...                               solver=jaxcache.FlowMatchEuler(), num_steps=20,
      ...                               policy=jaxcache.IntervalPolicy(4))
      >>> out = jaxcache.sample(plan, seg, other_noise, other_cond,        # doctest: +SKIP
      ...                       solver=jaxcache.FlowMatchEuler(), num_steps=20,
      ...                       policy=jaxcache.IntervalPolicy(4), reuse=reuse)
    """

    gains: Any
    order: int = 1
    dtype: Any = None
    residual: bool = False
    divides_by_time = True

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, (int, np.integer)) or not (
            1 <= self.order <= MAX_ORDER
        ):
            raise ValueError(f"FittedForecast.order must be 1 or 2, got {self.order!r}")

    @classmethod
    def taylor(cls, evaluations: int, order: int = 1, **kwargs: Any) -> FittedForecast:
        """Gains of one for ``evaluations`` model evaluations: TaylorSeer of ``order`` exactly.

        Args:
          evaluations: the run's model evaluations (its step count for one-stage solvers).
          order: 1 or 2.
          **kwargs: ``dtype``, ``residual``.
        """
        return cls(gains=jnp.ones((evaluations, order), jnp.float32), order=order, **kwargs)

    def _position(self, position: Position) -> jax.Array:
        return position.t.astype(jnp.float32)

    def _gaps(self, state: ForecastState, s: jax.Array) -> list[jax.Array]:
        return newton_gaps(state, s, self.order)

    def _weights(self, state: ForecastState, s: jax.Array, position: Position) -> list[jax.Array]:
        gains = jnp.asarray(self.gains, jnp.float32)[position.step]
        return [w * gains[j] for j, w in enumerate(newton_weights(state, s, self.order))]

    def check(self, plan, num_steps: int, refreshes: int | None) -> None:
        shape = np.shape(self.gains)
        if shape != (num_steps, self.order):
            raise ValueError(
                f"FittedForecast.gains must have shape (model evaluations, order) = "
                f"({num_steps}, {self.order}) for this run, got {shape}; fit the gains for the "
                "step count and solver you sample with"
            )
        super().check(plan, num_steps, refreshes)
