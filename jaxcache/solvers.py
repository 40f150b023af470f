"""Solver steps for the sampling loop, kept separate from caching.

A solver gives the time grid for a number of steps and one update ``x_t -> x_{t_next}`` from the
network's prediction. Times are in ``[0, 1]`` (``1`` is pure noise); the network sees the same
``t``. Grids are built with numpy at trace time, so they enter the program as constants.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Solver", "FlowMatchEuler", "DDIM"]


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps <= 0:
        raise ValueError(f"num_steps must be a positive int, got {num_steps}")


class Solver(abc.ABC):
    """One deterministic sampler update, independent of caching."""

    @abc.abstractmethod
    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``(t, t_next)``: float32 arrays of length ``num_steps``, from noise towards data."""

    @abc.abstractmethod
    def step(self, x: jax.Array, prediction: jax.Array, t: jax.Array, t_next: jax.Array):
        """The sample at ``t_next`` from the sample ``x`` at ``t`` and the network's prediction."""


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
        if not self.shift > 0:
            raise ValueError(f"FlowMatchEuler.shift must be > 0, got {self.shift}")

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        grid = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
        grid = self.shift * grid / (1.0 + (self.shift - 1.0) * grid)
        return grid[:-1].astype(np.float32), grid[1:].astype(np.float32)

    def step(self, x, prediction, t, t_next):
        dt = (t_next - t).astype(x.dtype)
        return x + dt * prediction.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    """Deterministic DDIM (eta = 0) for an epsilon-predicting network.

    The network sees ``t = k / num_train_steps`` for the discrete training step ``k``.

    Attributes:
      num_train_steps: length of the training noise schedule.
      beta_start: first beta of the linear schedule (DDPM / DiT).
      beta_end: last beta of the linear schedule.
    """

    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        _check_steps(self.num_train_steps)
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError("DDIM needs 0 < beta_start <= beta_end < 1")

    def _alpha_bar(self) -> np.ndarray:
        betas = np.linspace(self.beta_start, self.beta_end, self.num_train_steps)
        return np.cumprod(1.0 - betas)

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        if num_steps > self.num_train_steps:
            raise ValueError(
                f"num_steps={num_steps} exceeds DDIM.num_train_steps={self.num_train_steps}"
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

    def step(self, x, prediction, t, t_next):
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        eps = prediction.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        x0 = (xf - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        return (jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps).astype(x.dtype)
