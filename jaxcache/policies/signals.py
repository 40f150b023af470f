"""Per-row measures of change that signal-driven policies compare against a threshold.

Inside ``jax.shard_map`` with a sample's tokens split over mesh axes (``sample(...,
sequence_axis=...)``), each device holds part of every row: :func:`relative_l1` then reduces its
means over those axes (``lax.pmean``), so every device holding a row's tokens measures the whole
row and takes the same decision. The sampler names the axes while it traces a policy's
``decide`` (:func:`sequence_axes`); a policy calls ``relative_l1`` as it always does.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxcache.stack import layer_at

__all__ = [
    "SIGNALS",
    "HeadResidual",
    "ModulatedInput",
    "Signal",
    "check_signal",
    "current_sequence_axes",
    "last_computed_start",
    "last_computed_update",
    "relative_l1",
    "sequence_axes",
    "signal_function",
    "signal_of",
]

# The mesh axes that split a sample's tokens, while the sampler traces a decision (else empty).
_SEQUENCE_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "jaxcache_sequence_axes", default=()
)


@contextlib.contextmanager
def sequence_axes(axes: str | tuple[str, ...] | None) -> Iterator[tuple[str, ...]]:
    """While active (tracing), :func:`relative_l1` reduces its per-row means over ``axes``.

    The sampler enters it around a policy's ``decide`` when ``sequence_axis`` is given; a
    policy of one's own that measures a row some other way reads the axes with
    :func:`current_sequence_axes` and reduces over them itself (``lax.pmean``).

    Args:
      axes: the ``shard_map`` mesh axes that split each sample's tokens (None or empty: none).
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    token = _SEQUENCE_AXES.set(axes)
    try:
        yield axes
    finally:
        _SEQUENCE_AXES.reset(token)


def current_sequence_axes() -> tuple[str, ...]:
    """The mesh axes that split a sample's tokens in the decision being traced (else ``()``)."""
    return _SEQUENCE_AXES.get()

# A floor for the denominator: a signal that is exactly zero (a block that does nothing) must
# read as "no change", never as 0 / 0 = NaN, which compares False with every threshold and
# would silently disable caching.
_TINY = 1e-12


def relative_l1(
    current: jax.Array,
    previous: jax.Array,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """``mean|current - previous| / mean|previous|`` per row (axis 0), in float32.

    The earlier value is the denominator, as in First-Block Cache, TeaCache and DBCache; the
    means run over every axis but the row axis, so each sample is measured on its own (the
    anchors pool the whole batch, so one sample's change decides for its batch-mates).

    Args:
      current: ``[rows, ...]``.
      previous: ``[rows, ...]``, the value at the earlier step.
      axis_name: inside ``jax.shard_map``, the mesh axes that split each row's other axes
        (its tokens) into equal parts: both means are then averaged over them
        (``lax.pmean``), so every device holding part of a row gets the whole row's value.
        None (the default) takes the axes the sampler names while tracing a decision
        (:func:`sequence_axes`: ``sample(..., sequence_axis=...)``), none outside it; ``()``
        measures the local block only.

    Returns:
      ``[rows]`` float32.
    """
    axes = current_sequence_axes() if axis_name is None else axis_name
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    current = current.astype(jnp.float32)
    previous = previous.astype(jnp.float32)
    change = _row_mean(jnp.abs(current - previous))
    scale = _row_mean(jnp.abs(previous))
    if axes:  # equal blocks per device: the mean of the local means is the row's mean
        change, scale = jax.lax.pmean((change, scale), axes)
    return change / jnp.maximum(scale, _TINY)


def _row_mean(x: jax.Array) -> jax.Array:
    """The mean over every axis but the first, in two stages (last axis, then the rest).

    A single reduction of ``[rows, many]`` gives a GPU one block per row, a few rows for a whole
    chip; reducing the feature axis first spreads the work over every token.
    """
    if x.ndim > 2:
        x = jnp.mean(x, axis=-1)
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def last_computed_start(signal: jax.ShapeDtypeStruct) -> tuple[jax.Array, jax.Array]:
    """``(previous, seen)`` before step 0 for a policy comparing with the last computed step.

    First-Block Cache and DBCache compare each step's signal with its value at the row's last
    computed step (not the previous step): ``previous`` holds it (float32, the signal's
    shape), ``seen`` (``[rows]`` bool) whether it holds a value yet.
    """
    return jnp.zeros(signal.shape, jnp.float32), jnp.zeros(signal.shape[:1], bool)


def last_computed_update(
    previous: jax.Array, seen: jax.Array, refresh: jax.Array, signal: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(previous, seen)`` after a step: rows that compute (``refresh``) keep this signal."""
    keep = refresh.reshape((-1,) + (1,) * (signal.ndim - 1))
    return jnp.where(keep, signal.astype(jnp.float32), previous), seen | refresh


class Signal(abc.ABC):
    """What a signal-driven policy reads each step, produced by the plan's head.

    A signal checks itself against the plan (before anything compiles) and builds the function
    the sampler calls each step. A policy names its signal with ``signal_kind``: the name of a
    built-in signal (:data:`SIGNALS`) or a :class:`Signal` of its own, so a new signal is one
    class here or beside the policy, not an edit of the sampler.
    """

    #: The signal's name in messages and in ``signal_kind``.
    name: ClassVar[str]

    def check(self, plan, reader: str) -> None:  # noqa: B027 (optional hook)
        """Raises a ValueError when ``plan`` cannot produce the signal.

        Args:
          plan: the :class:`~jaxcache.CachePlan`.
          reader: the policy's name, for the message.
        """

    @abc.abstractmethod
    def function(self, plan, params) -> Callable:
        """``signal(embedded, h, ctx) -> [rows, ...]``: the embedding's output, the head's
        output and the step context in, the signal out.

        Args:
          plan: the :class:`~jaxcache.CachePlan`.
          params: its split parameters.
        """


class HeadResidual(Signal):
    """The head layers' residual on stream 1 (First-Block Cache's first block, DBCache's
    first ``Fn`` blocks): the head's output minus the embedding's, in float32."""

    name = "head_residual"

    def check(self, plan, reader):
        if plan.first_layers < 1:
            raise ValueError(
                f"{reader} reads the residual of the layers before the cached body; build the "
                "plan with first_layers >= 1 (e.g. CachePlan(network, cached_layers=N - 1, "
                "first_layers=1))"
            )

    def function(self, plan, params):
        def head_residual(embedded, h, ctx):
            after, before = plan.streams(h)[0], plan.streams(embedded)[0]
            return after.astype(jnp.float32) - before.astype(jnp.float32)

        return head_residual


class ModulatedInput(Signal):
    """The first layer's timestep-modulated input (TeaCache), from the network's
    ``modulated_input(layer_params, h, ctx)``."""

    name = "modulated_input"

    def check(self, plan, reader):
        if plan.network.modulated_input is None:
            raise ValueError(
                f"{reader} reads the first layer's timestep-modulated input, which this Network "
                "does not provide: give it modulated_input=(layer_params, h, ctx) -> array "
                "(from_nnx finds a block method named modulated_input)"
            )

    def function(self, plan, params):
        first = params.head if plan.first_layers else params.body
        layer0 = layer_at(first, 0)

        def modulated_input(embedded, h, ctx):
            return plan.network.modulated_input(layer0, embedded, ctx)

        return modulated_input


#: The built-in signals by name (a policy's ``signal_kind`` may name one).
SIGNALS: dict[str, Signal] = {s.name: s for s in (HeadResidual(), ModulatedInput())}


def signal_of(kind: str | Signal | None) -> Signal | None:
    """The :class:`Signal` a policy's ``signal_kind`` names (None: the policy reads none).

    Raises:
      ValueError: for a name that is not a built-in signal.
      TypeError: for anything else than None, a name or a :class:`Signal`.
    """
    if kind is None or isinstance(kind, Signal):
        return kind
    if isinstance(kind, str):
        if kind not in SIGNALS:
            raise ValueError(
                f"unknown signal_kind {kind!r}: name one of {sorted(SIGNALS)} or give a "
                "jaxcache.policies.signals.Signal"
            )
        return SIGNALS[kind]
    raise TypeError(
        f"signal_kind must be None, a signal's name or a Signal, got {type(kind).__name__}"
    )


def check_signal(policy, plan) -> None:
    """Raises a ValueError when ``plan`` cannot produce the signal ``policy`` reads."""
    signal = signal_of(policy.signal_kind)
    if signal is not None:
        signal.check(plan, type(policy).__name__)


def signal_function(kind: str | Signal | None, plan, params) -> Callable | None:
    """``signal(embedded, h, ctx) -> [rows, ...]`` for a policy's ``signal_kind`` (or None).

    Args:
      kind: the policy's ``signal_kind``: a built-in signal's name, a :class:`Signal`, or None.
      plan: the :class:`~jaxcache.CachePlan`.
      params: its split parameters.

    Returns:
      A function of the embedding's output, the head's output and the step context; None when
      the policy reads no signal.
    """
    signal = signal_of(kind)
    return None if signal is None else signal.function(plan, params)
