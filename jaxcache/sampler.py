"""The cached sampling loop, compiled whole.

``sample`` runs every denoising step inside one ``jax.jit``. Each step runs the plan's head
(the embedding and the first layers), then decides, then runs the cached body or lets the reuse
mode stand in for it, then runs the tail:

* A schedule known before sampling (:class:`~jaxcache.IntervalPolicy`, a
  :class:`~jaxcache.StepMaskPolicy`) compiles to scans over groups of one refresh step and its
  reuse steps: no decision inside the loop. Runs of equal groups share one scan, so the program
  does not grow with the step count.
* Any other policy decides on the device every step, per row (per sample and guidance branch):
  the body runs when any row needs it (a loop of zero or one trips that keeps the state buffers
  in place; see :func:`_run_or_reuse`), and each row then takes its own output by a select, so a
  sample's result never depends on its batch-mates.

Classifier-free guidance runs both branches as one batch of ``2B`` rows; every row keeps its
own decisions and cached values, so branch state cannot mix (the reference shared one cache,
and its negative pass reused the positive caption).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int
from jaxcache.plan import CachePlan, SegmentParams
from jaxcache.policies.base import RefreshPolicy
from jaxcache.reuse.base import Position, ReuseMode, select_rows
from jaxcache.reuse.output import OutputReuse
from jaxcache.solvers import Solver

PyTree = Any

__all__ = ["SampleResult", "lower", "sample"]


class SampleResult(NamedTuple):
    """What :func:`sample` returns.

    Attributes:
      sample: the final sample, shaped like the noise.
      refreshed: ``[num_steps]`` bool, the steps whose cached body ran (for any row).
      layers_computed: ``[num_steps, num_layers]`` bool, which layer ran at which step.
      caches: the reuse mode's final state for each guidance branch (conditional first, then
        unconditional): a :class:`~jaxcache.StepCache` for :class:`~jaxcache.OutputReuse`.
        None when sampling uncached.
      body_computed: ``[num_steps, branches, batch]`` bool: whether each sample's body output
        at each step was computed (True) or came from the reuse mode (False), per guidance
        branch.
    """

    sample: jax.Array
    refreshed: jax.Array
    layers_computed: jax.Array
    caches: tuple[PyTree, ...] | None
    body_computed: jax.Array | None = None

    @property
    def layer_evaluations(self) -> jax.Array:
        """Layer evaluations of the batch (a guided step counts once)."""
        return jnp.sum(self.layers_computed, dtype=jnp.int32)


def sample(
    plan: CachePlan,
    params: SegmentParams,
    noise: jax.Array,
    cond: PyTree,
    *,
    solver: Solver,
    num_steps: int,
    policy: RefreshPolicy | None = None,
    reuse: ReuseMode | None = None,
    uncond: PyTree = None,
    guidance_scale: float | None = None,
) -> SampleResult:
    """Samples with the cached body of ``plan`` reused between refreshes, in one program.

    Args:
      plan: the network and its segments (head, cached body, tail).
      params: parameters split by ``plan.split`` (once, before sampling).
      noise: the initial sample, ``[batch, ...]``.
      cond: the condition (e.g. caption token ids), batch-major.
      solver: the solver step (:class:`~jaxcache.FlowMatchEuler`, :class:`~jaxcache.DDIM`).
      num_steps: the number of denoising steps (static).
      policy: when the body runs; None samples uncached (every layer, every step). Its numeric
        settings are traced: a new threshold reuses the compiled program.
      reuse: what a skipped step uses; default :class:`~jaxcache.OutputReuse` (the reference).
      uncond: the negative condition for classifier-free guidance.
      guidance_scale: the guidance scale; None turns guidance off. Static.

    Returns:
      A :class:`SampleResult`.

    Raises:
      ValueError, TypeError: for arguments that cannot work, before anything is compiled.

    Example:
      >>> plan = jaxcache.CachePlan(network, cached_layers=15)          # doctest: +SKIP
      >>> out = jaxcache.sample(plan, plan.split(params), noise, cond,  # doctest: +SKIP
      ...                       solver=jaxcache.FlowMatchEuler(), num_steps=9,
      ...                       policy=jaxcache.IntervalPolicy(3))
    """
    args = _checked(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond,
                    guidance_scale)
    return _sample(*args)


def lower(
    plan: CachePlan,
    params: SegmentParams,
    noise: jax.Array,
    cond: PyTree,
    *,
    solver: Solver,
    num_steps: int,
    policy: RefreshPolicy | None = None,
    reuse: ReuseMode | None = None,
    uncond: PyTree = None,
    guidance_scale: float | None = None,
) -> jax.stages.Lowered:
    """The lowered (not yet compiled) program of :func:`sample` for these arguments.

    ``lower(...).compile()`` compiles it (benchmarks time compilation on its own);
    ``lower(...).as_text()`` is the program text (tests check it for host round trips and
    decisions).
    """
    args = _checked(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond,
                    guidance_scale)
    return _sample.lower(*args)


def _checked(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond, scale):
    """Validates every argument (before tracing) and returns ``_sample``'s arguments."""
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {type(plan).__name__}")
    plan.check(params)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxcache Solver, got {type(solver).__name__}")
    check_int(num_steps, "num_steps")
    if policy is not None:
        if not isinstance(policy, RefreshPolicy):
            raise TypeError(f"policy must be a RefreshPolicy or None, got {type(policy).__name__}")
        _check_signal(policy, plan)
        policy.check(plan, num_steps)
    if reuse is not None and not isinstance(reuse, ReuseMode):
        raise TypeError(f"reuse must be a ReuseMode or None, got {type(reuse).__name__}")
    if policy is not None and plan.cached_layers > 0:
        schedule = policy.static_schedule(num_steps)
        refreshes = None if schedule is None else int(np.sum(schedule))
        (reuse or OutputReuse()).check(plan, num_steps, refreshes)
    if np.ndim(noise) < 1:
        raise ValueError("noise must have a leading batch axis")
    if (scale is None) != (uncond is None):
        raise ValueError("classifier-free guidance needs both uncond and guidance_scale")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"guidance_scale must be a Python number (static), got {scale!r}")
    batch = noise.shape[0]
    for name, tree in (("cond", cond), ("uncond", uncond)):
        for leaf in jax.tree.leaves(tree):
            if np.ndim(leaf) < 1 or leaf.shape[0] != batch:
                raise ValueError(
                    f"{name} leaves need a leading batch axis of {batch} (the noise's), "
                    f"got shape {np.shape(leaf)}"
                )
    return plan, params, noise, cond, uncond, solver, num_steps, policy, reuse, scale


def _check_signal(policy: RefreshPolicy, plan: CachePlan) -> None:
    kind = policy.signal_kind
    name = type(policy).__name__
    if kind == "head_residual" and plan.first_layers < 1:
        raise ValueError(
            f"{name} reads the residual of the layers before the cached body; build the plan "
            "with first_layers >= 1 (e.g. CachePlan(network, cached_layers=N - 1, first_layers=1))"
        )
    if kind == "modulated_input" and plan.network.modulated_input is None:
        raise ValueError(
            f"{name} reads the first layer's timestep-modulated input, which this Network does "
            "not provide: give it modulated_input=(layer_params, h, ctx) -> array (from_nnx "
            "finds a block method named modulated_input)"
        )


# ------------------------------------------------------------------------------- the program
@functools.partial(jax.jit, static_argnums=(0, 5, 6, 9))
def _sample(plan, params, noise, cond, uncond, solver, num_steps, policy, reuse, guidance_scale):
    guided = guidance_scale is not None
    batch = noise.shape[0]
    branches = 2 if guided else 1
    depth = plan.total_layers(params)

    # Step-independent work happens once per guidance branch, before the loop.
    cond_rows = _concat(cond, uncond) if guided else cond
    constant = plan.network.condition(params.condition, cond_rows)

    def head(x, t):
        rows = jnp.concatenate([x, x]) if guided else x
        t_rows = jnp.full((rows.shape[0],), t, jnp.float32)
        return plan.run_head(params, rows, t_rows, constant)

    def finish(x, h, ctx, t, t_next):
        prediction = plan.run_tail(params, h, ctx)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + guidance_scale * (positive - negative)
        return solver.step(x, prediction, t, t_next)

    times, next_times = solver.times(num_steps)
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(times), jnp.asarray(next_times))

    if policy is None or plan.cached_layers == 0:

        def plain_step(x, step_t):
            _, t, t_next = step_t
            _, h, ctx = head(x, t)
            return finish(x, plan.run_body(params, h, ctx), ctx, t, t_next), None

        x, _ = jax.lax.scan(plain_step, noise, xs)
        every = jnp.ones((num_steps, branches, batch), bool)
        return SampleResult(x, jnp.ones((num_steps,), bool), jnp.ones((num_steps, depth), bool),
                            None, every)

    mode = reuse if reuse is not None else OutputReuse()
    _, body_shape, _ = jax.eval_shape(head, noise, jnp.zeros((), jnp.float32))
    state = mode.init(plan, body_shape, constant)
    loop = _Loop(plan, params, mode, head, finish)

    schedule = policy.static_schedule(num_steps)
    if schedule is not None:
        x, state = loop.static(noise, state, xs, np.asarray(schedule, bool))
        rows_computed = jnp.broadcast_to(
            jnp.asarray(_computed_steps(schedule))[:, None], (num_steps, branches * batch)
        )
    else:
        x, state, rows_computed = loop.dynamic(noise, state, xs, policy, num_steps)

    body_ran = jnp.any(rows_computed, axis=1)
    columns = [jnp.ones((num_steps, plan.first_layers), bool)]
    columns.append(jnp.broadcast_to(body_ran[:, None], (num_steps, plan.cached_layers)))
    columns.append(jnp.ones((num_steps, depth - plan.body_stop), bool))
    caches = tuple(mode.rows(state, j * batch, (j + 1) * batch) for j in range(branches))
    return SampleResult(
        x, body_ran, jnp.concatenate(columns, axis=1), caches,
        rows_computed.reshape(num_steps, branches, batch),
    )


class _Loop:
    """The step functions of one cached program (built inside the trace)."""

    def __init__(self, plan, params, mode, head, finish):
        self.plan, self.params, self.mode = plan, params, mode
        self.head, self.finish = head, finish

    def body(self, h, ctx, state, position, rows):
        """Runs the body and stores it for ``rows`` (None: every row): ``(output, state)``."""
        plan, mode = self.plan, self.mode
        if mode.records_layers:
            out, state = plan.run_body(
                self.params, h, ctx, state=state,
                observe=lambda s, i, layer_out: mode.record(s, i, layer_out, rows),
            )
        else:
            out = plan.run_body(self.params, h, ctx)
        return out, mode.store(state, h, out, position, rows)

    # ------------------------------------------------------------------ known schedules
    def static(self, noise, state, xs, schedule):
        """The loop of a schedule known now: scans over runs of equal groups, no decisions."""

        def step(kind, carry, step_t):
            x, state = carry
            i, t, t_next = step_t
            position = Position(i, t)
            _, h, ctx = self.head(x, t)
            if kind == "refresh":
                h, state = self.body(h, ctx, state, position, None)
            elif kind == "plain":  # before the first refresh: run, store nothing
                h = self.plan.run_body(self.params, h, ctx)
            else:
                h = self.mode.reuse(state, h, position)
            return self.finish(x, h, ctx, t, t_next), state

        def group(carry, group_xs):
            """One refresh step, then a scan of the reuse steps after it."""
            carry = step("refresh", carry, jax.tree.map(lambda a: a[0], group_xs))
            if group_xs[0].shape[0] > 1:
                rest = jax.tree.map(lambda a: a[1:], group_xs)
                carry, _ = jax.lax.scan(lambda c, st: (step("reuse", c, st), None), carry, rest)
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
        for run in _schedule_runs(schedule):
            if run[0] == "plain":
                _, start, count = run
                plain_xs = jax.tree.map(lambda a, s=start, n=count: a[s : s + n], xs)
                carry, _ = jax.lax.scan(lambda c, st: (step("plain", c, st), None), carry, plain_xs)
                continue
            _, start, reps, lengths = run
            span = sum(lengths)
            run_xs = jax.tree.map(lambda a, s=start, n=reps * span: a[s : s + n], xs)
            if reps == 1:
                carry, _ = pattern(lengths)(carry, run_xs)
            else:
                grouped = jax.tree.map(lambda a, shape=(reps, span): a.reshape(shape), run_xs)
                carry, _ = jax.lax.scan(pattern(lengths), carry, grouped)
        return carry

    # ------------------------------------------------------------------ device decisions
    def dynamic(self, noise, state, xs, policy, num_steps):
        """The loop of a policy that decides each step on the device, per row."""
        plan = self.plan
        signal_of = _signal_function(policy.signal_kind, plan, self.params)
        rows = jax.eval_shape(self.head, noise, jnp.zeros((), jnp.float32))[1]
        rows = jax.tree.leaves(rows)[0].shape[0]
        if signal_of is None:
            policy_state = policy.init(num_steps)
        else:
            structure = jax.eval_shape(
                lambda x: signal_of(*self.head(x, jnp.zeros((), jnp.float32))), noise
            )
            policy_state = policy.init(num_steps, structure)

        def cached_step(carry, step_t):
            x, state, policy_state, stored = carry
            i, t, t_next = step_t
            position = Position(i, t)
            embedded, h, ctx = self.head(x, t)
            signal = None if signal_of is None else signal_of(embedded, h, ctx)
            refresh, policy_state = policy.decide(policy_state, i, signal)
            refresh = jnp.broadcast_to(jnp.asarray(refresh, bool), (rows,))
            # A row with nothing stored yet runs without storing, as the reference did.
            compute = refresh | ~stored
            out, state = self.run_or_reuse(compute, refresh, h, ctx, state, position)
            x = self.finish(x, out, ctx, t, t_next)
            return (x, state, policy_state, stored | refresh), compute

        carry = (noise, state, policy_state, jnp.zeros((rows,), bool))
        (x, state, _, _), computed = jax.lax.scan(cached_step, carry, xs)
        return x, state, computed

    def run_or_reuse(self, compute, refresh, h, ctx, state, position):
        """The body's output per row: computed where ``compute``, else from the reuse mode.

        The body runs when any row computes. The choice is a ``while_loop`` of zero or one
        trips rather than a ``lax.cond``: XLA's GPU pipeline copies every buffer that passes
        through a conditional (twice per step, measured: the slots of DiT-XL at batch 8 are
        68 MB), while a loop updates its carry in place. Rows that refresh store what ran.
        """

        def run(carry):
            trips, _, state = carry
            out, state = self.body(h, ctx, state, position, refresh)
            return trips - 1, out, state

        trips = jnp.any(compute).astype(jnp.int32)
        _, ran, state = jax.lax.while_loop(lambda c: c[0] > 0, run, (trips, h, state))
        # Rows that did not store kept their state, so this is their own reuse value.
        reused = self.mode.reuse(state, h, position)
        return select_rows(compute, ran, reused), state


def _signal_function(kind, plan, params):
    """``signal(embedded, h, ctx) -> [rows, ...]`` for a policy's ``signal_kind`` (or None)."""
    if kind is None:
        return None
    if kind == "head_residual":

        def head_residual(embedded, h, ctx):
            after, before = plan.streams(h)[0], plan.streams(embedded)[0]
            return after.astype(jnp.float32) - before.astype(jnp.float32)

        return head_residual
    if kind == "modulated_input":
        first = params.head if plan.first_layers else params.body
        layer0 = jax.tree.map(lambda a: a[0], first)

        def modulated_input(embedded, h, ctx):
            return plan.network.modulated_input(layer0, embedded, ctx)

        return modulated_input
    raise ValueError(f"unknown signal_kind {kind!r}")


def _computed_steps(schedule: np.ndarray) -> np.ndarray:
    """Which steps compute the body under a known schedule (refreshes, and plain steps)."""
    schedule = np.asarray(schedule, bool)
    first = np.flatnonzero(schedule)
    computed = schedule.copy()
    computed[: first[0] if len(first) else len(schedule)] = True
    return computed


def _schedule_runs(schedule: np.ndarray, max_period: int = 8) -> list[tuple]:
    """A known schedule as runs the program scans over.

    ``("plain", start, count)``: ``count`` steps before the first refresh (run the body, store
    nothing). ``("groups", start, reps, lengths)``: ``reps`` repetitions of a pattern of groups,
    a group of length ``L`` being one refresh and ``L - 1`` reuse steps. Repeating patterns of
    up to ``max_period`` groups share one scan, so an interval schedule is one run (plus a
    shorter last group) and a periodic mask a few, whatever the step count.
    """
    schedule = np.asarray(schedule, bool)
    refreshes = np.flatnonzero(schedule)
    if not len(refreshes):
        return [("plain", 0, len(schedule))]
    runs: list[tuple] = [("plain", 0, int(refreshes[0]))] if refreshes[0] else []
    lengths = [int(n) for n in np.diff(np.append(refreshes, len(schedule)))]
    starts = [int(r) for r in refreshes]
    i = 0
    while i < len(lengths):
        best_period, best_reps = 1, 1
        for period in range(1, max_period + 1):
            pattern = lengths[i : i + period]
            if len(pattern) < period:
                break
            reps = 1
            while lengths[i + reps * period : i + (reps + 1) * period] == pattern:
                reps += 1
            if reps > 1 and reps * period > best_reps * best_period:
                best_period, best_reps = period, reps
        runs.append(("groups", starts[i], best_reps, tuple(lengths[i : i + best_period])))
        i += best_period * best_reps
    return runs


def _concat(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
