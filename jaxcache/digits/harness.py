"""One evaluation harness for the digit studies: a setting in, a row out.

A :class:`Setting` is one way to sample: a step count, and for a cached run a plan builder, a
refresh policy and a reuse mode. An :class:`Evaluator` holds one trained digit model and one
batch (noise and classes, shared by every setting), the digit classifier and the real held-out
digits' features. :meth:`Evaluator.evaluate` samples every setting, times each, and scores each
against the first setting, full compute, as a :class:`Row`: layer evaluations per sample and
per batch, the ideal speedup (matrix FLOPs), the measured speedup with its spread, PSNR, SSIM
and relative L1 against full compute, the classifier's accuracy against the requested classes,
the Frechet distance of its features to the real digits, and the share of the body computed at
each step.

Any policy and reuse mode make a setting, the harness unchanged: a sample's own layer
evaluations are read from what ran (``SampleResult.layers_computed``, layer by layer) where every
row decided alike, and from each row's own decisions (``SampleResult.body_computed``) where
rows differed (a signal-driven policy), as if each sample had been sampled alone.

Example:
  >>> from jaxcache.digits import harness, pretrained                 # doctest: +SKIP
  >>> model = pretrained.load_digits_model("dit")                     # doctest: +SKIP
  >>> evaluator = harness.Evaluator(model, [0, 1, 2, 3])              # doctest: +SKIP
  >>> full, cached = evaluator.evaluate([                             # doctest: +SKIP
  ...     harness.Setting.full(20), harness.Setting.interval(2, "taylor1", num_steps=20)])
  >>> cached.ideal_speedup, cached.psnr                               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int
from jaxcache.digits import pretrained
from jaxcache.digits.classifier import (
    DigitClassifier,
    accuracy,
    default_classifier,
    extract_features,
)
from jaxcache.digits.data import load_digits_images
from jaxcache.evaluation import metrics
from jaxcache.guidance import CFGCache
from jaxcache.network import Network
from jaxcache.nnx import from_nnx
from jaxcache.plan import CachePlan
from jaxcache.policies import IntervalPolicy, RefreshPolicy
from jaxcache.policies.sencache import is_whole_network
from jaxcache.reuse import (
    HermiteForecast,
    OutputReuse,
    ResidualReuse,
    ReuseMode,
    TaylorForecast,
)
from jaxcache.sampler import SampleResult, sample
from jaxcache.solvers import Solver
from jaxcache.tuning import threshold_for
from jaxcache.work import network_work

__all__ = [
    "REUSE_MODES",
    "Body",
    "Evaluator",
    "Row",
    "SampleWork",
    "Setting",
    "check_settings",
    "layers_per_sample",
]

#: What a skipped step uses, by the name a setting gives it.
REUSE_MODES: dict[str, ReuseMode] = {
    "reuse": OutputReuse(),
    "residual": ResidualReuse(),
    "taylor1": TaylorForecast(1),
    "taylor2": TaylorForecast(2),
    "hermite2": HermiteForecast(2),
    # HiCache order 1 on the residual at the contraction that did best at 4x on 80 digits.
    "hicache1": HermiteForecast(1, scale=0.65, residual=True),
}

PlanFn = Callable[[Network, int], CachePlan]


@dataclasses.dataclass(frozen=True)
class Body:
    """Which layers a setting caches: ``cached_layers`` layers after the first ``first``.

    A plan builder for :attr:`Setting.plan` (``Body()(network, depth)`` is a
    :class:`~jaxcache.CachePlan`), compared by value, so equal settings compare equal.

    Attributes:
      cached_layers: the layers of the body; None: every layer after the first ``first``.
      first: the layers that run every step before the body (First-Block's 1, DBCache's Fn).
    """

    cached_layers: int | None = None
    first: int = 0

    def __post_init__(self):
        if self.cached_layers is not None:
            check_int(self.cached_layers, "Body.cached_layers")
        check_int(self.first, "Body.first", minimum=0)

    def __call__(self, network: Network, depth: int) -> CachePlan:
        """The plan of this body in a network of ``depth`` layers.

        Raises:
          ValueError: if the body does not fit after the first ``first`` layers.
        """
        room = depth - self.first
        n = room if self.cached_layers is None else self.cached_layers
        if not 1 <= n <= room:
            raise ValueError(
                f"cached layers must be in [1, {room}] (a network of {depth} layers, "
                f"{self.first} before the body), got {n}"
            )
        return CachePlan(network, n, first_layers=self.first)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to sample.

    Attributes:
      family: what kind of setting, for tables: ``"full"``, ``"fewer steps"``, ``"interval"``,
        or a policy's name.
      mode: the reuse mode's label (``"-"`` when uncached).
      num_steps: solver steps.
      plan: ``plan(network, depth) -> CachePlan`` (a :class:`Body`); None: every layer cached.
      policy: the refresh policy; None samples uncached.
      reuse: the reuse mode; None: the sampler's default (plain reuse).
      knob: the setting's own parameter for tables (steps, interval or threshold).
      guidance: a :class:`~jaxcache.CFGCache` (cache steps run the conditional branch alone),
        for an evaluator with guidance; None: both branches every step.
    """

    family: str
    mode: str
    num_steps: int
    plan: PlanFn | None = None
    policy: RefreshPolicy | None = None
    reuse: ReuseMode | None = None
    knob: float | int | None = None
    guidance: CFGCache | None = None

    def __post_init__(self):
        for name in ("family", "mode"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Setting.{name} must be a str, got {getattr(self, name)!r}")
        check_int(self.num_steps, "Setting.num_steps")
        for name, kind in (("policy", RefreshPolicy), ("reuse", ReuseMode)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"Setting.{name} must be a {kind.__name__} instance or None, got {value!r}"
                )
        if self.guidance is not None and not isinstance(self.guidance, CFGCache):
            raise TypeError(f"Setting.guidance must be a CFGCache instance or None, got "
                            f"{self.guidance!r}")
        if self.plan is not None and not callable(self.plan):
            raise TypeError(f"Setting.plan must be plan(network, depth) -> CachePlan, got "
                            f"{self.plan!r}")
        if self.policy is None and (self.plan is not None or self.reuse is not None):
            raise ValueError("a Setting without a policy samples uncached: plan= and reuse= "
                             "apply only with a policy")

    @classmethod
    def full(cls, num_steps: int) -> Setting:
        """Full compute: uncached sampling with ``num_steps`` steps (the reference)."""
        return cls("full", "-", num_steps, knob=num_steps)

    @classmethod
    def fewer_steps(cls, num_steps: int) -> Setting:
        """Uncached sampling with ``num_steps`` steps: the baseline at a cached setting's cost."""
        return cls("fewer steps", "-", num_steps, knob=num_steps)

    @classmethod
    def interval(
        cls,
        interval: int,
        reuse: str | ReuseMode = "reuse",
        *,
        num_steps: int,
        cached_layers: int | None = None,
        mode: str | None = None,
    ) -> Setting:
        """The reference's schedule: the body runs every ``interval`` steps.

        Args:
          interval: the refresh interval.
          reuse: a :data:`REUSE_MODES` name, or a reuse mode (then label it with ``mode``).
          num_steps: solver steps.
          cached_layers: the body, layers ``[0, n)``; None: every layer.
          mode: the reuse mode's label; default the name given as ``reuse``.

        Raises:
          ValueError: for an unknown reuse mode name, or a reuse mode without a label.
        """
        if isinstance(reuse, str):
            if reuse not in REUSE_MODES:
                raise ValueError(f"reuse must be one of {sorted(REUSE_MODES)}, got {reuse!r}")
            mode, reuse = mode or reuse, REUSE_MODES[reuse]
        elif mode is None:
            raise ValueError("Setting.interval: label a reuse mode given as an object (mode=)")
        return cls("interval", mode, num_steps, Body(cached_layers), IntervalPolicy(interval),
                   reuse, knob=interval)


@dataclasses.dataclass(frozen=True)
class Row:
    """The scores of one setting against full compute (the evaluation's first setting).

    Attributes:
      family, mode, knob, num_steps: the setting's (see :class:`Setting`).
      cached_layers: the body's layers (0: uncached).
      layer_evaluations: one sample's layer evaluations, head and tail included (a guided step
        counts once, a CFG-Cache step one half), from its own decisions: as if sampled alone;
        SenCache's extra warm-up evaluations (its estimate) count whole.
      batch_layer_evaluations: the batch's (``SampleResult.layer_evaluations``): a step counts
        when any sample ran it.
      ideal_speedup: full compute's matrix FLOPs over one sample's of this setting.
      speedup: measured: the median wall time of full compute over this setting's.
      speedup_min: the same against this setting's slowest timed run.
      speedup_max: the same against its fastest.
      seconds: the median wall time of the batch.
      psnr: mean PSNR (dB) against full compute (``inf`` when identical).
      ssim: mean SSIM against full compute.
      relative_l1: mean relative L1 against full compute.
      accuracy: the classifier's accuracy against the requested classes.
      frechet: the Frechet distance of the classifier's features to the real held-out digits.
      computed_per_step: per model evaluation, the share of a sample's body layers computed
        (all ones when uncached).
    """

    family: str
    mode: str
    knob: float | int | None
    num_steps: int
    cached_layers: int
    layer_evaluations: float
    batch_layer_evaluations: int
    ideal_speedup: float
    speedup: float
    speedup_min: float
    speedup_max: float
    seconds: float
    psnr: float
    ssim: float
    relative_l1: float
    accuracy: float
    frechet: float
    computed_per_step: tuple[float, ...]

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict: non-finite numbers (identical images) as None."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


def check_settings(settings: Sequence[Setting]) -> list[Setting]:
    """``settings`` as a list, or a ValueError unless they are Settings, full compute first.

    Raises:
      ValueError: for no settings, something that is not a :class:`Setting`, or a first
        setting with a policy (every row is scored against the first, full compute).
    """
    settings = list(settings)
    if not settings:
        raise ValueError("settings is empty; give full compute first (Setting.full)")
    bad = [s for s in settings if not isinstance(s, Setting)]
    if bad:
        raise ValueError(f"settings must be Setting instances, got {bad[0]!r}")
    if settings[0].policy is not None:
        raise ValueError(
            f"the first setting must be full compute (no policy; Setting.full), got a "
            f"{settings[0].family!r} setting with {type(settings[0].policy).__name__}"
        )
    return settings


class SampleWork(NamedTuple):
    """What one sample computed, as if sampled alone (:func:`layers_per_sample`).

    Attributes:
      layers: ``[evaluations, depth]`` float64 in ``[0, 1]``, the share of each layer a sample
        ran at each evaluation: its sum is a sample's layer evaluations (a guided step counts
        once; a CFG-Cache step, which runs the conditional rows only, counts one half).
      steps: ``[evaluations]`` float64, the share of the embedding and final projection it ran
        (below 1 on CFG-Cache's cache steps, 0 where a whole-network policy skipped).
    """

    layers: np.ndarray
    steps: np.ndarray


def layers_per_sample(out: SampleResult, plan: CachePlan, *,
                      whole_network: bool = False) -> SampleWork:
    """Which layers ran for one sample at each evaluation, as if it had been sampled alone.

    Where every row decided alike at every step (every schedule known before sampling, a
    per-(step, layer) mask included), that is what ran: ``out.layers_computed``, halved on
    CFG-Cache's cache steps (``out.guidance_computed`` False: the unconditional rows did not
    run). Where rows differed (a signal-driven policy), the body ran for the batch whenever any
    row asked, and a row's own share of each step's body is the mean of ``out.body_computed``
    over the rows (the unconditional rows of a CFG-Cache step count as not computed, so this
    too halves it).

    Args:
      out: the run's :class:`~jaxcache.SampleResult`.
      plan: the plan it ran with.
      whole_network: the policy skips the whole network (:class:`~jaxcache.SenCachePolicy`):
        a row's decisions cover every layer and the embedding and final projection too.

    Returns:
      A :class:`SampleWork`.
    """
    layers = np.asarray(out.layers_computed, np.float64)
    evaluations = len(layers)
    share = np.ones(evaluations)
    if out.guidance_computed is not None:
        share = (1.0 + np.asarray(out.guidance_computed, np.float64)) / 2.0
    layers = layers * share[:, None]
    steps = share.copy()
    if whole_network:
        steps = steps * layers.any(axis=1)
    body = None if out.body_computed is None else np.asarray(out.body_computed)
    if body is None or body.size == 0 or _rows_alike(body, out.guidance_computed):
        return SampleWork(layers, steps)
    own = body.mean(axis=(1, 2))
    if whole_network:
        return SampleWork(np.repeat(own[:, None], layers.shape[1], axis=1), own)
    layers[:, plan.body_start : plan.body_stop] = own[:, None]
    return SampleWork(layers, steps)


def _rows_alike(body: np.ndarray, guidance_computed: Any) -> bool:
    """Whether every row that ran decided as the first at every evaluation (the unconditional
    rows of CFG-Cache's cache steps did not run, so they do not count)."""
    ran = np.ones(body.shape, bool)
    if guidance_computed is not None and body.shape[1] == 2:
        ran[:, 1] = np.asarray(guidance_computed, bool)[:, None]
    return bool(np.all((body == body[:, :1, :1]) | ~ran))


class Evaluator:
    """One model and one batch: samples settings and scores them against full compute.

    Args:
      model: a digit model (:func:`jaxcache.digits.pretrained.load_digits_model`).
      labels: the requested classes, one sample each.
      seed: seed of the shared initial noise.
      guidance: classifier-free guidance scale (None: off).
      solver: the solver; None: the model's recipe's
        (:func:`jaxcache.digits.pretrained.recipe_of`: Euler for flow matching, DDIM for noise
        prediction).
      repeats: timed runs per setting (medians are reported).
      classifier: the digit classifier (default: the shipped one).
      real_images: real digits for the Frechet distance (default: the held-out split).
      clock: the timer, seconds as a float.

    Attributes:
      num_steps: the recipe's step count (a default for settings).
    """

    def __init__(
        self,
        model,
        labels: Sequence[int],
        *,
        seed: int = 0,
        guidance: float | None = pretrained.DEFAULT_GUIDANCE,
        solver: Solver | None = None,
        repeats: int = 3,
        classifier: DigitClassifier | None = None,
        real_images: Any = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        recipe = pretrained.recipe_of(model)
        self.solver = solver or recipe.solver
        self.num_steps = recipe.num_steps
        self.repeats = check_int(repeats, "repeats")
        self.clock = clock
        self.network, self.params = from_nnx(model)
        self.depth = model.config.depth
        self.labels = np.asarray(labels)
        self.cond = pretrained.class_condition(labels)
        self.guidance = guidance
        self.uncond = None if guidance is None else jnp.full_like(self.cond,
                                                                  pretrained.NULL_CLASS)
        self.noise = jax.random.normal(
            jax.random.key(seed), (self.cond.shape[0], *model.config.image_shape)
        )
        self.classifier = classifier or default_classifier()
        if real_images is None:
            real_images, _ = load_digits_images(model.config.image_size, "test")
        self.real_features = np.asarray(extract_features(self.classifier, real_images))
        self._split: dict[tuple[int, int], Any] = {}
        # The FLOPs of each piece for the rows the network sees (both guidance branches).
        rows, cond_rows = self.noise, self.cond
        if self.uncond is not None:
            rows = jnp.concatenate([rows, rows])
            cond_rows = jnp.concatenate([self.cond, self.uncond])
        self.work = network_work(self.network, self.split(CachePlan(self.network, 0)), rows,
                                 cond_rows)

    def plan(self, setting: Setting) -> CachePlan:
        """The setting's plan: nothing cached when uncached, else its body (default all)."""
        if setting.policy is None:
            return CachePlan(self.network, 0)
        return (setting.plan or Body())(self.network, self.depth)

    def split(self, plan: CachePlan):
        """The model's parameters split for ``plan`` (once per head and body)."""
        key = (plan.first_layers, plan.cached_layers)
        if key not in self._split:
            self._split[key] = plan.split(self.params)
        return self._split[key]

    def program(self, setting: Setting) -> Callable[[], SampleResult]:
        """The setting's run on the batch, as a call with no arguments.

        Through :func:`jaxcache.sample` with keyword arguments (its jit cache keeps one
        program per setting), not a compiled program called with positional ones: the
        compiled program's argument layout is the sampler's own business.
        """
        plan = self.plan(setting)
        return functools.partial(
            sample, plan, self.split(plan), self.noise, self.cond, solver=self.solver,
            num_steps=setting.num_steps, policy=setting.policy, reuse=setting.reuse,
            uncond=self.uncond, guidance_scale=self.guidance, guidance=setting.guidance,
        )

    def run(self, setting: Setting) -> SampleResult:
        """Samples the batch under ``setting``."""
        return self.program(setting)()

    def images(self, setting: Setting) -> np.ndarray:
        """The batch sampled under ``setting``, clipped to ``[-1, 1]``."""
        return np.asarray(jnp.clip(self.run(setting).sample, -1.0, 1.0))

    def threshold_setting(self, setting: Setting, speedup: float, *, rows: int = 100) -> Setting:
        """``setting`` with its signal policy's threshold searched for an ideal speedup.

        The speedup is against uncached sampling at the setting's step count, for one sample
        from its own decisions, on the first ``rows`` samples. It is a budget of layer
        evaluations per sample (a run's FLOPs are linear in them, at the layers' mean cost);
        :func:`jaxcache.tuning.threshold_for` finds the least threshold within it (bisection on
        one compiled program: thresholds are traced), so the speedup reached is at least
        ``speedup``.

        Returns:
          The setting with the threshold in its policy and, rounded, in its ``knob``.
        """
        plan = self.plan(setting)
        evaluations = len(self.solver.times(setting.num_steps)[0])
        work = self.work
        if is_whole_network(setting.policy):  # a skip saves every layer and the step's own
            per_evaluation = float(np.sum(work.layers)) + work.step
            budget = (work.total(evaluations) / speedup - work.condition) / per_evaluation
            budget -= setting.policy.probe_evaluations(evaluations)  # within the budget
            budget *= len(work.layers)
        else:
            budget = (work.total(evaluations) / speedup - work.condition
                      - evaluations * work.step) / float(np.mean(work.layers))
        found = threshold_for(
            plan, self.split(plan), self.noise[:rows], self.cond[:rows], policy=setting.policy,
            solver=self.solver, num_steps=setting.num_steps, layer_budget=budget,
            per_sample=True, reuse=setting.reuse,
            uncond=None if self.uncond is None else self.uncond[:rows],
            guidance_scale=self.guidance,
        )
        return dataclasses.replace(setting, policy=found.policy, knob=round(found.threshold, 4))

    def _times(self, program: Callable[[], SampleResult]) -> list[float]:
        """Wall times of ``repeats`` back-to-back runs after a warm one."""
        jax.block_until_ready(program())
        times = []
        for _ in range(self.repeats):
            start = self.clock()
            jax.block_until_ready(program())
            times.append(self.clock() - start)
        return times

    def evaluate(
        self, settings: Sequence[Setting], *, log: Callable[[Row], None] | None = None
    ) -> list[Row]:
        """Samples the batch under every setting and scores each against the first.

        Every setting compiles (its first run) before any is timed. Then each is timed back to
        back after a warm call: on small CPU workloads the first call after switching programs
        runs slower, which would bias an interleaved comparison. Full compute is timed first
        and again last, so a drift during the sweep shows in its spread.

        Args:
          settings: the settings; the first must be full compute (no policy).
          log: called with each row as it is scored.

        Returns:
          One :class:`Row` per setting, in order.

        Raises:
          ValueError: for settings :func:`check_settings` refuses, or a body that does not fit
            the model (before anything compiles).
        """
        settings = check_settings(settings)
        if self.guidance is None and any(s.guidance is not None for s in settings):
            raise ValueError("a setting with CFGCache needs guidance: build the Evaluator with "
                             "guidance= a scale above 1")
        plans = [self.plan(s) for s in settings]
        programs = [self.program(s) for s in settings]
        outputs = [jax.block_until_ready(p()) for p in programs]
        times = [self._times(p) for p in programs]
        times[0] += self._times(programs[0])

        reference = jnp.clip(outputs[0].sample, -1.0, 1.0)
        full_seconds = statistics.median(times[0])
        full_flops = self.work.total(outputs[0].layers_computed.shape[0])
        rows = []
        for setting, plan, out, seconds in zip(settings, plans, outputs, times):
            images = jnp.clip(out.sample, -1.0, 1.0)
            own = layers_per_sample(out, plan, whole_network=is_whole_network(setting.policy))
            layers, steps = own.layers, own.steps
            if setting.policy is not None:  # evaluations beyond its steps (SenCache's probes)
                probes = setting.policy.probe_evaluations(len(layers))
                layers = np.concatenate([layers, np.ones((probes, layers.shape[1]))])
                steps = np.concatenate([steps, np.ones(probes)])
            body = own.layers[:, plan.body_start : plan.body_stop]
            computed = body.mean(axis=1) if plan.cached_layers else own.steps
            psnr, ssim, relative_l1 = metrics.mean_image_scores(images, reference)
            rows.append(Row(
                family=setting.family,
                mode=setting.mode,
                knob=setting.knob,
                num_steps=setting.num_steps,
                cached_layers=plan.cached_layers,
                layer_evaluations=float(layers.sum()),
                batch_layer_evaluations=int(out.layer_evaluations),
                ideal_speedup=full_flops / self.work.total(len(layers), layers, steps),
                speedup=full_seconds / statistics.median(seconds),
                speedup_min=full_seconds / max(seconds),
                speedup_max=full_seconds / min(seconds),
                seconds=statistics.median(seconds),
                psnr=psnr,
                ssim=ssim,
                relative_l1=relative_l1,
                accuracy=accuracy(self.classifier, images, jnp.asarray(self.labels)),
                frechet=metrics.frechet_distance(
                    np.asarray(extract_features(self.classifier, images)), self.real_features
                ),
                computed_per_step=tuple(float(c) for c in computed),
            ))
            if log is not None:
                log(rows[-1])
        return rows
