"""Matrix FLOPs of a JAX function, counted on its jaxpr (backend-independent).

Benchmarks weigh layer evaluations by compute to get the *ideal* speedup of caching (what a
perfect implementation would gain). Transformer compute is matrix products, so this counts
``dot_general`` and convolutions (2 FLOPs per multiply-add), walking into nested jaxprs: ``jit``,
``scan`` (times its length), ``cond`` / ``switch`` (the most expensive branch) and custom
derivative wrappers. Element-wise work is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxcache.stack import layer_at, stack_length

__all__ = ["StepFlops", "ideal_speedup", "jaxpr_flops", "matmul_flops", "step_flops"]


def matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The matrix FLOPs of one call ``fn(*args, **kwargs)`` (traced abstractly; nothing runs).

    Args:
      fn: the function.
      *args: its arguments (arrays or ``jax.ShapeDtypeStruct``s).
      **kwargs: keyword arguments.

    Returns:
      2 x the multiply-adds of every matrix product and convolution it performs.

    Raises:
      ValueError: if it contains a ``while`` loop, whose trip count is unknown.
    """
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


class StepFlops(NamedTuple):
    """Matrix FLOPs of the pieces of one sampling run (all rows, both guidance branches).

    Attributes:
      condition: the condition path, once per run.
      step: the embedding and the final projection, every step.
      layer: one layer, each time it is evaluated.
      depth: the number of layers.
    """

    condition: int
    step: int
    layer: int
    depth: int

    def total(self, num_steps: int, layer_evaluations: float) -> float:
        """The FLOPs of a run of ``num_steps`` steps that made ``layer_evaluations``."""
        return self.condition + num_steps * self.step + layer_evaluations * self.layer


def step_flops(network, params, noise: Any, cond: Any, *, uncond: Any = None) -> StepFlops:
    """The matrix FLOPs of each piece of a sampling step (traced abstractly; nothing runs).

    Args:
      network: the :class:`~jaxcache.Network`.
      params: its :class:`~jaxcache.SegmentParams` (arrays or ``jax.ShapeDtypeStruct``s).
      noise: the initial sample (arrays or ``jax.ShapeDtypeStruct``s: shapes only).
      cond: the condition (shapes only).
      uncond: the negative condition when sampling with guidance (doubles the rows).
    """
    guided = uncond is not None
    rows, cond_rows = noise, cond
    if guided:
        rows = jax.eval_shape(lambda a: jax.numpy.concatenate([a, a]), noise)
        cond_rows = jax.eval_shape(
            lambda a, b: jax.tree.map(lambda x, y: jax.numpy.concatenate([x, y]), a, b),
            cond, uncond,
        )
    t = jax.ShapeDtypeStruct((rows.shape[0],), np.float32)
    stacks = [p for p in (params.head, params.body, params.tail) if stack_length(p) > 0]
    # Shapes only: slicing a concrete layer out of a stack would run (and compile) a slice per
    # parameter array.
    first = jax.eval_shape(lambda stack: layer_at(stack, 0), stacks[0])
    constant = jax.eval_shape(network.condition, params.condition, cond_rows)
    head = jax.eval_shape(network.embed, params.embed, rows, t, constant)
    return StepFlops(
        condition=matmul_flops(network.condition, params.condition, cond_rows),
        step=matmul_flops(network.embed, params.embed, rows, t, constant)
        + matmul_flops(network.final, params.final, *head),
        layer=matmul_flops(network.layer, first, *head),
        depth=sum(stack_length(p) for p in stacks),
    )


def ideal_speedup(
    network,
    params,
    noise: Any,
    cond: Any,
    *,
    num_steps: int,
    layer_evaluations: float,
    uncond: Any = None,
) -> float:
    """Compute of uncached over cached sampling: what a perfect implementation would gain.

    Weighs the pieces of one step by their matrix FLOPs: the condition path runs once, the
    embedding and final projection every step, and the layers as often as they were evaluated.

    Args:
      network: the :class:`~jaxcache.Network`.
      params: its :class:`~jaxcache.SegmentParams`.
      noise: the initial sample (shapes only).
      cond: the condition (shapes only).
      num_steps: the number of steps.
      layer_evaluations: the layer evaluations of the cached run (``SampleResult``'s).
      uncond: the negative condition when sampling with guidance (doubles the rows).

    Returns:
      The ratio of FLOPs, uncached over cached.
    """
    flops = step_flops(network, params, noise, cond, uncond=uncond)
    return flops.total(num_steps, num_steps * flops.depth) / flops.total(
        num_steps, layer_evaluations
    )


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars)
    (contract_l, _), (batch_l, _) = eqn.params["dimension_numbers"]
    contracted = int(np.prod([lhs.shape[d] for d in contract_l], dtype=np.int64))
    out = eqn.outvars[0].aval
    return 2 * int(np.prod(out.shape, dtype=np.int64)) * contracted


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    kernel_out = rhs.shape[dn.rhs_spec[0]]
    per_output = int(np.prod(rhs.shape, dtype=np.int64)) // kernel_out
    groups = eqn.params.get("feature_group_count", 1)
    return 2 * int(np.prod(out.shape, dtype=np.int64)) * per_output // max(groups, 1) * groups


def jaxpr_flops(jaxpr) -> int:
    """The matrix FLOPs of a jaxpr (see :func:`matmul_flops`)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            raise ValueError("matmul_flops cannot count a while loop (unknown trip count)")
        else:
            for sub in _sub_jaxprs(eqn.params):
                total += jaxpr_flops(sub)
    return total


def _sub_jaxprs(params: dict) -> list:
    subs = []
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                subs.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                subs.append(v)
    return subs
