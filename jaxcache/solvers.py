"""Solver steps for the sampling loop, kept separate from caching.

A solver gives the model's evaluation points for a number of steps and the update after each
evaluation. Times are in ``[0, 1]`` (``1`` is pure noise); a network that reads another time
scale converts them itself (:class:`~jaxcache.TimeConvention`). Grids are built with numpy at
trace time, so they enter the program as constants.

What a solver must satisfy (custom solvers included):

* **Hashable, and equal when its settings are equal**: the solver is a static argument of the
  compiled program, which is looked up by ``hash`` and ``==``. A frozen dataclass of numbers,
  strings and tuples is right; a new solver of equal settings reuses the program. Do not hold
  a seed in it: a seed in the solver is a compile-time constant, so every seed would compile a
  new program. Ancestral solvers set ``uses_key = True`` and receive a fresh traced key per
  evaluation instead (``jaxcache.sample(..., key=...)``).
* **Pure**: ``times`` is numpy on Python numbers; ``step`` / ``advance`` are traced JAX
  functions of their arguments, with no Python side effects and no host round trips.

Three shapes of solver:

* stateless (:class:`FlowMatchEuler`, :class:`DDIM`): ``step(x, prediction, t, t_next)``;
* ancestral (:class:`DDPM`, :class:`EulerAncestral`): ``uses_key = True`` and
  ``step(x, prediction, t, t_next, key)``;
* with state (:class:`DPMSolverPP2M`, :class:`FlowMatchHeun`): ``init_state(x)`` and
  ``advance(state, x, prediction, t, t_next, index=..., key=...) -> (x, state)``. Every model
  evaluation is one entry of ``times``: a multistep solver remembers earlier predictions in its
  state; a two-stage solver (Heun) lists both of its evaluations, so the cache counts each one
  as a step.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolverPP2M",
    "EulerAncestral",
    "FlowMatchEuler",
    "FlowMatchHeun",
    "Solver",
]


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps <= 0:
        raise ValueError(f"num_steps must be a positive int, got {num_steps}")


class Solver(abc.ABC):
    """One sampler update per model evaluation, independent of caching.

    Subclasses define :meth:`times` and either :meth:`step` (no state) or :meth:`init_state`
    and :meth:`advance` (state carried between evaluations). See the module docstring for what
    every solver must satisfy (hashable, pure).

    Attributes:
      uses_key: whether the update draws noise. Then :func:`jaxcache.sample` needs ``key=`` and
        the update receives a key of its own per evaluation (traced: a new seed reuses the
        compiled program).
    """

    uses_key: ClassVar[bool] = False

    @abc.abstractmethod
    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``(t, t_next)``: float32 arrays, one entry per model evaluation, from noise to data.

        ``t[i]`` is where the model is evaluated; ``t_next[i]`` the time the update after that
        evaluation moves towards. One evaluation per step for single-stage solvers; a
        two-stage solver lists both stages.
        """

    def step(self, x: jax.Array, prediction: jax.Array, t: jax.Array, t_next: jax.Array,
             *args: Any) -> jax.Array:
        """The sample at ``t_next`` from the sample ``x`` at ``t`` and the network's prediction.

        Ancestral solvers (``uses_key``) take a fifth argument, the evaluation's key.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no stateless step(): its update reads state kept from "
            "earlier evaluations; loop with advance(state, x, prediction, t, t_next, index=i) "
            "from init_state(x) (jaxcache.sample does)"
        )

    def init_state(self, x: jax.Array) -> PyTree:
        """The solver's state before the first evaluation (None for stateless solvers)."""
        return None

    def advance(
        self,
        state: PyTree,
        x: jax.Array,
        prediction: jax.Array,
        t: jax.Array,
        t_next: jax.Array,
        *,
        index: jax.Array,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, PyTree]:
        """The update after evaluation ``index``: ``(x, state)`` for the next evaluation.

        Args:
          state: the solver's state (from :meth:`init_state`, then from the last call).
          x: the current sample.
          prediction: the network's prediction at ``(x, t)``.
          t: this evaluation's time (``times(...)[0][index]``), a float32 scalar.
          t_next: ``times(...)[1][index]``.
          index: the evaluation's index, an int32 scalar (traced).
          key: this evaluation's PRNG key when ``uses_key``, else None.

        The default calls :meth:`step`.
        """
        if self.uses_key:
            return self.step(x, prediction, t, t_next, key), state
        return self.step(x, prediction, t, t_next), state

    def defines_update(self) -> bool:
        """Whether the class defines :meth:`step` or :meth:`advance` (one is needed)."""
        cls = type(self)
        return cls.step is not Solver.step or cls.advance is not Solver.advance


def _flow_grid(num_steps: int, shift: float) -> np.ndarray:
    """The rectified-flow grid of ``num_steps + 1`` times from 1 to 0, shifted."""
    grid = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
    return shift * grid / (1.0 + (shift - 1.0) * grid)


def _check_shift(solver: Any) -> None:
    if not solver.shift > 0:
        raise ValueError(f"{type(solver).__name__}.shift must be > 0, got {solver.shift}")


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler(Solver):
    """Euler steps of a rectified-flow ODE (FLUX, SD3, Z-Image, Qwen-Image).

    Convention: ``x_t = (1 - t) * data + t * noise``; the network predicts the velocity
    ``noise - data``; ``x <- x + (t_next - t) * v``.

    Attributes:
      shift: timestep shift ``s``: ``t <- s t / (1 + (s - 1) t)``; ``1.0`` is the plain grid.
    """

    shift: float = 1.0

    def __post_init__(self):
        _check_shift(self)

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        grid = _flow_grid(num_steps, self.shift)
        return grid[:-1].astype(np.float32), grid[1:].astype(np.float32)

    def step(self, x, prediction, t, t_next):
        dt = (t_next - t).astype(x.dtype)
        return x + dt * prediction.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class FlowMatchHeun(Solver):
    """Heun's second-order method on a rectified-flow ODE (velocity prediction).

    Each step from ``t_k`` to ``t_{k+1}`` evaluates the model twice: a predictor at ``t_k``
    (an Euler proposal) and a corrector at ``t_{k+1}`` on the proposal; the step averages the
    two velocities. The last step (to ``t = 0``) is a plain Euler step, as in Karras et al. and
    diffusers' FlowMatchHeunDiscreteScheduler, so ``num_steps`` steps make ``2 num_steps - 1``
    model evaluations: :meth:`times` lists them all, and the cache counts each as one step
    (a refresh interval of 2 refreshes every predictor).

    Attributes:
      shift: timestep shift, as in :class:`FlowMatchEuler`.
    """

    shift: float = 1.0

    def __post_init__(self):
        _check_shift(self)

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        grid = _flow_grid(num_steps, self.shift).astype(np.float32)
        # Evaluation 2k is step k's predictor (at t_k), 2k + 1 its corrector (at t_{k + 1}).
        t = np.repeat(grid[:-1], 2)[:-1]
        t[1::2] = grid[1:-1]
        t_next = np.repeat(grid[1:], 2)[:-1]
        return t, t_next

    def init_state(self, x):
        zeros = jnp.zeros(x.shape, jnp.float32)
        return zeros, zeros, jnp.zeros((), jnp.float32)  # x_k, its velocity, t_k

    def advance(self, state, x, prediction, t, t_next, *, index, key=None):
        x_k, v_k, t_k = state
        v = prediction.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        corrector = (index % 2) == 1
        proposal = xf + (t_next - t) * v
        corrected = x_k + (t_next - t_k) * (0.5 * (v_k + v))
        out = jnp.where(corrector, corrected, proposal).astype(x.dtype)
        new_state = (jnp.where(corrector, x_k, xf), jnp.where(corrector, v_k, v),
                     jnp.where(corrector, t_k, t))
        return out, new_state


@dataclasses.dataclass(frozen=True)
class _DiscreteSchedule(Solver):
    """The linear-beta training schedule of DDPM, and the evenly spaced grid over it.

    The network sees ``t = k / num_train_steps`` for the discrete training step ``k``
    (``TimeConvention.index(num_train_steps)`` turns that back into ``k``).
    """

    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        _check_steps(self.num_train_steps)
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"{type(self).__name__} needs 0 < beta_start <= beta_end < 1")

    def _alpha_bar(self) -> np.ndarray:
        betas = np.linspace(self.beta_start, self.beta_end, self.num_train_steps)
        return np.cumprod(1.0 - betas)

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        if num_steps > self.num_train_steps:
            raise ValueError(
                f"num_steps={num_steps} exceeds "
                f"{type(self).__name__}.num_train_steps={self.num_train_steps}"
            )
        k = np.round(np.linspace(self.num_train_steps - 1, 0, num_steps)).astype(np.int64)
        k_next = np.append(k[1:], -1)  # -1: the clean sample (alpha_bar = 1)
        return (
            (k / self.num_train_steps).astype(np.float32),
            (k_next / self.num_train_steps).astype(np.float32),
        )

    def alpha_bar(self, t: jax.Array) -> jax.Array:
        """``alpha_bar`` at the time ``t`` (``t < 0`` gives 1, the clean sample)."""
        table = jnp.asarray(self._alpha_bar(), jnp.float32)
        k = jnp.round(t * self.num_train_steps).astype(jnp.int32)
        return jnp.where(k < 0, 1.0, table[jnp.clip(k, 0, self.num_train_steps - 1)])


@dataclasses.dataclass(frozen=True)
class DDIM(_DiscreteSchedule):
    """Deterministic DDIM (eta = 0) for an epsilon-predicting network.

    The network sees ``t = k / num_train_steps`` for the discrete training step ``k``.

    Attributes:
      num_train_steps: length of the training noise schedule.
      beta_start: first beta of the linear schedule (DDPM / DiT).
      beta_end: last beta of the linear schedule.
    """

    def step(self, x, prediction, t, t_next):
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        eps = prediction.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        x0 = (xf - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        return (jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DDPM(_DiscreteSchedule):
    """Ancestral DDPM sampling for an epsilon-predicting network (needs ``key=``).

    On DDIM's grid of training steps ``k -> k'``: the sample is drawn from the posterior
    ``q(x_k' | x_k, x0)`` with ``x0`` predicted from the noise, and its "fixed small" variance
    ``(1 - abar_k') / (1 - abar_k) * (1 - abar_k / abar_k')`` (DDPM, and the strided schedule of
    improved DDPM / DiT). The last step returns the predicted clean sample, without noise.

    Attributes:
      num_train_steps: length of the training noise schedule.
      beta_start: first beta of the linear schedule.
      beta_end: last beta of the linear schedule.
    """

    uses_key: ClassVar[bool] = True

    def step(self, x, prediction, t, t_next, key):
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        alpha = a / a_next  # this stride's alpha; beta = 1 - alpha
        eps = prediction.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        x0 = (xf - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        mean = (jnp.sqrt(a_next) * (1.0 - alpha) * x0 + jnp.sqrt(alpha) * (1.0 - a_next) * xf) / (
            1.0 - a
        )
        variance = (1.0 - a_next) / (1.0 - a) * (1.0 - alpha)
        noise = jax.random.normal(key, x.shape, jnp.float32)
        return (mean + jnp.sqrt(variance) * noise).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_DiscreteSchedule):
    """Euler ancestral steps (k-diffusion, diffusers) for an epsilon-predicting network.

    In the variance-exploding view ``x / sqrt(abar) = x0 + sigma eps`` with
    ``sigma = sqrt((1 - abar) / abar)``, each step from ``sigma`` to ``sigma'`` goes down to
    ``sigma_down`` along the predicted noise and adds fresh noise of scale ``sigma_up``, with
    ``sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))`` and
    ``sigma_down^2 + sigma_up^2 = sigma'^2``. The sample is carried as ``x`` (the network's
    input at ``t``), on DDIM's grid of training steps. Needs ``key=``.

    Attributes:
      num_train_steps: length of the training noise schedule.
      beta_start: first beta of the linear schedule.
      beta_end: last beta of the linear schedule.
      eta: the amount of fresh noise; 0 is deterministic (DDIM's update).
    """

    eta: float = 1.0
    uses_key: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"EulerAncestral.eta must be in [0, 1], got {self.eta}")

    def step(self, x, prediction, t, t_next, key):
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        sigma2, sigma2_next = (1.0 - a) / a, (1.0 - a_next) / a_next
        up2 = jnp.minimum(sigma2_next, self.eta**2 * sigma2_next * (sigma2 - sigma2_next) / sigma2)
        sigma_up, sigma_down = jnp.sqrt(up2), jnp.sqrt(sigma2_next - up2)
        eps = prediction.astype(jnp.float32)
        x_ve = x.astype(jnp.float32) / jnp.sqrt(a)
        noise = jax.random.normal(key, x.shape, jnp.float32)
        x_ve = x_ve + (sigma_down - jnp.sqrt(sigma2)) * eps + sigma_up * noise
        return (jnp.sqrt(a_next) * x_ve).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(_DiscreteSchedule):
    """DPM-Solver++ (2M), the second-order multistep solver, for an epsilon-predicting network.

    Data prediction ``x0 = (x - sigma eps) / alpha`` with ``alpha = sqrt(abar)``,
    ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` and ``h = lambda' - lambda``:
    ``x' = (sigma' / sigma) x - alpha' expm1(-h) D`` with
    ``D = (1 + 1 / (2r)) x0 - x0_prev / (2r)``, ``r = h_prev / h``. The first step, and the
    last (to the clean sample), are first order (``D = x0``: DDIM's update), as in diffusers
    with a zero final sigma. One model evaluation per step, on DDIM's grid; the previous
    prediction is the solver's state, so a step reused from the cache still feeds the next.

    Attributes:
      num_train_steps: length of the training noise schedule.
      beta_start: first beta of the linear schedule.
      beta_end: last beta of the linear schedule.
    """

    def init_state(self, x):
        return jnp.zeros(x.shape, jnp.float32), jnp.zeros((), jnp.float32)  # x0_prev, t_prev

    def _lambda(self, a: jax.Array) -> jax.Array:
        return 0.5 * (jnp.log(a) - jnp.log1p(-a))

    def advance(self, state, x, prediction, t, t_next, *, index, key=None):
        x0_prev, t_prev = state
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        eps = prediction.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        x0 = (xf - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        final = a_next >= 1.0  # to the clean sample: lambda' is infinite, first order
        lam = self._lambda(a)
        h = jnp.where(final, 1.0, self._lambda(jnp.where(final, 0.5, a_next)) - lam)
        h_prev = lam - self._lambda(self.alpha_bar(t_prev))
        second = (index > 0) & ~final
        half_inv_r = jnp.where(second, h / jnp.where(second, 2.0 * h_prev, 1.0), 0.0)
        d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
        stepped = (
            jnp.sqrt((1.0 - a_next) / (1.0 - a)) * xf - jnp.sqrt(a_next) * jnp.expm1(-h) * d
        )
        out = jnp.where(final, x0, stepped)
        return out.astype(x.dtype), (x0, t)
