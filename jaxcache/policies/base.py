"""The policy seam: when the cached body is recomputed.

A policy is a settings object (a frozen dataclass that is also a pytree: numbers such as
thresholds are traced, so a new value reuses the compiled program; structure such as an
interval is static) with pure functions:

* ``init(num_steps, signal=None) -> state``: the state before step 0. A policy that reads a
  signal receives the signal's structure (``jax.ShapeDtypeStruct``, leading row axis), so its
  state can hold the previous signal.
* ``decide(state, step, signal) -> (refresh, state)``: ``refresh`` is a boolean array, a scalar
  (every row alike) or ``[rows]`` (one decision per sample and guidance branch), never a Python
  bool, so the decision stays inside the compiled program.
* ``static_schedule(num_steps)``: every step's decision when it is known before sampling; the
  sampler then compiles the loop with no decision in it.
* ``static_layer_schedule(num_steps)``: a plan per step *and body layer* known before sampling
  (``[evaluations, cached_layers]`` bool), for policies that skip layers on their own
  (:class:`~jaxcache.LayerMaskPolicy`); also compiled with no decision in the loop.
* ``layer_gates(num_steps)``: traced per-(step, layer) gates in ``[0, 1]`` that mix each layer's
  computed output with its reuse value (:class:`~jaxcache.LayerGates`, for training a router).

The sampler reads the hooks in that order of precedence: a layer schedule, then gates, then a
step schedule; a policy with none of them decides on the device. A per-layer policy's
``decide`` raises, so it never runs as a per-step one.

``signal_kind`` names what the policy reads each step, produced by the plan's head:

* ``None``: nothing (static schedules);
* ``"head_residual"``: the head layers' residual on stream 1 (the first block's residual for
  First-Block Cache, the first ``Fn`` blocks' for DBCache);
* ``"modulated_input"``: the first layer's timestep-modulated input (TeaCache).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from jaxcache._checks import check_number, is_concrete

PyTree = Any

__all__ = ["SIGNAL_KINDS", "RefreshPolicy", "check_setting"]

SIGNAL_KINDS = (None, "head_residual", "modulated_input")


class RefreshPolicy(abc.ABC):
    """Decides, on the device, whether a step recomputes the cached body."""

    #: What the policy reads each step (see the module docstring).
    signal_kind: ClassVar[str | None] = None

    @abc.abstractmethod
    def init(self, num_steps: int, signal: PyTree = None) -> PyTree:
        """The state before step 0.

        Args:
          num_steps: the number of denoising steps (static).
          signal: the signal's structure for policies that read one, else None.
        """

    def static_schedule(self, num_steps: int) -> np.ndarray | None:
        """The refresh decision of every step, if it is known before sampling; else None.

        The sampler compiles a known schedule to a loop with no decision in it; policies that
        read signals or state return None.
        """
        return None

    def static_layer_schedule(self, num_steps: int) -> np.ndarray | None:
        """The plan of every step and body layer, if it is known before sampling; else None.

        Returns:
          None (the default: the policy decides per step), or ``[num_steps, cached_layers]``
          bool, True where the body layer runs at the step (see
          :class:`~jaxcache.LayerMaskPolicy`).
        """
        return None

    def layer_gates(self, num_steps: int) -> jax.Array | None:
        """Traced per-(step, layer) gates in ``[0, 1]``, for a policy that mixes each layer's
        computed output with its reuse value; else None (the default).

        Returns:
          None, or ``[num_steps, cached_layers]`` numbers (see :class:`~jaxcache.LayerGates`).
        """
        return None

    def with_threshold(self, threshold: float) -> RefreshPolicy:
        """This policy with its threshold at ``threshold``: the knob
        :func:`jaxcache.tuning.threshold_for` searches (larger skips more).

        Raises:
          TypeError: for a policy without a ``threshold`` field (one that has another knob
            overrides this method: SenCache's tolerance).
        """
        if "threshold" not in {f.name for f in dataclasses.fields(self)}:
            raise TypeError(f"{type(self).__name__} has no threshold")
        return dataclasses.replace(self, threshold=threshold)

    def probe_evaluations(self, num_steps: int) -> int:
        """Evaluations of the whole network the policy adds to a run of ``num_steps`` model
        evaluations, beyond the steps it computes (0, the default; SenCache's warm-up probes
        while it estimates its sensitivities)."""
        return 0

    @abc.abstractmethod
    def decide(self, state: PyTree, step: jax.Array, signal: PyTree) -> tuple[jax.Array, PyTree]:
        """Whether to refresh at ``step``.

        Args:
          state: the policy state.
          step: the step index, an int32 scalar array.
          signal: this step's signal (``[rows, ...]``), or None.

        Returns:
          ``(refresh, new_state)``: ``refresh`` a boolean scalar or ``[rows]`` array.
        """

    def check(self, plan, num_steps: int) -> None:  # noqa: B027 (optional hook)
        """Raises a ValueError when the policy cannot run with ``plan`` for ``num_steps``.

        Called before anything is compiled.
        """


def check_setting(
    value: Any, name: str, *, integer: bool = False, minimum: float | None = None
) -> None:
    """Raises unless ``value`` can be a policy's numeric setting ``name`` (in its constructor).

    A setting is a pytree leaf, traced inside the compiled program: a Python or numpy number,
    a JAX array, or (when JAX rebuilds the policy from its leaves) a tracer or a placeholder,
    which pass unchecked. Refused: a string (``"0.1"``), None and a bool (TypeError), a
    non-integral value where a step count is expected (``warmup_steps=2.5``) and a concrete
    value outside the bounds (ValueError). Nothing here calls ``float()`` on a tracer.

    Args:
      value: the setting.
      name: its name in messages (``"FirstBlockPolicy.threshold"``).
      integer: whether it counts steps (an int, or an integral float).
      minimum: the least value allowed, if any.
    """
    want = "an integer" if integer else "a number"
    if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(
            f"{name} must be {want} (a Python number or an array), got {value!r} of type "
            f"{type(value).__name__}"
        )
    if isinstance(value, np.ndarray) and value.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be {want}, got an array of dtype {value.dtype}")
    if integer and is_concrete(value):
        array = np.asarray(value, dtype=np.float64)
        if np.all(np.isfinite(array)) and np.any(array != np.round(array)):
            raise ValueError(f"{name} must be {want} (it counts steps), got {value!r}")
    check_number(value, name, minimum=minimum)
