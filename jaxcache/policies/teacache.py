"""TeaCache: recompute when the accumulated, rescaled change of the modulated input is large.

Also the calibration its users ask for with every new model: :func:`calibrate_teacache` fits
the rescaling polynomial from full-compute runs of any network.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int
from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy, check_setting
from jaxcache.policies.signals import relative_l1
from jaxcache.stack import layer_at

PyTree = Any

__all__ = [
    "FLUX_COEFFICIENTS",
    "TeaCachePolicy",
    "TeaCacheState",
    "calibrate_teacache",
    "fit_teacache_coefficients",
    "teacache_calibration_data",
]

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
        static). ``(1.0, 0.0)`` uses the raw change; :func:`calibrate_teacache` fits them for
        a model; :data:`FLUX_COEFFICIENTS` are the published FLUX.1 ones.
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


# ------------------------------------------------------------------------------ calibration
def teacache_calibration_data(
    plan,
    params,
    noise: jax.Array,
    cond: PyTree,
    *,
    solver,
    num_steps: int,
    uncond: PyTree = None,
    guidance_scale: float | None = None,
    key: jax.Array | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs full compute and records TeaCache's input and output change at every step.

    For every step after the first and every row (sample and guidance branch): ``x``, the
    relative L1 change of the first layer's modulated input against the previous step, and
    ``y``, the relative L1 change of the network's prediction (TeaCache's calibration pairs;
    the published coefficients were fitted on such pairs from 70 prompts).

    Args:
      plan: a :class:`~jaxcache.CachePlan` whose network provides ``modulated_input``.
      params: ``plan.split(params)``.
      noise: ``[batch, ...]`` initial samples (more samples give a steadier fit).
      cond: the conditions.
      solver: the solver the model will be sampled with.
      num_steps: its step count.
      uncond: the negative condition, with ``guidance_scale``, to calibrate guided sampling
        (each branch's rows are recorded apart, as TeaCache's authors advise).
      guidance_scale: the guidance scale.
      key: the PRNG key of an ancestral solver (as for :func:`jaxcache.sample`).

    Returns:
      ``(x, y)``, float64 arrays of one pair per row for every model evaluation after the
      first.

    Raises:
      ValueError: if the network has no ``modulated_input`` or ``num_steps < 2``.
    """
    if plan.network.modulated_input is None:
        raise ValueError(
            "TeaCache calibration reads the first layer's modulated input; this Network has no "
            "modulated_input"
        )
    check_int(num_steps, "num_steps", minimum=2)
    if solver.uses_key and key is None:
        raise ValueError(f"{type(solver).__name__} draws noise: pass key=jax.random.key(seed)")
    x, y = _calibration_pairs(plan, params, noise, cond, uncond, solver, num_steps,
                              guidance_scale, key)
    return np.asarray(x[1:], np.float64).ravel(), np.asarray(y[1:], np.float64).ravel()


def _calibration_pairs(plan, params, noise, cond, uncond, solver, num_steps, guidance_scale,
                       key):
    guided = guidance_scale is not None
    cond_rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond) if guided else cond
    first = params.head if plan.first_layers else params.body
    layer0 = layer_at(first, 0)
    times, next_times = solver.times(num_steps)

    @jax.jit
    def run(params, noise, cond_rows, key):
        constant = plan.network.condition(params.condition, cond_rows)

        def step(carry, step_t):
            x, solver_state, previous_signal, previous_out = carry
            i, t, t_next = step_t
            rows = jnp.concatenate([x, x]) if guided else x
            t_rows = jnp.full((rows.shape[0],), t, jnp.float32)
            embedded, h, ctx = plan.run_head(params, rows, t_rows, constant)
            signal = plan.network.modulated_input(layer0, embedded, ctx)
            out = plan.run_tail(params, plan.run_body(params, h, ctx), ctx)
            pairs = (relative_l1(signal, previous_signal), relative_l1(out, previous_out))
            prediction = out
            if guided:
                positive, negative = jnp.split(out, 2)
                prediction = negative + guidance_scale * (positive - negative)
            step_key = None if key is None else jax.random.fold_in(key, i)
            x, solver_state = solver.advance(solver_state, x, prediction, t, t_next, index=i,
                                             key=step_key)
            return (x, solver_state, signal.astype(jnp.float32), out.astype(jnp.float32)), pairs

        def first_signal():
            rows = jnp.concatenate([noise, noise]) if guided else noise
            t_rows = jnp.zeros((rows.shape[0],), jnp.float32)
            embedded, _, ctx = plan.run_head(params, rows, t_rows, constant)
            return plan.network.modulated_input(layer0, embedded, ctx)

        signal_shape = jax.eval_shape(first_signal).shape
        out_shape = (noise.shape[0] * (2 if guided else 1), *noise.shape[1:])
        init = (noise, solver.init_state(noise), jnp.zeros(signal_shape, jnp.float32),
                jnp.zeros(out_shape, jnp.float32))
        steps = jnp.arange(len(times), dtype=jnp.int32)
        _, pairs = jax.lax.scan(step, init, (steps, jnp.asarray(times), jnp.asarray(next_times)))
        return pairs

    return run(params, noise, cond_rows, key)


def fit_teacache_coefficients(x: Any, y: Any, degree: int = 4) -> tuple[float, ...]:
    """Fits TeaCache's rescaling polynomial ``y ~ P(x)`` by least squares (``np.polyfit``).

    Args:
      x: relative L1 changes of the modulated input (1-D, finite).
      y: the matching relative L1 changes of the output (same length).
      degree: the polynomial degree (TeaCache uses 4).

    Returns:
      The coefficients, highest power first, for :class:`TeaCachePolicy`.

    Raises:
      ValueError: for arrays that are not 1-D, differ in length, hold non-finite values, or
        have too few distinct points for the degree.
    """
    degree = check_int(degree, "degree", minimum=1)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"calibration data x and y must be 1-D arrays of equal length, got shapes "
            f"{x.shape} and {y.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("calibration data must be finite")
    if len(np.unique(x)) <= degree:
        raise ValueError(
            f"a degree-{degree} fit needs more than {degree} distinct x values, got "
            f"{len(np.unique(x))}"
        )
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def calibrate_teacache(
    plan,
    params,
    noise: jax.Array,
    cond: PyTree,
    *,
    solver,
    num_steps: int,
    uncond: PyTree = None,
    guidance_scale: float | None = None,
    degree: int = 4,
    key: jax.Array | None = None,
) -> tuple[float, ...]:
    """TeaCache's rescaling coefficients for any network, fitted from full-compute runs.

    :func:`teacache_calibration_data` then :func:`fit_teacache_coefficients`. Calibrate with
    the solver, step count and guidance you will sample with, on a few dozen samples.

    Example:
      >>> coefficients = calibrate_teacache(plan, seg, noise, cond,              # doctest: +SKIP
      ...                                   solver=jaxcache.FlowMatchEuler(), num_steps=20)
      >>> policy = TeaCachePolicy(threshold=0.3, coefficients=coefficients)  # doctest: +SKIP

    Returns:
      The coefficients, highest power first.
    """
    x, y = teacache_calibration_data(
        plan, params, noise, cond, solver=solver, num_steps=num_steps, uncond=uncond,
        guidance_scale=guidance_scale, key=key,
    )
    return fit_teacache_coefficients(x, y, degree)
