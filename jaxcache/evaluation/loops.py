"""The loops a user would otherwise write, timed against the one program by the bench.

* :func:`hand_loop`: a jitted, unrolled Python loop over the network's forward and the solver
  step, what a user already has before caching.
* :func:`host_loop`: a policy's rule decided on the host, as the anchors decide it: jitted
  pieces called from a Python loop that reads each step's decision back.
* :func:`cfg_host_loop`: CFG-Cache as the JAX peer runs it: a full step and a cache step, two
  jitted functions, the schedule known on the host.
* :func:`whole_host_loop`: a whole-network policy (SenCache) decided on the host, the network
  run only when a row needs it.
* :func:`constants_per_step_network`: a network glued as a port without the
  ``layer_constant`` hook is, recomputing each layer's constant at every call.

Each returns a function of ``(seg, noise, cond, uncond)`` (or a network) for
:func:`jaxcache.evaluation.bench.run_benchmark` to compile, warm and time beside ``sample``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxcache as jc
from jaxcache.policies.signals import signal_function
from jaxcache.reuse import Position
from jaxcache.reuse.base import select_rows

__all__ = ["cfg_host_loop", "constants_per_step_network", "hand_loop", "host_loop",
           "whole_host_loop"]


def hand_loop(plan, seg, solver, steps, guidance):
    """A user's own sampler: a jitted, unrolled Python loop over the forward and the solver."""
    network = plan.network
    times, next_times = solver.times(steps)

    @jax.jit
    def run(seg, noise, cond, uncond):
        cond_rows = cond if guidance is None else jnp.concatenate([cond, uncond])
        x, state = noise, solver.init_state(noise)
        for i, (t, t_next) in enumerate(zip(times, next_times)):
            rows = x if guidance is None else jnp.concatenate([x, x])
            t_rows = jnp.full((rows.shape[0],), t, jnp.float32)
            constant = network.condition(seg.condition, cond_rows)
            # A per-step loop computes per-layer constants (text K/V) at every step, as the
            # layers of a port do; nothing to bind for a network without them.
            bound = plan.bind_layers(seg, constant)
            h, ctx = network.embed(seg.embed, rows, t_rows, constant)
            for stack in (bound.head, bound.body, bound.tail):
                h = jc.stack.run_layers(network.kinds, stack, h, ctx,
                                        unroll=network.layer_unroll)
            prediction = network.final(seg.final, h, ctx)
            if guidance is not None:
                positive, negative = jnp.split(prediction, 2)
                prediction = negative + guidance * (positive - negative)
            x, state = solver.advance(state, x, prediction, t, t_next, index=jnp.int32(i))
        return x

    return run


def _once(plan) -> tuple[Callable, Callable]:
    """The jitted condition path and layer binding of a host loop, made once per loop: a jit
    of ``plan.bind_layers`` made inside the loop's run would trace and compile it anew at every
    run (a new bound method each time), and the timing would count it."""
    return jax.jit(plan.network.condition), jax.jit(plan.bind_layers)


def host_loop(plan, seg, policy, mode, solver, steps, guidance):
    """The same rule decided on the host, as the anchors decide: a read-back every step.

    Jitted pieces (head and signal, decision, body and store, reuse, tail and solver step)
    called from a Python loop; the batch computes when any row asks (``bool(any)``). A schedule
    known before sampling (the interval, MagCache, planned) is read off the host instead, as
    the anchors read theirs: no decision on the device, nothing read back.
    """
    guided = guidance is not None
    schedule = policy.static_schedule(len(solver.times(steps)[0]))
    signal_of = None if schedule is not None else signal_function(policy.signal_kind, plan, seg)

    @jax.jit
    def head(seg, x, t, constant):
        rows = jnp.concatenate([x, x]) if guided else x
        embedded, h, ctx = plan.run_head(seg, rows, jnp.full((rows.shape[0],), t), constant)
        return h, ctx, None if signal_of is None else signal_of(embedded, h, ctx)

    @jax.jit
    def decide(policy_state, step, signal):
        refresh, policy_state = policy.decide(policy_state, step, signal)
        return jnp.any(refresh), policy_state

    @jax.jit
    def body(seg, h, ctx, state, step, t):
        out = plan.run_body(seg, h, ctx)
        return out, mode.store(state, h, out, Position(step, t), None)

    @jax.jit
    def reuse(state, h, step, t):
        return mode.reuse(state, h, Position(step, t))

    @jax.jit
    def tail(seg, x, solver_state, h, ctx, t, t_next, step):
        prediction = plan.run_tail(seg, h, ctx)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + guidance * (positive - negative)
        return solver.advance(solver_state, x, prediction, t, t_next, index=step)

    times, next_times = solver.times(steps)
    condition, bind = _once(plan)

    def run(seg, noise, cond, uncond):
        cond_rows = jnp.concatenate([cond, uncond]) if guided else cond
        constant = condition(seg.condition, cond_rows)
        seg = bind(seg, constant)  # per-layer constants, once
        x, solver_state = noise, solver.init_state(noise)
        h0, _, signal = head(seg, x, jnp.float32(times[0]), constant)
        state = mode.init(plan, jax.eval_shape(lambda: h0), constant)
        evaluations = len(times)  # the cache counts model evaluations
        policy_state = (policy.init(evaluations) if signal is None
                        else policy.init(evaluations, jax.eval_shape(lambda: signal)))
        refreshes = 0
        for i in range(evaluations):
            step, t, t_next = jnp.int32(i), jnp.float32(times[i]), jnp.float32(next_times[i])
            h, ctx, signal = head(seg, x, t, constant)
            if schedule is not None:  # known on the host
                refresh = bool(schedule[i])
            else:
                refresh, policy_state = decide(policy_state, step, signal)
            if bool(refresh) or i == 0:  # the read-back the anchors make every step
                out, state = body(seg, h, ctx, state, step, t)
                refreshes += 1
            else:
                out = reuse(state, h, step, t)
            x, solver_state = tail(seg, x, solver_state, out, ctx, t, t_next, step)
        return x, refreshes

    return run


def _actions(schedule: np.ndarray | None, evaluations: int) -> list[str]:
    """Each evaluation's action under a known schedule (None: no layer cache): ``"plain"``
    (run, store nothing: before the first refresh, or every step without a cache),
    ``"refresh"`` (run and store) or ``"reuse"`` (the reuse mode stands in), as the sampler
    runs a known schedule."""
    if schedule is None:
        return ["plain"] * evaluations
    schedule = np.asarray(schedule, bool)
    stored = np.logical_or.accumulate(schedule)
    return ["refresh" if r else "reuse" if seen else "plain" for r, seen in zip(schedule, stored)]


def cfg_host_loop(plan, seg, guidance, policy, mode, solver, steps, scale):
    """CFG-Cache the JAX peer's way: a Python loop over separately jitted step functions.

    Both schedules are known on the host: CFG-Cache's full steps and, with a policy of a known
    schedule (the interval, MagCache, planned), the layer cache's refreshes; no decision runs on
    the device and nothing is read back. A *full* step runs both branches (``2B`` rows) and
    keeps the gap between them (:meth:`~jaxcache.CFGCache.store`); a *cache* step runs the
    conditional rows alone, with their own condition and per-layer constants, and estimates the
    unconditional prediction from the gap (:meth:`~jaxcache.CFGCache.estimate`, weighted by
    :meth:`~jaxcache.CFGCache.weights` at its time). Each ``(kind, action)`` pair is its own
    jitted function; the reuse state holds both branches' rows, and a cache step reads and
    writes it through the conditional rows twice over, storing the conditional ones only (as
    the sampler does).
    """
    times, next_times = solver.times(steps)
    evaluations = len(times)
    full = np.asarray(guidance.full_steps(evaluations), bool)
    schedule = None if policy is None else policy.static_schedule(evaluations)
    if policy is not None and schedule is None:
        raise ValueError(f"the CFG-Cache host loop needs a known schedule; "
                         f"{type(policy).__name__} decides on the device")
    actions = _actions(schedule, evaluations)

    def padded(tree, half):
        return jax.tree.map(lambda a: jnp.concatenate([a, a]), tree) if half else tree

    @functools.partial(jax.jit, static_argnames=("half", "action"))
    def step(seg, constant, x, solver_state, cfg_state, state, i, t, t_next, *, half, action):
        batch = x.shape[0]
        rows = x if half else jnp.concatenate([x, x])
        _, h, ctx = plan.run_head(seg, rows, jnp.full((rows.shape[0],), t), constant)
        position = Position(i, t)
        if action == "reuse":
            out = mode.reuse(state, padded(h, half), position)
            out = jax.tree.map(lambda a: a[:batch], out) if half else out
        else:
            out = plan.run_body(seg, h, ctx)
            if action == "refresh":  # a cache step stores its conditional rows only
                stored = (jnp.arange(2 * batch) < batch) if half else None
                state = mode.store(state, padded(h, half), padded(out, half), position, stored)
        prediction = plan.run_tail(seg, out, ctx)
        if half:  # the conditional branch alone: the unconditional one estimated from the gap
            positive = prediction
            negative, cfg_state = guidance.estimate(cfg_state, positive, t)
        else:  # both branches: the gap kept for the cache steps after this one
            positive, negative = jnp.split(prediction, 2)
            cfg_state = guidance.store(cfg_state, positive, negative)
        prediction = negative + scale * (positive - negative)
        x, solver_state = solver.advance(solver_state, x, prediction, t, t_next, index=i)
        return x, solver_state, cfg_state, state

    condition, bind = _once(plan)

    def run(seg, noise, cond, uncond):
        constant = condition(seg.condition, jnp.concatenate([cond, uncond]))
        half_constant = condition(seg.condition, cond)
        full_seg, half_seg = bind(seg, constant), bind(seg, half_constant)  # once each
        x, solver_state = noise, solver.init_state(noise)
        cfg_state = guidance.init(noise)
        state = None
        if mode is not None and schedule is not None:
            rows = jnp.concatenate([noise, noise])
            _, h0, _ = jax.eval_shape(
                lambda: plan.run_head(full_seg, rows, jnp.ones((rows.shape[0],)), constant))
            state = mode.init(plan, h0, constant)
        refreshes = 0
        for i in range(evaluations):
            half, action = not full[i], actions[i]
            x, solver_state, cfg_state, state = step(
                half_seg if half else full_seg, half_constant if half else constant, x,
                solver_state, cfg_state, state, jnp.int32(i), jnp.float32(times[i]),
                jnp.float32(next_times[i]), half=half, action=action)
            refreshes += action != "reuse"
        return x, refreshes

    return run


def whole_host_loop(plan, seg, policy, mode, solver, steps, guidance):
    """SenCache decided on the host: its decision read back every step with ``bool()``.

    Jitted pieces called from a Python loop, as the sampler's loop of a policy that skips the
    whole network runs them: the decision (on the sample's rows and the time), the whole
    network and the store where any row needs it (else nothing of the network runs), the reuse
    mode standing in for the other rows' prediction, and, while the sensitivities are
    estimated, the warm-up probe at the previous time (its steps known on the host).
    """
    guided = guidance is not None
    # The mode that stands in for the prediction: the last one for output (the sampler's).
    if mode is None or isinstance(mode, jc.OutputReuse):
        mode = jc.TaylorForecast(0)
    times, next_times = solver.times(steps)
    previous = np.concatenate([times[:1], times[:-1]])
    evaluations = len(times)
    probing = (set(range(1, min(int(policy.warmup_steps), evaluations)))
               if policy.estimates else set())

    def sample_rows(x):
        return jnp.concatenate([x, x]) if guided else x

    @jax.jit
    def decide(policy_state, x, i, t):
        samples = sample_rows(x)
        refresh, policy_state = policy.decide(policy_state, i, (samples, t))
        refresh = jnp.broadcast_to(jnp.asarray(refresh, bool), samples.shape[:1]) | (i == 0)
        return refresh, jnp.any(refresh), policy_state

    def predict(seg, constant, x, t):
        rows = sample_rows(x)
        _, h, ctx = plan.run_head(seg, rows, jnp.full((rows.shape[0],), t), constant)
        return plan.run_tail(seg, plan.run_body(seg, h, ctx), ctx)

    @jax.jit
    def computed(seg, constant, x, state, refresh, i, t):
        prediction = predict(seg, constant, x, t)
        samples, position = sample_rows(x), Position(i, t)
        state = mode.store(state, samples, prediction, position, refresh)
        reused = mode.reuse(state, samples, position)
        reused = jax.tree.map(lambda a: a.astype(prediction.dtype), reused)
        return select_rows(refresh, prediction, reused), state

    @jax.jit
    def skipped(state, x, i, t, like):
        reused = mode.reuse(state, sample_rows(x), Position(i, t))
        return reused.astype(like.dtype)

    probe_at = jax.jit(predict)
    observe = jax.jit(policy.observe)

    @jax.jit
    def advance(x, solver_state, prediction, i, t, t_next):
        if guided:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + guidance * (positive - negative)
        return solver.advance(solver_state, x, prediction, t, t_next, index=i)

    condition, bind = _once(plan)

    def run(seg, noise, cond, uncond):
        constant = condition(seg.condition, jnp.concatenate([cond, uncond]) if guided else cond)
        seg = bind(seg, constant)  # per-layer constants, once
        x, solver_state = noise, solver.init_state(noise)
        shape = jax.eval_shape(predict, seg, constant, x, jnp.float32(times[0]))
        state = mode.init(plan, shape, None)
        policy_state = policy.init(evaluations, jax.eval_shape(sample_rows, x))
        like = jnp.zeros((), shape.dtype)
        refreshes = 0
        for i in range(evaluations):
            step, t, t_next = jnp.int32(i), jnp.float32(times[i]), jnp.float32(next_times[i])
            refresh, any_row, policy_state = decide(policy_state, x, step, t)
            if bool(any_row):  # the read-back: the network runs when a row needs it
                prediction, state = computed(seg, constant, x, state, refresh, step, t)
                refreshes += 1
            else:
                prediction = skipped(state, x, step, t, like)
            if policy.estimates:  # f(x_i, t_{i-1}) on the warm-up steps after the first
                probe = (probe_at(seg, constant, x, jnp.float32(previous[i])) if i in probing
                         else prediction)
                policy_state = observe(policy_state, step, prediction, probe)
            x, solver_state = advance(x, solver_state, prediction, step, t, t_next)
        return x, refreshes

    return run


def constants_per_step_network(network: jc.Network) -> jc.Network:
    """``network`` glued as a port without the ``layer_constant`` hook is: each layer call
    computes its constant (Wan's text keys and values) from the condition path's output again.

    The condition's output rides in the per-step context beside the network's own (``ctx``
    becomes ``(ctx, constant)``), and each kind of block that has a ``layer_constant`` gets a
    layer function that calls it before the block; the parameters are the network's, so
    parameters split for ``network`` (:meth:`~jaxcache.CachePlan.split`) run this one too. The
    same prediction up to float rounding, at the cost of computing every layer's constant at
    every model evaluation (what ``layer_constant`` saves; tests/test_wan.py glues the same port
    from the model).

    Raises:
      ValueError: for a network none of whose kinds of block has a ``layer_constant``.
    """
    kinds = network.kinds
    if not any(kind.layer_constant is not None for kind in kinds):
        raise ValueError(
            "constants_per_step needs a network whose layers have per-layer constants "
            "(a layer_constant: the wan model's text keys and values); this one has none, so "
            "there is nothing to recompute at every step"
        )

    def port_kind(kind: jc.BlockKind) -> jc.BlockKind:
        function = getattr(kind.layer, "jaxcache_unbound", kind.layer)
        make = kind.layer_constant

        if make is None:
            def layer(params, h, ctx, **keywords):
                return function(params, h, ctx[0], **keywords)
        else:
            def layer(params, h, ctx, **keywords):
                # The port's block: its constant from the condition, at every call.
                return function(params, h, ctx[0], layer_constant=make(params, ctx[1]),
                                **keywords)

        enter = leave = None
        if kind.enter is not None:
            def enter(h, ctx, _enter=kind.enter):
                return _enter(h, ctx[0])

            def leave(state, h, ctx, _leave=kind.leave):
                return _leave(state, h, ctx[0])

        return jc.BlockKind(layer, enter=enter, leave=leave, name=kind.name,
                            layer_index=kind.layer_index)

    raw_embed, _ = getattr(network.embed, "jaxcache_time", (network.embed, None))

    def embed(params, x, t, constant):
        h, ctx = raw_embed(params, x, t, constant)
        return h, (ctx, constant)

    def final(params, h, ctx):
        return network.final(params, h, ctx[0])

    modulated = network.modulated_input
    modulated = getattr(modulated, "jaxcache_unbound", modulated)
    if modulated is not None:
        def modulated_input(params, h, ctx, _read=modulated):
            return _read(params, h, ctx[0])
    else:
        modulated_input = None
    layer = tuple(port_kind(k) for k in kinds)
    return jc.Network(
        condition=network.condition, embed=embed, layer=layer, final=final,
        dual_stream=network.dual_stream, modulated_input=modulated_input, time=network.time,
        layer_unroll=network.layer_unroll, compiler_options=network.compiler_options,
    )
