"""Residual reuse: a skipped step adds the body's stored residual to its current input.

First-Block Cache, DBCache and TeaCache reuse this way: the body's output minus its input is
stored on a computed step, and a skipped step returns ``input + residual``, so what the head
computed this step (the first blocks, the fresh embedding) still reaches the tail.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcache._dataclass import settings_dataclass
from jaxcache.reuse.base import ReuseMode, select_rows

PyTree = Any

__all__ = ["ResidualReuse", "ResidualState"]


class ResidualState(NamedTuple):
    """The residual mode's state.

    Attributes:
      residual: body output minus body input at the last computed step, per row (the body's
        structure: one array, or ``(image, text)``).
    """

    residual: PyTree


@settings_dataclass()
class ResidualReuse(ReuseMode):
    """Reuse the body's residual: a skipped step returns its input plus the stored residual."""

    def init(self, plan, body, constant):
        return ResidualState(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), body))

    def store(self, state, body_in, body_out, position, rows):
        residual = jax.tree.map(lambda o, i: o - i, body_out, body_in)
        return ResidualState(select_rows(rows, residual, state.residual))

    def reuse(self, state, body_in, position):
        return jax.tree.map(lambda i, r: i + r, body_in, state.residual)

    def rows(self, state, start, stop):
        return jax.tree.map(lambda a: a[start:stop], state)
