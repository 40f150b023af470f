"""The reuse-mode seam: what a skipped step uses in place of the cached body's output.

A reuse mode owns the shape of the state it carries through the loop. After a computed body the
sampler calls ``store``; on a skipped step it calls ``reuse``. Both see the body's input of this
step (what the head produced), so a mode can add a stored residual to it or forecast from the
steps it stored.

Every value is per row (per sample, per guidance branch): ``store`` takes a ``[rows]`` mask of
the rows that store this step, and rows outside it keep their state. Settings that are numbers
are pytree leaves (traced); structure (which layers, the order of a forecast) is static.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["Position", "ReuseMode", "select_rows"]


class Position(NamedTuple):
    """Where a step is: its index and the solver's time there.

    Attributes:
      step: the step index, an int32 scalar.
      t: the solver's time at the step (the time the network sees), a float32 scalar.
    """

    step: jax.Array
    t: jax.Array


def select_rows(rows: jax.Array | None, new: PyTree, old: PyTree, axis: int = 0) -> PyTree:
    """``new`` in the rows where ``rows`` is True, ``old`` elsewhere (``rows=None``: all new).

    Args:
      rows: ``[rows]`` bool, or None for every row.
      new: a pytree whose leaves have the row axis at ``axis``.
      old: a pytree of the same structure.
      axis: the row axis of every leaf.
    """
    if rows is None:
        return new

    def pick(a, b):
        shape = [1] * a.ndim
        shape[axis] = rows.shape[0]
        return jnp.where(rows.reshape(shape), a, b)

    return jax.tree.map(pick, new, old)


class ReuseMode(abc.ABC):
    """What a skipped step uses in place of the cached body's output."""

    #: Whether :meth:`record` wants each body layer's output (written inside the layer scan).
    records_layers: bool = False

    def history(self) -> int:
        """Computed bodies a full-strength reuse needs (1 for reuse; ``order + 1`` to forecast)."""
        return 1

    @abc.abstractmethod
    def init(self, plan, body: PyTree, constant: PyTree) -> PyTree:
        """The state before the first step.

        Args:
          plan: the :class:`~jaxcache.CachePlan`.
          body: the body's input (= output) structure, a pytree of ``jax.ShapeDtypeStruct``
            with a leading row axis.
          constant: the condition path's output (kept by modes that return a
            :class:`~jaxcache.StepCache`).
        """

    @abc.abstractmethod
    def store(
        self,
        state: PyTree,
        body_in: PyTree,
        body_out: PyTree,
        position: Position,
        rows: jax.Array | None,
    ) -> PyTree:
        """The state after a computed body, for the rows in ``rows`` (None: every row)."""

    @abc.abstractmethod
    def reuse(self, state: PyTree, body_in: PyTree, position: Position) -> PyTree:
        """The body's output on a skipped step."""

    def record(self, state: PyTree, index: jax.Array, h: PyTree, rows: jax.Array | None):
        """Sees body layer ``index``'s output inside the layer scan (if ``records_layers``)."""
        return state

    @abc.abstractmethod
    def rows(self, state: PyTree, start: int, stop: int) -> PyTree:
        """The state of rows ``[start, stop)`` (one guidance branch's).

        Cut only what is per row; state shared by every row (a constant that is not
        batch-major, such as a RoPE table) stays whole (see :meth:`jaxcache.OutputReuse.rows`).
        """

    def check(self, plan, num_steps: int, refreshes: int | None) -> None:  # noqa: B027
        """Raises a ValueError for settings this run cannot honour, before anything compiles.

        Args:
          plan: the cache plan.
          num_steps: the number of steps.
          refreshes: the number of refresh steps when the schedule is known, else None.
        """
