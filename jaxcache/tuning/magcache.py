"""MagCache's calibration: the body's residual magnitude ratios, from one full-compute run.

:func:`calibrate_magcache` runs ``jaxcache.sample(..., policy=None, record=("body_residual",))``
once and measures, per guidance branch, the magnitude ratio of the body's residual between
consecutive model evaluations (the published calibration: the mean over samples and tokens of
``||r_t|| / ||r_{t-1}||``, norms over the feature axis). The result, a
:class:`MagCacheCalibration`, knows which model, plan, solver and step count it belongs to,
saves to and loads from a ``.npz`` file (no pickle), builds a
:class:`~jaxcache.MagCachePolicy`, and keeps the error tables a planned schedule needs
(:func:`jaxcache.tuning.plan_refreshes`), so one run calibrates both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from jaxcache._checks import check_int
from jaxcache.policies.magcache import MagCachePolicy
from jaxcache.tuning.planner import StepErrors, step_errors
from jaxcache.tuning.run import CalibrationRun, takes_a_run

PyTree = Any

__all__ = ["MagCacheCalibration", "calibrate_magcache", "magnitude_ratios"]

_FORMAT = "jaxcache.magcache/1"
# A floor for a residual norm, so a token whose residual is exactly zero gives a finite ratio.
_TINY = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class MagCacheCalibration:
    """One full-compute run's calibration, and what it was made for.

    Attributes:
      ratios: ``[branches, evaluations]`` float64, the magnitude ratio of the body's residual
        at each model evaluation against the previous one, per guidance branch (conditional
        first); 1 at evaluation 0.
      errors: the planner's error tables (:class:`~jaxcache.tuning.StepErrors`), from the same
        residuals and the solver's times.
      num_steps: the solver steps calibrated for.
      solver: the solver, as its ``repr`` (settings included).
      depth: the network's layers.
      first_layers: the plan's head layers.
      cached_layers: the plan's body layers.
      features: the per-row shape of the body's residual (stream 1), e.g. ``(tokens, width)``.
    """

    ratios: np.ndarray
    errors: StepErrors
    num_steps: int
    solver: str
    depth: int
    first_layers: int
    cached_layers: int
    features: tuple[int, ...]

    @property
    def evaluations(self) -> int:
        """Model evaluations of the calibrated run (``num_steps`` for one-stage solvers)."""
        return self.ratios.shape[1]

    @property
    def branches(self) -> int:
        """1 unguided, 2 with classifier-free guidance."""
        return self.ratios.shape[0]

    def identity(self) -> dict[str, Any]:
        """What the calibration was made for (the keys :meth:`check` compares)."""
        return {
            "num_steps": self.num_steps,
            "evaluations": self.evaluations,
            "solver": self.solver,
            "depth": self.depth,
            "first_layers": self.first_layers,
            "cached_layers": self.cached_layers,
            "features": list(self.features),
            "branches": self.branches,
        }

    def policy(
        self, threshold: float = 0.12, max_skips: int = 2, warmup: float | int = 0.2
    ) -> MagCachePolicy:
        """A :class:`~jaxcache.MagCachePolicy` with these ratios (see its settings)."""
        return MagCachePolicy(
            ratios=self.ratios, threshold=threshold, max_skips=max_skips, warmup=warmup,
            layout=(self.first_layers, self.cached_layers),
        )

    def check(self, plan=None, params=None, *, solver=None, num_steps: int | None = None) -> None:
        """Raises a ValueError unless the calibration was made for what is given.

        Args:
          plan: the :class:`~jaxcache.CachePlan` to sample with (its head and body).
          params: its split parameters (the network's depth).
          solver: the solver to sample with.
          num_steps: the step count to sample with.
        """
        got: dict[str, Any] = {}
        if plan is not None:
            got.update(first_layers=plan.first_layers, cached_layers=plan.cached_layers)
        if params is not None:
            if plan is None:
                raise ValueError("MagCacheCalibration.check: params= needs plan= beside it")
            got["depth"] = plan.total_layers(params)
        if solver is not None:
            got["solver"] = repr(solver)
        if num_steps is not None:
            got["num_steps"] = num_steps
        want = self.identity()
        wrong = {k: v for k, v in got.items() if want[k] != v}
        if wrong:
            made = ", ".join(f"{k}={want[k]!r}" for k in wrong)
            given = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise ValueError(
                f"this MagCache calibration was made for {made}, but got {given}; calibrate "
                "again for this model and schedule (jaxcache.tuning.calibrate_magcache, one "
                "uncached run)"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the calibration to ``path`` (a ``.npz``: arrays and a JSON header, no pickle)."""
        arrays = {
            "format": np.asarray(_FORMAT),
            "identity": np.asarray(json.dumps(self.identity())),
            "ratios": self.ratios,
            "reuse_errors": self.errors.reuse,
        }
        if self.errors.forecast is not None:
            arrays["forecast_errors"] = self.errors.forecast
        if self.errors.times is not None:
            arrays["times"] = self.errors.times
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(
        cls, path: str | os.PathLike, plan=None, params=None, *, solver=None,
        num_steps: int | None = None,
    ) -> MagCacheCalibration:
        """Reads a calibration written by :meth:`save`, checked against what is given.

        Args:
          path: the file.
          plan, params, solver, num_steps: what it will be used with; each one given is
            compared with what the calibration was made for (:meth:`check`).

        Raises:
          ValueError: for a file that is not a MagCache calibration, or one made for another
            model, plan, solver or step count.
        """
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != _FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not a jaxcache MagCache calibration "
                                 f"(format {_FORMAT})")
            identity = json.loads(str(data["identity"]))
            errors = StepErrors(
                reuse=np.asarray(data["reuse_errors"], np.float64),
                forecast=(np.asarray(data["forecast_errors"], np.float64)
                          if "forecast_errors" in data.files else None),
                times=np.asarray(data["times"], np.float64) if "times" in data.files else None,
            )
            ratios = np.asarray(data["ratios"], np.float64)
        calibration = cls(
            ratios=ratios, errors=errors, num_steps=int(identity["num_steps"]),
            solver=identity["solver"], depth=int(identity["depth"]),
            first_layers=int(identity["first_layers"]),
            cached_layers=int(identity["cached_layers"]),
            features=tuple(int(v) for v in identity["features"]),
        )
        calibration.check(plan, params, solver=solver, num_steps=num_steps)
        return calibration


def magnitude_ratios(residuals: PyTree, branches: int = 1) -> np.ndarray:
    """The published magnitude ratios of recorded body residuals, per guidance branch.

    Args:
      residuals: ``SampleResult.body_residuals``: leaves ``[evaluations, rows, ...]`` (of a
        dual-stream body, ``(image, text)``: the image stream is measured).
      branches: 2 when the rows are a guided run's (conditional rows first), else 1.

    Returns:
      ``[branches, evaluations]`` float64: ``mean over rows and tokens of ||r_t|| / ||r_{t-1}||``
      (norms over the last axis), 1 at evaluation 0.
    """
    if isinstance(residuals, tuple) and len(residuals) == 2:
        residuals = residuals[0]
    r = np.asarray(jax.tree.leaves(residuals)[0], np.float64)
    if r.ndim < 3 or r.shape[1] % branches:
        raise ValueError(
            f"residuals must be [evaluations, rows, ...features] with rows a multiple of "
            f"branches={branches}, got shape {r.shape}"
        )
    norms = np.linalg.norm(r, axis=-1)  # [evaluations, rows, tokens...]
    norms = norms.reshape(norms.shape[0], branches, -1)  # rows of a branch, then tokens
    ratios = np.ones((branches, r.shape[0]))
    ratios[:, 1:] = np.mean(norms[1:] / np.maximum(norms[:-1], _TINY), axis=2).T
    return ratios


@takes_a_run
def calibrate_magcache(run: CalibrationRun) -> MagCacheCalibration:
    """MagCache's magnitude ratios (and the planner's error tables) from one full-compute run.

    One :func:`jaxcache.sample` run, uncached, recording the body's residual at every model
    evaluation (``record=("body_residual",)``). The published calibration needs a single
    sample; more give a steadier curve. With guidance, each branch gets its own ratios, as in
    the authors' Wan 2.1 calibration. Calibrate with the plan (the body MagCache skips: every
    layer, ``CachePlan(network, N)``), solver, step count and guidance you sample with.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`): a
        plan with a body of at least one layer, at least 2 steps.

    Returns:
      A :class:`MagCacheCalibration`; ``.policy(threshold=...)`` samples with it.

    Raises:
      ValueError, TypeError: for a plan with no body, ``num_steps < 2`` or arguments the
        sampler refuses (before anything compiles).

    Example:
      >>> calibration = calibrate_magcache(plan, seg, noise, cond,        # doctest: +SKIP
      ...                                  solver=jaxcache.FlowMatchEuler(), num_steps=20)
      >>> calibration.save("magcache.npz")                                # doctest: +SKIP
      >>> policy = calibration.policy(threshold=0.12)                     # doctest: +SKIP
    """
    check_int(run.num_steps, "num_steps", minimum=2)
    residuals = run.sample(record=("body_residual",)).body_residuals
    plan = run.plan
    image = residuals[0] if plan.network.dual_stream else residuals
    branches = 1 if run.guidance_scale is None else 2
    times = np.asarray(run.solver.times(run.num_steps)[0], np.float64)
    return MagCacheCalibration(
        ratios=magnitude_ratios(image, branches),
        errors=step_errors(image, times),
        num_steps=run.num_steps,
        solver=repr(run.solver),
        depth=plan.total_layers(run.params),
        first_layers=plan.first_layers,
        cached_layers=plan.cached_layers,
        features=tuple(int(d) for d in np.shape(image)[2:]),
    )
