"""Forecast reuse: a skipped step predicts the body's output from the last computed steps.

Two predictors share one state, a ladder of ``order + 1`` arrays shaped like the body's output
plus a few scalars per row, fixed in shape so it rides in the loop's carry:

* :class:`TaylorForecast` (TaylorSeer): a Taylor expansion about the last computed step whose
  derivatives are Newton divided differences over the last ``order + 1`` computed steps, in the
  solver's time. Order 1 extrapolates linearly; order ``k`` reproduces any body output that is
  a polynomial of degree ``<= k`` in ``t`` exactly, with refreshes spaced evenly or not.
  TaylorSeer's published rule divides every difference by the latest gap; the two agree at
  order 1 and for evenly spaced refreshes up to the factor the Newton form keeps exact.
* :class:`HermiteForecast` (HiCache): TaylorSeer's ladder in step units, expanded in scaled
  Hermite polynomials instead of powers, which damps long extrapolations.

Order 0 is plain reuse of the last computed output. Rows keep their own ladders: a row that
did not store this step keeps its state. :class:`Ladder` is their common base;
:class:`~jaxcache.FittedForecast` (:mod:`jaxcache.reuse.fitted`) is a third rule on it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_number
from jaxcache._dataclass import settings_dataclass
from jaxcache.reuse.base import Position, ReuseMode, select_rows

PyTree = Any

__all__ = ["ForecastState", "HermiteForecast", "Ladder", "TaylorForecast"]

MAX_ORDER = 2


class ForecastState(NamedTuple):
    """The forecast modes' state.

    Attributes:
      factors: ``order + 1`` pytrees shaped like the body's output (leading row axis): the
        value at the last computed step, then the differences of order 1, 2, ...
      positions: ``[max(order, 1), rows]`` float32: where the last computed steps were (the
        solver's time for Taylor, the step index for Hermite), newest first.
      count: ``[rows]`` int32, computed steps stored so far (saturating at ``order + 1``).
    """

    factors: tuple[PyTree, ...]
    positions: jax.Array
    count: jax.Array


def _check_order(order: Any, name: str) -> None:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not (
        0 <= order <= MAX_ORDER
    ):
        raise ValueError(f"{name}.order must be 0, 1 or 2, got {order!r}")


def _per_row(w: jax.Array, a: jax.Array) -> jax.Array:
    """A ``[rows]`` weight shaped to broadcast against ``a`` (rows on axis 0)."""
    return w.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)


def newton_gaps(state: ForecastState, s: jax.Array, order: int) -> list[jax.Array]:
    """Divisors of Newton's divided differences: order ``j`` spans the newest ``j + 1`` times."""
    return [s - state.positions[j - 1] for j in range(1, order + 1)]


def newton_weights(state: ForecastState, s: jax.Array, order: int) -> list[jax.Array]:
    """Newton's weights ``prod_{i<j} (s - s_i)`` of the differences of order ``1..order``."""
    weights, w = [], jnp.ones_like(state.positions[0])
    for j in range(1, order + 1):
        w = w * (s - state.positions[j - 1])
        weights.append(w)
    return weights


class Ladder(ReuseMode):
    """The shared ladder of differences; subclasses say where a step is and how to expand."""

    #: Whether positions are the solver's time: two stored evaluations at one time would then
    #: divide by zero (the sampler refuses such runs before compiling).
    divides_by_time: bool = False

    order: int
    dtype: Any
    residual: bool

    def history(self) -> int:
        return self.order + 1

    def _position(self, position: Position) -> jax.Array:
        raise NotImplementedError

    def init(self, plan, body, constant):
        rows = jax.tree.leaves(body)[0].shape[0]

        def zeros(s):
            return jnp.zeros(s.shape, self.dtype or s.dtype)

        factors = tuple(jax.tree.map(zeros, body) for _ in range(self.order + 1))
        return ForecastState(
            factors=factors,
            positions=jnp.zeros((max(self.order, 1), rows), jnp.float32),
            count=jnp.zeros((rows,), jnp.int32),
        )

    def _gaps(self, state: ForecastState, s: jax.Array) -> list[jax.Array]:
        """The divisor of the order-``j`` difference, ``j = 1..order`` (``[rows]`` each)."""
        raise NotImplementedError

    def store(self, state, body_in, body_out, position, rows):
        s = self._position(position)
        if self.residual:
            body_out = jax.tree.map(lambda o, i: o - i, body_out, body_in)
        new = [jax.tree.map(lambda y, f: y.astype(f.dtype), body_out, state.factors[0])]
        for j, gap in enumerate(self._gaps(state, s), start=1):
            valid = state.count >= j
            safe = jnp.where(valid, gap, 1.0)

            def difference(a, b, valid=valid, safe=safe):
                return jnp.where(_per_row(valid, a), (a - b) / _per_row(safe, a), 0)

            new.append(jax.tree.map(difference, new[j - 1], state.factors[j - 1]))
        positions = jnp.concatenate(
            [jnp.broadcast_to(s, state.positions[:1].shape), state.positions[:-1]]
        )
        count = jnp.minimum(state.count + 1, self.order + 1)
        updated = ForecastState(tuple(new), positions, count)
        if rows is None:
            return updated
        return ForecastState(
            factors=select_rows(rows, updated.factors, state.factors),
            positions=select_rows(rows, updated.positions, state.positions, axis=1),
            count=select_rows(rows, updated.count, state.count),
        )

    def _weights(
        self, state: ForecastState, s: jax.Array, position: Position
    ) -> list[jax.Array]:
        """The ``[rows]`` weight of each difference of order ``1..order`` at ``position``."""
        raise NotImplementedError

    def reuse(self, state, body_in, position):
        s = self._position(position)
        out = state.factors[0]
        for j, weight in enumerate(self._weights(state, s, position), start=1):
            weight = jnp.where(state.count > j, weight, 0.0)
            out = jax.tree.map(lambda o, f, w=weight: o + _per_row(w, f) * f, out, state.factors[j])
        if self.residual:
            return jax.tree.map(lambda o, i: (i + o.astype(i.dtype)), out, body_in)
        return jax.tree.map(lambda o, i: o.astype(i.dtype), out, body_in)

    def rows(self, state, start, stop):
        return ForecastState(
            factors=jax.tree.map(lambda a: a[start:stop], state.factors),
            positions=state.positions[:, start:stop],
            count=state.count[start:stop],
        )

    def check(self, plan, num_steps, refreshes):
        name = type(self).__name__
        need = self.order + 1
        if need > num_steps:
            raise ValueError(
                f"{name}(order={self.order}) forecasts from {need} computed steps, more than "
                f"the run's num_steps={num_steps}"
            )
        if refreshes is not None and refreshes < need:
            raise ValueError(
                f"{name}(order={self.order}) needs {need} computed steps, but the schedule "
                f"refreshes only {refreshes} times in {num_steps} steps; lower the order or "
                "refresh more often"
            )


@settings_dataclass(static=("order", "dtype", "residual"))
class TaylorForecast(Ladder):
    """TaylorSeer: forecast the body's output by a Taylor expansion in the solver's time.

    Attributes:
      order: 0 (plain reuse), 1 (linear, the usual choice) or 2.
      dtype: dtype of the stored differences; None keeps the body's activation dtype (then the
        state is ``order + 1`` copies of one activation); ``jnp.float32`` is more precise for
        bfloat16 models at twice the bytes.

    Example:
      >>> out = jaxcache.sample(plan, seg, noise, cond, solver=jaxcache.FlowMatchEuler(),
      ...                       num_steps=20, policy=jaxcache.IntervalPolicy(2),
      ...                       reuse=jaxcache.TaylorForecast(1))     # doctest: +SKIP
    """

    order: int = 1
    dtype: Any = None
    residual: bool = False
    divides_by_time = True

    def __post_init__(self):
        _check_order(self.order, "TaylorForecast")

    def _position(self, position):
        return position.t.astype(jnp.float32)

    def _gaps(self, state, s):
        return newton_gaps(state, s, self.order)

    def _weights(self, state, s, position):
        return newton_weights(state, s, self.order)


@settings_dataclass(static=("order", "dtype", "residual"))
class HermiteForecast(Ladder):
    """HiCache: TaylorSeer's differences expanded in scaled Hermite polynomials.

    With ``x`` the steps since the last computed step and ``D_k`` the order-``k`` difference
    per step (each divided by the latest gap, as in TaylorSeer), the forecast is
    ``D_0 + sum_k D_k H_k(scale * x) scale**k / k!`` with physicists' Hermite polynomials
    ``H_1(y) = 2y``, ``H_2(y) = 4y**2 - 2``. At order 1 this is a linear extrapolation whose
    slope is scaled by ``2 scale**2`` (halved at the default 0.5); ``scale = 1/sqrt(2)`` gives
    Taylor's leading terms.

    Attributes:
      order: 0, 1 or 2.
      scale: the Hermite scale ``sigma`` (a traced number: a new value does not recompile).
      dtype: dtype of the stored differences (see :class:`TaylorForecast`).
    """

    order: int = 2
    scale: float = 0.5
    dtype: Any = None
    residual: bool = False

    def __post_init__(self):
        _check_order(self.order, "HermiteForecast")
        check_number(self.scale, "HermiteForecast.scale", minimum=0.0)

    def _position(self, position):
        return position.step.astype(jnp.float32)

    def _gaps(self, state, s):
        gap = s - state.positions[0]
        return [gap] * self.order

    def _weights(self, state, s, position):
        sigma = jnp.asarray(self.scale, jnp.float32)
        y = sigma * (s - state.positions[0])
        hermite = [jnp.ones_like(y), 2.0 * y]
        for k in range(1, self.order):
            hermite.append(2.0 * y * hermite[k] - 2.0 * k * hermite[k - 1])
        return [hermite[k] * sigma**k / math.factorial(k) for k in range(1, self.order + 1)]
