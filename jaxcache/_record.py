"""What ``sample(..., record=...)`` records per evaluation, carried with the sample.

A :class:`Record` rides in the loop's carry: the per-row relative change of the policy's signal
and of the network's prediction at each evaluation (NaN at the first), and the body's residual
per evaluation, each only where asked. The sampler returns them on its ``SampleResult``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcache.policies.signals import relative_l1

PyTree = Any


#: What ``sample(..., record=...)`` can return beside the sample (see :class:`SampleResult`).
RECORDABLE = ("signal", "output_change", "body_residual", "sensitivity")

class Record(NamedTuple):
    """What a run records (``record=``), carried with the sample; None where not recorded.

    ``previous_*``: the value at the previous evaluation, per row; ``signals`` and
    ``output_changes``: ``[evaluations, rows]``, written one evaluation at a time.
    """

    previous_signal: jax.Array | None
    signals: jax.Array | None
    previous_output: jax.Array | None
    output_changes: jax.Array | None
    body_residuals: PyTree = None


def record_start(record, head, signal_of, start, steps) -> Record:
    """The record before evaluation 0 (shapes from the head and the sample, traced abstractly)."""
    zero = jnp.zeros((), jnp.float32)
    shapes = jax.eval_shape(head, start, zero)
    rows = jax.tree.leaves(shapes[1])[0].shape[0]
    empty = jnp.full((steps, rows), jnp.nan, jnp.float32)
    signal = output = None
    if "signal" in record:
        shape = jax.eval_shape(lambda z: signal_of(*head(z, zero)), start).shape
        signal = jnp.zeros(shape, jnp.float32)
    if "output_change" in record:
        output = jnp.zeros((rows, *start[0].shape[1:]), jnp.float32)
    residuals = None
    if "body_residual" in record:
        residuals = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), jnp.float32), shapes[1])
    return Record(signal, None if signal is None else empty,
                   output, None if output is None else empty, residuals)


def record_residual(recorded: Record, i, body_in, body_out) -> Record:
    """``recorded`` with evaluation ``i``'s body residual written."""
    residuals = jax.tree.map(
        lambda buf, o, h: buf.at[i].set((o - h).astype(jnp.float32)),
        recorded.body_residuals, body_out, body_in,
    )
    return recorded._replace(body_residuals=residuals)


def recorded_residuals(z, record) -> PyTree:
    """The recorded body residuals of a finished run's carry (None unless recorded)."""
    return z.record.body_residuals if "body_residual" in record else None


def record_changes(recorded: Record, i, signal, prediction, sequence) -> Record:
    """``recorded`` with evaluation ``i``'s changes written (NaN at evaluation 0)."""
    axes = sequence or ()  # a row split over devices is measured whole (relative_l1)

    def change(current, previous, buffer):
        value = relative_l1(current, previous, axis_name=axes)
        value = jnp.where(i == 0, jnp.nan, value)
        return current.astype(jnp.float32), buffer.at[i].set(value)

    if recorded.signals is not None:
        previous, signals = change(signal, recorded.previous_signal, recorded.signals)
        recorded = recorded._replace(previous_signal=previous, signals=signals)
    if recorded.output_changes is not None:
        previous, changes = change(prediction, recorded.previous_output,
                                   recorded.output_changes)
        recorded = recorded._replace(previous_output=previous, output_changes=changes)
    return recorded


def recorded_changes(z, record) -> tuple[jax.Array | None, jax.Array | None]:
    """``(signals, output_changes)`` of a finished run's carry."""
    if not record:
        return None, None
    return z.record.signals, z.record.output_changes
