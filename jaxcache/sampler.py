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
  in place; see :func:`_run_or_reuse`), and each row then takes its own output by a select, so a
  sample's result never depends on its batch-mates.
* A policy that reads only the sample and the time (:class:`~jaxcache.SenCachePolicy`, its
  ``whole_network``) decides the same way, before the network: a skipped step runs none of it,
  and the reuse mode stands in for the network's prediction.

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

from jaxcache._checks import check_arrays, check_int
from jaxcache.guidance import CFGCache
from jaxcache.plan import CachePlan, SegmentParams
from jaxcache.policies.base import RefreshPolicy
from jaxcache.policies.sencache import is_whole_network
from jaxcache.policies.signals import check_signal, relative_l1, sequence_axes, signal_function
from jaxcache.reuse.base import Position, ReuseMode, select_rows
from jaxcache.reuse.forecast import Ladder, TaylorForecast
from jaxcache.reuse.output import OutputReuse
from jaxcache.sharding import check_sequence_axes, manual_axes, normalize_sequence_axis, vary
from jaxcache.solvers import Solver
from jaxcache.stack import LayerList, Segments, run_layers, stack_length
from jaxcache.work import network_work

PyTree = Any

__all__ = ["RECORDABLE", "Compiled", "Lowered", "SampleResult", "lower", "sample"]

#: What ``sample(..., record=...)`` can return beside the sample (see :class:`SampleResult`).
RECORDABLE = ("signal", "output_change", "body_residual", "sensitivity")


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
    args = _checked(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond,
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
    args = _checked(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond,
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


def _check_remat(remat: Any, policy: RefreshPolicy | None = None, on_device: bool = False) -> bool:
    """``remat`` as a bool; refused where it cannot apply (a loop that decides on the device)."""
    if not isinstance(remat, bool):
        raise TypeError(f"remat must be a bool (static), got {remat!r}")
    if remat and on_device:
        raise ValueError(
            f"remat=True rematerialises each step of the uncached loop or of a schedule known "
            f"before sampling in the backward pass; {type(policy).__name__} decides on the "
            "device (its static_schedule is None), and that loop runs the body in a "
            "while_loop, which reverse-mode differentiation does not cross: there is no "
            "backward pass to rematerialise. Drop remat=, or differentiate through a known "
            "schedule (IntervalPolicy, StepMaskPolicy)"
        )
    return remat


def _kind_of(value: Any) -> str:
    """How an argument of the wrong kind is named in a message (a class as a class)."""
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return type(value).__name__


def _check_instance(value: Any, base: type, what: str) -> None:
    """Refuses a class of ``base`` passed where an instance is needed, naming the fix."""
    if isinstance(value, type) and issubclass(value, base):
        try:
            needs = any(
                p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                for p in inspect.signature(value).parameters.values()
            )
        except (TypeError, ValueError):
            needs = False
        call = f"{value.__name__}(...)" if needs else f"{value.__name__}()"
        raise TypeError(
            f"{what} must be an instance, got the class {value.__name__}: pass an instance, "
            f"{call}"
        )


def _checked(plan, params, noise, cond, solver, num_steps, policy, reuse, uncond, scale, key,
             remat=False, sequence_axis=None, record=(), guidance=None):
    """Validates every argument (before tracing) and returns ``_sample``'s arguments."""
    _check_instance(plan, CachePlan, "plan")
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {_kind_of(plan)}")
    _check_remat(remat)
    plan.check(params)
    check_arrays(params, "params")
    _check_solver(solver, key)
    check_int(num_steps, "num_steps")
    times, next_times = solver.times(num_steps)
    evaluations = len(times)
    if np.shape(times) != (evaluations,) or np.shape(next_times) != (evaluations,):
        raise ValueError(
            f"{type(solver).__name__}.times({num_steps}) must return two 1-D arrays of equal "
            f"length, got shapes {np.shape(times)} and {np.shape(next_times)}"
        )
    # Only an index network is checked: a discrete-schedule solver on a continuous network may
    # be right (a model trained on t = k / T) or wrong (a DDPM-trained one); nothing here knows.
    plan.network.time.check_times(times, solver)
    counted = "" if evaluations == num_steps else (
        f" (the cache counts model evaluations: {type(solver).__name__} makes {evaluations} in "
        f"{num_steps} steps)"
    )
    schedule = None
    if policy is not None:
        _check_instance(policy, RefreshPolicy, "policy")
        if not isinstance(policy, RefreshPolicy):
            raise TypeError(f"policy must be a RefreshPolicy or None, got {_kind_of(policy)}")
        check_signal(policy, plan)  # the signal checks itself against the plan
        try:
            policy.check(plan, evaluations)
        except ValueError as error:
            raise ValueError(f"{error}{counted}") from error
    if reuse is not None:
        _check_instance(reuse, ReuseMode, "reuse")
        if not isinstance(reuse, ReuseMode):
            raise TypeError(f"reuse must be a ReuseMode or None, got {_kind_of(reuse)}")
    whole = policy is not None and is_whole_network(policy)
    inner = getattr(policy, "policy", None)
    if not whole and inner is not None and is_whole_network(inner):
        raise ValueError(
            f"{type(inner).__name__} already decides on the device, before the network; pass "
            f"it as policy= itself, not wrapped in {type(policy).__name__}"
        )
    if whole:  # the reuse mode stands in for the network's prediction
        mode = _prediction_mode(policy, reuse)
        try:
            mode.check(plan, evaluations, None)
        except ValueError as error:
            raise ValueError(f"{error}{counted}") from error
        _check_forecast_times(mode, solver, times, None)
        _check_remat(remat, policy, on_device=True)
    elif policy is not None and plan.cached_layers > 0:
        mode = reuse or OutputReuse()
        layers = policy.static_layer_schedule(evaluations)
        gates = None if layers is not None else policy.layer_gates(evaluations)
        if layers is not None or gates is not None:
            _check_layer_plan(plan, policy, mode, solver, times, layers, counted)
        else:
            schedule = policy.static_schedule(evaluations)
            refreshes = None if schedule is None else int(np.sum(schedule))
            try:
                mode.check(plan, evaluations, refreshes)
            except ValueError as error:
                raise ValueError(f"{error}{counted}") from error
            _check_forecast_times(mode, solver, times, schedule)
            _check_remat(remat, policy, on_device=schedule is None)
    if np.ndim(noise) < 1:
        raise ValueError("noise must have a leading batch axis")
    if (scale is None) != (uncond is None):
        raise ValueError("classifier-free guidance needs both uncond and guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"guidance_scale must be a Python number (static), got {scale!r}")
    if scale is not None and not (np.isfinite(scale) and scale >= 0):
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1 is the conditional prediction, 0 "
            f"the unconditional one, above 1 guides), got {scale!r}"
        )
    _check_conditions(noise, cond, uncond)
    sequence = normalize_sequence_axis(sequence_axis)
    record = _check_record(record, policy, plan)
    if whole and record and record != ("sensitivity",):
        raise ValueError(
            f"record={record!r} is not available with {type(policy).__name__}: it skips the "
            "whole network, so a skipped step has no signal or prediction of its own to record"
        )
    if guidance is not None:
        _check_guidance(guidance, plan, policy, evaluations, noise, scale, record, sequence,
                        counted)
    return (plan, params, noise, cond, uncond, solver, num_steps, policy, reuse, scale, key,
            remat, sequence, record, guidance)


def _prediction_mode(policy: RefreshPolicy, reuse: ReuseMode | None) -> ReuseMode:
    """The reuse mode that stands in for the network's prediction under a policy that skips
    the whole network: the given one, or order-0 Taylor (the last prediction) for the default
    and :class:`~jaxcache.OutputReuse`, whose cache is shaped for the body's streams."""
    if isinstance(reuse, OutputReuse) and reuse.all_layers:
        raise ValueError(
            f"OutputReuse(all_layers=True) keeps every body layer's output, and "
            f"{type(policy).__name__} skips the whole network, reusing its prediction: pass "
            "reuse=None (the last prediction), a forecast of it (TaylorForecast(1)) or "
            "ResidualReuse()"
        )
    if reuse is None or isinstance(reuse, OutputReuse):
        return TaylorForecast(0)
    return reuse


def _check_guidance(guidance, plan, policy, evaluations, noise, scale, record, sequence,
                    counted) -> None:
    """CFG-Cache's settings fit this run, and nothing else in it excludes CFG-Cache."""
    _check_instance(guidance, CFGCache, "guidance")
    if not isinstance(guidance, CFGCache):
        raise TypeError(f"guidance must be a CFGCache or None, got {_kind_of(guidance)}")
    try:
        guidance.check(evaluations, tuple(np.shape(noise)), scale)
    except ValueError as error:
        raise ValueError(f"{error}{counted}") from error
    if record:
        raise ValueError(
            f"record={record!r} is not available with CFGCache: its cache steps compute the "
            "conditional rows only. Record on a run without guidance="
        )
    if sequence:
        raise ValueError(
            "CFGCache splits the gap between the branches into frequencies by an FFT over each "
            "whole sample; with sequence_axis a device holds part of a sample: drop guidance= "
            "or sequence_axis="
        )
    if policy is None:
        return
    name = type(policy).__name__
    if is_whole_network(policy):
        raise ValueError(
            f"{name} skips the whole network for both guidance branches, and CFGCache runs the "
            "conditional branch alone on its cache steps; the two do not combine: drop one"
        )
    if (plan.cached_layers > 0 and policy.static_layer_schedule(evaluations) is None
            and policy.layer_gates(evaluations) is not None):
        raise ValueError(
            f"{name} mixes every layer's output with its reuse value at every step (for "
            "training a router, at the uncached run's cost); CFGCache does not combine with it. "
            "Sample with the trained mask, LayerMaskPolicy(gates > 0.5), and CFGCache"
        )


def _check_record(record: Any, policy: RefreshPolicy | None, plan: CachePlan) -> tuple[str, ...]:
    """``record`` as a tuple in :data:`RECORDABLE`'s order; refused where it cannot apply."""
    names = (record,) if isinstance(record, str) else record
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(
            f"record must be a tuple of names from {RECORDABLE}, got {record!r}"
        ) from None
    unknown = [n for n in names if n not in RECORDABLE]
    if unknown:
        raise ValueError(f"record: unknown {unknown!r}; choose from {RECORDABLE}")
    if "signal" in names:
        kind = None if policy is None else policy.signal_kind
        if kind is None:
            name = "policy=None" if policy is None else type(policy).__name__
            raise ValueError(
                f"record='signal' returns the change of the policy's signal, and {name} reads "
                "none: give a policy that reads one (FirstBlockPolicy, TeaCachePolicy, "
                "DBCachePolicy); at threshold 0 it computes every step, as uncached"
            )
        if plan.first_layers + plan.cached_layers == 0:
            raise ValueError(
                "record='signal' reads the first layer in the head or the cached body; this plan "
                "has neither (first_layers + cached_layers == 0)"
            )
    if "sensitivity" in names and not getattr(policy, "estimates", False):
        name = "policy=None" if policy is None else type(policy).__name__
        raise ValueError(
            f"record='sensitivity' returns the sensitivities SenCache measures while warming up, "
            f"and {name} measures none: give SenCachePolicy without sensitivity_x and "
            "sensitivity_t (jaxcache.tuning.calibrate_sencache does)"
        )
    if "body_residual" in names:
        if policy is not None:
            raise ValueError(
                f"record='body_residual' records the cached body's residual at every "
                f"evaluation, which only the uncached run computes: pass policy=None (got "
                f"{type(policy).__name__})"
            )
        if plan.cached_layers == 0:
            raise ValueError(
                "record='body_residual' records the cached body's residual; this plan caches no "
                "layer (cached_layers == 0): build it with the layers the schedule will cache"
            )
    return tuple(n for n in RECORDABLE if n in names)


def _check_solver(solver: Solver, key) -> None:
    """The solver can be a static argument, and the key fits what it draws."""
    _check_instance(solver, Solver, "solver")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxcache Solver, got {_kind_of(solver)}")
    name = type(solver).__name__
    try:
        hash(solver)
    except TypeError as error:
        raise TypeError(
            f"solver {name} must be hashable: it is a static argument of the compiled program, "
            "looked up by hash and ==. Make it a frozen dataclass "
            "(@dataclasses.dataclass(frozen=True)) of numbers, strings and tuples"
        ) from error
    if not solver.defines_update():
        raise TypeError(
            f"solver {name} defines neither step(x, prediction, t, t_next) nor "
            "advance(state, x, prediction, t, t_next, index=..., key=...)"
        )
    if solver.uses_key and key is None:
        raise ValueError(
            f"{name} draws fresh noise at every step: pass key=jax.random.key(seed) (traced, so "
            "a new seed reuses the compiled program)"
        )
    if key is not None:
        if not solver.uses_key:
            raise ValueError(
                f"key= was given, but {name} draws no noise (its uses_key is False): drop key=, "
                "or use an ancestral solver (DDPM, EulerAncestral)"
            )
        dtype = getattr(key, "dtype", None)
        typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        raw = dtype == np.uint32 and np.shape(key) == (2,)
        if not ((typed and np.shape(key) == ()) or raw):
            raise ValueError(
                "key must be one PRNG key, jax.random.key(seed) (or jax.random.PRNGKey(seed)), "
                f"got {type(key).__name__} of shape {np.shape(key)} and dtype {dtype}"
            )


def _check_layer_plan(plan, policy, mode, solver, times, layers, counted) -> None:
    """A per-layer plan's shape, and the reuse mode's checks for each run of layers it reuses.

    ``layers``: the plan's static ``[evaluations, cached_layers]`` mask, or None for gates
    (which store, weighted, at every evaluation).
    """
    evaluations = len(times)
    name = type(policy).__name__
    if layers is None:
        shape = tuple(np.shape(policy.layer_gates(evaluations)))
        checks = [((0, 1), None, None)]
    else:
        layers = np.asarray(layers)
        shape = layers.shape
        checks = []
    want = (evaluations, plan.cached_layers)
    if shape != want:  # LayerMaskPolicy.check says so first; this covers any per-layer policy
        raise ValueError(
            f"{name}'s per-layer plan has shape {shape}, but this run needs (evaluations, "
            f"cached_layers) = {want}{counted}"
        )
    if layers is not None:
        if layers.dtype != bool:
            raise TypeError(f"{name}.static_layer_schedule must return bools, got {layers.dtype}")
        actions = _layer_actions(layers)
        for lo, hi in _layer_units(layers):
            # Only a run of layers that is ever reused needs what it stored.
            reused = bool(np.any(actions[:, lo] == _REUSE))
            checks.append(((lo, hi), int(layers[:, lo].sum()) if reused else None, layers[:, lo]))
    for (lo, hi), refreshes, column in checks:
        where = "" if layers is None else f" (body layers [{lo}, {hi}) of the layer mask)"
        try:
            mode.check(_unit_plan(plan, lo, hi), evaluations, refreshes)
            _check_forecast_times(mode, solver, times, column)
        except ValueError as error:
            raise ValueError(f"{error}{where}{counted}") from error


def _check_forecast_times(mode, solver, times, schedule) -> None:
    """A Taylor forecast divides by the time between stored steps: none may share a time."""
    if not (isinstance(mode, Ladder) and mode.divides_by_time and mode.order >= 1):
        return
    stored = np.asarray(times) if schedule is None else np.asarray(times)[np.asarray(schedule)]
    same = np.flatnonzero(np.diff(stored) == 0)
    if len(same):
        raise ValueError(
            f"{type(mode).__name__}(order={mode.order}) divides by the time between the steps it "
            f"stores, and this run could store two evaluations at t={float(stored[same[0]]):.6g} "
            f"({type(solver).__name__} evaluates twice at some times). Use HermiteForecast (it "
            "counts in steps), OutputReuse, or a schedule that never refreshes two evaluations "
            "at one time (an interval of 2 or more)"
        )


def _check_prediction(prediction: Any, x: jax.Array, branches: int) -> None:
    """The network's prediction is shaped like the sample (per guidance branch).

    Run while tracing (shapes are static): a prediction of another shape would otherwise meet
    the sample inside the solver's update as a broadcasting error, or broadcast silently.
    """
    shape = getattr(prediction, "shape", None)
    want = (branches * x.shape[0], *x.shape[1:])
    if shape is not None and tuple(shape) == want:
        return
    got = f"shape {tuple(shape)}" if shape is not None else f"a {type(prediction).__name__}"
    rows = "" if branches == 1 else (
        f" (guidance runs both branches as one batch: {branches} x {x.shape[0]} rows)"
    )
    raise ValueError(
        f"the network's prediction (its final projection's output) has {got}, but the noise "
        f"has shape {tuple(x.shape)}: the solver combines the two element by element, so the "
        f"prediction must be one array of shape {want}{rows}. Check network.final (e.g. "
        "unpatchify back to the noise's layout, or keep only the predicted half of a "
        "learned-variance output)"
    )


def _describe(leaf) -> str:
    return f"shape {np.shape(leaf)} {getattr(leaf, 'dtype', type(leaf).__name__)}"


def _check_conditions(noise, cond, uncond) -> None:
    """cond and uncond are arrays with the noise's batch axis, and alike."""
    batch = noise.shape[0]
    for name, tree in (("cond", cond), ("uncond", uncond)):
        for leaf in jax.tree.leaves(tree):
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise TypeError(
                    f"{name} must be an array, or a pytree of arrays, with a leading batch axis; "
                    f"it holds a {type(leaf).__name__} leaf (a Python list or tuple is a pytree "
                    "of its items: convert it with jnp.asarray)"
                )
            if np.ndim(leaf) < 1 or leaf.shape[0] != batch:
                raise ValueError(
                    f"{name} leaves need a leading batch axis of {batch} (the noise's), "
                    f"got shape {np.shape(leaf)}. noise is [batch, ...]: its shape "
                    f"{tuple(noise.shape)} reads as {batch} samples of shape "
                    f"{tuple(noise.shape[1:])}; for one sample without a batch axis pass "
                    "noise[None]"
                )
    if uncond is None:
        return
    cond_leaves, cond_def = jax.tree.flatten(cond)
    uncond_leaves, uncond_def = jax.tree.flatten(uncond)
    if cond_def != uncond_def:
        raise ValueError(
            f"uncond must have cond's structure (both branches run as one batch): cond is "
            f"{cond_def}, uncond is {uncond_def}"
        )
    for a, b in zip(cond_leaves, uncond_leaves):
        if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
            raise ValueError(
                f"uncond must match cond leaf for leaf (both branches run as one batch): cond "
                f"has {_describe(a)}, uncond {_describe(b)}; pad or cast the negative condition "
                "to cond's shape and dtype"
            )


# ------------------------------------------------------------------------------- the program
def _program(plan: CachePlan):
    """The jitted sampler for the plan's network's compiler options (one per option set)."""
    return _jitted_sample(plan.network.compiler_options)


@functools.lru_cache(maxsize=None)
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
             else [_FULL if f else _HALF for f in guidance.full_steps(steps)])
    half = None if kinds is None else np.asarray([k == _HALF for k in kinds])
    half_params = half_constant = None
    if half is not None and half.any():
        # The cache steps run the conditional rows alone, with their own constants (once).
        half_constant = plan.network.condition(split.condition, cond)
        half_params = plan.bind_layers(split, half_constant)
    work = functools.partial(_flops, plan, params, rows, cond_rows, half=half,
                             half_rows=(split, noise, cond))

    # The loop carries z, a _Carry: the sample, the solver's state (None for stateless solvers),
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
        prediction = plan.run_tail(half_params if kind == _HALF else params, h, ctx)
        return advance(z, prediction, i, t, t_next, signal, kind)

    def advance(z, prediction, i, t, t_next, signal=None, kind=None):
        """The guidance combine and the solver's update, from the network's prediction."""
        x, solver_state, recorded, cfg_state = z
        if kind == _HALF:  # CFG-Cache's estimate stands in for the unconditional rows
            _check_prediction(prediction, x, 1)
            negative, cfg_state = guidance.estimate(cfg_state, prediction, t)
            prediction = jnp.concatenate([prediction, negative])
        else:
            _check_prediction(prediction, x, branches)  # while tracing: costs nothing
        if record:
            recorded = _record(recorded, i, signal, prediction, sequence)
        if guided:
            positive, negative = jnp.split(prediction, 2)
            if kind == _FULL:  # the gap the cache steps after this one start from
                cfg_state = guidance.store(cfg_state, positive, negative)
            prediction = negative + guidance_scale * (positive - negative)
        step_key = None if key is None else jax.random.fold_in(key, i)
        z_next = solver.advance(solver_state, x, prediction, t, t_next, index=i, key=step_key)
        return _Carry(*z_next, recorded, cfg_state)

    xs = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(times), jnp.asarray(next_times))
    start = vary(_Carry(noise, solver.init_state(noise)), axes)
    # The policy's signal, where a step records it (else None: nothing computes it).
    signal_of = (signal_function(policy.signal_kind, plan, params) if "signal" in record
                 else None)
    if record:
        start = start._replace(
            record=vary(_record_start(record, head, signal_of, start, steps), axes)
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
        mode = _prediction_mode(policy, reuse)
        loop = _Loop(plan, params, mode, head, finish, remat, axes, sequence, None, batch)

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
            embedded, h, ctx = head(z, t, half=kind == _HALF)
            signal = None if signal_of is None else signal_of(embedded, h, ctx)
            out = plan.run_body(half_params if kind == _HALF else params, h, ctx)
            z_next = finish(z, out, ctx, i, t, t_next, signal, kind)
            if "body_residual" in record:
                z_next = z_next._replace(record=_record_residual(z_next.record, i, h, out))
            return vary(z_next, axes)

        if remat:  # the backward pass recomputes each step from its carry
            plain_step = jax.checkpoint(plain_step, static_argnums=(0,))
        if kinds is None:
            z, _ = jax.lax.scan(lambda c, st: (plain_step(None, c, st), None), start, xs)
        else:
            z = _scan_steps(plain_step, start, xs, kinds)
        every = jnp.ones((steps, branches * batch), bool)
        computed = jnp.ones((steps, depth), bool)
        return SampleResult(z[0], jnp.ones((steps,), bool), computed, None, by_branch(every),
                            *work(computed), *_recorded(z, record), _residuals(z, record),
                            guidance_computed)

    mode = reuse if reuse is not None else OutputReuse()
    _, body_shape, _ = jax.eval_shape(head, start, jnp.zeros((), jnp.float32))
    loop = _Loop(plan, params, mode, head, finish, remat, axes, sequence, signal_of, batch,
                 half_params)

    layers = policy.static_layer_schedule(steps)
    gates = None if layers is not None else policy.layer_gates(steps)
    if layers is not None or gates is not None:
        n = plan.cached_layers
        if layers is not None:
            layers = np.asarray(layers, bool)
            units = _layer_units(layers)
            states = tuple(vary(mode.init(_unit_plan(plan, lo, hi), body_shape, constant), axes)
                           for lo, hi in units)
            z, states = loop.layered(start, states, xs, units, _unit_actions(layers, units),
                                     kinds)
            ran = _layer_actions(layers) != _REUSE  # [steps, body layers]
        else:
            one = mode.init(_unit_plan(plan, 0, 1), body_shape, constant)
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
            *work(computed), *_recorded(z, record), guidance_computed=guidance_computed,
        )

    state = vary(mode.init(plan, body_shape, constant), axes)

    schedule = policy.static_schedule(steps)
    if schedule is not None:
        z, state = loop.static(start, state, xs, np.asarray(schedule, bool), kinds)
        rows_computed = jnp.broadcast_to(
            jnp.asarray(_computed_steps(schedule))[:, None], (steps, branches * batch)
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
        *work(computed), *_recorded(z, record), guidance_computed=guidance_computed,
    )


class _Carry(NamedTuple):
    """The loop's carry: the sample, the solver's state, then (None where not asked) what
    ``record=`` records and CFG-Cache's state."""

    x: jax.Array
    solver: PyTree
    record: PyTree = None
    guidance: PyTree = None


# CFG-Cache's kinds of evaluation: both branches run and the gap between them is kept (_FULL),
# or the conditional rows run alone (_HALF).
_FULL, _HALF = "full", "half"


def _scan_steps(step, carry, xs, keys):
    """``carry`` after ``step(keys[i], carry, xs[i])`` for every step ``i``, in order.

    ``keys`` are hashable and static (what a step does): steps of equal keys share one step
    function, and runs of equal keys, and repeating patterns of such runs (:func:`_row_runs`),
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

    for start, reps, items in _row_runs(ids):
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


# ------------------------------------------------------------------ recorded per-step values
class _Record(NamedTuple):
    """What a run records (``record=``), carried with the sample; None where not recorded.

    ``previous_*``: the value at the previous evaluation, per row; ``signals`` and
    ``output_changes``: ``[evaluations, rows]``, written one evaluation at a time.
    """

    previous_signal: jax.Array | None
    signals: jax.Array | None
    previous_output: jax.Array | None
    output_changes: jax.Array | None
    body_residuals: PyTree = None


def _record_start(record, head, signal_of, start, steps) -> _Record:
    """The record before evaluation 0 (shapes from the head and the sample, traced abstractly)."""
    zero = jnp.zeros((), jnp.float32)
    shapes = jax.eval_shape(head, start, zero)
    rows = jax.tree.leaves(shapes[1])[0].shape[0]
    empty = jnp.full((steps, rows), jnp.nan, jnp.float32)
    signal = output = None
    if "signal" in record:
        shape = jax.eval_shape(lambda z: signal_of(*head(z, zero)), start).shape
        signal = jnp.zeros(shape, jnp.float32)
    if "output_change" in record:
        output = jnp.zeros((rows, *start[0].shape[1:]), jnp.float32)
    residuals = None
    if "body_residual" in record:
        residuals = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), jnp.float32), shapes[1])
    return _Record(signal, None if signal is None else empty,
                   output, None if output is None else empty, residuals)


def _record_residual(recorded: _Record, i, body_in, body_out) -> _Record:
    """``recorded`` with evaluation ``i``'s body residual written."""
    residuals = jax.tree.map(
        lambda buf, o, h: buf.at[i].set((o - h).astype(jnp.float32)),
        recorded.body_residuals, body_out, body_in,
    )
    return recorded._replace(body_residuals=residuals)


def _residuals(z, record) -> PyTree:
    """The recorded body residuals of a finished run's carry (None unless recorded)."""
    return z.record.body_residuals if "body_residual" in record else None


def _record(recorded: _Record, i, signal, prediction, sequence) -> _Record:
    """``recorded`` with evaluation ``i``'s changes written (NaN at evaluation 0)."""
    axes = sequence or ()  # a row split over devices is measured whole (relative_l1)

    def change(current, previous, buffer):
        value = relative_l1(current, previous, axis_name=axes)
        value = jnp.where(i == 0, jnp.nan, value)
        return current.astype(jnp.float32), buffer.at[i].set(value)

    if recorded.signals is not None:
        previous, signals = change(signal, recorded.previous_signal, recorded.signals)
        recorded = recorded._replace(previous_signal=previous, signals=signals)
    if recorded.output_changes is not None:
        previous, changes = change(prediction, recorded.previous_output,
                                   recorded.output_changes)
        recorded = recorded._replace(previous_output=previous, output_changes=changes)
    return recorded


def _recorded(z, record) -> tuple[jax.Array | None, jax.Array | None]:
    """``(signals, output_changes)`` of a finished run's carry."""
    if not record:
        return None, None
    return z.record.signals, z.record.output_changes


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


class _Loop:
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
            half = guidance == _HALF
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
            return _scan_steps(step, (noise, state), xs,
                               list(zip(_step_actions(schedule), kinds)))

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
        for run in _schedule_runs(schedule):
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
            half = kind == _HALF
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
        (x, state, _, _), computed = _scan_steps(step, (carry, computed), xs, kinds)
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
        if kind == _HALF:
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
            if row[k] == _REUSE:
                h = self.reuse(states[k], h, position, half)
            elif row[k] == _STORE:
                h, states[k] = self.store_range(lo, hi, h, ctx, states[k], position, half)
            else:  # consecutive units that run without storing run as one range
                end = k
                while end + 1 < len(units) and row[end + 1] == _PLAIN:
                    end += 1
                h = self.run_range(lo, units[end][1], h, ctx, half=half)
                k = end
            k += 1
        return h, tuple(states)

    def layered(self, noise, states, xs, units, actions, kinds=None):
        """The loop of a per-layer plan known now: scans over runs of equal rows, no decisions.

        ``units``: the runs of body layers that share a reuse state; ``actions``: ``[steps,
        units]`` of ``_REUSE``, ``_STORE`` and ``_PLAIN``; ``kinds``: CFG-Cache's kind of each
        step, or None.
        """
        rows = [tuple(int(a) for a in row) for row in np.asarray(actions)]
        keys = list(zip(rows, [None] * len(rows) if kinds is None else kinds))

        def step(key, carry, step_t):
            row, guidance = key
            half = guidance == _HALF
            x, states = carry
            i, t, t_next = step_t
            position = Position(i, t)
            _, h, ctx = self.head(x, t, half=half)
            h, states = self.layer_row(row, units, h, ctx, states, position, half)
            return self.vary((self.finish(x, h, ctx, i, t, t_next, None, guidance), states))

        if self.remat:  # the backward pass recomputes each step from its carry
            step = jax.checkpoint(step, static_argnums=(0,))
        return _scan_steps(step, (noise, states), xs, keys)

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


# The action of a run of body layers at a step, under a per-layer plan.
_REUSE, _STORE, _PLAIN = 0, 1, 2


def _layer_actions(mask: np.ndarray) -> np.ndarray:
    """``[steps, layers]`` actions of a per-layer mask: store where True; where False, reuse
    if the layer stored before, else run without storing (the reference's empty-slot rule)."""
    mask = np.asarray(mask, bool)
    stored = np.logical_or.accumulate(mask, axis=0)
    return np.where(mask, _STORE, np.where(stored, _REUSE, _PLAIN)).astype(np.int8)


def _layer_units(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Runs ``(lo, hi)`` of consecutive body layers whose mask columns are equal.

    Such layers are computed and reused at the same steps, so one reuse state covers them, fed
    the run's input and output: for the shipped modes (linear in what they store) this is the
    per-layer rule exactly in real arithmetic, with fewer states (a uniform mask is one run,
    the whole body, as a step mask).
    """
    mask = np.asarray(mask, bool)
    n = mask.shape[1]
    starts = [0] + [j for j in range(1, n) if not np.array_equal(mask[:, j], mask[:, j - 1])]
    return tuple(zip(starts, [*starts[1:], n]))


def _unit_actions(mask: np.ndarray, units) -> np.ndarray:
    """``[steps, units]``: each run's action (the action of its first layer)."""
    return _layer_actions(mask)[:, [lo for lo, _ in units]]


def _unit_plan(plan: CachePlan, lo: int, hi: int) -> CachePlan:
    """The plan whose cached body is body layers ``[lo, hi)`` of ``plan`` (for reuse modes)."""
    return CachePlan(plan.network, cached_layers=hi - lo, first_layers=plan.first_layers + lo)


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


def _row_runs(ids: np.ndarray, max_period: int = 8) -> list[tuple[int, int, tuple]]:
    """A sequence of step-function ids as runs the program scans over.

    The ids are first cut into items ``(id, count)`` of equal consecutive ids (a scan of
    ``count`` steps). ``(start, reps, items)``: ``reps`` repetitions of a pattern of up to
    ``max_period`` items from step ``start``, so an interval-like plan is one run (plus a
    shorter end) whatever the step count.
    """
    items: list[tuple[int, int]] = []
    starts: list[int] = []
    for step, row_id in enumerate(int(r) for r in ids):
        if items and items[-1][0] == row_id:
            items[-1] = (row_id, items[-1][1] + 1)
        else:
            items.append((row_id, 1))
            starts.append(step)
    runs = []
    for i, period, reps in _repeats(items, max_period):
        runs.append((starts[i], reps, tuple(items[i : i + period])))
    return runs


def _repeats(items: list, max_period: int) -> list[tuple[int, int, int]]:
    """``items`` cut into repetitions of patterns: ``(start, period, reps)`` each, in order.

    At each position the pattern of at most ``max_period`` items that repeats over the most
    items wins (one item, once, if none repeats).
    """
    out = []
    i = 0
    while i < len(items):
        best_period, best_reps = 1, 1
        for period in range(1, max_period + 1):
            pattern = items[i : i + period]
            if len(pattern) < period:
                break
            reps = 1
            while items[i + reps * period : i + (reps + 1) * period] == pattern:
                reps += 1
            if reps > 1 and reps * period > best_reps * best_period:
                best_period, best_reps = period, reps
        out.append((i, best_period, best_reps))
        i += best_period * best_reps
    return out


def _computed_steps(schedule: np.ndarray) -> np.ndarray:
    """Which steps compute the body under a known schedule (refreshes, and plain steps)."""
    schedule = np.asarray(schedule, bool)
    first = np.flatnonzero(schedule)
    computed = schedule.copy()
    computed[: first[0] if len(first) else len(schedule)] = True
    return computed


def _step_actions(schedule: np.ndarray) -> list[str]:
    """Each step's action under a known schedule: ``"plain"`` before the first refresh (run,
    store nothing), ``"refresh"``, or ``"reuse"``."""
    schedule = np.asarray(schedule, bool)
    stored = np.logical_or.accumulate(schedule)
    return ["refresh" if s else "reuse" if seen else "plain" for s, seen in zip(schedule, stored)]


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
    for i, period, reps in _repeats(lengths, max_period):
        runs.append(("groups", starts[i], reps, tuple(lengths[i : i + period])))
    return runs


def _concat(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
