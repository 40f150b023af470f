"""Matrix FLOPs of a JAX function, counted on its jaxpr (backend-independent).

Benchmarks weigh layer evaluations by compute to get the *ideal* speedup of caching (what a
perfect implementation would gain). Transformer compute is matrix products, so this counts
``dot_general`` and convolutions (2 FLOPs per multiply-add), walking into nested jaxprs: ``jit``,
``scan`` (times its length), ``cond`` / ``switch`` (the most expensive branch) and custom
derivative wrappers. Element-wise work is not counted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxcache.work import jaxpr_flops, matmul_flops, network_work

__all__ = ["StepFlops", "ideal_speedup", "jaxpr_flops", "matmul_flops", "step_flops"]


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


def _rows(noise, cond, uncond):
    """The rows and conditions the network sees (both guidance branches), as shapes."""
    if uncond is None:
        return noise, cond
    rows = jax.eval_shape(lambda a: jax.numpy.concatenate([a, a]), noise)
    cond_rows = jax.eval_shape(
        lambda a, b: jax.tree.map(lambda x, y: jax.numpy.concatenate([x, y]), a, b),
        cond, uncond,
    )
    return rows, cond_rows


def step_flops(network, params, noise: Any, cond: Any, *, uncond: Any = None) -> StepFlops:
    """The matrix FLOPs of each piece of a sampling step (traced abstractly; nothing runs).

    ``layer`` is the mean over the layers: exact for a stack of one kind; for several kinds of
    block use :func:`jaxcache.work.network_work`, which counts each layer.

    Args:
      network: the :class:`~jaxcache.Network`.
      params: its :class:`~jaxcache.SegmentParams` (arrays or ``jax.ShapeDtypeStruct``s).
      noise: the initial sample (arrays or ``jax.ShapeDtypeStruct``s: shapes only).
      cond: the condition (shapes only).
      uncond: the negative condition when sampling with guidance (doubles the rows).
    """
    work = network_work(network, params, *_rows(noise, cond, uncond))
    depth = len(work.layers)
    return StepFlops(
        condition=work.condition,
        step=work.step,
        layer=int(np.sum(work.layers)) // max(depth, 1),
        depth=depth,
    )


def ideal_speedup(
    network,
    params,
    noise: Any,
    cond: Any,
    *,
    num_steps: int,
    layer_evaluations: float | None = None,
    layers_computed: Any = None,
    uncond: Any = None,
) -> float:
    """Compute of uncached over cached sampling: what a perfect implementation would gain.

    Weighs the pieces of one step by their matrix FLOPs: the condition path runs once, the
    embedding and final projection every step, and each layer as often as it was evaluated.
    :attr:`jaxcache.SampleResult.ideal_speedup` gives the same figure from a run.

    Args:
      network: the :class:`~jaxcache.Network`.
      params: its :class:`~jaxcache.SegmentParams`.
      noise: the initial sample (shapes only).
      cond: the condition (shapes only).
      num_steps: the number of model evaluations.
      layer_evaluations: the layer evaluations of the cached run (``SampleResult``'s); enough
        when every layer costs the same.
      layers_computed: ``[evaluations, depth]`` bool (``SampleResult.layers_computed``):
        which layer ran at which evaluation; needed when layers differ in cost.
      uncond: the negative condition when sampling with guidance (doubles the rows).

    Returns:
      The ratio of FLOPs, uncached over cached.

    Raises:
      ValueError: if neither count is given, or only ``layer_evaluations`` for layers of
        different cost.
    """
    work = network_work(network, params, *_rows(noise, cond, uncond))
    full = work.total(num_steps)
    if layers_computed is not None:
        return full / work.total(num_steps, layers_computed)
    if layer_evaluations is None:
        raise ValueError("ideal_speedup needs layer_evaluations or layers_computed")
    if len(set(work.layers.tolist())) > 1:
        raise ValueError(
            "the network's layers differ in cost (several kinds of block): pass "
            "layers_computed=result.layers_computed, or read result.ideal_speedup"
        )
    layer = float(work.layers[0]) if len(work.layers) else 0.0
    return full / (work.condition + num_steps * work.step + layer_evaluations * layer)
