"""The cached sampling loop, compiled whole.

``sample`` runs every denoising step as one ``lax.scan`` inside ``jax.jit``. The scan carries the
sample, the :class:`~jaxcache.StepCache` and the policy state; on each step the policy decides on
the device whether the cached layers run; the program then runs them (storing their outputs on a
refresh step) or reuses the stored outputs, exactly as the reference's per-layer loop did (a
non-refresh step before anything was stored runs the layers without storing them). The choice
is device-side control flow, a loop of zero or one trips that keeps the cache buffers in place
(see ``_body_or_reuse`` for why not ``lax.cond``), never a Python branch.

Classifier-free guidance runs both branches as one batch of ``2B`` rows. The cache keeps every
row's values apart, so each branch has its own slots and its own constant (the reference shared
one cache, and the negative pass reused the positive caption): branch state cannot mix.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache.plan import CachePlan, SegmentParams
from jaxcache.policies import RefreshPolicy
from jaxcache.solvers import Solver
from jaxcache.step_cache import StepCache

PyTree = Any

__all__ = ["SampleResult", "lower", "sample"]

class SampleResult(NamedTuple):
    """What :func:`sample` returns.

    Attributes:
      sample: the final sample, shaped like the noise.
      refreshed: ``[num_steps]`` bool, the steps whose cached layers ran.
      layers_computed: ``[num_steps, num_layers]`` bool, which layer ran at which step.
      caches: the final cache of each guidance branch (conditional first, then unconditional),
        or None when sampling uncached.
    """

    sample: jax.Array
    refreshed: jax.Array
    layers_computed: jax.Array
    caches: tuple[StepCache, ...] | None

    @property
    def layer_evaluations(self) -> jax.Array:
        """The number of layer evaluations per sample (a guided step counts once)."""
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
    uncond: PyTree = None,
    guidance_scale: float | None = None,
) -> SampleResult:
    """Samples with the cached layers of ``plan`` reused between refreshes, in one program.

    Args:
      plan: the network and how many of its first layers are cached.
      params: parameters split by ``plan.split`` (once, before sampling).
      noise: the initial sample, ``[batch, ...]``.
      cond: the condition (e.g. caption token ids), batch-major.
      solver: the solver step (:class:`~jaxcache.FlowMatchEuler`, :class:`~jaxcache.DDIM`).
      num_steps: the number of denoising steps (the scan length; static).
      policy: when the cached layers run; None samples uncached (every layer, every step).
      uncond: the negative condition for classifier-free guidance.
      guidance_scale: the guidance scale; None turns guidance off. Static.

    Returns:
      A :class:`SampleResult`.

    Example:
      >>> plan = jaxcache.CachePlan(network, cached_layers=15)          # doctest: +SKIP
      >>> out = jaxcache.sample(plan, plan.split(params), noise, cond,  # doctest: +SKIP
      ...                       solver=jaxcache.FlowMatchEuler(), num_steps=9,
      ...                       policy=jaxcache.IntervalPolicy(3))
    """
    _check_arguments(plan, params, noise, cond, solver, num_steps, policy, uncond, guidance_scale)
    return _sample(plan, params, noise, cond, uncond, solver, num_steps, policy, guidance_scale)


def lower(
    plan: CachePlan,
    params: SegmentParams,
    noise: jax.Array,
    cond: PyTree,
    *,
    solver: Solver,
    num_steps: int,
    policy: RefreshPolicy | None = None,
    uncond: PyTree = None,
    guidance_scale: float | None = None,
) -> jax.stages.Lowered:
    """The lowered (not yet compiled) program of :func:`sample` for these arguments.

    ``lower(...).compile()`` compiles it: benchmarks use this to time compilation on its own.
    """
    _check_arguments(plan, params, noise, cond, solver, num_steps, policy, uncond, guidance_scale)
    return _sample.lower(
        plan, params, noise, cond, uncond, solver, num_steps, policy, guidance_scale
    )


def _check_arguments(plan, params, noise, cond, solver, num_steps, policy, uncond, scale):
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {type(plan).__name__}")
    plan.check(params)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxcache Solver, got {type(solver).__name__}")
    if policy is not None and not isinstance(policy, RefreshPolicy):
        raise TypeError(f"policy must be a RefreshPolicy or None, got {type(policy).__name__}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps <= 0:
        raise ValueError(f"num_steps must be a positive int, got {num_steps}")
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


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _sample(plan, params, noise, cond, uncond, solver, num_steps, policy, guidance_scale):
    net = plan.network
    guided = guidance_scale is not None
    batch = noise.shape[0]
    n = plan.cached_layers
    total = plan.total_layers(params)
    caching = policy is not None and n > 0

    # Step-independent work happens once per guidance branch, before the loop.
    cond_rows = _concat(cond, uncond) if guided else cond
    constant = net.condition(params.condition, cond_rows)

    def embed(x, t, constant):
        rows = jnp.concatenate([x, x]) if guided else x
        t_rows = jnp.full((rows.shape[0],), t, jnp.float32)
        return net.embed(params.embed, rows, t_rows, constant)

    def finish(h, ctx):
        h = plan.run_layers(params.tail, h, ctx)
        prediction = net.final(params.final, h, ctx)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            prediction = negative + guidance_scale * (positive - negative)
        return prediction

    times, next_times = solver.times(num_steps)
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(times), jnp.asarray(next_times))

    if not caching:

        def plain_step(x, step_t):
            _, t, t_next = step_t
            h, ctx = embed(x, t, constant)
            h = plan.run_layers(params.body, h, ctx)
            return solver.step(x, finish(h, ctx), t, t_next), None

        x, _ = jax.lax.scan(plain_step, noise, xs)
        computed = jnp.ones((num_steps, total), bool)
        return SampleResult(x, jnp.ones((num_steps,), bool), computed, None)

    cache = _empty_cache(plan, params, embed, noise, constant).set_constant(constant)
    policy_state = policy.init(num_steps)  # validates the policy against the step count

    def step_with(body, x, cache, step_t):
        """One step whose cached segment is ``body(h, ctx, cache) -> (h, cache)``."""
        _, t, t_next = step_t
        h, ctx = embed(x, t, cache.get_constant())
        h, cache = body(h, ctx, cache)
        return solver.step(x, finish(h, ctx), t, t_next), cache

    period = _static_period(policy, num_steps)
    if period is not None:
        # A schedule known at trace time needs no decision in the loop: scan over groups of
        # one refresh step and (period - 1) reuse steps. No control flow waits on the device.
        def refresh(h, ctx, cache):
            return _run_body(plan, h, ctx, cache, params.body, keep=False)

        def reuse(h, ctx, cache):
            return _stored(plan, cache), cache

        def group(carry, group_xs):
            x, cache = step_with(refresh, *carry, jax.tree.map(lambda a: a[0], group_xs))
            if period > 1:
                rest = jax.tree.map(lambda a: a[1:], group_xs)
                (x, cache), _ = jax.lax.scan(
                    lambda c, st: (step_with(reuse, *c, st), None), (x, cache), rest
                )
            return (x, cache), None

        groups, rem = divmod(num_steps, period)
        carry = (noise, cache)
        if groups:
            grouped = jax.tree.map(lambda a: a[: groups * period].reshape(groups, period), xs)
            carry, _ = jax.lax.scan(group, carry, grouped)
        if rem:
            carry, _ = group(carry, jax.tree.map(lambda a: a[groups * period :], xs))
        x, cache = carry
        body_ran = jnp.asarray(np.arange(num_steps) % period == 0)
    else:

        def cached_step(carry, step_t):
            x, cache, policy_state = carry
            refresh, policy_state = policy.decide(policy_state, step_t[0], None)
            filled = cache.has(n - 1)  # the sampler fills all slots at once
            compute = refresh | ~filled

            def body(h, ctx, cache):
                return _body_or_reuse(plan, compute, refresh, h, ctx, cache, params.body)

            x, cache = step_with(body, x, cache, step_t)
            return (x, cache, policy_state), compute

        carry = (noise, cache, policy_state)
        (x, cache, _), body_ran = jax.lax.scan(cached_step, carry, xs)

    body_cols = jnp.broadcast_to(body_ran[:, None], (num_steps, n))
    computed = jnp.concatenate([body_cols, jnp.ones((num_steps, total - n), bool)], axis=1)
    caches = (cache.select_rows(0, batch), cache.select_rows(batch, 2 * batch)) if guided else (
        cache,
    )
    return SampleResult(x, body_ran, computed, caches)


def _static_period(policy: RefreshPolicy, num_steps: int) -> int | None:
    """``k`` if the policy's schedule is known now and refreshes exactly when ``step % k == 0``."""
    schedule = policy.static_schedule(num_steps)
    if schedule is None:
        return None
    schedule = np.asarray(schedule, bool)
    if schedule.shape != (num_steps,) or not schedule[0]:
        return None
    refreshes = np.flatnonzero(schedule)
    period = int(refreshes[1]) if len(refreshes) > 1 else num_steps
    return period if np.array_equal(schedule, np.arange(num_steps) % period == 0) else None


def _stored(plan: CachePlan, cache: StepCache) -> PyTree:
    """The stored output of the last cached layer, as a hidden state."""
    last = plan.cached_layers - 1
    return plan.join(cache.get(last), cache.get2(last) if cache.has_stream2 else None)


def _run_body(plan, h, ctx, cache, body_params, keep):
    """Runs the cached layers, writing each output into its slot in place (unless ``keep``)."""
    layer = plan.network.layer
    layer_ids = jnp.arange(plan.cached_layers, dtype=jnp.int32)

    def one_layer(carry, xs):
        h, cache = carry
        i, layer_params = xs
        h = layer(layer_params, h, ctx)
        return (h, cache.write_layer(i, *plan.streams(h), keep=keep)), None

    (h, cache), _ = jax.lax.scan(one_layer, (h, cache), (layer_ids, body_params))
    return h, cache.mark_filled(jnp.logical_not(keep))


def _body_or_reuse(plan, compute, refresh, h, ctx, cache, body_params):
    """Runs the cached layers when ``compute``, else takes the stored output of the last one.

    The choice is a ``while_loop`` of zero or one trips rather than a ``lax.cond``: XLA's GPU
    pipeline copies every buffer that passes through a conditional (twice per step, measured:
    the slots of DiT-XL at batch 8 are 68 MB), while a loop updates its carry in place. On a
    refresh step the outputs are stored; a non-refresh step that runs because nothing is stored
    yet stores nothing (the reference's per-layer loop with empty slots).
    """

    def run(carry):
        trips, h, cache = carry
        h, cache = _run_body(plan, h, ctx, cache, body_params, keep=~refresh)
        return trips - 1, h, cache

    _, ran, cache = jax.lax.while_loop(
        lambda carry: carry[0] > 0, run, (compute.astype(jnp.int32), h, cache)
    )
    h = jax.tree.map(lambda a, b: jnp.where(compute, a, b), ran, _stored(plan, cache))
    return h, cache


def _empty_cache(plan, params, embed, noise, constant) -> StepCache:
    """An empty cache whose slots have the shape of one cached layer's output (no compute)."""

    def slot_shapes(x, constant):
        h, ctx = embed(x, jnp.zeros((), jnp.float32), constant)
        return plan.network.layer(jax.tree.map(lambda a: a[0], params.body), h, ctx)

    layer, layer2 = plan.streams(jax.eval_shape(slot_shapes, noise, constant))
    return StepCache.create(plan.cached_layers, layer=layer, layer2=layer2, constant=constant)


def _concat(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
