"""Fitting a :class:`~jaxcache.FittedForecast`'s gains to a model, schedule and step count.

:func:`fit_forecast` samples a batch uncached (the target) and with the forecast, and descends
with Optax (Adam) the mean squared error between the two final samples, differentiating through
the compiled loop of :func:`jaxcache.sample` itself: the same program that samples, with each
step rematerialised in the backward pass (``remat=True``). The gains are traced, so every Adam
step runs one compiled program. The forecast itself, a reuse mode, lives in the core
(:mod:`jaxcache.reuse.fitted`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache.policies import IntervalPolicy
from jaxcache.reuse.fitted import FittedForecast
from jaxcache.tuning.run import CalibrationRun, takes_a_run

__all__ = ["fit_forecast"]


@takes_a_run
def fit_forecast(
    run: CalibrationRun,
    *,
    policy,
    order: int = 1,
    residual: bool = False,
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
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`); the
        gains are per model evaluation of ``num_steps``.
      policy: the refresh policy to sample with, a schedule known before sampling
        (:class:`~jaxcache.IntervalPolicy`, :class:`~jaxcache.StepMaskPolicy`): the gains fit
        its refresh steps.
      order: 1 or 2.
      residual: forecast the body's residual instead of its output.
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

    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or (
        iterations < 1
    ):
        raise ValueError(f"fit_forecast: iterations must be an int >= 1, got {iterations!r}")
    if not learning_rate > 0:
        raise ValueError(f"fit_forecast: learning_rate must be > 0, got {learning_rate!r}")
    evaluations = run.evaluations
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
    start.check(run.plan, evaluations, int(np.sum(schedule)))

    def final(policy, reuse, remat=False):
        return run.sample(policy=policy, reuse=reuse, remat=remat).sample

    target = jax.lax.stop_gradient(final(IntervalPolicy(1), None))

    def loss(gains):
        reuse = FittedForecast(gains=gains, order=order, dtype=start.dtype, residual=residual)
        error = final(policy, reuse, remat).astype(jnp.float32) - target.astype(jnp.float32)
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
