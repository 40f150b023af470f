"""TeaCache's calibration: its rescaling polynomial fitted to a model from a full-compute run.

TeaCache (:class:`~jaxcache.TeaCachePolicy`) rescales the change of the first layer's modulated
input by a polynomial that maps it to the change of the network's output; the polynomial is
model-specific. :func:`teacache_calibration_data` records the pairs along the uncached
trajectory with one :func:`jaxcache.sample` run (the sampler's own program, asked to record its
per-step changes: ``record=("signal", "output_change")``), :func:`fit_teacache_coefficients`
fits the polynomial, and :func:`calibrate_teacache` does both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcache._checks import check_int
from jaxcache.policies.teacache import TeaCachePolicy
from jaxcache.tuning.run import CalibrationRun, takes_a_run

__all__ = ["calibrate_teacache", "fit_teacache_coefficients", "teacache_calibration_data"]


@takes_a_run
def teacache_calibration_data(run: CalibrationRun) -> tuple[np.ndarray, np.ndarray]:
    """Runs full compute and records TeaCache's input and output change at every step.

    For every step after the first and every row (sample and guidance branch): ``x``, the
    relative L1 change of the first layer's modulated input against the previous step, and
    ``y``, the relative L1 change of the network's prediction (TeaCache's calibration pairs;
    the published coefficients were fitted on such pairs from 70 prompts).

    One :func:`jaxcache.sample` run: TeaCache at threshold 0, which computes every step (the
    uncached trajectory), recording ``out.signals`` (``x``) and ``out.output_changes`` (``y``).

    The plan's network must provide ``modulated_input``; more samples give a steadier fit;
    with ``uncond`` and ``guidance_scale`` each branch's rows are recorded apart, as TeaCache's
    authors advise.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`).

    Returns:
      ``(x, y)``, float64 arrays of one pair per row for every model evaluation after the
      first (evaluation-major: the rows of evaluation 1, then of evaluation 2, ...; the
      conditional rows before the unconditional ones).

    Raises:
      ValueError: if the network has no ``modulated_input`` or ``num_steps < 2``.
    """
    if run.plan.network.modulated_input is None:
        raise ValueError(
            "TeaCache calibration reads the first layer's modulated input; this Network has no "
            "modulated_input"
        )
    check_int(run.num_steps, "num_steps", minimum=2)
    if run.solver.uses_key and run.key is None:
        raise ValueError(f"{type(run.solver).__name__} draws noise: pass "
                         "key=jax.random.key(seed)")
    out = run.sample(policy=TeaCachePolicy(threshold=0.0), record=("signal", "output_change"))
    x = np.asarray(out.signals, np.float64)[1:].ravel()
    y = np.asarray(out.output_changes, np.float64)[1:].ravel()
    return x, y


def fit_teacache_coefficients(x: Any, y: Any, degree: int = 4) -> tuple[float, ...]:
    """Fits TeaCache's rescaling polynomial ``y ~ P(x)`` by least squares (``np.polyfit``).

    Args:
      x: relative L1 changes of the modulated input (1-D, finite).
      y: the matching relative L1 changes of the output (same length).
      degree: the polynomial degree (TeaCache uses 4).

    Returns:
      The coefficients, highest power first, for :class:`~jaxcache.TeaCachePolicy`.

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


@takes_a_run
def calibrate_teacache(run: CalibrationRun, *, degree: int = 4) -> tuple[float, ...]:
    """TeaCache's rescaling coefficients for any network, fitted from full-compute runs.

    :func:`teacache_calibration_data` then :func:`fit_teacache_coefficients`. Calibrate with
    the solver, step count and guidance you will sample with, on a few dozen samples.

    Example:
      >>> coefficients = calibrate_teacache(plan, seg, noise, cond,              # doctest: +SKIP
      ...                                   solver=jaxcache.FlowMatchEuler(), num_steps=20)
      >>> policy = TeaCachePolicy(threshold=0.3, coefficients=coefficients)  # doctest: +SKIP

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`).
      degree: the polynomial's degree (TeaCache uses 4).

    Returns:
      The coefficients, highest power first.
    """
    x, y = teacache_calibration_data.on_run(run)
    return fit_teacache_coefficients(x, y, degree)
