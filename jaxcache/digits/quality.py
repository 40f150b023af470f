"""What caching costs: cache settings measured against full compute on a trained digit model.

For each setting (cached layers, interval) the cached sampler runs on the same noise and classes
as the full-compute sampler. Reported per setting: layer evaluations, ideal speedup (matrix
FLOPs), measured speedup (medians of back-to-back timed runs, after compilation), PSNR, SSIM and
relative L1 of the cached images against the full-compute images, and the data-side scores of
the cached images: the digit classifier's accuracy against the requested class and the Frechet
distance of its features to the real held-out digits.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache import sampler
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
from jaxcache.network import from_nnx
from jaxcache.plan import CachePlan
from jaxcache.policies import IntervalPolicy
from jaxcache.reuse import HermiteForecast, OutputReuse, TaylorForecast
from jaxcache.solvers import Solver

__all__ = ["REUSE_MODES", "SettingReport", "digit_scores", "evaluate_settings"]


@dataclasses.dataclass(frozen=True)
class SettingReport:
    """The figures of one cache setting (``cached_layers = 0`` is full compute).

    Attributes:
      cached_layers: layers ``[0, n)`` cached.
      interval: refresh interval.
      layer_evaluations: layer evaluations per sample.
      ideal_speedup: uncached over cached matrix FLOPs.
      speedup: measured uncached over cached wall time.
      seconds: median wall time of one batch.
      psnr: mean PSNR (dB) against full compute (``inf`` when identical).
      ssim: mean SSIM against full compute.
      relative_l1: mean relative L1 against full compute.
      accuracy: classifier accuracy against the requested classes.
      frechet: Frechet distance of classifier features to the real held-out digits.
      reuse: what skipped steps used (a :data:`REUSE_MODES` name), or ``"fewer steps"`` for
        uncached sampling with fewer steps (the honest baseline at equal compute).
      num_steps: the solver steps of this run.
      speedup_min: the slowest of the timed runs as a speedup (``speedup`` is the median).
      speedup_max: the fastest of the timed runs as a speedup.
    """

    cached_layers: int
    interval: int
    layer_evaluations: int
    ideal_speedup: float
    speedup: float
    seconds: float
    psnr: float
    ssim: float
    relative_l1: float
    accuracy: float
    frechet: float
    reuse: str = "reuse"
    num_steps: int = 0
    speedup_min: float = float("nan")
    speedup_max: float = float("nan")


#: What a skipped step uses, by the name a setting gives it.
REUSE_MODES = {
    "reuse": OutputReuse(),
    "taylor1": TaylorForecast(1),
    "taylor2": TaylorForecast(2),
    "hermite2": HermiteForecast(2),
}


def _key(setting: Sequence) -> tuple[int, int, str]:
    """A setting as ``(cached_layers, interval, reuse)`` (plain reuse when not given)."""
    n, interval, *rest = setting
    reuse = rest[0] if rest else "reuse"
    if reuse not in REUSE_MODES:
        raise ValueError(f"reuse must be one of {sorted(REUSE_MODES)}, got {reuse!r}")
    return int(n), int(interval), reuse


def _seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def evaluate_settings(
    model,
    labels: Sequence[int],
    settings: Sequence[tuple[int, int]],
    *,
    seed: int = 0,
    num_steps: int | None = None,
    guidance_scale: float | None = pretrained.DEFAULT_GUIDANCE,
    repeats: int = 3,
    solver: Solver | None = None,
    classifier: DigitClassifier | None = None,
    real_images: Any = None,
    fewer_steps: Sequence[int] = (),
) -> tuple[SettingReport, list[SettingReport], dict[tuple[int, int], np.ndarray]]:
    """Samples the digits in ``labels`` under each cache setting and scores them.

    Args:
      model: a digit model (:func:`jaxcache.digits.pretrained.load_digits_model`).
      labels: the requested classes, one sample each.
      settings: ``(cached_layers, interval)`` or ``(cached_layers, interval, reuse)``, with
        ``cached_layers`` in ``[1, depth]`` and ``reuse`` a :data:`REUSE_MODES` name (default
        ``"reuse"``: the reference's plain reuse; ``"taylor1"``: the order-1 forecast).
      seed: seed of the shared initial noise.
      num_steps: solver steps; None: the model's recipe's
        (:func:`jaxcache.digits.pretrained.recipe_of`: 20 Euler steps for flow matching, 50 DDIM
        steps for noise prediction).
      guidance_scale: classifier-free guidance scale (None: off).
      repeats: timed runs per setting (medians are reported).
      solver: the solver; None: the model's recipe's.
      classifier: the digit classifier (default: the shipped one).
      real_images: real digits for the Frechet distance (default: the held-out split).
      fewer_steps: step counts to sample uncached with, scored against full compute at
        ``num_steps`` (the honest baseline: fewer steps at the compute of a cached setting).

    Returns:
      ``(full, reports, images)``: the full-compute report, one report per setting then one
      per ``fewer_steps`` count (``reuse="fewer steps"``), and the images of every run keyed
      by ``(cached_layers, interval, reuse)`` (``(0, 1, "reuse")``: full compute;
      ``(0, 1, "steps<k>")``: ``k`` uncached steps).

    Raises:
      ValueError: for a setting outside the model's depth or an interval below 1.
    """
    recipe = pretrained.recipe_of(model)
    solver = solver or recipe.solver
    num_steps = recipe.num_steps if num_steps is None else check_int(num_steps, "num_steps")
    depth = model.config.depth
    settings = [_key(s) for s in settings]
    for n, interval, _ in settings:
        if not 1 <= n <= depth:
            raise ValueError(f"cached layers must be in [1, {depth}], got {n}")
        check_int(interval, "interval")
    cond = pretrained.class_condition(labels)
    classifier = classifier or default_classifier()
    if real_images is None:
        real_images, _ = load_digits_images(model.config.image_size, "test")
    real_features = np.asarray(extract_features(classifier, real_images))

    network, params = from_nnx(model)
    noise = jax.random.normal(jax.random.key(seed), (cond.shape[0], *model.config.image_shape))
    uncond = None if guidance_scale is None else jnp.full_like(cond, pretrained.NULL_CLASS)
    common = dict(solver=solver, num_steps=num_steps, uncond=uncond, guidance_scale=guidance_scale)

    # Through sampler.sample (keyword arguments), not a compiled program called with positional
    # ones: the compiled program's argument layout is the sampler's own business. Its jit cache
    # keeps one program per setting.
    programs, segments, steps_of = {}, {}, {}
    full_key = (0, 1, "reuse")
    for key in [full_key, *settings]:
        n, interval, reuse = key
        plan = CachePlan(network, n)
        seg = segments[key] = plan.split(params)
        policy = None if n == 0 else IntervalPolicy(interval)
        steps_of[key] = num_steps
        programs[key] = functools.partial(
            sampler.sample, plan, seg, noise, cond, policy=policy, reuse=REUSE_MODES[reuse],
            **common,
        )
    for k in fewer_steps:
        key = (0, 1, f"steps{check_int(k, 'fewer_steps')}")
        plan = CachePlan(network, 0)
        segments[key], steps_of[key] = segments[full_key], k
        programs[key] = functools.partial(
            sampler.sample, plan, segments[key], noise, cond, **dict(common, num_steps=k),
        )
    # Compile everything first (the first call of each), so timing sees only execution.
    outputs = jax.block_until_ready({key: fn() for key, fn in programs.items()})
    # Each program back to back after a warm call: on small CPU workloads the first call after
    # switching programs runs slower, which would bias an interleaved comparison. Full compute
    # is timed first and again last, so a drift during the sweep shows in its spread.
    seconds = {}
    for key in [*programs, full_key]:
        fn = programs[key]
        jax.block_until_ready(fn())
        seconds.setdefault(key, []).extend(_seconds(fn, repeats))

    full = jnp.clip(outputs[full_key].sample, -1.0, 1.0)
    full_seconds = statistics.median(seconds[full_key])

    full_flops = float(outputs[full_key].uncached_flops)

    def report(key) -> SettingReport:
        n, interval, reuse = key
        out = outputs[key]
        images = jnp.clip(out.sample, -1.0, 1.0)
        evaluations = int(out.layer_evaluations)
        med = statistics.median(seconds[key])
        feats = np.asarray(extract_features(classifier, images))
        psnr, ssim, relative_l1 = metrics.mean_image_scores(images, full)
        return SettingReport(
            cached_layers=n,
            interval=interval,
            layer_evaluations=evaluations,
            # Against full compute at num_steps (fewer-steps runs too): what ran, FLOP-weighted.
            ideal_speedup=full_flops / float(out.flops),
            speedup=full_seconds / med,
            speedup_min=full_seconds / max(seconds[key]),
            speedup_max=full_seconds / min(seconds[key]),
            num_steps=steps_of[key],
            seconds=med,
            psnr=psnr,
            ssim=ssim,
            relative_l1=relative_l1,
            accuracy=accuracy(classifier, images, jnp.asarray(labels)),
            frechet=metrics.frechet_distance(feats, real_features),
            reuse="fewer steps" if reuse.startswith("steps") else reuse,
        )

    reports = {key: report(key) for key in programs}
    images = {key: np.asarray(jnp.clip(outputs[key].sample, -1, 1)) for key in programs}
    extra = [key for key in programs if key[2].startswith("steps")]
    return reports[full_key], [reports[key] for key in [*settings, *extra]], images


def digit_scores(
    images: Any,
    labels: Any,
    classifier: DigitClassifier | None = None,
    real_images: Any | None = None,
) -> dict[str, float]:
    """Class accuracy and classifier-feature Frechet distance of generated digits.

    Args:
      images: ``[N, S, S, 1]`` generated images in ``[-1, 1]``, ``N >= 2``.
      labels: ``[N]`` classes the images were conditioned on.
      classifier: the scoring classifier; ``None`` loads the shipped one
        (:func:`~jaxcache.digits.classifier.default_classifier`, 16x16 images).
      real_images: real images for the Frechet reference; ``None`` uses the held-out test split
        of :func:`~jaxcache.digits.data.load_digits_images` (359 images) at size ``S``.

    Returns:
      ``{"accuracy": float, "frechet": float}``.

    Raises:
      ValueError: on malformed inputs, or images whose size the classifier does not take.
    """
    model = default_classifier() if classifier is None else classifier
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be an NHWC batch [N, H, W, 1], got shape {images.shape}")
    if real_images is None:
        real_images, _ = load_digits_images(size=images.shape[1], split="test")
    acc = accuracy(model, images, labels)
    fd = metrics.frechet_distance(
        extract_features(model, images),
        extract_features(model, real_images),
    )
    return {"accuracy": acc, "frechet": fd}
