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

The discrete-schedule solvers (:class:`DDIM`, :class:`DDPM`, :class:`EulerAncestral`,
:class:`DPMSolverPP2M`) read the model's training noise schedule: a named one
(``beta_schedule=`` with ``beta_start`` / ``beta_end``; default DDPM's linear 1e-4..0.02) or the
table itself (``betas=`` or ``alphas_cumprod=``). The wrong schedule samples without error and
gives wrong images.
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


#: The named training schedules of :class:`_DiscreteSchedule` (diffusers' ``beta_schedule``).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

_DEFAULT_BETAS = (1e-4, 0.02)


def _cosine_betas(num_train_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol and Dhariwal's cosine schedule: ``beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta)``
    with ``f(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` (diffusers' ``squaredcos_cap_v2``)."""
    s = np.arange(num_train_steps + 1, dtype=np.float64) / num_train_steps
    f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _first(bad: np.ndarray) -> int:
    """The index of the first True in ``bad``."""
    return int(np.argmax(bad))


def _float_table(value: Any, name: str) -> tuple[float, ...]:
    """``value`` (a sequence or array of numbers) as a tuple of Python floats, or a ValueError."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D sequence of floats, got {value!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of floats (one per training step), "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        i = _first(~np.isfinite(arr))
        raise ValueError(f"{name} must be finite; entry {i} is {float(arr[i])!r}")
    return tuple(float(v) for v in arr)


@dataclasses.dataclass(frozen=True)
class _DiscreteSchedule(Solver):
    """A discrete DDPM training schedule of ``num_train_steps`` steps, and the evenly spaced grid
    over it.

    The network sees ``t = k / num_train_steps`` for the discrete training step ``k``
    (``TimeConvention.index(num_train_steps)`` turns that back into ``k``).

    The training schedule is the one the model was trained on; a wrong one samples without error
    and gives wrong images. Give it one of three ways:

    * a named schedule (default ``beta_schedule="linear"`` with ``beta_start=1e-4``,
      ``beta_end=0.02``: DDPM's, DiT's), with diffusers' names and formulas:

      - ``"linear"``: ``betas = linspace(beta_start, beta_end, T)``;
      - ``"scaled_linear"``: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``
        (Stable Diffusion 1/2, with ``beta_start=0.00085``, ``beta_end=0.012``);
      - ``"squaredcos_cap_v2"``: improved DDPM's cosine schedule,
        ``beta_i = min(1 - f((i + 1) / T) / f(i / T), 0.999)`` with
        ``f(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2``. It has no ``beta_start`` /
        ``beta_end`` (diffusers ignores them; here they must stay at their defaults).

      The tables are computed in float64 (diffusers rounds the betas to float32 first: a
      relative difference of about 1e-7).
    * ``betas=``: the training betas, one per step (a diffusers scheduler's ``betas``, or its
      config's ``trained_betas``); ``alphas_cumprod = cumprod(1 - betas)``.
    * ``alphas_cumprod=``: ``alpha_bar`` itself, one per step, strictly decreasing in ``(0, 1)``.

    A table replaces the named schedule: give ``betas`` or ``alphas_cumprod`` (not both), and
    leave ``beta_schedule``, ``beta_start`` and ``beta_end`` at their defaults. Tables are stored
    as tuples of floats (a sequence or a numpy array is converted), so the solver stays a
    hashable, equal-by-value static argument. ``num_train_steps`` defaults to the table's
    length (1000 without a table); given explicitly, it must equal the table's length. As the
    value is filled in, ``dataclasses.replace(solver, betas=...)`` with a table of another length
    is refused: pass ``num_train_steps=None`` with it.
    """

    num_train_steps: int | None = None
    beta_start: float = _DEFAULT_BETAS[0]
    beta_end: float = _DEFAULT_BETAS[1]
    _: dataclasses.KW_ONLY
    beta_schedule: str = "linear"
    betas: tuple[float, ...] | None = None
    alphas_cumprod: tuple[float, ...] | None = None

    def __post_init__(self):
        name = type(self).__name__
        if self.betas is not None and self.alphas_cumprod is not None:
            raise ValueError(
                f"{name}: give betas= or alphas_cumprod=, not both (each is the whole schedule)"
            )
        table_name = "betas" if self.betas is not None else "alphas_cumprod"
        table = self.betas if self.betas is not None else self.alphas_cumprod
        if table is not None:
            table = _float_table(table, f"{name}.{table_name}")
            object.__setattr__(self, table_name, table)
            given = {}
            if self.beta_schedule != "linear":
                given["beta_schedule"] = self.beta_schedule
            if (self.beta_start, self.beta_end) != _DEFAULT_BETAS:
                given.update(beta_start=self.beta_start, beta_end=self.beta_end)
            if given:
                raise ValueError(
                    f"{name}: {table_name}= is the whole training schedule, so "
                    f"{', '.join(f'{k}={v!r}' for k, v in given.items())} would be ignored; "
                    "give either a table or a named schedule"
                )
            if self.num_train_steps is None:
                object.__setattr__(self, "num_train_steps", len(table))
            self._check_train_steps()
            if self.num_train_steps != len(table):
                raise ValueError(
                    f"{name}: num_train_steps={self.num_train_steps} but {table_name} has "
                    f"{len(table)} entries (one per training step); leave num_train_steps out "
                    "to take it from the table"
                )
            values = np.asarray(table, np.float64)
            outside = (values <= 0.0) | (values >= 1.0)
            if np.any(outside):
                i = _first(outside)
                raise ValueError(
                    f"{name}.{table_name} must lie in the open interval (0, 1); entry {i} is "
                    f"{float(values[i])!r}"
                )
            if self.alphas_cumprod is not None and len(values) > 1:
                rising = np.diff(values) >= 0.0
                if np.any(rising):
                    i = _first(rising)
                    raise ValueError(
                        f"{name}.alphas_cumprod must be strictly decreasing (alpha_bar falls "
                        f"with every training step); entry {i + 1} "
                        f"({float(values[i + 1])!r}) is not below entry {i} ({float(values[i])!r})"
                    )
        else:
            if self.num_train_steps is None:
                object.__setattr__(self, "num_train_steps", 1000)
            self._check_train_steps()
            if not isinstance(self.beta_schedule, str) or self.beta_schedule not in BETA_SCHEDULES:
                raise ValueError(
                    f"{name}: unknown beta_schedule={self.beta_schedule!r}; expected one of "
                    f"{', '.join(map(repr, BETA_SCHEDULES))} (or betas= / alphas_cumprod=)"
                )
            if self.beta_schedule == "squaredcos_cap_v2":
                if (self.beta_start, self.beta_end) != _DEFAULT_BETAS:
                    raise ValueError(
                        f"{name}: beta_schedule='squaredcos_cap_v2' has no beta_start or "
                        f"beta_end (got beta_start={self.beta_start!r}, "
                        f"beta_end={self.beta_end!r}); leave them out"
                    )
            elif not 0 < self.beta_start <= self.beta_end < 1:
                raise ValueError(
                    f"{name} needs 0 < beta_start <= beta_end < 1, got "
                    f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
                )
        last = self._alpha_bar()[-1]
        if not last > 0.0:  # cumprod(1 - betas) underflowed: x0 = x / sqrt(alpha_bar) fails
            raise ValueError(
                f"{name}: the training schedule's last alphas_cumprod is {float(last)!r}; it must "
                "be positive (are the betas too large for this many steps?)"
            )

    def _check_train_steps(self) -> None:
        n = self.num_train_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(
                f"{type(self).__name__}.num_train_steps must be a positive int, got {n!r}"
            )

    def _betas(self) -> np.ndarray:
        """The training betas of a named schedule (float64)."""
        if self.beta_schedule == "scaled_linear":
            return (
                np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_steps) ** 2
            )
        if self.beta_schedule == "squaredcos_cap_v2":
            return _cosine_betas(self.num_train_steps)
        return np.linspace(self.beta_start, self.beta_end, self.num_train_steps)

    def _alpha_bar(self) -> np.ndarray:
        if self.alphas_cumprod is not None:
            return np.asarray(self.alphas_cumprod, np.float64)
        betas = np.asarray(self.betas, np.float64) if self.betas is not None else self._betas()
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
      num_train_steps: length of the training noise schedule; default 1000, or the length of
        ``betas`` / ``alphas_cumprod`` (given with a table, it must equal the table's length).
      beta_start: first beta of the named schedule (default 1e-4: DDPM / DiT).
      beta_end: last beta of the named schedule (default 0.02).
      beta_schedule: (keyword) ``"linear"`` (default), ``"scaled_linear"`` or
        ``"squaredcos_cap_v2"``, as in diffusers (formulas in ``_DiscreteSchedule``).
      betas: (keyword) the training betas, one per training step, instead of a named schedule.
      alphas_cumprod: (keyword) ``alpha_bar`` per training step, instead of a named schedule.

    The training schedule must be the one the model was trained on, e.g. Stable Diffusion's
    ``DDIM(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)``, or a diffusers
    scheduler's table ``DDIM(betas=scheduler.betas.numpy())``.
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
      num_train_steps, beta_start, beta_end, beta_schedule, betas, alphas_cumprod: the
        training noise schedule, as for :class:`DDIM`.
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
      num_train_steps, beta_start, beta_end, beta_schedule, betas, alphas_cumprod: the
        training noise schedule, as for :class:`DDIM`.
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
      num_train_steps, beta_start, beta_end, beta_schedule, betas, alphas_cumprod: the
        training noise schedule, as for :class:`DDIM`.
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
