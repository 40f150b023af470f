"""StepCache: a cache of layer outputs reused across denoising steps, as an immutable pytree.

This is the JAX port of the reference step cache (see the mapping table in docs/design.md). Each of
the two slot streams is stored as one stacked buffer ``[num_layers, *slot_shape]`` per leaf plus a
``[num_layers]`` filled-mask, so a traced layer index (inside a ``lax.scan`` over layers) can read
and write a slot. Shapes are fixed at creation, so a cache can be a ``lax.scan`` carry. Every method
that "mutates" returns a new cache.

Semantics follow the reference exactly:

* ``set`` past the end is a silent no-op; ``get`` past the end returns ``None`` (static index);
  ``has`` past the end is ``False``.
* A negative static index raises ``IndexError``. A traced index outside ``[0, num_layers)``
  behaves as past the end (reads give zeros and ``has`` is ``False``; writes do nothing).
* ``set(i, None)`` clears slot ``i``.
* ``free()`` empties every slot and the constant; the freed cache holds fresh buffers and no
  reference to the old ones, and keeps its length so it can be reused.

An empty slot reads as zeros: under ``jit`` there is no "nothing" to return, so check ``has``.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["StepCache", "should_refresh"]


def should_refresh(step: int | jax.Array, interval: int) -> bool | jax.Array:
    """Whether the cache is refreshed at ``step``: ``step % interval == 0``.

    Step 0 always refreshes; ``interval=1`` refreshes every step.

    Args:
      step: the denoising step, a Python int or a traced integer array.
      interval: the refresh interval, a static positive int.

    Returns:
      A Python bool for a Python ``step``, else a boolean array.

    Raises:
      ValueError: if ``interval`` is not a positive int.
    """
    check_interval(interval)
    if isinstance(step, (int, np.integer)):
        return step % interval == 0
    return jnp.asarray(step) % interval == 0


def check_interval(interval: Any) -> None:
    """Raises a ValueError unless ``interval`` is a positive int (the reference crashes at 0)."""
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)):
        raise ValueError(f"interval must be a positive int, got {interval!r}")
    if interval <= 0:
        raise ValueError(f"interval must be a positive int, got {interval}")


class _SlotSpec:
    """One slot's structure: a treedef and its leaves' shapes and dtypes (hashable, static)."""

    __slots__ = ("treedef", "leaves")

    def __init__(self, example: PyTree):
        leaves, self.treedef = jax.tree.flatten(example)
        self.leaves = tuple(
            jax.ShapeDtypeStruct(tuple(np.shape(a)), jnp.result_type(a)) for a in leaves
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _SlotSpec)
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __repr__(self) -> str:
        return self.describe()

    def tree(self, lead: tuple[int, ...] = ()) -> PyTree:
        """The structure as a pytree of ShapeDtypeStructs, with ``lead`` axes prepended."""
        return jax.tree.unflatten(
            self.treedef, [jax.ShapeDtypeStruct(lead + s.shape, s.dtype) for s in self.leaves]
        )

    def zeros(self, lead: tuple[int, ...] = ()) -> PyTree:
        return jax.tree.unflatten(
            self.treedef, [jnp.zeros(lead + s.shape, s.dtype) for s in self.leaves]
        )

    def describe(self, lead: tuple[int, ...] = ()) -> str:
        return str(jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", self.tree(lead)))

    def check(self, value: PyTree, what: str, lead: tuple[int, ...] = ()) -> None:
        """Raises a ValueError naming expected and got when ``value`` does not fit."""
        got = _SlotSpec(value)
        want = self.tree(lead)
        if got.treedef != self.treedef or any(
            g.shape != w.shape or g.dtype != w.dtype
            for g, w in zip(got.leaves, jax.tree.leaves(want))
        ):
            raise ValueError(f"{what}: expected {self.describe(lead)}, got {got.describe()}")


def _static_index(i: Any) -> int | None:
    """``i`` as a Python int if it is static, else None (a traced index)."""
    if isinstance(i, jax.core.Tracer):
        return None
    try:
        return operator.index(i)
    except TypeError:
        arr = np.asarray(i)
        if arr.shape == () and np.issubdtype(arr.dtype, np.integer):
            return int(arr)
        raise TypeError(f"a layer index must be an integer, got {i!r}") from None


@dataclasses.dataclass(frozen=True)
class _Stream:
    """One slot stream: stacked buffers and a filled-mask (internal)."""

    slots: PyTree  # leaves [n, *slot_shape]
    filled: jax.Array  # [n] bool


jax.tree_util.register_dataclass(_Stream, data_fields=["slots", "filled"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class StepCache:
    """Layer outputs cached across denoising steps (the reference ``StepCache``), as a pytree.

    Create one with :meth:`create`. Stream 1 (``get``/``set``) holds e.g. image hidden states,
    stream 2 (``get2``/``set2``) text hidden states of a dual-stream model, and the constant slot
    a step-independent value such as a caption embedding.

    Example:
      >>> import jax.numpy as jnp
      >>> cache = StepCache.create(2, layer=jax.ShapeDtypeStruct((3,), jnp.float32))
      >>> cache = cache.set(0, jnp.ones(3))
      >>> bool(cache.has(0)), bool(cache.has(1)), cache.get(5) is None
      (True, False, True)
    """

    stream1: _Stream
    stream2: _Stream | None
    constant_value: PyTree
    constant_filled: jax.Array | None
    num_layers: int
    layer_spec: _SlotSpec
    layer2_spec: _SlotSpec | None
    constant_spec: _SlotSpec | None

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        num_layers: int,
        layer: PyTree,
        layer2: PyTree = None,
        constant: PyTree = None,
    ) -> "StepCache":
        """An empty cache.

        Args:
          num_layers: the number of slots per stream (``0`` is allowed and stores nothing).
          layer: one stream-1 slot's structure: an array, a ``jax.ShapeDtypeStruct`` or a pytree
            of them (only shapes and dtypes are used).
          layer2: one stream-2 slot's structure, or None for a single-stream cache.
          constant: the constant slot's structure, or None for a cache without one.

        Returns:
          A cache with every slot and the constant empty.

        Raises:
          ValueError: if ``num_layers`` is negative or not an int, or ``layer`` is None.
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
            raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {num_layers}")
        if layer is None:
            raise ValueError("layer must give one slot's structure (an array or ShapeDtypeStruct)")
        n = int(num_layers)
        spec1 = _SlotSpec(layer)
        spec2 = None if layer2 is None else _SlotSpec(layer2)
        cspec = None if constant is None else _SlotSpec(constant)
        return cls(
            stream1=_Stream(spec1.zeros((n,)), jnp.zeros((n,), bool)),
            stream2=None if spec2 is None else _Stream(spec2.zeros((n,)), jnp.zeros((n,), bool)),
            constant_value=None if cspec is None else cspec.zeros(),
            constant_filled=None if cspec is None else jnp.zeros((), bool),
            num_layers=n,
            layer_spec=spec1,
            layer2_spec=spec2,
            constant_spec=cspec,
        )

    # ----------------------------------------------------------------------------- stream 1
    def get(self, i: int | jax.Array) -> PyTree:
        """The value in stream-1 slot ``i`` (zeros if empty; None for a static ``i`` past the end).

        Raises:
          IndexError: for a negative static ``i``.
        """
        return self._get(self.stream1, self.layer_spec, i)

    def has(self, i: int | jax.Array) -> jax.Array:
        """Whether stream-1 slot ``i`` is filled (False past the end)."""
        return self._has(self.stream1, i)

    def set(self, i: int | jax.Array, value: PyTree) -> "StepCache":
        """A cache with ``value`` in stream-1 slot ``i`` (``None`` clears the slot).

        Setting past the end is a silent no-op, as in the reference.

        Raises:
          IndexError: for a negative static ``i``.
          ValueError: if ``value`` does not match the slot's structure, shapes and dtypes.
        """
        stream = self._set(self.stream1, self.layer_spec, i, value, "set")
        return dataclasses.replace(self, stream1=stream)

    # ----------------------------------------------------------------------------- stream 2
    def get2(self, i: int | jax.Array) -> PyTree:
        """``get`` on the second stream."""
        return self._get(self._stream2("get2"), self.layer2_spec, i)

    def has2(self, i: int | jax.Array) -> jax.Array:
        """``has`` on the second stream."""
        return self._has(self._stream2("has2"), i)

    def set2(self, i: int | jax.Array, value: PyTree) -> "StepCache":
        """``set`` on the second stream."""
        stream = self._set(self._stream2("set2"), self.layer2_spec, i, value, "set2")
        return dataclasses.replace(self, stream2=stream)

    # ----------------------------------------------------------------------------- constant
    def get_constant(self) -> PyTree:
        """The constant slot's value (zeros if empty)."""
        self._need_constant("get_constant")
        return self.constant_value

    def has_constant(self) -> jax.Array:
        """Whether the constant slot is filled."""
        self._need_constant("has_constant")
        return self.constant_filled

    def set_constant(self, value: PyTree) -> "StepCache":
        """A cache with ``value`` in the constant slot (``None`` clears it)."""
        self._need_constant("set_constant")
        if value is None:
            return dataclasses.replace(
                self,
                constant_value=self.constant_spec.zeros(),
                constant_filled=jnp.zeros((), bool),
            )
        self.constant_spec.check(value, "StepCache.set_constant value")
        return dataclasses.replace(
            self, constant_value=value, constant_filled=jnp.ones((), bool)
        )

    # ----------------------------------------------------------------------------- whole cache
    def free(self) -> "StepCache":
        """An empty cache of the same length; it holds fresh buffers and none of the old ones.

        Freeing twice is safe. To release the memory itself, drop every reference to the cache.
        """
        def tree(spec):
            return None if spec is None else spec.tree()

        return StepCache.create(
            self.num_layers, tree(self.layer_spec), tree(self.layer2_spec), tree(self.constant_spec)
        )

    def arrays(self) -> list[PyTree]:
        """All filled values: the constant, then stream-1 slots, then stream-2 slots (eager only).

        Raises:
          TypeError: under ``jit``, where which slots are filled is not known.
        """
        try:
            out = []
            if self.constant_spec is not None and bool(self.constant_filled):
                out.append(self.constant_value)
            for stream in (self.stream1, self.stream2):
                if stream is None:
                    continue
                filled = np.asarray(stream.filled)
                for i in np.flatnonzero(filled):
                    out.append(jax.tree.map(lambda a, i=i: a[i], stream.slots))
            return out
        except jax.errors.ConcretizationTypeError as e:
            raise TypeError("StepCache.arrays() needs concrete values; call it outside jit") from e

    @property
    def has_stream2(self) -> bool:
        """Whether the cache was created with a second stream."""
        return self.stream2 is not None

    # ----------------------------------------------------------------------------- internals
    def _stream2(self, method: str) -> _Stream:
        if self.stream2 is None:
            raise ValueError(
                f"StepCache.{method}: this cache has no second stream; "
                "create it with StepCache.create(..., layer2=...)"
            )
        return self.stream2

    def _need_constant(self, method: str) -> None:
        if self.constant_spec is None:
            raise ValueError(
                f"StepCache.{method}: this cache has no constant slot; "
                "create it with StepCache.create(..., constant=...)"
            )

    def _index(self, i: Any) -> tuple[int | None, jax.Array | None]:
        """Static index (checked) or a traced index mapped so out-of-range is past the end."""
        static = _static_index(i)
        if static is not None:
            if static < 0:
                raise IndexError(f"layer index must be >= 0, got {static}")
            return static, None
        i = jnp.asarray(i)
        if not jnp.issubdtype(i.dtype, jnp.integer) or i.shape != ():
            raise TypeError(
                f"a traced layer index must be a scalar integer, got {i.dtype}{i.shape}"
            )
        # Negative traced indices would wrap around in numpy indexing; send them past the end.
        return None, jnp.where(i < 0, self.num_layers, i)

    def _get(self, stream: _Stream, spec: PyTree, i: Any) -> PyTree:
        static, traced = self._index(i)
        if static is not None:
            if static >= self.num_layers:
                return None
            return jax.tree.map(lambda a: a[static], stream.slots)
        return jax.tree.map(
            lambda a: jnp.take(a, traced, axis=0, mode="fill", fill_value=0), stream.slots
        )

    def _has(self, stream: _Stream, i: Any) -> jax.Array:
        static, traced = self._index(i)
        if static is not None:
            if static >= self.num_layers:
                return jnp.zeros((), bool)
            return stream.filled[static]
        return jnp.take(stream.filled, traced, mode="fill", fill_value=False)

    def _set(self, stream: _Stream, spec: PyTree, i: Any, value: PyTree, method: str) -> _Stream:
        static, traced = self._index(i)
        clear = value is None
        if not clear:
            spec.check(value, f"StepCache.{method} value")
        if static is not None and static >= self.num_layers:
            return stream  # past the end: a silent no-op, as in the reference
        idx = static if static is not None else traced
        new_value = spec.zeros() if clear else value
        slots = jax.tree.map(
            lambda a, v: a.at[idx].set(v, mode="drop"), stream.slots, new_value
        )
        filled = stream.filled.at[idx].set(not clear, mode="drop")
        return _Stream(slots, filled)


jax.tree_util.register_dataclass(
    StepCache,
    data_fields=["stream1", "stream2", "constant_value", "constant_filled"],
    meta_fields=["num_layers", "layer_spec", "layer2_spec", "constant_spec"],
)
