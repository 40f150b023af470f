"""Cached sampling on a mesh of devices, with JAX's own sharding (see docs/sharding.md).

jaxcache has no communication layer: a sharded run is :func:`jaxcache.sample` under ``jax.jit``
with ``NamedSharding`` inputs (XLA's propagation splits the work), or inside ``jax.shard_map``
(each device runs the loop on its own block). This module holds the few helpers that go with
it:

* :func:`manual_axes`, :func:`vary`: the manual mesh axes a value varies over inside
  ``shard_map``, and a pytree cast to vary over them (what the sampler does to the loop state
  it creates, so a ``scan`` carry keeps one type). Both are no-ops outside ``shard_map``.
* :func:`check_sequence_axes`: ``sample(..., sequence_axis=...)``'s check that the axes are
  ``shard_map`` axes.
* :func:`place`: ``jax.device_put`` onto a ``NamedSharding`` that first checks that the mesh
  divides the array, with a ValueError naming the sizes.
* :func:`param_specs`, :func:`place_params`: split parameters (``plan.split(params)``) placed
  with their matrices' last dimension over a model axis, for a model that does not fit one
  device.
* :func:`collectives`: the collectives of a compiled program's text and the bytes of their
  operands, inside and outside the loops (the communication a run costs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

__all__ = [
    "Collective",
    "check_divides",
    "check_sequence_axes",
    "collectives",
    "manual_axes",
    "param_specs",
    "place",
    "place_params",
    "traffic",
    "vary",
]


# ------------------------------------------------------------------ inside shard_map
def manual_axes(x: Any) -> tuple[str, ...]:
    """The manual mesh axes (``shard_map``'s) that ``x`` varies over, sorted; empty outside.

    JAX records them on the value's type: ``jax.typeof(x).vma`` up to JAX 0.9,
    ``jax.typeof(x).manual_axis_type.varying`` from 0.10; both are read. A ``shard_map`` with
    ``check_vma=False`` records none.
    """
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)
    if axes is None:
        kind = getattr(aval, "manual_axis_type", None)
        axes = getattr(kind, "varying", None) if kind is not None else None
    return tuple(sorted(axes or ()))


def _to_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # older JAX: pcast(to="varying") was pvary


def vary(tree: PyTree, axes: Sequence[str]) -> PyTree:
    """``tree`` with every array leaf cast to vary over ``axes`` (the leaves that lack some).

    Inside ``shard_map`` a value built from constants (``jnp.zeros``) is invariant: the same
    on every device. A loop whose carry starts so and then mixes in the noise (which varies
    over the mesh axes) changes type between iterations, which ``lax.scan`` refuses. The
    sampler casts the loop state it creates, and each step's new state, with this.

    Args:
      tree: a pytree of arrays (None leaves pass).
      axes: the manual mesh axes, e.g. ``manual_axes(noise)``; empty returns ``tree`` itself
        (outside ``shard_map`` the program is unchanged).
    """
    axes = tuple(axes)
    if not axes:
        return tree

    def cast(leaf):
        if not hasattr(leaf, "dtype"):
            return leaf
        missing = tuple(a for a in axes if a not in manual_axes(leaf))
        return _to_varying(leaf, missing) if missing else leaf

    return jax.tree.map(cast, tree)


def _axis_size(name: str) -> int | None:
    """The size of a bound (``shard_map``) mesh axis; None when ``name`` is not bound."""
    try:
        return int(jax.lax.axis_size(name))
    except NameError:
        return None


def normalize_sequence_axis(sequence_axis: Any) -> tuple[str, ...] | None:
    """``sample``'s ``sequence_axis`` as a tuple of names (None: none), checked for its type."""
    if sequence_axis is None:
        return None
    names = (sequence_axis,) if isinstance(sequence_axis, str) else sequence_axis
    if not isinstance(names, (tuple, list)) or not names or not all(
        isinstance(n, str) for n in names
    ):
        raise TypeError(
            "sequence_axis must be a mesh axis name (str), a non-empty tuple of them, or None, "
            f"got {sequence_axis!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"sequence_axis names an axis twice: {sequence_axis!r}")
    return tuple(names)


def check_sequence_axes(axes: tuple[str, ...] | None, noise: jax.Array) -> None:
    """Raises unless every axis of ``axes`` is a manual mesh axis here (inside ``shard_map``).

    Called while tracing: outside ``shard_map`` no axis is bound, and jit's sharding
    propagation already keeps a token-sharded sample consistent, so ``sequence_axis`` has no
    meaning there.
    """
    if not axes:
        return
    unbound = [a for a in axes if _axis_size(a) is None]
    if unbound:
        raise ValueError(
            f"sequence_axis={axes if len(axes) > 1 else axes[0]!r}: no mesh axis named "
            f"{unbound[0]!r} is bound here. sequence_axis names the jax.shard_map axes that "
            "split each sample's tokens, and sample() is not running inside a shard_map over "
            f"{unbound[0]!r} (the noise, of local shape {tuple(noise.shape)}, varies over "
            f"{list(manual_axes(noise)) or 'no manual axis'}). Under jax.jit with "
            "NamedSharding inputs, sharding propagation keeps a token-split sample consistent "
            "by itself: drop sequence_axis there"
        )


# ------------------------------------------------------------------ placing arrays
def _spec_sizes(mesh: Mesh, entry: Any) -> tuple[tuple[str, ...], int]:
    if entry is None:
        return (), 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return names, int(np.prod([mesh.shape[n] for n in names]))


def place(x: jax.Array, mesh: Mesh, spec: PartitionSpec, what: str = "array") -> jax.Array:
    """``jax.device_put(x, NamedSharding(mesh, spec))``, refused first where the mesh does not
    divide the array.

    Args:
      x: the array (e.g. the noise ``[batch, tokens, ...]``).
      mesh: the mesh.
      spec: how ``x``'s dimensions split over the mesh axes, e.g. ``P("data")`` (the batch) or
        ``P("data", "seq")`` (the batch, then each sample's tokens).
      what: the array's name in the message.

    Raises:
      ValueError: naming the dimension, its size and the mesh axes' size, when a dimension
        does not split evenly (JAX's own refusal is an ``IndivisibleError``, a ValueError too;
        this one says which dimension it is and what would fit).
    """
    check_divides(np.shape(x), mesh, spec, what)
    return jax.device_put(x, NamedSharding(mesh, spec))


def check_divides(shape: Sequence[int], mesh: Mesh, spec: PartitionSpec,
                  what: str = "array") -> None:
    """Raises a ValueError naming the sizes unless ``spec`` splits ``shape`` evenly on ``mesh``.

    Dimension 0 is called the batch, dimension 1 the tokens (the layout of a sample).
    """
    shape = tuple(int(s) for s in shape)
    if len(spec) > len(shape):
        raise ValueError(f"{what} of shape {shape} has fewer dimensions than the spec {spec}")
    for dim, entry in enumerate(spec):
        names, parts = _spec_sizes(mesh, entry)
        if parts > 1 and shape[dim] % parts:
            role = {0: "batch", 1: "token count"}.get(dim, f"dimension {dim}")
            axes = " x ".join(f"{n!r} ({mesh.shape[n]})" for n in names)
            up = -(-shape[dim] // parts) * parts
            raise ValueError(
                f"the mesh axis {axes} splits {what}'s {role} (dimension {dim}) into {parts} "
                f"parts, but the {role} is {shape[dim]} (shape {shape}), which {parts} does not "
                f"divide: pad it to a multiple of {parts} (e.g. {up}) or split it over mesh "
                f"axes whose size divides {shape[dim]}"
            )


def param_specs(params: PyTree, mesh: Mesh, axis: str, min_size: int = 0) -> PyTree:
    """A ``PartitionSpec`` per leaf: matrices split on their last dimension over ``axis``.

    A leaf of two or more dimensions whose last dimension ``axis`` divides (and which holds at
    least ``min_size`` elements) is split there; every other leaf (biases, tables, scalars) is
    replicated. For stacked layers (``[layers, d_in, d_out]``) that is the output features of
    every layer's weight: XLA then runs each matrix product on a slice of the features and
    gathers (or reduces) the activations between layers.

    Args:
      params: a pytree of arrays, e.g. ``plan.split(params)``.
      mesh: the mesh.
      axis: the model axis's name.
      min_size: leaves with fewer elements stay replicated.
    """
    parts = mesh.shape[axis]

    def spec(leaf):
        shape = np.shape(leaf)
        if len(shape) >= 2 and shape[-1] % parts == 0 and np.prod(shape) >= min_size:
            return PartitionSpec(*([None] * (len(shape) - 1)), axis)
        return PartitionSpec()

    return jax.tree.map(spec, params)


def place_params(params: PyTree, mesh: Mesh, axis: str, min_size: int = 0) -> PyTree:
    """``params`` placed on ``mesh`` as :func:`param_specs` says (matrices over ``axis``)."""
    specs = param_specs(params, mesh, axis, min_size)
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)


# ------------------------------------------------------------------ communication
class Collective(NamedTuple):
    """One collective instruction of a compiled program.

    Attributes:
      op: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``,
        ``collective-permute`` (a ``-start`` / ``-done`` pair counts once, as its start).
      bytes: the bytes of its operands (what each device sends into it, per execution).
      computation: the HLO computation it sits in.
      in_loop: whether that computation is (reached from) a ``while`` loop's body or
        condition: it runs once per step of the sampling loop (or per layer of a scanned
        stack inside it), not once per run.
      shapes: its operands' shapes as the text writes them (``f32[2,8]``).
      runs: how many times it runs in one execution of the program: the product of the
        known trip counts of the loops around it (a loop of unknown count, such as the
        zero-or-one loop that runs the cached body on a device's decision, counts once).
        ``bytes * runs`` summed over a program, divided by its steps, is the traffic per step
        (with the body computed at every step: an upper bound for a device-decided policy).
      source: the JAX operation it came from, the last part of its ``op_name`` metadata
        (``psum``, ``pmax``, ``concatenate``, ``dot_general``...), or ``""``.
    """

    op: str
    bytes: int
    computation: str
    in_loop: bool
    shapes: tuple[str, ...]
    source: str = ""
    runs: int = 1


_COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                   "collective-permute", "collective-broadcast", "ragged-all-to-all")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
          "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+?)\[([\d,]*)\]")
_DEFINE = re.compile(r"^(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+(?P<op>[\w\-]+)\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\((?P<params>.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"%?([\w.\-]+):\s*(\([^)]*\)|[\w]+\[[\d,]*\](?:\{[\d,]*\})?)")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls|branch_computations|"
                     r"true_computation|false_computation)=\{?([%\w.\-,\s]+?)\}?(?:,\s\w+=|$)")


def _bytes_of(types: list[str]) -> int:
    total = 0
    for text in types:
        for dtype, dims in _SHAPE.findall(text):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += n * _BYTES.get(dtype, 4)
    return total


def _operands(args: str) -> list[str]:
    """The operand names of an instruction's argument list (up to its closing parenthesis)."""
    depth, end = 1, len(args)
    for k, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = k
            break
    inside = re.sub(r"/\*.*?\*/", "", args[:end])
    return re.findall(r"%([\w.\-]+)", inside)


def _source(line: str) -> str:
    found = re.search(r'op_name="([^"]*)"', line)
    if not found:
        return ""
    names = re.findall(r"[A-Za-z_][\w]*", found.group(1).rsplit("/", 1)[-1])
    return names[-1] if names else ""


def _entries(text: str):
    for line in text.splitlines():
        match = re.match(r"^ENTRY\s+%?([\w.\-]+)", line)
        if match:
            yield match.group(1), line


def _executions(edges: dict[str, list[tuple[str, int, bool]]], entry: str | None) -> dict:
    """Executions per program run of each computation reachable from ``entry``."""
    if entry is None:
        return {}
    order, seen = [], set()

    def visit(name):  # depth first, callers after callees
        stack = [(name, iter(edges.get(name, ())))]
        seen.add(name)
        while stack:
            node, children = stack[-1]
            for callee, _, _ in children:
                if callee not in seen:
                    seen.add(callee)
                    stack.append((callee, iter(edges.get(callee, ()))))
                    break
            else:
                stack.pop()
                order.append(node)

    visit(entry)
    runs = {name: 0 for name in order}
    runs[entry] = 1
    for name in reversed(order):  # callers before callees
        for callee, count, _ in edges.get(name, ()):
            runs[callee] += runs[name] * count
    return runs


def collectives(compiled_text: str) -> list[Collective]:
    """The collectives of a compiled program (``lowered.compile().as_text()``, optimised HLO).

    Returns:
      One :class:`Collective` per instruction, in text order, with the bytes of its operands
      (their types looked up where the text defines them: an instruction or a parameter of the
      enclosing computation).
    """
    computations: dict[str, list[str]] = {}
    types: dict[str, dict[str, str]] = {}
    current = None
    for line in compiled_text.splitlines():
        if line and not line[0].isspace():
            match = _HEADER.match(line.strip())
            if match:
                current = match.group("name")
                computations[current] = []
                types[current] = dict(_PARAM.findall(match.group("params")))
                continue
        if current is not None and line.strip():
            stripped = line.strip()
            computations[current].append(stripped)
            define = _DEFINE.match(stripped)
            if define:
                types[current][define.group("name")] = define.group("type")

    # Who calls whom, and how many times per call: a while loop runs its body its known trip
    # count (a loop of unknown count, the sampler's zero-or-one body loop, counts once: the
    # body's traffic if it runs); fusions, reductions and branches run once per caller.
    edges: dict[str, list[tuple[str, int, bool]]] = {name: [] for name in computations}
    for name, lines in computations.items():
        for line in lines:
            if re.search(r"\bwhile\(", line):
                trips = re.search(r'known_trip_count"?:\{"n":"(\d+)"', line)
                count = int(trips.group(1)) if trips else 1
                for key in ("body", "condition"):
                    found = re.search(r"\b" + key + r"=%?([\w.\-]+)", line)
                    if found:
                        edges[name].append((found.group(1), count, True))
                continue
            for group in _CALLEE.findall(line):
                for callee in group.split(","):
                    callee = callee.strip().lstrip("%")
                    if callee in computations:
                        edges[name].append((callee, 1, False))
    entry = next((n for n, line in _entries(compiled_text)), None)
    runs = _executions(edges, entry)
    in_loop: set[str] = set()
    todo = [callee for calls in edges.values() for callee, _, loop in calls if loop]
    while todo:
        name = todo.pop()
        if name not in in_loop:
            in_loop.add(name)
            todo.extend(callee for callee, _, _ in edges.get(name, ()))

    found = []
    pattern = re.compile(r"\s(" + "|".join(_COLLECTIVE_OPS) + r")(?:-start)?\((.*)$")
    for name, lines in computations.items():
        for line in lines:
            define = _DEFINE.match(line)
            match = pattern.search(line)
            if not (define and match and define.group("op").removesuffix("-start")
                    in _COLLECTIVE_OPS):
                continue
            operand_types = [types[name].get(o, "") for o in _operands(match.group(2))]
            if not all(operand_types):  # an operand defined elsewhere: count the result
                operand_types = [define.group("type")]
            found.append(Collective(
                op=match.group(1), bytes=_bytes_of(operand_types), computation=name,
                in_loop=name in in_loop, runs=runs.get(name, 0),
                shapes=tuple(f"{d}[{s}]" for t in operand_types for d, s in _SHAPE.findall(t)),
                source=_source(line),
            ))
    return found


def traffic(compiled_text: str, steps: int) -> dict[str, dict[str, float]]:
    """The bytes a compiled sampling program's collectives move, by operation.

    Args:
      compiled_text: ``lowered.compile().as_text()``.
      steps: the run's model evaluations (the loop's steps).

    Returns:
      ``{"per_step": {op: bytes}, "once": {op: bytes}}``: ``per_step`` sums the collectives
      inside loops, each weighed by its :attr:`Collective.runs`, over ``steps`` (with the body
      computed at every step where a device decides; a layer's collective inside a scanned
      stack counts once per layer); ``once`` sums those outside every loop (the condition's
      rows, the results' gathering). The bytes are each device's operands, as the
      instructions name them.
    """
    out: dict[str, dict[str, float]] = {"per_step": {}, "once": {}}
    for c in collectives(compiled_text):
        if c.in_loop:
            key, moved = "per_step", c.bytes * c.runs / steps
        else:
            key, moved = "once", float(c.bytes)
        out[key][c.op] = out[key].get(c.op, 0.0) + moved
    return out
