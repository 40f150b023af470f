"""Fitted forecast: TaylorSeer's forecast with a gain per step and order, fitted to a model.

A Taylor forecast extrapolates every skipped step the same way, while a trained model's
features do not move the same way at every step (on the shipped digit models they change most
at the first and last steps). :class:`FittedForecast` multiplies the weight of each Taylor term
by a gain per step, ``gains[step, j - 1]`` for the order-``j`` term:

    forecast(step) = D_0 + sum_j gains[step, j - 1] * w_j(t) * D_j

with ``D_j`` and ``w_j`` the Newton differences and weights of :class:`TaylorForecast`. Gains of
one are TaylorSeer exactly; HiCache's order-1 rule is one gain ``2 scale**2`` for every step.
:func:`fit_forecast` fits the gains for one model, schedule and step count with Optax: it
samples a batch uncached (the target) and with the forecast, and descends the mean squared
error between the two final samples through the compiled loop. The gains are traced numbers:
new values reuse the compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
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

PyTree = Any

__all__ = ["FittedForecast", "fit_forecast"]


@settings_dataclass(static=("order", "dtype", "residual"))
class FittedForecast(Ladder):
    """TaylorSeer with a fitted gain per step and order (see the module docstring).

    Attributes:
      gains: ``[evaluations, order]`` float32, the gain of each Taylor term at each model
        evaluation (the step count for one-stage solvers; a traced array: new gains reuse the
        compiled program). Build it with :func:`fit_forecast`, or from ones (:meth:`taylor`)
        for TaylorSeer exactly.
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


def fit_forecast(
    plan,
    params,
    noise: jax.Array,
    cond: PyTree,
    *,
    solver,
    num_steps: int,
    policy,
    order: int = 1,
    residual: bool = False,
    uncond: PyTree = None,
    guidance_scale: float | None = None,
    key: jax.Array | None = None,
    iterations: int = 60,
    learning_rate: float = 0.05,
    initial: FittedForecast | None = None,
    log: Callable[[int, float], None] | None = None,
    remat: bool = True,
) -> FittedForecast:
    """Fits a :class:`FittedForecast`'s gains to one model, schedule and step count.

    Samples ``noise`` uncached (the target, with the same plan refreshed every step) and then
    descends, with Adam, the mean squared error between the target and the sample under
    ``policy`` with the forecast, differentiating through the compiled loop. Fit on a few
    dozen samples that are not the ones you evaluate on. With ``remat`` (the default) the
    backward pass recomputes each step from its carry, so it holds one step's activations at a
    time; memory still grows with the batch.

    Args:
      plan: the cache plan to sample with.
      params: its split parameters (:meth:`CachePlan.split`).
      noise: the fitting batch's initial noise.
      cond: its condition.
      solver: the solver to sample with.
      num_steps: the step count to sample with (the gains are per step).
      policy: the refresh policy to sample with, a schedule known before sampling
        (:class:`~jaxcache.IntervalPolicy`, :class:`~jaxcache.StepMaskPolicy`): the gains fit
        its refresh steps.
      order: 1 or 2.
      residual: forecast the body's residual instead of its output.
      uncond: the unconditional input for guidance (None: unguided).
      guidance_scale: the guidance scale.
      key: the solver's key, for stochastic solvers.
      iterations: Adam steps.
      learning_rate: Adam's learning rate.
      initial: gains to start from (default: ones, TaylorSeer).
      log: called with ``(iteration, loss)`` after every Adam step, the loss being the mean
        squared error before that step (reading it back waits for the step; None reads
        nothing back until the end).
      remat: rematerialise each step in the backward pass (:func:`~jaxcache.sample`'s
        ``remat``); False keeps every step's activations, faster where they fit in memory.

    Returns:
      The fitted forecast (its ``gains`` a float32 device array).

    Raises:
      ValueError: for ``iterations < 1``, a non-positive learning rate, a policy that decides
        on the device (signal-driven, :class:`~jaxcache.OnDevice`), or settings the run cannot
        honour (checked before anything compiles).
    """
    import optax  # a declared dependency, loaded only when fitting

    from jaxcache.policies import IntervalPolicy
    from jaxcache.sampler import sample

    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or (
        iterations < 1
    ):
        raise ValueError(f"fit_forecast: iterations must be an int >= 1, got {iterations!r}")
    if not learning_rate > 0:
        raise ValueError(f"fit_forecast: learning_rate must be > 0, got {learning_rate!r}")
    evaluations = len(solver.times(num_steps)[0])
    start = initial or FittedForecast.taylor(evaluations, order, residual=residual)
    if (start.order, start.residual) != (order, residual):
        raise ValueError(
            f"fit_forecast: initial has order={start.order}, residual={start.residual}; "
            f"expected order={order}, residual={residual}"
        )
    if policy is None:
        raise ValueError("fit_forecast: policy is None; give the policy you will sample with")
    schedule = policy.static_schedule(evaluations)
    if schedule is None:
        raise ValueError(
            f"fit_forecast needs a schedule known before sampling (IntervalPolicy, "
            f"StepMaskPolicy), got {type(policy).__name__}: a loop that decides on the device "
            "runs its body in a while_loop, which reverse-mode differentiation does not cross"
        )
    start.check(plan, evaluations, int(np.sum(schedule)))

    def run(policy, reuse, remat=False):
        return sample(
            plan, params, noise, cond, solver=solver, num_steps=num_steps, policy=policy,
            reuse=reuse, uncond=uncond, guidance_scale=guidance_scale, key=key, remat=remat,
        ).sample

    target = jax.lax.stop_gradient(run(IntervalPolicy(1), None))

    def loss(gains):
        reuse = FittedForecast(gains=gains, order=order, dtype=start.dtype, residual=residual)
        error = run(policy, reuse, remat).astype(jnp.float32) - target.astype(jnp.float32)
        return jnp.mean(jnp.square(error))

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def update(gains, opt_state):
        value, grad = jax.value_and_grad(loss)(gains)
        # optax mixes its int32 step count with floats: let it, whatever the caller's promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grad, opt_state)
        return optax.apply_updates(gains, updates), opt_state, value

    gains = jnp.asarray(start.gains, jnp.float32)
    opt_state = optimizer.init(gains)
    for iteration in range(iterations):
        gains, opt_state, value = update(gains, opt_state)
        if log is not None:
            log(iteration, float(value))
    return FittedForecast(gains=gains, order=order, dtype=start.dtype, residual=residual)
