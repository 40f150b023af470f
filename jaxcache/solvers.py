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
* with state (:class:`DPMSolverPP2M`, :class:`FlowMatchHeun`, :class:`UniPC`): ``init_state(x)`` and
  ``advance(state, x, prediction, t, t_next, index=..., key=...) -> (x, state)``. Every model
  evaluation is one entry of ``times``: a multistep solver remembers earlier predictions in its
  state; a two-stage solver (Heun) lists both of its evaluations, so the cache counts each one
  as a step.

The flow-matching solvers (:class:`FlowMatchEuler`, :class:`FlowMatchHeun`, :class:`UniPC`)
evaluate at continuous times; a pipeline's own grid is one of :data:`FLOW_GRIDS`, computed as
that pipeline computes it, so a loop written against the pipeline and jaxcache agree on every
time (``FlowMatchEuler(shift, grid="flow_sigmas")``).

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
    "UniPC",
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
      time_kind: what the times are, for the check against the network's
        :class:`~jaxcache.TimeConvention` before compiling: ``"index"`` (``k / T`` for integer
        training steps ``k``: the discrete-schedule solvers), ``"continuous"`` (flow-matching
        times, no training-step index: :class:`FlowMatchEuler`, :class:`FlowMatchHeun`,
        :class:`UniPC`), or None (not declared: a custom solver's times are checked by value
        only).
    """

    uses_key: ClassVar[bool] = False
    time_kind: ClassVar[str | None] = None

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


def _flow_sigmas(num_steps: int, shift: float, num_train_steps: int) -> np.ndarray:
    """diffusers' ``use_flow_sigmas`` grid: ``num_steps + 1`` sigmas, the last 0 (float64).

    ``sigma = shift s / (1 + (shift - 1) s)`` at ``s = 1 - a``, ``a = linspace(1, 1 / T,
    num_steps + 1)``, largest first; the last, ``s = 0``, is 0 (``final_sigmas_type="zero"``).
    Written as the schedulers write it (float64 numpy; the caller casts to float32 as they do).
    """
    alphas = np.linspace(1.0, 1.0 / num_train_steps, num_steps + 1)
    s = 1.0 - alphas
    sigmas = np.flip(shift * s / (1.0 + (shift - 1.0) * s))[:-1]
    return np.append(sigmas, 0.0)


def _flow_match_euler_sigmas(num_steps: int, shift: float, num_train_steps: int) -> np.ndarray:
    """diffusers' FlowMatchEulerDiscreteScheduler grid (static shift): ``num_steps + 1`` sigmas.

    The scheduler shifts its training sigmas ``k / T`` (float32) once to find ``sigma_max``
    (1) and ``sigma_min`` (the shifted ``1 / T``); ``set_timesteps`` then spaces ``num_steps``
    times evenly from ``T sigma_max`` to ``T sigma_min`` (both ends included) and shifts them
    again (float64), and appends a final 0.
    """
    train = np.linspace(1, num_train_steps, num_train_steps, dtype=np.float32)[::-1]
    train = train / np.float32(num_train_steps)
    train = np.float32(shift) * train / (np.float32(1.0) + np.float32(shift - 1.0) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    s = np.linspace(sigma_max * num_train_steps, sigma_min * num_train_steps, num_steps)
    s = s / num_train_steps
    return np.append(shift * s / (1.0 + (shift - 1.0) * s), 0.0)


#: The flow-matching grids by name (``FlowMatchEuler(grid=...)``), each ``num_steps + 1`` times:
#:
#: * ``"linspace"`` (the default): ``shift(s)`` at ``s = linspace(1, 0, num_steps + 1)``; also
#:   FLUX.1's diffusers pipeline, whose ``sigmas = linspace(1, 1 / N, N)`` with the dynamic
#:   shift ``mu`` is this grid with ``shift = exp(mu)``.
#: * ``"flow_sigmas"``: diffusers' ``use_flow_sigmas`` (UniPCMultistepScheduler and
#:   DPMSolverMultistepScheduler, with ``flow_shift``: the Wan 2.1 pipelines, their JAX ports,
#:   and Wan's own FlowUniPCMultistepScheduler): ``s = 1 - linspace(1, 1 / T, num_steps + 1)``,
#:   so the first time is ``shift(1 - 1 / T)``, not 1, and every time lies below the default
#:   grid's (by up to ``3.8e-4`` at shift 3). :class:`UniPC` samples on it.
#: * ``"flow_match_euler"``: diffusers' FlowMatchEulerDiscreteScheduler with a static ``shift``
#:   (SD3): ``num_steps`` evaluation times from 1 to the twice-shifted ``1 / T``, both ends
#:   included, then 0. Its last evaluation is close to 0, so its steps are ``N - 1`` intervals
#:   where the default grid has ``N``: a different grid, not a rounding of it.
FLOW_GRIDS = ("linspace", "flow_sigmas", "flow_match_euler")

_GRID_FUNCTIONS = {"flow_sigmas": _flow_sigmas, "flow_match_euler": _flow_match_euler_sigmas}


def _check_shift(solver: Any) -> None:
    shift = solver.shift
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.integer, np.floating)):
        raise ValueError(f"{type(solver).__name__}.shift must be a number > 0, got {shift!r}")
    if not (np.isfinite(shift) and shift > 0):
        raise ValueError(f"{type(solver).__name__}.shift must be > 0 and finite, got {shift}")


def _check_train_steps(solver: Any) -> None:
    n = solver.num_train_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(
            f"{type(solver).__name__}.num_train_steps must be a positive int, got {n!r}"
        )


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler(Solver):
    """Euler steps of a rectified-flow ODE (FLUX, SD3, Z-Image, Qwen-Image, Wan).

    Convention: ``x_t = (1 - t) * data + t * noise``; the network predicts the velocity
    ``noise - data``; ``x <- x + (t_next - t) * v``.

    Attributes:
      shift: timestep shift ``s``: ``t <- s t / (1 + (s - 1) t)``; ``1.0`` is the plain grid.
      grid: (keyword) which grid the shift applies to, one of :data:`FLOW_GRIDS`:
        ``"linspace"`` (the default, unchanged: ``linspace(1, 0, N + 1)`` shifted),
        ``"flow_sigmas"`` (diffusers' ``use_flow_sigmas``: the Wan pipelines) or
        ``"flow_match_euler"`` (diffusers' FlowMatchEulerDiscreteScheduler, static shift).
        Use the grid of the pipeline you compare with: on another grid the same shift samples
        at other times.
      num_train_steps: (keyword) ``T`` of the diffusers grids (their
        ``num_train_timesteps``, 1000); the default grid has none, so it must stay 1000 there.

    Example::

        solver = FlowMatchEuler(shift=3.0, grid="flow_sigmas")  # a Wan 2.1 pipeline's times
    """

    shift: float = 1.0
    _: dataclasses.KW_ONLY
    grid: str = "linspace"
    num_train_steps: int = 1000
    time_kind: ClassVar[str] = "continuous"

    def __post_init__(self):
        _check_shift(self)
        name = type(self).__name__
        if not isinstance(self.grid, str) or self.grid not in FLOW_GRIDS:
            raise ValueError(
                f"{name}: unknown grid={self.grid!r}; expected one of "
                f"{', '.join(map(repr, FLOW_GRIDS))}"
            )
        _check_train_steps(self)
        if self.grid == "linspace" and self.num_train_steps != 1000:
            raise ValueError(
                f"{name}: num_train_steps={self.num_train_steps} applies to the diffusers grids "
                "(grid='flow_sigmas' or 'flow_match_euler'); the default grid has no training "
                "steps, so leave it out"
            )

    def __repr__(self) -> str:
        # Keyword settings at their defaults are left out: the repr is a recorded identity
        # (calibrations, routers), and the default grid's reads ``FlowMatchEuler(shift=3.0)``.
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name, default in (("grid", "linspace"), ("num_train_steps", 1000))
            if getattr(self, name) != default
        )
        return f"{type(self).__name__}(shift={self.shift!r}{extra})"

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        if self.grid == "linspace":
            grid = _flow_grid(num_steps, self.shift)
        else:
            grid = _GRID_FUNCTIONS[self.grid](num_steps, self.shift, self.num_train_steps)
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
    time_kind: ClassVar[str] = "continuous"

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


def _flow_lambda(sigma: jax.Array) -> jax.Array:
    """``lambda = log(alpha / sigma)``, the log signal-to-noise ratio (``alpha = 1 - sigma``)."""
    return jnp.log1p(-sigma) - jnp.log(sigma)


@dataclasses.dataclass(frozen=True)
class UniPC(Solver):
    """UniPC (Zhao et al. 2023), multistep of order 2, on flow-matching sigmas: the Wan pipelines'.

    As diffusers' UniPCMultistepScheduler runs it for Wan 2.1 (``solver_order=2``,
    ``solver_type="bh2"``, ``predict_x0=True``, ``prediction_type="flow_prediction"``,
    ``use_flow_sigmas=True``, ``lower_order_final=True``, ``final_sigmas_type="zero"``): the
    network predicts the velocity ``v`` of ``x_t = (1 - t) data + t noise``; each evaluation
    gives the data prediction ``m = x - t v``, with ``alpha = 1 - t``, ``lambda = log(alpha /
    t)`` and ``B(h) = expm1(-h)``. One model evaluation per step, on the ``"flow_sigmas"`` grid
    of :data:`FLOW_GRIDS`:

    * **corrector** (UniC), from the second evaluation on: the evaluation at the predicted
      sample refines it, from the sample the last predictor started at, before the next
      predictor starts: order 1 at the second evaluation, order 2 after. It reuses the next
      step's evaluation, so it costs no model call.
    * **predictor** (UniP-2, diffusers' simplified ``rho = 1/2``): first order at the first
      step and at the last (``lower_order_final``: the step to ``t = 0`` returns the data
      prediction), second order between.

    The state carried between evaluations (like :class:`DPMSolverPP2M`'s) is the sample the
    last predictor started at, the last two data predictions and their times, in float32; a
    step served from the cache still feeds the next. The update is computed in float32.

    Attributes:
      shift: the flow shift (diffusers' ``flow_shift``: Wan 2.1 uses 3.0 at 480p, 5.0 at 720p).
      num_train_steps: ``T`` of the grid (diffusers' ``num_train_timesteps``, 1000).

    Example::

        solver = UniPC(shift=5.0)  # Wan 2.1 at 720p; a network reading int(1000 t) declares
        # time=TimeConvention.truncated(1000)
    """

    shift: float = 1.0
    num_train_steps: int = 1000
    time_kind: ClassVar[str] = "continuous"

    def __post_init__(self):
        _check_shift(self)
        _check_train_steps(self)

    def times(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        _check_steps(num_steps)
        grid = _flow_sigmas(num_steps, self.shift, self.num_train_steps).astype(np.float32)
        return grid[:-1], grid[1:]

    def init_state(self, x):
        zeros = jnp.zeros(x.shape, jnp.float32)
        never = jnp.full((), 0.5, jnp.float32)  # a harmless time until two evaluations exist
        # The sample the last predictor started at; the data predictions of the last two
        # evaluations and their times.
        return zeros, zeros, zeros, never, never

    def advance(self, state, x, prediction, t, t_next, *, index, key=None):
        x_last, m1, m2, t1, t2 = state
        xf = x.astype(jnp.float32)
        m0 = xf - t * prediction.astype(jnp.float32)  # the data prediction of this evaluation
        lam = _flow_lambda(t)

        # UniC: this evaluation corrects the step that led here, from x_last at t1.
        h = lam - _flow_lambda(t1)
        phi = jnp.expm1(-h)  # e^{-h} - 1: the first-order coefficient, and B(h) for bh2
        k1 = phi / -h - 1.0  # the next two of the expansion's coefficients
        k2 = k1 / -h - 0.5
        b1, b2 = k1 / phi, 2.0 * k2 / phi
        base = (t / t1) * x_last - (1.0 - t) * phi * m1
        r = (_flow_lambda(t2) - _flow_lambda(t1)) / h
        second = index >= 2
        r = jnp.where(second, r, 0.5)  # r is a time ratio only once two evaluations exist
        rho0 = (b1 - b2) / (1.0 - r)  # the 2 x 2 solve [[1, 1], [r, 1]] rho = (b1, b2)
        rho1 = jnp.where(second, b1 - rho0, 0.5)
        history = jnp.where(second, rho0 * (m2 - m1) / r, 0.0)
        corrected = base - (1.0 - t) * phi * (history + rho1 * (m0 - m1))
        xc = jnp.where(index >= 1, corrected, xf)

        # UniP: from xc at t to t_next; first order at the first and the last step.
        final = t_next <= 0.0
        h = jnp.where(final, 1.0, _flow_lambda(jnp.where(final, 0.5, t_next)) - lam)
        phi = jnp.expm1(-h)
        stepped = (t_next / t) * xc - (1.0 - t_next) * phi * m0
        r = jnp.where(index >= 1, (_flow_lambda(t1) - lam) / h, 1.0)
        stepped = stepped - jnp.where(
            index >= 1, (1.0 - t_next) * phi * 0.5 * (m1 - m0) / r, 0.0
        )
        out = jnp.where(final, m0, stepped)
        return out.astype(x.dtype), (xc, m0, m1, t, t1)


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
    time_kind: ClassVar[str] = "index"

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
