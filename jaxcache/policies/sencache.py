"""SenCache: skip the whole network while its predicted output change stays small.

SenCache (Haghighi and Alahi, 2026, arXiv 2602.24208) bounds the change of the network's
prediction between a row's last computed step and this one by a first-order expansion in its two
inputs, the noisy sample and the time:

    S = a_x * |x - x_last| + a_t * |t - t_last|

where ``a_x`` and ``a_t`` are the network's sensitivities (norms of its Jacobians with respect
to the sample and the time). While ``S`` stays below a tolerance the step reuses the last
prediction; the drift is measured from the last computed step, so it accumulates over a run of
skips. The published rule also computes a few steps at each end, uses a tighter tolerance for
the first fifth of the run, and caps the skips in a row.

Here ``|x - x_last|`` is the relative L1 change of the sample
(:func:`~jaxcache.policies.signals.relative_l1`, per row) and ``|t - t_last|`` the change of the
solver's time, so ``S`` predicts the relative L1 change of the prediction, the quantity
TeaCache's threshold bounds. The sensitivities are given (calibrated once for a model) or
estimated in the program from the warm-up steps by finite differences, as the paper calibrates
them: at warm-up step ``i >= 1`` the network also runs at the new sample and the *previous*
time, ``f(x_i, t_{i-1})``, so

    a_x = |f(x_i, t_{i-1}) - f(x_{i-1}, t_{i-1})| / |x_i - x_{i-1}|
    a_t = |f(x_i, t_i) - f(x_i, t_{i-1})| / |t_i - t_{i-1}|

(averaged over the warm-up pairs, per row): one more model evaluation per warm-up step after
the first, counted in :attr:`~jaxcache.SampleResult.flops`.

The signal costs nothing from the network, so a skipped step skips all of it, embedding and
final projection included (``whole_network``): the sampler runs the network only when a row
needs it and lets the reuse mode stand in for the *prediction* (the last one by default, or a
forecast of it: :class:`~jaxcache.TaylorForecast` of order 1 is the first-order one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy, check_setting
from jaxcache.policies.signals import relative_l1

__all__ = ["SenCachePolicy", "SenCacheState"]

# A floor for a measured drift: a step that moved nothing gives no sensitivity, never 0 / 0.
_TINY = 1e-12


class SenCacheState(NamedTuple):
    """SenCache's state, per row.

    Attributes:
      x_last: the sample at the row's last computed step (float32).
      t_last: ``[rows]`` float32, the time there.
      skips: ``[rows]`` int32, steps skipped since the last computed one.
      drift_x: ``[rows]`` float32, the sample's relative change measured at this step.
      drift_t: ``[rows]`` float32, the time's change measured at this step.
      sum_x: ``[rows]`` float32, the sample sensitivities estimated so far (summed).
      sum_t: ``[rows]`` float32, the time sensitivities estimated so far (summed).
      pairs: ``[rows]`` float32, how many warm-up pairs were summed.
      prediction: the previous evaluation's prediction, while sensitivities are estimated
        (else None).
      num_steps: the run's model evaluations (int32).
    """

    x_last: jax.Array
    t_last: jax.Array
    skips: jax.Array
    drift_x: jax.Array
    drift_t: jax.Array
    sum_x: jax.Array
    sum_t: jax.Array
    pairs: jax.Array
    prediction: jax.Array | None
    num_steps: jax.Array


@settings_dataclass()
class SenCachePolicy(RefreshPolicy):
    """SenCache: skip the network while ``a_x |dx| + a_t |dt|`` stays below ``tolerance``.

    Any plan works: a skipped step skips the whole network (see the module docstring), and
    the reuse mode (``sample(..., reuse=)``) stands in for the network's prediction: the last
    one by default (``None`` or ``OutputReuse()``), a forecast of it in the solver's time with
    :class:`~jaxcache.TaylorForecast`, or the last ``prediction - x`` added to the current
    sample with :class:`~jaxcache.ResidualReuse`. Decisions are per row (per sample and
    guidance branch): the network runs when any row needs it and each row keeps its own.
    ``tolerance = 0`` never skips.

    All settings are traced numbers (a new value reuses the compiled program), except that
    giving the sensitivities or not is structure.

    Attributes:
      tolerance: the largest predicted relative change of the prediction a skip may hide.
      early_tolerance: the tolerance for the first ``early_fraction`` of the run (the paper's
        tighter start); None: ``tolerance``.
      early_fraction: the fraction of the evaluations, rounded, that ``early_tolerance``
        governs (the paper's 0.2).
      sensitivity_x: ``a_x``, the prediction's relative change per unit of the sample's
        relative change (>= 0); None (with ``sensitivity_t`` None) estimates both in the
        program from the warm-up steps.
      sensitivity_t: ``a_t``, the prediction's relative change per unit of time (>= 0).
      warmup_steps: evaluations at the start that always compute (at least 2 when the
        sensitivities are estimated: one pair to measure).
      final_steps: evaluations at the end that always compute.
      max_skips: at most this many skipped evaluations in a row (the paper's ``n``).

    Example:
      >>> policy = jaxcache.SenCachePolicy(tolerance=0.05)        # doctest: +SKIP
      >>> out = jaxcache.sample(plan, seg, noise, cond, solver=jaxcache.FlowMatchEuler(),
      ...                       num_steps=30, policy=policy)       # doctest: +SKIP
    """

    tolerance: float = 0.05
    early_tolerance: float | None = None
    early_fraction: float = 0.2
    sensitivity_x: float | None = None
    sensitivity_t: float | None = None
    warmup_steps: int = 2
    final_steps: int = 1
    max_skips: int = 3

    #: The policy reads only the sample and the time: a skipped step skips the whole network.
    whole_network: ClassVar[bool] = True

    def __post_init__(self):
        check_setting(self.tolerance, "SenCachePolicy.tolerance", minimum=0.0)
        if self.early_tolerance is None:
            object.__setattr__(self, "early_tolerance", self.tolerance)
        check_setting(self.early_tolerance, "SenCachePolicy.early_tolerance", minimum=0.0)
        check_setting(self.early_fraction, "SenCachePolicy.early_fraction", minimum=0.0)
        given = (self.sensitivity_x is not None, self.sensitivity_t is not None)
        if given[0] != given[1]:
            raise ValueError(
                "SenCachePolicy: give both sensitivity_x and sensitivity_t (calibrated), or "
                "neither (estimated from the warm-up steps in the program)"
            )
        for name in ("sensitivity_x", "sensitivity_t"):
            value = getattr(self, name)
            if value is not None:  # a norm of the network's Jacobian
                check_setting(value, f"SenCachePolicy.{name}", minimum=0.0)
        check_setting(self.warmup_steps, "SenCachePolicy.warmup_steps", integer=True,
                      minimum=2 if self.estimates else 1)
        check_setting(self.final_steps, "SenCachePolicy.final_steps", integer=True, minimum=0)
        check_setting(self.max_skips, "SenCachePolicy.max_skips", integer=True, minimum=0)

    @property
    def estimates(self) -> bool:
        """Whether the sensitivities are estimated in the program (not given)."""
        return self.sensitivity_x is None

    def with_threshold(self, threshold: float) -> SenCachePolicy:
        """This policy with its tolerance at ``threshold`` (the early tolerance kept in the same
        ratio to it): SenCache's knob for :func:`jaxcache.tuning.threshold_for`."""
        ratio = self.early_tolerance / self.tolerance if self.tolerance > 0 else 1.0
        return dataclasses.replace(self, tolerance=threshold, early_tolerance=threshold * ratio)

    def probe_evaluations(self, evaluations: int) -> int:
        """The extra evaluations of the whole network a run of ``evaluations`` makes to
        estimate the sensitivities (one per warm-up step after the first; none when given)."""
        if not self.estimates:
            return 0
        return max(0, min(int(self.warmup_steps), int(evaluations)) - 1)

    def check(self, plan, num_steps):
        if self.estimates and num_steps < 2:
            raise ValueError(
                f"SenCachePolicy estimates its sensitivities from two warm-up evaluations, and "
                f"this run makes {num_steps}: give sensitivity_x and sensitivity_t"
            )

    def init(self, num_steps, signal=None):
        """The state before step 0; ``signal`` is the structure of the sample's rows."""
        rows = signal.shape[:1]
        zeros = jnp.zeros(rows, jnp.float32)
        return SenCacheState(
            x_last=jnp.zeros(signal.shape, jnp.float32),
            t_last=zeros,
            skips=jnp.zeros(rows, jnp.int32),
            drift_x=zeros,
            drift_t=zeros,
            sum_x=zeros,
            sum_t=zeros,
            pairs=zeros,
            prediction=jnp.zeros(signal.shape, jnp.float32) if self.estimates else None,
            num_steps=jnp.asarray(num_steps, jnp.int32),
        )

    def sensitivities(self, state: SenCacheState) -> tuple[jax.Array, jax.Array]:
        """``(a_x, a_t)``: the given ones, or the warm-up estimates so far (``[rows]``)."""
        if not self.estimates:
            return (jnp.asarray(self.sensitivity_x, jnp.float32),
                    jnp.asarray(self.sensitivity_t, jnp.float32))
        pairs = jnp.maximum(state.pairs, 1.0)
        return state.sum_x / pairs, state.sum_t / pairs

    def decide(self, state, step, signal):
        """``signal``: ``(x, t)``, the sample's rows and this evaluation's time."""
        x, t = signal
        t = jnp.asarray(t, jnp.float32)
        drift_x = relative_l1(x, state.x_last)
        drift_t = jnp.abs(t - state.t_last)
        a_x, a_t = self.sensitivities(state)
        change = a_x * drift_x + a_t * drift_t
        early = step < jnp.round(
            jnp.asarray(self.early_fraction, jnp.float32) * state.num_steps.astype(jnp.float32)
        ).astype(jnp.int32)
        tolerance = jnp.where(early, jnp.asarray(self.early_tolerance, jnp.float32),
                              jnp.asarray(self.tolerance, jnp.float32))
        warmup, final, most = (jnp.asarray(v).astype(jnp.int32)
                               for v in (self.warmup_steps, self.final_steps, self.max_skips))
        refresh = (
            (step < warmup)
            | (step >= state.num_steps - final)
            | (state.skips >= most)
            | ~(change < tolerance)
        )
        keep = refresh.reshape((-1,) + (1,) * (x.ndim - 1))
        return refresh, state._replace(
            x_last=jnp.where(keep, x.astype(jnp.float32), state.x_last),
            t_last=jnp.where(refresh, t, state.t_last),
            skips=jnp.where(refresh, 0, state.skips + 1),
            drift_x=drift_x,
            drift_t=drift_t,
        )

    def probes(self, state: SenCacheState, step: jax.Array) -> jax.Array:
        """Whether the sampler evaluates ``f(x_i, t_{i-1})`` at this step (a bool scalar):
        warm-up steps after the first, while the sensitivities are estimated."""
        if not self.estimates:
            return jnp.zeros((), bool)
        return (step >= 1) & (step < jnp.asarray(self.warmup_steps).astype(jnp.int32))

    def measure(self, state: SenCacheState, prediction: jax.Array,
                probe: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(a_x, a_t)`` per row from one probe: the prediction's relative change from
        ``f(x_{i-1}, t_{i-1})`` to the probe ``f(x_i, t_{i-1})`` over the sample's drift, and
        from the probe to ``f(x_i, t_i)`` over the time's (meaningful at a probed step)."""
        a_x = relative_l1(probe, state.prediction) / jnp.maximum(state.drift_x, _TINY)
        a_t = relative_l1(prediction, probe) / jnp.maximum(state.drift_t, _TINY)
        return a_x, a_t

    def observe(self, state: SenCacheState, step: jax.Array, prediction: jax.Array,
                probe: jax.Array) -> SenCacheState:
        """The state after the step's prediction (and probe, where :meth:`probes` said so).

        Args:
          state: the state after :meth:`decide`.
          step: the evaluation index.
          prediction: the prediction each row used at this step, ``[rows, ...]``.
          probe: ``f(x_i, t_{i-1})`` where the sampler evaluated it (else any value).
        """
        if not self.estimates:
            return state
        measured = self.probes(state, step)
        a_x, a_t = self.measure(state, prediction, probe)
        return state._replace(
            sum_x=state.sum_x + jnp.where(measured, a_x, 0.0),
            sum_t=state.sum_t + jnp.where(measured, a_t, 0.0),
            pairs=state.pairs + measured.astype(jnp.float32),
            prediction=prediction.astype(jnp.float32),
        )


def is_whole_network(policy: Any) -> bool:
    """Whether ``policy`` reads only the sample and the time (a skip skips the whole network)."""
    return bool(getattr(policy, "whole_network", False))
