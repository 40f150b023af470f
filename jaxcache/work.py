"""What a sampling run computes: the matrix FLOPs of each piece, counted on its jaxpr.

Transformer compute is matrix products, so this counts ``dot_general`` and convolutions (2 FLOPs
per multiply-add), walking into nested jaxprs: ``jit``, ``scan`` (times its length), ``cond`` /
``switch`` (the most expensive branch) and custom derivative wrappers. Element-wise work is not
counted. Nothing runs: the pieces are traced on shapes.

The sampler weighs what ran by these counts (:attr:`jaxcache.SampleResult.flops`), so that the
reported saving is the compute saved, block kinds of different cost (FLUX's double- and
single-stream blocks) each weighed by their own. Per-layer constants
(:attr:`jaxcache.Network.layer_constant`: a cross-attention block's text keys and values) are
computed once per run, so they count with the condition path, not with the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxcache.stack import (
    LayerInputs,
    LayerList,
    Segments,
    as_kinds,
    bind_layers,
    layer_at,
    stack_length,
)

PyTree = Any

__all__ = ["Work", "jaxpr_flops", "matmul_flops", "network_work"]


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


class Work(NamedTuple):
    """Matrix FLOPs of the pieces of one sampling run (all rows, both guidance branches).

    Attributes:
      condition: the condition path, once per run, with every layer's ``layer_constant``.
      step: the embedding and the final projection, every model evaluation.
      layers: ``[depth]`` int64, each layer, each time it is evaluated (layers of different
        kinds differ).
    """

    condition: int
    step: int
    layers: np.ndarray

    def total(self, evaluations: int, layers_computed: Any = None,
              steps_computed: Any = None) -> float:
        """The FLOPs of a run of ``evaluations`` model evaluations.

        Args:
          evaluations: the number of model evaluations.
          layers_computed: ``[evaluations, depth]``, which layer ran at which evaluation (bool,
            or the share of the rows that ran it); None: every layer at every evaluation.
          steps_computed: ``[evaluations]``, the share of the rows whose embedding and final
            projection ran at each evaluation (below 1 on CFG-Cache's cache steps, 0 where a
            whole-network policy skipped); None: all of them at every evaluation.
        """
        if layers_computed is None:
            layer_total = evaluations * float(np.sum(self.layers))
        else:
            layer_total = float(np.sum(np.asarray(layers_computed, np.float64) @ self.layers))
        steps = evaluations if steps_computed is None else float(np.sum(steps_computed))
        return float(self.condition) + steps * float(self.step) + layer_total


def _shapes(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def network_work(network, params, rows: Any, cond_rows: Any) -> Work:
    """The matrix FLOPs of each piece of a network's step, for these rows.

    Args:
      network: the :class:`~jaxcache.Network`.
      params: its :class:`~jaxcache.SegmentParams` (arrays, tracers or shapes).
      rows: the rows the network sees at each evaluation (both guidance branches), shapes
        suffice.
      cond_rows: the condition for those rows.

    Returns:
      A :class:`Work`.

    Raises:
      ValueError: if a piece contains a ``while`` loop (its trip count is unknown).
    """
    params, rows, cond_rows = _shapes(params), _shapes(rows), _shapes(cond_rows)
    t = jax.ShapeDtypeStruct((rows.shape[0],), np.float32)
    constant = jax.eval_shape(network.condition, params.condition, cond_rows)
    h, ctx = jax.eval_shape(network.embed, params.embed, rows, t, constant)
    kinds = as_kinds(network.kinds)
    per_kind: dict[int, int] = {}
    constants = 0  # the per-layer constants, computed once per run
    layers = []
    for stack in (params.head, params.body, params.tail):
        # Bound on shapes (unchanged if bound already): a binding kind's layers read LayerInputs.
        stack = jax.eval_shape(lambda s, c: bind_layers(kinds, s, c), stack, constant)
        pieces = stack.pieces if isinstance(stack, Segments) else (stack,)
        indices = stack.kinds if isinstance(stack, Segments) else (0,)
        for piece, k in zip(pieces, indices):
            length = stack_length(piece)
            if not length:
                continue
            kind = kinds[k]
            if k not in per_kind:
                state = h if kind.enter is None else jax.eval_shape(kind.enter, h, ctx)
                first = jax.eval_shape(lambda stack: layer_at(stack, 0), piece)
                per_kind[k] = matmul_flops(kind.layer, first, state, ctx)
            if kind.layer_constant is not None:
                one = _first_params(piece)
                constants += length * matmul_flops(kind.layer_constant, one, constant)
            layers.extend([per_kind[k]] * length)
    return Work(
        condition=matmul_flops(network.condition, params.condition, cond_rows) + constants,
        step=matmul_flops(network.embed, params.embed, rows, t, constant)
        + matmul_flops(network.final, params.final, h, ctx),
        layers=np.asarray(layers, np.int64),
    )


def _first_params(piece: PyTree) -> PyTree:
    """The first layer's own parameters (shapes) of a bound piece."""
    if isinstance(piece, LayerList):
        return piece.layers[0].params
    first = jax.eval_shape(lambda stack: layer_at(stack, 0), piece)
    return first.params if isinstance(first, LayerInputs) else first


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
