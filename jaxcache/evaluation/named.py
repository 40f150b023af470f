"""Policies by name, each with the plan it runs on: one pairing for every study and benchmark.

A named setting (``"interval"``, ``"first-block"``, ``"teacache"``, ``"dbcache"``,
``"sencache"``, and the planned schedules ``"magcache"``, ``"planned"``, ``"layer-mask"``) is a
refresh policy *and* the cache plan its published rule assumes: First-Block Cache runs the first
block every step and caches the rest (``F = 1``), TeaCache, MagCache, the planned schedules and
the interval cache the whole stack or its first layers, DBCache runs ``Fn`` first and ``Bn``
last blocks. SenCache skips the whole network, embedding and final projection included, so its
plan (the whole stack) only names the layers it counts. The
planned schedules are fitted to the model (a calibration run), so :func:`named_policy` does not
build them: the bench does, from its own model. The bench, the kernel
profiler and the digit trade-off study all build their settings here, so a name means the same
plan everywhere.
"""

from __future__ import annotations

import numpy as np

import jaxcache as jc

__all__ = ["PLANNED", "POLICIES", "named_plan", "named_policy", "staggered_layer_mask"]

#: The policies a name can give, in the order the command lines list them.
POLICIES = ("interval", "first-block", "teacache", "dbcache", "sencache", "magcache", "planned",
            "layer-mask")
#: The names whose policy is fitted to the model (built by the caller, not by name).
PLANNED = ("magcache", "planned", "layer-mask")


def _check_name(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {list(POLICIES)}")


def named_plan(
    name: str,
    network: jc.Network,
    depth: int,
    *,
    cached_layers: int | None = None,
    first: int = 1,
    last: int = 0,
) -> jc.CachePlan:
    """The cache plan the named policy runs on.

    Args:
      name: a :data:`POLICIES` name.
      network: the network.
      depth: its number of layers (of every kind).
      cached_layers: ``"interval"`` only: the first layers cached (default: every layer).
      first: ``"dbcache"`` only: ``Fn``, the layers that always run first.
      last: ``"dbcache"`` only: ``Bn``, the layers that always run last.

    Raises:
      ValueError: for an unknown name, or layer counts the depth cannot hold.
    """
    _check_name(name)
    if name == "interval":
        n = depth if cached_layers is None else cached_layers
        if not 1 <= n <= depth:
            raise ValueError(f"cached layers must be in [1, {depth}], got {n}")
        return jc.CachePlan(network, n)
    if name == "first-block":
        return jc.CachePlan.around(network, depth, first=1)
    if name in ("teacache", "sencache", *PLANNED):
        return jc.CachePlan(network, depth)
    return jc.CachePlan.around(network, depth, first=first, last=last)


def named_policy(
    name: str,
    *,
    interval: int = 3,
    threshold: float = 0.1,
    warmup: int = 2,
    coefficients: tuple[float, ...] | None = None,
    on_device: bool = False,
) -> jc.RefreshPolicy:
    """The named refresh policy.

    Args:
      name: a :data:`POLICIES` name.
      interval: ``"interval"``: the refresh interval.
      threshold: the signal-driven policies' threshold (SenCache's ``tolerance``).
      warmup: ``"dbcache"``: warm-up steps that always compute.
      coefficients: ``"teacache"``: the rescaling polynomial (default: the raw change).
      on_device: ``"interval"``: decide every step on the device
        (:class:`~jaxcache.OnDevice`) instead of compiling the known schedule.

    Raises:
      ValueError: for an unknown name, or ``on_device`` with a policy other than the interval.
    """
    _check_name(name)
    if name in PLANNED:
        raise ValueError(
            f"{name} is fitted to the model: build it from a calibration "
            "(jaxcache.tuning.calibrate_magcache, plan_refreshes) or a mask, not by name"
        )
    if on_device and name != "interval":
        raise ValueError(
            f"on_device applies to the interval only ({name} always decides on the device)"
        )
    if name == "interval":
        policy = jc.IntervalPolicy(interval)
        return jc.OnDevice(policy) if on_device else policy
    if name == "first-block":
        return jc.FirstBlockPolicy(threshold)
    if name == "teacache":
        if coefficients is None:
            return jc.TeaCachePolicy(threshold)
        return jc.TeaCachePolicy(threshold, coefficients=tuple(coefficients))
    if name == "sencache":  # the paper's rule: warm-up, a final step, at most 3 skips in a row
        return jc.SenCachePolicy(threshold)
    return jc.DBCachePolicy(threshold, warmup_steps=warmup)


def staggered_layer_mask(evaluations: int, layers: int, interval: int) -> np.ndarray:
    """A per-(step, layer) plan where each layer refreshes every ``interval`` steps, staggered.

    Layer ``j`` computes at evaluation ``i`` when ``(i + j) % interval == 0``, and every layer
    at evaluation 0: each step computes about ``1 / interval`` of the layers, and the rows
    repeat with period ``interval`` (the program holds ``interval`` distinct step functions).

    Args:
      evaluations: model evaluations.
      layers: the body's layers.
      interval: each layer's refresh interval (>= 1; 1 computes everything).
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    step = np.arange(evaluations)[:, None]
    mask = (step + np.arange(layers)[None, :]) % interval == 0
    mask[0] = True
    return mask
