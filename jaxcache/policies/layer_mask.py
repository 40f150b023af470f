"""Per-(step, layer) schedules: which body layer runs at which step.

Two forms of one idea (Learning-to-Cache, L2C):

* :class:`LayerMaskPolicy`: a static bool mask ``[evaluations, cached_layers]``. Each body layer
  runs or is reused on its own at each step; the sampler compiles it with no decision in the
  loop (``static_layer_schedule``).
* :class:`LayerGates`: traced gates in ``[0, 1]`` of the same shape, for training a router: every
  layer runs at every step and its output is mixed with its reuse value, so the sample is
  differentiable in the gates (``layer_gates``). Gates of exact 0/1 sample as the mask does.

Neither decides per step: their ``decide`` raises (a per-layer plan must not run as a per-step
one), so a wrapper that hides their schedule (:class:`~jaxcache.OnDevice`) is refused while the
program is traced.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcache._checks import is_concrete
from jaxcache._dataclass import settings_dataclass
from jaxcache.policies.base import RefreshPolicy

__all__ = ["LayerGates", "LayerMaskPolicy"]


def _bool_entry(value: Any, where: str) -> bool:
    """One mask entry as a bool: a bool, or an integer 0 or 1; anything else is refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise TypeError(
        f"LayerMaskPolicy.mask must hold bools (or 0/1), got {value!r} of type "
        f"{type(value).__name__} at {where}; for fractional gates use LayerGates"
    )


def _as_mask(mask: Any) -> tuple[tuple[bool, ...], ...]:
    """``mask`` (nested sequences or a 2-D array) as a tuple of tuples of bools, or raises."""
    if isinstance(mask, (str, bytes)):
        raise TypeError(f"LayerMaskPolicy.mask must be a 2-D bool mask, got the string {mask!r}")
    if hasattr(mask, "shape") and hasattr(mask, "dtype"):
        array = np.asarray(mask)
        if array.ndim != 2:
            raise ValueError(
                f"LayerMaskPolicy.mask must be 2-D, [evaluations, cached_layers], got shape "
                f"{array.shape}"
            )
        if array.dtype.kind not in "biu":
            raise TypeError(
                f"LayerMaskPolicy.mask must hold bools, got an array of dtype {array.dtype}; "
                "for fractional gates use LayerGates"
            )
        mask = array.tolist()
    try:
        rows = tuple(mask)
    except TypeError:
        raise TypeError(
            f"LayerMaskPolicy.mask must be a 2-D bool mask (rows of bools), got {mask!r}"
        ) from None
    if not rows:
        raise ValueError("LayerMaskPolicy.mask is empty: give one row per model evaluation")
    out = []
    for s, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise TypeError(
                f"LayerMaskPolicy.mask row {s} must be a sequence of bools, one per cached "
                f"layer, got {row!r}"
            )
        out.append(tuple(_bool_entry(v, f"[{s}][{j}]") for j, v in enumerate(row)))
    lengths = sorted({len(row) for row in out})
    if len(lengths) > 1:
        raise ValueError(
            f"LayerMaskPolicy.mask is ragged: its rows have {lengths} entries; every row needs "
            "one entry per cached layer"
        )
    if lengths[0] == 0:
        raise ValueError("LayerMaskPolicy.mask has empty rows: give one entry per cached layer")
    return tuple(out)


def _check_shape(name: str, shape: tuple[int, ...], plan, num_steps: int) -> None:
    """Raises unless ``shape`` is ``(num_steps, plan.cached_layers)`` (rows only without plan)."""
    if plan is None:
        if shape[0] != num_steps:
            raise ValueError(
                f"{name} has {shape[0]} rows but num_steps={num_steps} (one row per model "
                "evaluation)"
            )
        return
    want = (num_steps, plan.cached_layers)
    if tuple(shape) != want:
        raise ValueError(
            f"{name} has shape {tuple(shape)}, but this run needs (evaluations, cached_layers) "
            f"= {want}: one row per model evaluation, one column per layer of the plan's cached "
            f"body (layers [{plan.body_start}, {plan.body_stop}))"
        )


def _per_step_refused(name: str):
    raise ValueError(
        f"{name} decides per (step, layer), not per step: pass it to jaxcache.sample directly "
        "(the sampler runs each body layer on its own); it cannot be wrapped in OnDevice or "
        "read as a per-step policy"
    )


@settings_dataclass(static=("mask",))
class LayerMaskPolicy(RefreshPolicy):
    """Run body layer ``j`` at evaluation ``i`` exactly where ``mask[i][j]`` is True.

    A skipped layer is replaced by the reuse mode *per layer*: :class:`~jaxcache.OutputReuse`
    reuses the layer's stored output, :class:`~jaxcache.ResidualReuse` adds the layer's stored
    residual to its current input, a forecast forecasts the layer's output. A layer reused
    before it was ever computed runs without storing (the reference's rule for empty slots).
    The schedule is known before sampling, so the loop compiles with no decision in it; steps
    with the same row share one step function and runs of equal rows (and repeating patterns)
    are scanned, so the program grows with the number of *distinct rows*, not the step count.
    Its ``static_schedule`` is None (there is no one decision per step; the sampler reads
    :meth:`static_layer_schedule`), and its ``decide`` raises.

    Attributes:
      mask: ``[evaluations, cached_layers]`` bools (nested sequences or a 2-D array; stored as
        a tuple of tuples: static, so a new mask compiles a new program).

    Example:
      >>> mask = np.ones((20, 4), bool); mask[1::2, 2:] = False   # doctest: +SKIP
      >>> jaxcache.sample(plan, seg, noise, cond, solver=jaxcache.FlowMatchEuler(),
      ...                 num_steps=20, policy=jaxcache.LayerMaskPolicy(mask))  # doctest: +SKIP
    """

    mask: tuple[tuple[bool, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "mask", _as_mask(self.mask))

    @property
    def shape(self) -> tuple[int, int]:
        """``(evaluations, cached_layers)``."""
        return len(self.mask), len(self.mask[0])

    def check(self, plan, num_steps):
        _check_shape("LayerMaskPolicy.mask", self.shape, plan, num_steps)

    def static_layer_schedule(self, num_steps: int) -> np.ndarray:
        self.check(None, num_steps)
        return np.asarray(self.mask, bool)

    def init(self, num_steps, signal=None):
        return ()

    def decide(self, state, step, signal):
        _per_step_refused("LayerMaskPolicy")


@settings_dataclass()
class LayerGates(RefreshPolicy):
    """Traced per-(step, layer) gates in ``[0, 1]``: a differentiable layer schedule (L2C).

    Every body layer runs at every step and its output is mixed with its reuse value,
    ``g * layer(h) + (1 - g) * reuse(h)``, and so is the layer's reuse state (``g * stored +
    (1 - g) * old``; a non-float leaf takes the stored value where ``g >= 0.5``). Before a
    layer has stored anything its reuse value is its own output, weighed by how much it has
    stored so far, so gates of exact 0 and 1 sample as :class:`LayerMaskPolicy` of the same
    mask (to float32 rounding) and all ones as uncached. Nothing is skipped: the run costs the
    uncached run's compute (``layers_computed`` is all True). Train the gates with
    ``jax.grad`` through :func:`jaxcache.sample` (``remat=True`` keeps one step's activations),
    then sample with ``LayerMaskPolicy(gates > 0.5)``.

    Attributes:
      gates: ``[evaluations, cached_layers]`` numbers in ``[0, 1]`` (a pytree leaf, traced:
        new gates reuse the compiled program).
    """

    gates: Any

    def __post_init__(self):
        gates = self.gates
        dtype = getattr(gates, "dtype", None)
        if isinstance(gates, (str, bytes, bool, np.bool_)) or gates is None or (
            dtype is not None and np.dtype(dtype).kind not in "iuf"
        ):
            raise TypeError(
                f"LayerGates.gates must be an array of numbers in [0, 1], got "
                f"{type(gates).__name__}{'' if dtype is None else f' of dtype {dtype}'}; for a "
                "bool plan use LayerMaskPolicy, or cast the mask to float32"
            )
        if not is_concrete(gates):  # traced (under jit or grad): checked before tracing
            return
        values = np.asarray(gates, np.float64)
        if values.ndim != 2:
            raise ValueError(
                f"LayerGates.gates must be 2-D, [evaluations, cached_layers], got shape "
                f"{values.shape}"
            )
        bad = ~(np.isfinite(values) & (values >= 0) & (values <= 1))
        if bad.any():
            where = tuple(int(k) for k in np.argwhere(bad)[0])
            raise ValueError(
                f"LayerGates.gates must lie in [0, 1]: {int(bad.sum())} of {bad.size} do not, "
                f"the first {float(values[where])!r} at [step, layer] = {list(where)} (clip "
                "them, or map a router's logits through jax.nn.sigmoid)"
            )

    def check(self, plan, num_steps):
        _check_shape("LayerGates.gates", np.shape(self.gates), plan, num_steps)

    def layer_gates(self, num_steps: int) -> Any:
        self.check(None, num_steps)
        return self.gates

    def init(self, num_steps, signal=None):
        return ()

    def decide(self, state, step, signal):
        _per_step_refused("LayerGates")
