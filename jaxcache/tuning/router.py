"""Learning-to-Cache: a router that learns, for every step and body layer, whether to compute.

Learning-to-Cache (Ma et al., 2024) gives each (model evaluation, layer) pair a learnable logit.
While training, the layer's output is a mix of the computed and the reused value,
``g * layer(h) + (1 - g) * reuse(h)`` with ``g = sigmoid(logit)``
(:class:`~jaxcache.LayerGates`: every layer runs, so the sample is differentiable in the gates);
the loss is the mean squared error of the final sample against full compute plus ``lam`` times
the L1 norm of the gates (the computed fraction), so the gates of layers that matter little
fall. At inference a threshold turns the gates into a static per-(step, layer) plan
(:class:`~jaxcache.LayerMaskPolicy`), compiled with no decision in the loop.

:func:`train_router` differentiates through the sampler's own compiled loop (``remat=True``),
with Optax (Adam): one program for every iteration. It shows a progress line, writes a
checkpoint every ``checkpoint_every`` iterations and resumes from one exactly (the logits, the
optimiser's state and the iteration are saved; each iteration's minibatch depends only on the
seed and the iteration).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache.plan import CachePlan
from jaxcache.policies.layer_mask import LayerGates, LayerMaskPolicy
from jaxcache.tuning.run import CalibrationRun, takes_a_run

PyTree = Any

__all__ = ["Router", "train_router"]

_FORMAT = "jaxcache-router-1"


def _identity(plan: CachePlan, params, solver, num_steps: int) -> dict[str, Any]:
    """What a router is made for: the plan's layers, the solver and the step count."""
    return dict(
        depth=int(plan.total_layers(params)),
        first_layers=int(plan.first_layers),
        cached_layers=int(plan.cached_layers),
        solver=repr(solver),
        num_steps=int(num_steps),
        evaluations=len(solver.times(num_steps)[0]),
    )


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"Router threshold must be a number in [0, 1), got {threshold!r}")
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(
            f"Router threshold must be in [0, 1) (a layer runs where its gate exceeds it; 0 "
            f"runs every layer), got {threshold!r}"
        )
    return float(threshold)


@dataclasses.dataclass(frozen=True)
class Router:
    """A trained router: one logit per (model evaluation, body layer), and what it is for.

    Attributes:
      logits: ``[evaluations, cached_layers]`` float32 (numpy).
      identity: the plan's ``depth``, ``first_layers`` and ``cached_layers``, the solver
        (its ``repr``), ``num_steps`` and ``evaluations`` it was trained for; a router is
        refused for any other (:meth:`check`).
    """

    logits: np.ndarray
    identity: dict[str, Any]

    @property
    def gates(self) -> np.ndarray:
        """``sigmoid(logits)``: how much each layer's computed output counted in training."""
        return 1.0 / (1.0 + np.exp(-np.asarray(self.logits, np.float64)))

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        """``[evaluations, cached_layers]`` bool: the layers whose gate exceeds ``threshold``."""
        return self.gates > _check_threshold(threshold)

    def policy(self, threshold: float = 0.5) -> LayerMaskPolicy:
        """The static per-(step, layer) plan at ``threshold`` (0 computes every layer)."""
        return LayerMaskPolicy(self.mask(threshold))

    def budget_mask(self, fraction: float) -> np.ndarray:
        """The plan computing ``fraction`` of the body-layer evaluations, by the largest gates.

        Every layer computes at evaluation 0 (nothing is stored before it, so a layer skipped
        there would run anyway); the rest of the budget goes to the largest gates. This sets a
        budget exactly where a threshold would land near it.

        Args:
          fraction: the share of ``evaluations x cached_layers`` to compute, in ``(0, 1]``; at
            least the first evaluation's layers are computed.
        """
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        gates = self.gates
        steps, layers = gates.shape
        count = max(layers, int(math.floor(fraction * steps * layers + 1e-9)))
        mask = np.zeros_like(gates, bool)
        mask[0] = True
        rest = np.argsort(-gates[1:], axis=None, kind="stable")[: count - layers]
        mask[1:].reshape(-1)[rest] = True
        return mask

    def computed_fraction(self, threshold: float = 0.5) -> float:
        """The fraction of body-layer evaluations the plan at ``threshold`` computes."""
        return float(np.mean(self.mask(threshold)))

    def check(self, plan: CachePlan, params, *, solver, num_steps: int) -> None:
        """Raises a ValueError unless the router was trained for this plan, solver and steps."""
        want = _identity(plan, params, solver, num_steps)
        if want != self.identity:
            diff = {k: (self.identity.get(k), v) for k, v in want.items()
                    if self.identity.get(k) != v}
            raise ValueError(
                "this router was trained for another model or run: "
                + ", ".join(f"{k}: trained for {a!r}, given {b!r}" for k, (a, b) in diff.items())
            )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the router to ``path`` (an ``.npz``: the logits and the identity as JSON)."""
        np.savez(path, logits=np.asarray(self.logits, np.float32),
                 identity=np.asarray(json.dumps(dict(self.identity, format=_FORMAT))))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Router:
        """Reads a router written by :meth:`save` (check it with :meth:`check` before use)."""
        with np.load(path, allow_pickle=False) as data:
            if "logits" not in data or "identity" not in data:
                raise ValueError(f"{path} is not a saved router (no logits or identity)")
            identity = json.loads(str(data["identity"]))
            logits = np.asarray(data["logits"], np.float32)
        if identity.pop("format", None) != _FORMAT:
            raise ValueError(f"{path} is not a router of format {_FORMAT}")
        shape = (identity["evaluations"], identity["cached_layers"])
        if logits.shape != shape:
            raise ValueError(f"{path}: logits of shape {logits.shape}, its identity says {shape}")
        return cls(logits, identity)


class _Progress:
    """One line on stderr, rewritten each iteration: count, bar, loss, computed fraction."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.total, self.enabled, self.start = total, enabled, start
        self.began = time.perf_counter()

    def show(self, done: int, loss: float, fraction: float) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / self.total)
        rate = (done - self.start) / max(time.perf_counter() - self.began, 1e-9)
        sys.stderr.write(
            f"\rrouter {done}/{self.total} [{'#' * filled}{'.' * (width - filled)}] loss "
            f"{loss:.4g} gates {fraction:.3f} ({rate:.2f} it/s)"
        )
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@takes_a_run
def train_router(
    run: CalibrationRun,
    *,
    reuse=None,
    lam: float = 0.01,
    iterations: int = 100,
    batch_size: int | None = None,
    learning_rate: float = 0.05,
    initial_logit: float = 2.0,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 25,
    progress: bool = True,
    log: Callable[[int, float, float], None] | None = None,
    remat: bool = True,
) -> Router:
    """Trains a Learning-to-Cache router for one model, plan, solver and step count.

    Args:
      run: the batch and how it is sampled, passed as ``plan, params, noise, cond, *, solver,
        num_steps, uncond=None, guidance_scale=None, key=None`` (:class:`CalibrationRun`): the
        plan whose body layers the router gates, a training batch ``[N, ...]`` of its own (not
        the samples you evaluate); the router has one row per model evaluation.
      reuse: what a skipped layer uses (default :class:`~jaxcache.ResidualReuse`: the layer's
        stored residual added to its current input, as Learning-to-Cache reuses).
      lam: the weight of the gates' L1 norm (their mean): larger computes less. 0 trains for
        quality alone.
      iterations: Adam steps (in all, counting those of a resumed checkpoint).
      batch_size: samples per iteration, drawn from ``noise`` without replacement each pass
        (None: all of them every iteration).
      learning_rate: Adam's learning rate.
      initial_logit: every logit's start (2.0: gates of 0.88, close to full compute).
      seed: the minibatch order's seed.
      checkpoint: a path (``.npz``) to save the training state to every ``checkpoint_every``
        iterations and at the end; if it exists, training resumes from it (its settings must
        match), continuing exactly as an uninterrupted run would.
      checkpoint_every: iterations between checkpoints.
      progress: show a progress line on stderr.
      log: called with ``(iteration, loss, mean gate)`` after each iteration (reads them back).
      remat: rematerialise each step in the backward pass (one step's activations at a time).

    Returns:
      The :class:`Router`.

    Raises:
      ValueError: for bad settings (``iterations < 1``, a batch size outside ``[1, N]``, a
        negative ``lam``, ...) or a checkpoint made with other settings, before training.
    """
    import optax  # a declared dependency, loaded only when training

    from jaxcache.reuse import ResidualReuse

    for name, value, low in (("iterations", iterations, 1), ("checkpoint_every",
                                                             checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"train_router: {name} must be an int >= {low}, got {value!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"train_router: lam must be a finite number >= 0, got {lam!r}")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"train_router: learning_rate must be > 0, got {learning_rate!r}")
    if run.plan.cached_layers < 1:
        raise ValueError("train_router: the plan caches no layer (cached_layers == 0)")
    rows = int(run.noise.shape[0])
    batch = rows if batch_size is None else batch_size
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not (
        1 <= batch <= rows
    ):
        raise ValueError(f"train_router: batch_size must be an int in [1, {rows}], got "
                         f"{batch_size!r}")
    reuse = ResidualReuse() if reuse is None else reuse
    identity = _identity(run.plan, run.params, run.solver, run.num_steps)
    shape = (identity["evaluations"], identity["cached_layers"])
    settings = dict(lam=float(lam), batch_size=int(batch), learning_rate=float(learning_rate),
                    initial_logit=float(initial_logit), seed=int(seed), reuse=repr(reuse),
                    rows=rows, guidance_scale=run.guidance_scale)

    def final(policy, noise, cond, uncond, remat=False):
        rows = dataclasses.replace(run, noise=noise, cond=cond, uncond=uncond)
        return rows.sample(policy=policy, reuse=reuse, remat=remat).sample.astype(jnp.float32)

    # The target: full compute, once, before training.
    target = jax.lax.stop_gradient(final(None, run.noise, run.cond, run.uncond))
    optimizer = optax.adam(learning_rate)

    def loss(logits, noise, cond, uncond, target):
        gates = jax.nn.sigmoid(logits)
        error = final(LayerGates(gates), noise, cond, uncond, remat) - target
        return jnp.mean(jnp.square(error)) + lam * jnp.mean(gates), jnp.mean(gates)

    @jax.jit
    def update(logits, opt_state, noise, cond, uncond, target):
        (value, mean_gate), grad = jax.value_and_grad(loss, has_aux=True)(
            logits, noise, cond, uncond, target)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grad, opt_state)
        return optax.apply_updates(logits, updates), opt_state, value, mean_gate

    logits = jnp.full(shape, initial_logit, jnp.float32)
    opt_state = optimizer.init(logits)
    done = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        logits, opt_state, done = _resume(checkpoint, opt_state, identity, settings, shape)

    def batch_rows(iteration: int) -> np.ndarray:
        """The rows of ``iteration``: a fresh permutation each pass over the data."""
        per_pass = rows // batch
        order = np.random.default_rng([seed, iteration // per_pass]).permutation(rows)
        part = iteration % per_pass
        return order[part * batch:(part + 1) * batch]

    def take(tree, index):
        return None if tree is None else jax.tree.map(lambda a: a[index], tree)

    bar = _Progress(iterations, progress, start=done)
    for iteration in range(done, iterations):
        index = batch_rows(iteration) if batch < rows else np.arange(rows)
        logits, opt_state, value, mean_gate = update(
            logits, opt_state, take(run.noise, index), take(run.cond, index),
            take(run.uncond, index), target[index])
        if log is not None or progress:
            value, mean_gate = float(value), float(mean_gate)
            bar.show(iteration + 1, value, mean_gate)
            if log is not None:
                log(iteration, value, mean_gate)
        finished = iteration + 1
        if checkpoint is not None and (finished % checkpoint_every == 0 or finished == iterations):
            _save_state(checkpoint, logits, opt_state, finished, identity, settings)
    return Router(np.asarray(logits, np.float32), identity)


def _save_state(path, logits, opt_state, done, identity, settings) -> None:
    """The training state, written to a temporary file and renamed (never half written)."""
    leaves = {f"opt_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(opt_state))}
    meta = json.dumps(dict(format=_FORMAT + "-training", identity=identity, settings=settings,
                           done=int(done)))
    tmp = f"{os.fspath(path)}.tmp.npz"
    np.savez(tmp, logits=np.asarray(logits), meta=np.asarray(meta), **leaves)
    os.replace(tmp, path)


def _resume(path, opt_state, identity, settings, shape):
    """``(logits, opt_state, done)`` from a checkpoint of the same training, or raises."""
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data:
            raise ValueError(f"{path} is not a router training checkpoint")
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != _FORMAT + "-training":
            raise ValueError(f"{path} is not a router training checkpoint")
        if meta["identity"] != identity:
            raise ValueError(
                f"{path} was written training for {meta['identity']}, not {identity}: "
                "remove it or give another checkpoint path"
            )
        if meta["settings"] != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{path} was written with settings {meta['settings']}, not {settings}: resume "
                "with the same settings (only iterations may grow)"
            )
        logits = jnp.asarray(data["logits"])
        treedef = jax.tree.structure(opt_state)
        leaves = [jnp.asarray(data[f"opt_{i}"]) for i in range(treedef.num_leaves)]
    if logits.shape != shape:
        raise ValueError(f"{path}: logits of shape {logits.shape}, expected {shape}")
    return logits, jax.tree.unflatten(treedef, leaves), int(meta["done"])
