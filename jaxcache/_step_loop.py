"""The loops of one cached program: the step functions and the scans over steps that run them.

:class:`StepLoop` is built inside the sampler's trace, from the plan's head and the step's finish
(the guidance combine and the solver's update), and holds one loop per kind of policy: a known
schedule (:meth:`StepLoop.static`), decisions on the device (:meth:`StepLoop.dynamic`), a skipped
whole network (:meth:`StepLoop.whole`), a per-(step, layer) plan (:meth:`StepLoop.layered`) and
traced gates (:meth:`StepLoop.gated`). :func:`scan_steps` runs steps of known kinds (CFG-Cache's
full and cache steps) with one step function per kind and runs of equal kinds scanned.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._schedule_runs import PLAIN, REUSE, STORE, row_runs, schedule_runs, step_actions
from jaxcache.plan import SegmentParams
from jaxcache.policies.signals import sequence_axes, signal_function
from jaxcache.reuse.base import Position, select_rows
from jaxcache.sharding import vary
from jaxcache.stack import LayerList, Segments, run_layers, stack_length

PyTree = Any


class Carry(NamedTuple):
    """The loop's carry: the sample, the solver's state, then (None where not asked) what
    ``record=`` records and CFG-Cache's state."""

    x: jax.Array
    solver: PyTree
    record: PyTree = None
    guidance: PyTree = None


# CFG-Cache's kinds of evaluation: both branches run and the gap between them is kept (FULL),
# or the conditional rows run alone (HALF).
FULL, HALF = "full", "half"


def scan_steps(step, carry, xs, keys):
    """``carry`` after ``step(keys[i], carry, xs[i])`` for every step ``i``, in order.

    ``keys`` are hashable and static (what a step does): steps of equal keys share one step
    function, and runs of equal keys, and repeating patterns of such runs (:func:`row_runs`),
    are scanned, so the program grows with the number of distinct keys and patterns, not with
    the step count.
    """
    distinct: list = []
    for k in keys:
        if k not in distinct:
            distinct.append(k)
    ids = np.asarray([distinct.index(k) for k in keys])

    def pattern(items):
        """One repetition of a pattern of (id, count) items, in order."""

        def run(carry, pattern_xs):
            offset = 0
            for key_id, count in items:
                part = jax.tree.map(lambda a, o=offset, c=count: a[o : o + c], pattern_xs)
                key = distinct[key_id]
                if count == 1:
                    carry = step(key, carry, jax.tree.map(lambda a: a[0], part))
                else:
                    carry, _ = jax.lax.scan(
                        lambda c, st, k=key: (step(k, c, st), None), carry, part
                    )
                offset += count
            return carry, None

        return run

    for start, reps, items in row_runs(ids):
        span = sum(count for _, count in items)
        carry = _run_repeated(pattern(items), carry, xs, start, reps, span)
    return carry


def _run_repeated(body, carry, xs, start: int, reps: int, span: int):
    """``body`` (``(carry, xs of span steps) -> (carry, _)``) over ``reps`` runs of ``span``
    steps from step ``start``: once inline, or scanned over the runs (one copy in the program)."""
    run_xs = jax.tree.map(lambda a: a[start : start + reps * span], xs)
    if reps == 1:
        return body(carry, run_xs)[0]
    grouped = jax.tree.map(lambda a: a.reshape((reps, span) + a.shape[1:]), run_xs)
    return jax.lax.scan(body, carry, grouped)[0]


class StepLoop:
    """The step functions of one cached program (built inside the trace).

    ``x`` in the carries below is the pair (sample, solver state) that ``head`` reads and
    ``finish`` returns.
    """

    def __init__(self, plan, params, mode, head, finish, remat=False, axes=(), sequence=None,
                 recorded_signal=None, batch=None, half_params=None):
        self.plan, self.params, self.mode = plan, params, mode
        self.head, self.finish = head, finish
        self.remat = remat
        self.axes = axes  # the manual mesh axes of the noise (empty outside shard_map)
        self.sequence = sequence  # the mesh axes that split a sample's tokens, or None
        self.recorded_signal = recorded_signal  # the signal a step records (record=), or None
        self.batch = batch  # the samples: CFG-Cache's cache steps run these rows alone
        self.half_params = half_params  # the parameters bound for those rows

    def vary(self, tree):
        """``tree`` cast to vary over the noise's manual mesh axes (nothing outside shard_map)."""
        return vary(tree, self.axes)

    # A cache step of CFG-Cache (``half``) runs the B conditional rows; the reuse state holds
    # both branches' 2B rows. The mode reads and writes it through the conditional rows twice
    # over, storing only the conditional ones, so its unconditional rows keep their values.
    def seg(self, half: bool) -> SegmentParams:
        """The parameters a step runs with (bound for its rows)."""
        return self.half_params if half else self.params

    def padded(self, tree, half: bool):
        """The rows a reuse mode sees: on a cache step, the conditional rows twice over."""
        if not half:
            return tree
        return jax.tree.map(lambda a: jnp.concatenate([a, a]), tree)

    def unpadded(self, tree, half: bool):
        """A reuse mode's rows back to the step's: on a cache step, the conditional ones."""
        if not half:
            return tree
        return jax.tree.map(lambda a: a[: self.batch], tree)

    def rows_of(self, rows, half: bool):
        """The rows a store writes (None: every row): on a cache step, conditional ones only."""
        if not half:
            return rows
        conditional = jnp.arange(2 * self.batch) < self.batch
        return conditional if rows is None else rows & conditional

    def reuse(self, state, h, position, half=False):
        """The reuse mode's value for the step's rows."""
        return self.unpadded(self.mode.reuse(state, self.padded(h, half), position), half)

    def body(self, h, ctx, state, position, rows, half=False):
        """Runs the body and stores it for ``rows`` (None: every row): ``(output, state)``."""
        plan, mode = self.plan, self.mode
        rows = self.rows_of(rows, half)
        if mode.records_layers:
            out, state = plan.run_body(
                self.seg(half), h, ctx, state=state,
                observe=lambda s, i, layer_out: mode.record(
                    s, i, self.padded(layer_out, half), rows
                ),
            )
        else:
            out = plan.run_body(self.seg(half), h, ctx)
        return out, mode.store(state, self.padded(h, half), self.padded(out, half), position,
                               rows)

    # ------------------------------------------------------------------ known schedules
    def static(self, noise, state, xs, schedule, kinds=None):
        """The loop of a schedule known now: scans over runs of equal groups, no decisions.

        ``kinds``: CFG-Cache's kind of each step, or None.
        """

        def step(key, carry, step_t):
            kind, guidance = key  # the body's action, CFG-Cache's kind (or None)
            half = guidance == HALF
            x, state = carry
            i, t, t_next = step_t
            position = Position(i, t)
            embedded, h, ctx = self.head(x, t, half=half)
            signal = (None if self.recorded_signal is None
                      else self.recorded_signal(embedded, h, ctx))
            if kind == "refresh":
                h, state = self.body(h, ctx, state, position, None, half)
            elif kind == "plain":  # before the first refresh: run, store nothing
                h = self.plan.run_body(self.seg(half), h, ctx)
            else:
                h = self.reuse(state, h, position, half)
            return self.vary((self.finish(x, h, ctx, i, t, t_next, signal, guidance), state))

        if self.remat:  # the backward pass recomputes each step from its carry
            step = jax.checkpoint(step, static_argnums=(0,))
        if kinds is not None:  # each step's (action, kind) pair, scanned by runs
            return scan_steps(step, (noise, state), xs,
                               list(zip(step_actions(schedule), kinds)))

        def group(carry, group_xs):
            """One refresh step, then a scan of the reuse steps after it."""
            carry = step(("refresh", None), carry, jax.tree.map(lambda a: a[0], group_xs))
            if group_xs[0].shape[0] > 1:
                rest = jax.tree.map(lambda a: a[1:], group_xs)
                carry, _ = jax.lax.scan(lambda c, st: (step(("reuse", None), c, st), None),
                                        carry, rest)
            return carry, None

        def pattern(lengths):
            """The groups of one repetition of a pattern, run in order."""

            def run(carry, pattern_xs):
                offset = 0
                for length in lengths:
                    part = jax.tree.map(lambda a, o=offset, n=length: a[o : o + n], pattern_xs)
                    carry, _ = group(carry, part)
                    offset += length
                return carry, None

            return run

        carry = (noise, state)
        for run in schedule_runs(schedule):
            if run[0] == "plain":
                _, start, count = run
                plain_xs = jax.tree.map(lambda a, s=start, n=count: a[s : s + n], xs)
                carry, _ = jax.lax.scan(lambda c, st: (step(("plain", None), c, st), None),
                                        carry, plain_xs)
                continue
            _, start, reps, lengths = run
            carry = _run_repeated(pattern(lengths), carry, xs, start, reps, sum(lengths))
        return carry

    # ------------------------------------------------------------------ device decisions
    def dynamic(self, noise, state, xs, policy, num_steps, kinds=None):
        """The loop of a policy that decides each step on the device, per row.

        ``kinds``: CFG-Cache's kind of each step, or None. With it each branch keeps a policy
        state of its own, and the unconditional one decides only where its rows run.
        """
        plan = self.plan
        signal_of = signal_function(policy.signal_kind, plan, self.params)
        half_signal_of = (None if self.half_params is None
                          else signal_function(policy.signal_kind, plan, self.half_params))
        zero = jnp.zeros((), jnp.float32)
        rows = jax.eval_shape(self.head, noise, zero)[1]
        rows = jax.tree.leaves(rows)[0].shape[0]
        if signal_of is None:
            policy_state = policy.init(num_steps)
            if kinds is not None:
                policy_state = (policy_state, policy.init(num_steps))
        else:
            structure = jax.eval_shape(lambda x: signal_of(*self.head(x, zero)), noise)
            if kinds is None:
                policy_state = policy.init(num_steps, structure)
            else:  # one state per branch, of its rows
                branch = jax.tree.map(
                    lambda s: jax.ShapeDtypeStruct((self.batch, *s.shape[1:]), s.dtype),
                    structure,
                )
                policy_state = (policy.init(num_steps, branch), policy.init(num_steps, branch))
        policy_state = self.vary(policy_state)

        def cached_step(kind, carry, step_t):
            x, state, policy_state, stored = carry
            half = kind == HALF
            i, t, t_next = step_t
            position = Position(i, t)
            embedded, h, ctx = self.head(x, t, half=half)
            signals = half_signal_of if half else signal_of
            signal = None if signals is None else signals(embedded, h, ctx)
            refresh, policy_state = self.decide(policy, policy_state, i, signal, kind, rows)
            # A row with nothing stored yet runs without storing, as the reference did.
            compute = refresh | ~stored
            if half:  # the unconditional rows do not run
                compute = self.rows_of(compute, half)
            out, state = self.run_or_reuse(compute, refresh, h, ctx, state, position, half)
            x = self.finish(x, out, ctx, i, t, t_next, signal, kind)
            return self.vary((x, state, policy_state, stored | refresh)), compute

        carry = (noise, state, policy_state, self.vary(jnp.zeros((rows,), bool)))
        if kinds is None:
            (x, state, _, _), computed = jax.lax.scan(
                lambda c, st: cached_step(None, c, st), carry, xs
            )
            return x, state, computed

        # CFG-Cache: scanned by runs of equal kinds; the computed rows ride in the carry.
        steps = xs[0].shape[0]

        def step(kind, carry, step_t):
            inner, computed = carry
            inner, rows_computed = cached_step(kind, inner, step_t)
            return inner, computed.at[step_t[0]].set(rows_computed)

        computed = self.vary(jnp.zeros((steps, rows), bool))
        (x, state, _, _), computed = scan_steps(step, (carry, computed), xs, kinds)
        return x, state, computed

    def decide(self, policy, policy_state, i, signal, kind, rows):
        """``(refresh [rows], policy state)`` at step ``i``; under CFG-Cache (``kind`` not
        None) each branch decides with its own state, the unconditional one only where its
        rows run."""

        def one(state, signal, count):
            if self.sequence:  # relative_l1 averages each row over the devices of its tokens
                with sequence_axes(self.sequence):
                    refresh, state = policy.decide(state, i, signal)
            else:
                refresh, state = policy.decide(state, i, signal)
            return jnp.broadcast_to(jnp.asarray(refresh, bool), (count,)), state

        if kind is None:
            return one(policy_state, signal, rows)
        batch = self.batch
        conditional, unconditional = policy_state
        if kind == HALF:
            refresh, conditional = one(conditional, signal, batch)
            refresh = jnp.concatenate([refresh, jnp.zeros((batch,), bool)])
            return refresh, (conditional, unconditional)
        first = jax.tree.map(lambda a: a[:batch], signal)
        second = jax.tree.map(lambda a: a[batch:], signal)
        refresh_c, conditional = one(conditional, first, batch)
        refresh_u, unconditional = one(unconditional, second, batch)
        return jnp.concatenate([refresh_c, refresh_u]), (conditional, unconditional)

    def run_or_reuse(self, compute, refresh, h, ctx, state, position, half=False):
        """The body's output per row: computed where ``compute``, else from the reuse mode.

        The body runs when any row computes (on this device; with ``sequence_axis``, on any
        device holding the same rows' tokens). The choice is a ``while_loop`` of zero or one
        trips rather than a ``lax.cond``: XLA's GPU pipeline copies every buffer that passes
        through a conditional (twice per step, measured: the slots of DiT-XL at batch 8 are
        68 MB), while a loop updates its carry in place. Rows that refresh store what ran.
        On a cache step of CFG-Cache (``half``) the masks cover both branches' rows, and the
        body runs the conditional ones.
        """

        def run(carry):
            trips, _, state = carry
            out, state = self.body(h, ctx, state, position, refresh, half)
            return (trips - 1, *self.vary((out, state)))

        trips = jnp.any(compute).astype(jnp.int32)
        if self.sequence:
            # The devices that hold one sample's tokens run the body together (its collectives
            # span them): one runs it, all do. Their decisions already agree (relative_l1
            # averages over them); this makes the branch agree by construction.
            trips = jax.lax.pmax(trips, self.sequence)
        _, ran, state = jax.lax.while_loop(lambda c: c[0] > 0, run, (trips, h, state))
        # Rows that did not store kept their state, so this is their own reuse value.
        reused = self.reuse(state, h, position, half)
        return select_rows(self.unpadded(compute, half), ran, reused), state

    # ------------------------------------------------------------------ the whole network
    def whole(self, start, xs, policy, num_steps, predict, advance, sample_rows,
              record=False):
        """The loop of a policy that reads only the sample and the time (SenCache).

        Each step decides per row before the network; the whole network runs when any row
        needs it (a loop of zero or one trips, as :meth:`run_or_reuse`), and the reuse mode
        stands in for the *prediction* of the other rows, fed the sample's rows as its input.
        Where the policy estimates its sensitivities, its warm-up steps also evaluate the
        network at the previous time (:meth:`~jaxcache.SenCachePolicy.probes`).

        Args:
          start: the loop's first carry.
          xs: ``(index, t, t_next, t_previous)`` per step.
          policy: the policy.
          num_steps: the model evaluations.
          predict: ``(z, t) -> prediction`` of every row.
          advance: ``(z, prediction, i, t, t_next) -> z``.
          sample_rows: ``z -> [rows, ...]``, the sample as the network's rows.
          record: also return the sensitivities each probe measured.

        Returns:
          ``(z, reuse state, computed [steps, rows], probes, sensitivities)``: the last
          ``[steps, 2, rows]`` (NaN where no probe ran) when recorded, else None.
        """
        mode = self.mode
        zero = jnp.zeros((), jnp.float32)
        x_rows = jax.eval_shape(sample_rows, start)
        rows = x_rows.shape[0]
        shape = jax.eval_shape(predict, start, zero)
        state = self.vary(mode.init(self.plan, shape, None))
        policy_state = self.vary(policy.init(num_steps, x_rows))
        estimates = bool(getattr(policy, "estimates", False))

        def evaluate(computes, probes, z, t, t_previous, state, store):
            """``(prediction at t, probe at t_previous, state)``: the network at ``t`` where
            ``computes`` is 1 (``store(state, prediction)`` applied), and first at
            ``t_previous`` where ``probes`` is 1 (zeros and ``state`` where 0). One loop of up
            to two trips over one copy of the network (two loops, one per call, made the
            program twice as slow on a CPU), which keeps the carried buffers in place."""

            def run(carry):
                trips, prediction, probe, state = carry
                if not estimates:  # no probe: one trip at t, nothing to select
                    out = predict(z, t)
                    return (trips - 1, *self.vary((out, probe, store(state, out))))
                probing = trips > computes  # the probe goes first
                out = predict(z, jnp.where(probing, t_previous, t))
                stored = store(state, out)
                state = jax.tree.map(lambda old, new: jnp.where(probing, old, new), state,
                                     stored)
                prediction = jnp.where(probing, prediction, out)
                probe = jnp.where(probing, out, probe)
                return (trips - 1, *self.vary((prediction, probe, state)))

            if self.sequence:  # every device of a sample's tokens runs it together
                computes = jax.lax.pmax(computes, self.sequence)
                probes = jax.lax.pmax(probes, self.sequence)
            placeholder = self.vary(jnp.zeros(shape.shape, shape.dtype))
            _, prediction, probe, state = jax.lax.while_loop(
                lambda c: c[0] > 0, run, (computes + probes, placeholder, placeholder, state))
            return prediction, probe, state

        def step(carry, step_t):
            z, state, policy_state = carry
            i, t, t_next, t_previous = step_t
            position = Position(i, t)
            samples = sample_rows(z)
            if self.sequence:  # relative_l1 averages each row over the devices of its tokens
                with sequence_axes(self.sequence):
                    refresh, policy_state = policy.decide(policy_state, i, (samples, t))
            else:
                refresh, policy_state = policy.decide(policy_state, i, (samples, t))
            # Step 0 computes: nothing is stored before it.
            refresh = jnp.broadcast_to(jnp.asarray(refresh, bool), (rows,)) | (i == 0)
            probed = jnp.zeros((), bool)
            if estimates:  # f(x_i, t_{i-1}): the sensitivities' finite differences
                probed = policy.probes(policy_state, i)
            ran, probe, state = evaluate(
                jnp.any(refresh).astype(jnp.int32), probed.astype(jnp.int32), z, t,
                t_previous, state,
                lambda state, out: mode.store(state, samples, out, position, refresh),
            )
            reused = jax.tree.map(lambda a: a.astype(shape.dtype),
                                  mode.reuse(state, samples, position))
            prediction = select_rows(refresh, ran, reused)
            measured = None
            if record:  # before observe: it measures against the previous prediction
                a_x, a_t = policy.measure(policy_state, prediction, probe)
                measured = jnp.where(probed, jnp.stack([a_x, a_t]), jnp.nan)
            if estimates:
                policy_state = policy.observe(policy_state, i, prediction, probe)
            z = advance(z, prediction, i, t, t_next)
            return self.vary((z, state, policy_state)), (refresh, probed, measured)

        (z, state, _), (computed, probed, measured) = jax.lax.scan(
            step, (start, state, policy_state), xs
        )
        return z, state, computed, jnp.sum(probed, dtype=jnp.int32), measured

    # ------------------------------------------------------------------ per-layer plans
    def pieces(self, half=False) -> list[tuple[PyTree, Any, int]]:
        """The body's pieces in order: ``(params, block kind, index of its first body layer)``."""
        body, kinds = self.seg(half).body, self.plan.network.kinds
        if not isinstance(body, Segments):
            return [(body, kinds[0], 0)]
        out, offset = [], 0
        for piece, k in zip(body.pieces, body.kinds):
            out.append((piece, kinds[k], offset))
            offset += stack_length(piece)
        return out

    def run_range(self, lo, hi, h, ctx, observe=None, state=None, half=False):
        """Body layers ``[lo, hi)``: ``h`` after them, or ``(h, state)`` with ``observe``.

        ``observe(state, index, output)`` sees each layer's output in the network's form, the
        index counted from ``lo``. The whole body runs as :meth:`CachePlan.run_body` does. A
        part of a stacked piece is a scan over its layer indices that reads each layer's
        parameters from the whole stack (what a scan over the stack reads): nothing is sliced
        per step, and a :class:`~jaxcache.stack.LayerList` runs its own arrays.
        """
        plan = self.plan
        if (lo, hi) == (0, plan.cached_layers):
            return plan.run_body(self.seg(half), h, ctx, observe=observe, state=state)
        unroll = plan.network.layer_unroll
        for piece, kind, offset in self.pieces(half):
            a, b = max(lo - offset, 0), min(hi - offset, stack_length(piece))
            if a >= b:
                continue
            if isinstance(piece, LayerList) or (a, b) == (0, stack_length(piece)):
                part = LayerList(piece.layers[a:b]) if isinstance(piece, LayerList) else piece
                shift = offset + a - lo
                seen = None if observe is None else functools.partial(_shifted, observe, shift)
                result = run_layers(kind, part, h, ctx, observe=seen, state=state, unroll=unroll)
                h, state = (result, state) if observe is None else result
            else:
                h, state = _run_indexed(kind, piece, a, b, h, ctx, observe, state, unroll,
                                        offset - lo)
        return h if observe is None else (h, state)

    def store_range(self, lo, hi, h, ctx, state, position, half=False):
        """Runs body layers ``[lo, hi)`` and stores them as one body: ``(output, state)``."""
        mode = self.mode
        rows = self.rows_of(None, half)
        if mode.records_layers:
            out, state = self.run_range(
                lo, hi, h, ctx, state=state, half=half,
                observe=lambda s, i, layer_out: mode.record(
                    s, i, self.padded(layer_out, half), rows
                ),
            )
        else:
            out = self.run_range(lo, hi, h, ctx, half=half)
        return out, mode.store(state, self.padded(h, half), self.padded(out, half), position,
                               rows)

    def layer_row(self, row, units, h, ctx, states, position, half=False):
        """One step's body under a row of unit actions: ``(output, states)``."""
        states = list(states)
        k = 0
        while k < len(units):
            lo, hi = units[k]
            if row[k] == REUSE:
                h = self.reuse(states[k], h, position, half)
            elif row[k] == STORE:
                h, states[k] = self.store_range(lo, hi, h, ctx, states[k], position, half)
            else:  # consecutive units that run without storing run as one range
                end = k
                while end + 1 < len(units) and row[end + 1] == PLAIN:
                    end += 1
                h = self.run_range(lo, units[end][1], h, ctx, half=half)
                k = end
            k += 1
        return h, tuple(states)

    def layered(self, noise, states, xs, units, actions, kinds=None):
        """The loop of a per-layer plan known now: scans over runs of equal rows, no decisions.

        ``units``: the runs of body layers that share a reuse state; ``actions``: ``[steps,
        units]`` of ``REUSE``, ``STORE`` and ``PLAIN``; ``kinds``: CFG-Cache's kind of each
        step, or None.
        """
        rows = [tuple(int(a) for a in row) for row in np.asarray(actions)]
        keys = list(zip(rows, [None] * len(rows) if kinds is None else kinds))

        def step(key, carry, step_t):
            row, guidance = key
            half = guidance == HALF
            x, states = carry
            i, t, t_next = step_t
            position = Position(i, t)
            _, h, ctx = self.head(x, t, half=half)
            h, states = self.layer_row(row, units, h, ctx, states, position, half)
            return self.vary((self.finish(x, h, ctx, i, t, t_next, None, guidance), states))

        if self.remat:  # the backward pass recomputes each step from its carry
            step = jax.checkpoint(step, static_argnums=(0,))
        return scan_steps(step, (noise, states), xs, keys)

    def gated(self, noise, states, xs, gates):
        """The loop of traced gates: one scan over the steps, every layer run and mixed.

        ``states``: one reuse state per body layer, stacked on a leading axis.
        """
        fills = self.vary(jnp.zeros((self.plan.cached_layers,), jnp.float32))

        def step(carry, step_t):
            x, states, fills = carry
            i, t, t_next, row = step_t
            position = Position(i, t)
            _, h, ctx = self.head(x, t)
            h, states, fills = self.gated_body(h, ctx, states, fills, row, position)
            return self.vary((self.finish(x, h, ctx, i, t, t_next), states, fills)), None

        if self.remat:
            step = jax.checkpoint(step)
        gates = jnp.asarray(gates, jnp.float32)
        (x, states, _), _ = jax.lax.scan(step, (noise, states, fills), (*xs, gates))
        return x, states

    def gated_body(self, h, ctx, states, fills, gates, position):
        """Every body layer, each mixed with its reuse value by its gate."""

        def one(kind, layer_params, j, h, states, fills):
            state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False),
                                 states)
            out, state, fill = self.gated_layer(kind, layer_params, h, ctx, state, fills[j],
                                                gates[j], position)
            states = jax.tree.map(
                lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, j, 0), states, state
            )
            return out, states, fills.at[j].set(fill)

        for piece, kind, offset in self.pieces():
            if isinstance(piece, LayerList):
                for a, layer_params in enumerate(piece.layers):
                    h, states, fills = one(kind, layer_params, offset + a, h, states, fills)
                continue
            length = stack_length(piece)
            if not length:
                continue

            def scanned(carry, layer_xs, kind=kind):
                j, layer_params = layer_xs
                return one(kind, layer_params, j, *carry), None

            indices = jnp.arange(offset, offset + length, dtype=jnp.int32)
            (h, states, fills), _ = jax.lax.scan(scanned, (h, states, fills), (indices, piece),
                                                 unroll=self.plan.network.layer_unroll)
        return h, states, fills

    def gated_layer(self, kind, layer_params, h, ctx, state, fill, gate, position):
        """One layer at gate ``gate``: ``(output, state, fill)``.

        ``fill`` in ``[0, 1]`` is how much the layer has stored so far: a layer that stored
        nothing reuses its own output (the rule for empty slots), so gates of 0 and 1 sample as
        the mask does.
        """
        mode = self.mode
        native = h if kind.enter is None else kind.enter(h, ctx)
        native = kind.layer(layer_params, native, ctx)
        computed = native if kind.enter is None else kind.leave(native, h, ctx)
        reused = _mix(fill, mode.reuse(state, h, position), computed)
        out = _mix(gate, computed, reused)
        stored = mode.record(state, 0, computed, None) if mode.records_layers else state
        stored = mode.store(stored, h, computed, position, None)
        return out, _mix(gate, stored, state), gate + (1 - gate) * fill


def _shifted(observe, shift, state, index, h):
    """``observe`` with the layer index shifted by ``shift``."""
    return observe(state, index + shift, h)


def _run_indexed(kind, stack, a, b, h, ctx, observe, state, unroll, shift):
    """Layers ``[a, b)`` of one kind's stacked piece, read by index from the whole stack:
    ``(h, state)``; ``observe`` sees index ``i + shift`` for the piece's layer ``i``."""
    entered = h
    native = h if kind.enter is None else kind.enter(h, ctx)

    def layer(carry, i):
        native, state = carry
        layer_params = jax.tree.map(
            lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), stack
        )
        native = kind.layer(layer_params, native, ctx)
        if observe is not None:
            seen = native if kind.enter is None else kind.leave(native, entered, ctx)
            state = observe(state, i + shift, seen)
        return (native, state), None

    indices = jnp.arange(a, b, dtype=jnp.int32)
    (native, state), _ = jax.lax.scan(layer, (native, state), indices, unroll=unroll)
    return (native if kind.enter is None else kind.leave(native, entered, ctx)), state


def _mix(weight: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``weight * new + (1 - weight) * old`` leaf by leaf; a non-float leaf takes ``new`` where
    ``weight >= 0.5``; a leaf that is the same value in both stays as it is."""

    def one(a, b):
        if a is b:
            return a
        if jnp.issubdtype(a.dtype, jnp.inexact):
            w = weight.astype(a.dtype)
            return w * a + (1 - w) * b
        return jnp.where(weight >= 0.5, a, b)

    return jax.tree.map(one, new, old)
