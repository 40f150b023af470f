"""The cached sampling loop, compiled whole.

``sample`` runs every denoising step inside one ``jax.jit``. Each step runs the plan's head
(the embedding and the first layers), then decides, then runs the cached body or lets the reuse
mode stand in for it, then runs the tail:

* A schedule known before sampling (:class:`~jaxcache.IntervalPolicy`, a
  :class:`~jaxcache.StepMaskPolicy`) compiles to scans over groups of one refresh step and its
  reuse steps: no decision inside the loop. Runs of equal groups share one scan, so the program
  does not grow with the step count.
* A plan per step and body layer known before sampling (:class:`~jaxcache.LayerMaskPolicy`)
  runs each body layer, or lets the reuse mode stand in for it, on its own: one reuse state per
  run of consecutive layers whose mask columns agree (layers always computed and reused
  together), each called with that run's input and output as its "body". Steps with the same
  row share one step function; runs of equal rows and repeating patterns of them are scanned,
  so the program grows with the number of distinct rows, not the step count. No decision.
* Traced per-(step, layer) gates (:class:`~jaxcache.LayerGates`) run every layer at every step
  and mix its output with its reuse value, in one scan over the steps: differentiable in the
  gates, for training a router.
* Any other policy decides on the device every step, per row (per sample and guidance branch):
  the body runs when any row needs it (a loop of zero or one trips that keeps the state buffers
  in place; see ``StepLoop.run_or_reuse``), and each row then takes its own output by a select,
  so a sample's result never depends on its batch-mates.
* A policy that reads only the sample and the time (:class:`~jaxcache.SenCachePolicy`, its
  ``whole_network``) decides the same way, before the network: a skipped step runs none of it,
  and the reuse mode stands in for the network's prediction.

This module holds the entry points and the program that picks one of these loops; the loops
themselves are in ``jaxcache._step_loop`` (``StepLoop``), known schedules are cut into scanned
runs in ``jaxcache._schedule_runs``, the checks made before compiling are in
``jaxcache._sample_checks`` and what ``record=`` carries is in ``jaxcache._record``.

Classifier-free guidance runs both branches as one batch of ``2B`` rows; every row keeps its
own decisions and cached values, so branch state cannot mix (the reference shared one cache,
and its negative pass reused the positive caption). With CFG-Cache (``guidance=``,
:class:`~jaxcache.CFGCache`) the cache steps, known before sampling, run the ``B`` conditional
rows alone, with the condition path's output and per-layer constants of those rows, and
estimate the unconditional prediction; a reuse state of ``2B`` rows is read and written there
through the conditional rows twice over, its unconditional rows masked out, so the layer cache
composes with it unchanged.

A step of the loop is one model evaluation (one entry of ``solver.times``): a two-stage solver
such as :class:`~jaxcache.FlowMatchHeun` makes two per solver step, and the cache counts both.
The solver's state (a multistep solver's earlier predictions, Heun's predictor) rides in the
loop's carry; an ancestral solver's key is folded with the evaluation index inside the loop, so
the seed is traced and a new one reuses the compiled program.

On a mesh of devices (docs/sharding.md) the same program runs under ``jax.jit`` with sharded
inputs, or inside ``jax.shard_map``. There every piece of loop state the program creates (the
solver's state, the reuse mode's, the policy's, the mask of rows that stored) is cast to vary
over the noise's manual mesh axes, so the loops keep one carry type; with ``sequence_axis`` a
decision's per-row measure is averaged over the devices that hold a row's tokens and the body's
run-or-skip predicate is agreed over them (``pmax``), so those devices always take the same
branch. Outside ``shard_map`` none of this is in the program.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._record import (
    RECORDABLE,
    record_changes,
    record_residual,
    record_start,
    recorded_changes,
    recorded_residuals,
)
from jaxcache._sample_checks import check_prediction, checked_arguments, prediction_mode
from jaxcache._schedule_runs import (
    REUSE,
    computed_steps,
    layer_actions,
    layer_units,
    unit_actions,
    unit_plan,
)
from jaxcache._step_loop import FULL, HALF, Carry, StepLoop, scan_steps
from jaxcache.guidance import CFGCache
from jaxcache.plan import CachePlan, SegmentParams
from jaxcache.policies.base import RefreshPolicy
from jaxcache.policies.sencache import is_whole_network
from jaxcache.policies.signals import signal_function
from jaxcache.reuse.base import ReuseMode
from jaxcache.reuse.output import OutputReuse
from jaxcache.sharding import check_sequence_axes, manual_axes, vary
from jaxcache.solvers import Solver
from jaxcache.work import network_work

PyTree = Any

__all__ = ["RECORDABLE", "Compiled", "Lowered", "SampleResult", "lower", "sample"]



class SampleResult(NamedTuple):
    """What :func:`sample` returns.

    Steps here are model evaluations (``len(solver.times(num_steps)[0])``: ``num_steps`` for
    one-stage solvers, ``2 num_steps - 1`` for :class:`~jaxcache.FlowMatchHeun`).

    Attributes:
      sample: the final sample, shaped like the noise.
      refreshed: ``[evaluations]`` bool, the steps whose cached body ran (for any row); with
        a per-layer plan, the steps where any body layer ran.
      layers_computed: ``[evaluations, num_layers]`` bool, which layer ran at which step:
        every layer of the network, the head's and the tail's included.
      caches: the reuse mode's final state for each guidance branch (conditional first, then
        unconditional): a :class:`~jaxcache.StepCache` for :class:`~jaxcache.OutputReuse`.
        None when sampling uncached. With a :class:`~jaxcache.LayerMaskPolicy`, each branch's
        is a tuple of states, one per run of consecutive body layers whose mask columns agree
        (in layer order); with :class:`~jaxcache.LayerGates`, one per body layer. With a
        policy that skips the whole network (:class:`~jaxcache.SenCachePolicy`), the state of
        the mode standing in for the prediction (a ``ForecastState`` for the default).
      body_computed: ``[evaluations, branches, batch]`` bool: whether each sample's body output
        at each step was computed (True) or came from the reuse mode (False), per guidance
        branch; with a per-layer plan, True where every body layer ran
        (:attr:`layers_computed` has each layer's).
      flops: the matrix FLOPs the run computed (float32 scalar): the condition path once, the
        embedding and final projection at every evaluation, and each layer each time it ran,
        weighed by its own cost (FLUX's single-stream blocks cost less than its double-stream
        ones). Counted on the traced pieces (:mod:`jaxcache.work`); NaN for a network whose
        pieces hold a ``while`` loop (its trip count is unknown). CFG-Cache's cache steps
        count their ``B`` rows; under a policy that skips the whole network (SenCache) the
        embedding and final projection count where the network ran, and its extra warm-up
        evaluations count whole.
      uncached_flops: the same for the run without caching.
      signals: with ``record=("signal", ...)`` only (else None): ``[evaluations, rows]``
        float32, the relative L1 change (:func:`~jaxcache.policies.signals.relative_l1`) of the
        policy's signal (its ``signal_kind``: the first block's residual for First-Block and
        DBCache, the first layer's modulated input for TeaCache) at each model evaluation
        against the previous evaluation's, per row (the conditional rows, then the
        unconditional ones); NaN at evaluation 0. TeaCache's measure before its rescaling;
        First-Block's and DBCache's wherever the step before computed (they compare with the
        row's last computed step), so all of them along a run that computes every step.
      output_changes: with ``record=("output_change", ...)`` only (else None): ``[evaluations,
        rows]`` float32, the same change of the network's prediction (the final projection's
        output, per row, before the guidance combine); NaN at evaluation 0.
      body_residuals: with ``record=("body_residual", ...)`` only (else None): the cached
        body's residual (its output minus its input) at every evaluation, per row: the body's
        structure (one array, or ``(image, text)``) with leaves ``[evaluations, rows, ...]``
        float32. Recorded on the uncached run (``policy=None``) of a plan with a body, so
        every evaluation computes it: the calibration data of planned schedules (MagCache's
        magnitude ratios, :mod:`jaxcache.tuning`).
      sensitivities: with ``record=("sensitivity",)`` only (else None; a
        :class:`~jaxcache.SenCachePolicy` estimating its sensitivities): ``[evaluations, 2,
        rows]`` float32, ``(a_x, a_t)`` per row measured by the finite differences of each
        probed warm-up step (:meth:`~jaxcache.SenCachePolicy.measure`), NaN at the other steps:
        SenCache's calibration data (:func:`jaxcache.tuning.calibrate_sencache`).
      guidance_computed: with guidance only (else None): ``[evaluations]`` bool, whether the
        unconditional branch ran; False on CFG-Cache's cache steps, where it was estimated
        from the conditional one (:class:`~jaxcache.CFGCache`). There :attr:`body_computed`
        is False for the unconditional branch, and :attr:`flops` counts the conditional rows
        only.
    """

    sample: jax.Array
    refreshed: jax.Array
    layers_computed: jax.Array
    caches: tuple[PyTree, ...] | None
    body_computed: jax.Array | None = None
    flops: jax.Array | None = None
    uncached_flops: jax.Array | None = None
    signals: jax.Array | None = None
    output_changes: jax.Array | None = None
    body_residuals: PyTree = None
    guidance_computed: jax.Array | None = None
    sensitivities: jax.Array | None = None

    @property
    def layer_evaluations(self) -> jax.Array:
        """Layer evaluations of the batch, head and tail included (a guided step counts once).

        Layers of different kinds count alike here; :attr:`ideal_speedup` weighs them.
        """
        return jnp.sum(self.layers_computed, dtype=jnp.int32)

    @property
    def ideal_speedup(self) -> jax.Array:
        """Compute of the uncached run over this one (``uncached_flops / flops``): the speedup
        a perfect implementation gets, every piece that ran counted at its cost."""
        return self.uncached_flops / self.flops


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
    guidance: CFGCache | None = None,
    key: jax.Array | None = None,
    remat: bool = False,
    sequence_axis: str | tuple[str, ...] | None = None,
    record: tuple[str, ...] = (),
) -> SampleResult:
    """Samples with the cached body of ``plan`` reused between refreshes, in one program.

    Args:
      plan: the network and its segments (head, cached body, tail).
      params: parameters split by ``plan.split`` (once, before sampling).
      noise: the initial sample, ``[batch, ...]``.
      cond: the condition (e.g. caption token ids), batch-major.
      solver: the solver (:class:`~jaxcache.FlowMatchEuler`, :class:`~jaxcache.DDIM`, ...).
        Static: it must be hashable (a frozen dataclass), and equal settings share a program.
        Its times are in ``[0, 1]``; the network's :class:`~jaxcache.TimeConvention` says how
        the model reads them. A discrete-schedule solver (DDIM, DDPM, ...) on a network of the
        default ``continuous`` convention is accepted without a word: the model then reads
        ``k / T`` rather than the index ``k``, which is right for a model trained on that
        time (the shipped ``dit-eps`` digits model) and wrong for a DDPM-trained one (DiT,
        ADM), which needs ``TimeConvention.index(T)``. Only an ``index`` network is checked
        against its solver's times.
      num_steps: the number of solver steps (static). The cache steps are the model
        evaluations: ``num_steps`` for one-stage solvers, ``2 num_steps - 1`` for Heun; the
        policy (an interval, a mask's length) counts evaluations.
      policy: when the body runs; None samples uncached (every layer, every step). Its numeric
        settings are traced: a new threshold reuses the compiled program. A per-layer plan
        (:class:`~jaxcache.LayerMaskPolicy`) runs or reuses each body layer on its own, the
        reuse mode standing in per layer; its program grows with the number of distinct mask
        rows. :class:`~jaxcache.LayerGates` mixes computed and reused layer outputs by traced
        gates (every layer runs; differentiable in the gates). A policy that reads only the
        sample and the time (:class:`~jaxcache.SenCachePolicy`) skips the whole network, any
        plan's head, body and tail alike.
      reuse: what a skipped step uses; default :class:`~jaxcache.OutputReuse` (the reference).
        With a whole-network policy it stands in for the network's prediction (``None`` and
        ``OutputReuse()``: the last prediction; a forecast mode: a forecast of it;
        :class:`~jaxcache.ResidualReuse`: the current sample plus the last ``prediction -
        x``).
      uncond: the negative condition for classifier-free guidance, shaped like ``cond``.
      guidance_scale: the guidance scale (>= 0); None turns guidance off. Static.
      guidance: :class:`~jaxcache.CFGCache` (FasterCache's CFG-Cache): cache steps, known
        before sampling, run the conditional branch alone (``B`` rows, not ``2B``) and
        estimate the unconditional prediction from the gap between the branches at the last
        full step, split into low and high frequencies. Needs ``uncond`` and a
        ``guidance_scale`` above 1. Composes with any per-step policy and reuse mode and with a
        :class:`~jaxcache.LayerMaskPolicy` (the conditional rows keep caching on their own);
        not with :class:`~jaxcache.LayerGates`, ``record=``, ``sequence_axis`` (the FFT needs a
        whole sample) or a policy that skips the whole network (SenCache). None (the default):
        both branches run at every evaluation.
      key: a PRNG key (``jax.random.key(seed)``) for an ancestral solver
        (:class:`~jaxcache.DDPM`, :class:`~jaxcache.EulerAncestral`); traced, so a new seed
        reuses the compiled program. Evaluation ``i`` gets ``jax.random.fold_in(key, i)``.
        Solvers that draw no noise refuse it.
      remat: for differentiating through sampling (:func:`~jaxcache.fit_forecast`): each step
        of a schedule known before sampling (per step or per layer), of the gated loop
        (:class:`~jaxcache.LayerGates`), or of the uncached loop (``policy=None`` or no
        cached layers), is rematerialised in the backward pass, which then keeps one step's
        activations at a time instead of every step's, for about one more forward pass of
        compute. The samples are the same. Static. Refused (ValueError) with a policy that
        decides on the device: that loop runs the body in a ``while_loop``, which reverse-mode
        differentiation does not cross, so there is no backward pass to rematerialise.
      sequence_axis: inside ``jax.shard_map``, the mesh axis name (or names) that split each
        sample's tokens over devices (sequence parallelism; the network's layers then mix
        tokens through collectives over the same axes). A device-decided policy's per-row
        measure (:func:`~jaxcache.policies.signals.relative_l1`) is then averaged over these
        axes and the body's run-or-skip predicate agreed over them (``lax.pmax``), so every
        device holding a sample's tokens takes the same decision and the same branch, and the
        collectives inside the body cannot deadlock. None (the default): no axis splits a
        sample's tokens (one device, data parallelism, or ``jax.jit`` with sharded inputs,
        whose sharding propagation needs nothing more). Static. Naming an axis that is not a
        ``shard_map`` axis where ``sample`` runs is a ValueError while tracing.
        See docs/sharding.md.
      record: per-step values to return beside the sample, computed only when asked (static;
        the default program computes none): ``"signal"``, the change of the policy's signal
        between consecutive evaluations (:attr:`SampleResult.signals`; the policy must read a
        signal: First-Block, TeaCache, DBCache), and ``"output_change"``, that of the
        network's prediction (:attr:`SampleResult.output_changes`), and ``"body_residual"``, the
        cached body's residual at every evaluation (:attr:`SampleResult.body_residuals`; only
        uncached, ``policy=None``, with ``cached_layers > 0``), and ``"sensitivity"``, the
        sensitivities SenCache measures on its warm-up steps (:attr:`SampleResult.sensitivities`;
        a :class:`~jaxcache.SenCachePolicy` estimating them; with a whole-network policy the
        only one). A policy at threshold 0
        computes every step, so its recorded values follow the uncached trajectory (TeaCache's
        calibration, :func:`jaxcache.tuning.teacache_calibration_data`).

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
    args = checked_arguments(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond,
                    guidance_scale, key, remat, sequence_axis, record, guidance)
    return _program(plan)(*args)


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
    guidance: CFGCache | None = None,
    key: jax.Array | None = None,
    remat: bool = False,
    sequence_axis: str | tuple[str, ...] | None = None,
    record: tuple[str, ...] = (),
) -> Lowered:
    """The lowered (not yet compiled) program of :func:`sample` for these arguments.

    ``lower(...).compile()`` compiles it (benchmarks time compilation on its own) into a
    :class:`Compiled`, called by name: ``compiled(policy=new_policy)`` runs the program with
    the lowered arguments but those given. ``lower(...).as_text()`` is the program text (tests
    check it for host round trips and decisions).
    """
    args = checked_arguments(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond,
                    guidance_scale, key, remat, sequence_axis, record, guidance)
    return Lowered(_program(plan).lower(*args), args)


# The arguments of the compiled program that are traced (the rest are static), by name, in the
# order of _sample's signature. Only the wrappers below read this order.
_STATIC = frozenset({"plan", "solver", "num_steps", "guidance_scale", "remat", "sequence",
                     "record"})


def _traced_names() -> tuple[str, ...]:
    return tuple(n for n in inspect.signature(_sample).parameters if n not in _STATIC)


class Lowered:
    """:func:`lower`'s result: the lowered program, compiled into a :class:`Compiled`.

    Everything else (``as_text()``, ``cost_analysis()``, ...) is JAX's ``Lowered``.
    """

    def __init__(self, lowered: jax.stages.Lowered, args: tuple):
        self._lowered = lowered
        names = inspect.signature(_sample).parameters
        self._values = dict(zip(names, args))

    def compile(self, *args, **kwargs) -> Compiled:
        """Compiles the program (JAX's ``Lowered.compile``)."""
        return Compiled(self._lowered.compile(*args, **kwargs), self._values)

    def __getattr__(self, name):
        return getattr(self._lowered, name)


class Compiled:
    """A compiled sampling program, called by name with what may change between calls.

    ``compiled(params=..., noise=..., cond=..., uncond=..., policy=..., reuse=..., key=...)``
    runs it; every argument left out keeps the value the program was lowered with. A policy
    or reuse mode of the same structure (a new threshold, new gains) reuses the program; a
    different structure raises JAX's mismatch error. Everything else (``as_text()``,
    ``cost_analysis()``, ...) is JAX's ``Compiled``.
    """

    def __init__(self, compiled: jax.stages.Compiled, values: dict[str, Any]):
        self._compiled = compiled
        self._values = values

    @property
    def names(self) -> tuple[str, ...]:
        """The arguments a call may give."""
        return _traced_names()

    def __call__(self, **changes: Any) -> SampleResult:
        unknown = sorted(set(changes) - set(self.names))
        if unknown:
            raise TypeError(f"a compiled sampler takes {list(self.names)} by name, got "
                            f"{unknown}")
        return self._compiled(*(changes.get(n, self._values[n]) for n in self.names))

    def __getattr__(self, name):
        return getattr(self._compiled, name)


# ------------------------------------------------------------------------------- the program
def _program(plan: CachePlan):
    """The jitted sampler for the plan's network's compiler options (one per option set)."""
    return _jitted_sample(plan.network.compiler_options)


@functools.cache
def _jitted_sample(options: tuple[tuple[str, Any], ...]):
    return jax.jit(_sample, static_argnums=(0, 5, 6, 9, 11, 12, 13),
                   compiler_options=dict(options) or None)


def _sample(plan, params, noise, cond, uncond, solver, num_steps, policy, reuse, guidance_scale,
            key, remat, sequence=None, record=(), guidance=None):
    # Inside shard_map: the manual mesh axes the noise varies over; loop state made here is cast
    # to vary over them too (else a scan's carry changes type). Empty outside: no casts at all.
    axes = manual_axes(noise)
    check_sequence_axes(sequence, noise)
    if key is not None and axes:
        # Each device draws its own noise (the same key everywhere would repeat one draw on
        # every device's block of the batch and tokens).
        key = jax.random.fold_in(key, jax.lax.axis_index(axes))
    guided = guidance_scale is not None
    batch = noise.shape[0]
    branches = 2 if guided else 1
    depth = plan.total_layers(params)
    split = params  # as split: CFG-Cache's cache steps bind their own rows' constants to it

    # Step-independent work happens once per guidance branch, before the loop.
    cond_rows = _concat(cond, uncond) if guided else cond
    constant = plan.network.condition(params.condition, cond_rows)
    params = plan.bind_layers(params, constant)  # per-layer constants, once, before the loop
    rows = jnp.concatenate([noise, noise]) if guided else noise

    times, next_times = solver.times(num_steps)
    steps = len(times)  # model evaluations: the cache's steps
    # CFG-Cache: each evaluation's kind, known now (None without it).
    kinds = (None if guidance is None
             else [FULL if f else HALF for f in guidance.full_steps(steps)])
    half = None if kinds is None else np.asarray([k == HALF for k in kinds])
    half_params = half_constant = None
    if half is not None and half.any():
        # The cache steps run the conditional rows alone, with their own constants (once).
        half_constant = plan.network.condition(split.condition, cond)
        half_params = plan.bind_layers(split, half_constant)
    work = functools.partial(_flops, plan, params, rows, cond_rows, half=half,
                             half_rows=(split, noise, cond))

    # The loop carries z, a Carry: the sample, the solver's state (None for stateless solvers),
    # and where asked what record= records and CFG-Cache's state.
    def head(z, t, half=False):
        x = z[0]
        if half:  # a cache step of CFG-Cache: the conditional rows alone
            t_rows = jnp.full((x.shape[0],), t, jnp.float32)
            return plan.run_head(half_params, x, t_rows, half_constant)
        rows = jnp.concatenate([x, x]) if guided else x
        t_rows = jnp.full((rows.shape[0],), t, jnp.float32)
        return plan.run_head(params, rows, t_rows, constant)

    def finish(z, h, ctx, i, t, t_next, signal=None, kind=None):
        prediction = plan.run_tail(half_params if kind == HALF else params, h, ctx)
        return advance(z, prediction, i, t, t_next, signal, kind)

    def advance(z, prediction, i, t, t_next, signal=None, kind=None):
        """The guidance combine and the solver's update, from the network's prediction."""
        x, solver_state, recorded, cfg_state = z
        if kind == HALF:  # CFG-Cache's estimate stands in for the unconditional rows
            check_prediction(prediction, x, 1)
            negative, cfg_state = guidance.estimate(cfg_state, prediction, t)
            prediction = jnp.concatenate([prediction, negative])
        else:
            check_prediction(prediction, x, branches)  # while tracing: costs nothing
        if record:
            recorded = record_changes(recorded, i, signal, prediction, sequence)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            if kind == FULL:  # the gap the cache steps after this one start from
                cfg_state = guidance.store(cfg_state, positive, negative)
            prediction = negative + guidance_scale * (positive - negative)
        step_key = None if key is None else jax.random.fold_in(key, i)
        z_next = solver.advance(solver_state, x, prediction, t, t_next, index=i, key=step_key)
        return Carry(*z_next, recorded, cfg_state)

    xs = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(times), jnp.asarray(next_times))
    start = vary(Carry(noise, solver.init_state(noise)), axes)
    # The policy's signal, where a step records it (else None: nothing computes it).
    signal_of = (signal_function(policy.signal_kind, plan, params) if "signal" in record
                 else None)
    if record:
        start = start._replace(
            record=vary(record_start(record, head, signal_of, start, steps), axes)
        )
    if guidance is not None:
        start = start._replace(guidance=vary(guidance.init(noise), axes))
    # With guidance: whether the unconditional branch ran (not on CFG-Cache's cache steps).
    uncond_ran = np.ones((steps,), bool) if half is None else ~half
    guidance_computed = jnp.asarray(uncond_ran) if guided else None

    def by_branch(rows_computed):
        """``[steps, rows]`` computed rows as ``[steps, branches, batch]``, the unconditional
        rows of CFG-Cache's cache steps not computed."""
        if half is not None:
            ran = np.concatenate([np.ones((steps, batch), bool),
                                  np.broadcast_to(uncond_ran[:, None], (steps, batch))], axis=1)
            rows_computed = rows_computed & jnp.asarray(ran)
        return rows_computed.reshape(steps, branches, batch)

    if policy is not None and is_whole_network(policy):
        mode = prediction_mode(policy, reuse)
        loop = StepLoop(plan, params, mode, head, finish, remat, axes, sequence, None, batch)

        def predict(z, t):
            _, h, ctx = head(z, t)
            return plan.run_tail(params, plan.run_body(params, h, ctx), ctx)

        def sample_rows(z):
            return jnp.concatenate([z[0], z[0]]) if guided else z[0]

        previous = np.concatenate([np.asarray(times)[:1], np.asarray(times)[:-1]])
        z, state, rows_computed, probes, sensitivities = loop.whole(
            start, (*xs, jnp.asarray(previous)), policy, steps, predict, advance, sample_rows,
            record="sensitivity" in record,
        )
        ran = jnp.any(rows_computed, axis=1)
        computed = jnp.broadcast_to(ran[:, None], (steps, depth))
        caches = tuple(mode.rows(state, j * batch, (j + 1) * batch) for j in range(branches))
        return SampleResult(
            z[0], ran, computed, caches, by_branch(rows_computed),
            *work(computed, evaluated=ran, probes=probes), guidance_computed=guidance_computed,
            sensitivities=sensitivities,
        )

    if policy is None or plan.cached_layers == 0:

        def plain_step(kind, z, step_t):
            i, t, t_next = step_t
            embedded, h, ctx = head(z, t, half=kind == HALF)
            signal = None if signal_of is None else signal_of(embedded, h, ctx)
            out = plan.run_body(half_params if kind == HALF else params, h, ctx)
            z_next = finish(z, out, ctx, i, t, t_next, signal, kind)
            if "body_residual" in record:
                z_next = z_next._replace(record=record_residual(z_next.record, i, h, out))
            return vary(z_next, axes)

        if remat:  # the backward pass recomputes each step from its carry
            plain_step = jax.checkpoint(plain_step, static_argnums=(0,))
        if kinds is None:
            z, _ = jax.lax.scan(lambda c, st: (plain_step(None, c, st), None), start, xs)
        else:
            z = scan_steps(plain_step, start, xs, kinds)
        every = jnp.ones((steps, branches * batch), bool)
        computed = jnp.ones((steps, depth), bool)
        return SampleResult(z[0], jnp.ones((steps,), bool), computed, None, by_branch(every),
                            *work(computed), *recorded_changes(z, record),
                            recorded_residuals(z, record), guidance_computed)

    mode = reuse if reuse is not None else OutputReuse()
    _, body_shape, _ = jax.eval_shape(head, start, jnp.zeros((), jnp.float32))
    loop = StepLoop(plan, params, mode, head, finish, remat, axes, sequence, signal_of, batch,
                 half_params)

    layers = policy.static_layer_schedule(steps)
    gates = None if layers is not None else policy.layer_gates(steps)
    if layers is not None or gates is not None:
        n = plan.cached_layers
        if layers is not None:
            layers = np.asarray(layers, bool)
            units = layer_units(layers)
            states = tuple(vary(mode.init(unit_plan(plan, lo, hi), body_shape, constant), axes)
                           for lo, hi in units)
            z, states = loop.layered(start, states, xs, units, unit_actions(layers, units),
                                     kinds)
            ran = layer_actions(layers) != REUSE  # [steps, body layers]
        else:
            one = mode.init(unit_plan(plan, 0, 1), body_shape, constant)
            stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), one)
            z, stacked = loop.gated(start, vary(stacked, axes), xs, gates)
            ran = np.ones((steps, n), bool)  # every layer runs; the gates mix
            states = tuple(jax.tree.map(lambda a, j=j: a[j], stacked) for j in range(n))
        caches = tuple(tuple(mode.rows(s, j * batch, (j + 1) * batch) for s in states)
                       for j in range(branches))
        computed = jnp.asarray(np.concatenate(
            [np.ones((steps, plan.first_layers), bool), ran,
             np.ones((steps, depth - plan.body_stop), bool)], axis=1))
        whole = np.broadcast_to(ran.all(axis=1)[:, None], (steps, branches * batch))
        return SampleResult(
            z[0], jnp.asarray(ran.any(axis=1)), computed, caches, by_branch(jnp.asarray(whole)),
            *work(computed), *recorded_changes(z, record), guidance_computed=guidance_computed,
        )

    state = vary(mode.init(plan, body_shape, constant), axes)

    schedule = policy.static_schedule(steps)
    if schedule is not None:
        z, state = loop.static(start, state, xs, np.asarray(schedule, bool), kinds)
        rows_computed = jnp.broadcast_to(
            jnp.asarray(computed_steps(schedule))[:, None], (steps, branches * batch)
        )
    else:
        z, state, rows_computed = loop.dynamic(start, state, xs, policy, steps, kinds)

    body_ran = jnp.any(rows_computed, axis=1)
    columns = [jnp.ones((steps, plan.first_layers), bool)]
    columns.append(jnp.broadcast_to(body_ran[:, None], (steps, plan.cached_layers)))
    columns.append(jnp.ones((steps, depth - plan.body_stop), bool))
    caches = tuple(mode.rows(state, j * batch, (j + 1) * batch) for j in range(branches))
    computed = jnp.concatenate(columns, axis=1)
    return SampleResult(
        z[0], body_ran, computed, caches, by_branch(rows_computed),
        *work(computed), *recorded_changes(z, record), guidance_computed=guidance_computed,
    )


def _flops(plan, params, rows, cond_rows, computed, *, half=None, half_rows=None,
           evaluated=None, probes=None):
    """``(flops, uncached_flops)`` of a run whose layers ran where ``computed`` says.

    Args:
      half: None, or ``[steps]`` bool (static): the evaluations that ran ``half_rows``
        (``(params, rows, cond)``: CFG-Cache's conditional rows) instead of ``rows``; their
        condition path ran once more.
      evaluated: None (the embedding and final projection ran at every evaluation), or
        ``[steps]`` bool: where they ran.
      probes: extra evaluations of the whole network on ``rows`` (SenCache's estimate).
    """
    steps = computed.shape[0]
    try:  # counted on shapes while tracing: constants in the program
        counts = network_work(plan.network, params, rows, cond_rows)
        halves = (network_work(plan.network, *half_rows)
                  if half is not None and np.any(half) else None)
    except ValueError:  # a piece with a while loop: its cost is unknown
        nan = jnp.float32(np.nan)
        return nan, nan
    layers = jnp.asarray(counts.layers, jnp.float32)
    uncached = jnp.float32(counts.total(steps))
    if halves is None and evaluated is None and probes is None:
        fixed = np.float32(counts.condition + steps * counts.step)
        return fixed + jnp.sum(computed.astype(jnp.float32) @ layers), uncached
    computed = computed.astype(jnp.float32)
    per_step = computed @ layers
    per_evaluation = jnp.full((steps,), np.float32(counts.step))
    fixed = np.float32(counts.condition)
    if halves is not None:
        mask = jnp.asarray(half)
        per_step = jnp.where(mask, computed @ jnp.asarray(halves.layers, jnp.float32), per_step)
        per_evaluation = jnp.where(mask, np.float32(halves.step), per_evaluation)
        fixed = fixed + np.float32(halves.condition)
    if evaluated is not None:
        per_evaluation = per_evaluation * evaluated.astype(jnp.float32)
    flops = fixed + jnp.sum(per_evaluation) + jnp.sum(per_step)
    if probes is not None:
        whole = np.float32(counts.step + float(np.sum(counts.layers)))
        flops = flops + probes.astype(jnp.float32) * whole
    return flops, uncached


def _concat(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
