"""Training of a class-conditional diffusion transformer: flow matching or noise prediction.

The pieces a training script needs, kept in the library so they are tested:

* :func:`flow_matching_loss`: rectified-flow loss in the sampler's convention
  (``x_t = (1 - t) * data + t * noise``, target velocity ``noise - data``), sampled with
  :class:`~jaxcache.FlowMatchEuler`.
* :func:`epsilon_loss`: noise-prediction loss on the variance-preserving schedule of a
  :class:`~jaxcache.DDIM` (``x_k = sqrt(a_k) * data + sqrt(1 - a_k) * noise``, target ``noise``),
  sampled with that DDIM.
* :func:`make_optimizer`: AdamW with linear warmup, cosine decay and gradient clipping.
* :class:`TrainState`, :func:`init_train_state`: parameters, optimizer state and an EMA copy,
  all plain pytrees of arrays (nested dicts), so they serialise and compare directly.
* :func:`make_train_step`: one jitted step (buffers donated). Every random draw of step ``i``
  comes from ``jax.random.fold_in(key, i)``, so a run is reproducible and resumes bit-exactly
  from a checkpoint of its state and step.
* :func:`save_train_state`, :func:`restore_train_state`: a :class:`TrainState` in a
  :mod:`jaxcache.pretrained` checkpoint file (the EMA weights as the model, so the file is also
  a model to sample from).

The class label is the caption: ``caption_len`` copies of the class id, with a reserved
``null_class`` id for the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization

from jaxcache.digits import pretrained
from jaxcache.digits.data import random_shift
from jaxcache.solvers import DDIM

PyTree = Any

__all__ = [
    "TrainState",
    "class_tokens",
    "epsilon_loss",
    "flow_matching_loss",
    "init_train_state",
    "make_optimizer",
    "make_train_step",
    "restore_train_state",
    "sample_times",
    "save_train_state",
]

_TIME_SAMPLINGS = ("uniform", "logit_normal")


class TrainState(NamedTuple):
    """Everything a training step updates.

    Attributes:
      params: the model's parameters as a pure nested dict (``nnx.to_pure_dict``).
      opt_state: the optax state for ``params``.
      ema: an exponential moving average of ``params`` (the weights to sample with).
    """

    params: PyTree
    opt_state: PyTree
    ema: PyTree


def class_tokens(labels: jax.Array, caption_len: int) -> jax.Array:
    """Class ids ``[B]`` as captions ``[B, caption_len]``: the id repeated (traceable).

    No validation; see :func:`jaxcache.pretrained.class_condition` for checked host input.
    """
    labels = jnp.asarray(labels, jnp.int32)
    return jnp.broadcast_to(labels[:, None], (labels.shape[0], caption_len))


def sample_times(key: jax.Array, batch: int, method: str = "logit_normal") -> jax.Array:
    """Training times ``t`` in ``(0, 1)``, ``[batch]`` float32.

    Args:
      key: PRNG key.
      batch: number of times.
      method: ``"uniform"`` or ``"logit_normal"`` (``sigmoid(N(0, 1))``, as in SD3: it spends
        more steps at mid noise levels, where the velocity is hardest to predict).

    Raises:
      ValueError: for an unknown method.
    """
    if method == "uniform":
        return jax.random.uniform(key, (batch,), jnp.float32)
    if method == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    raise ValueError(f"time sampling must be one of {_TIME_SAMPLINGS}, got {method!r}")


def flow_matching_loss(
    model: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    images: jax.Array,
    cond: jax.Array,
    key: jax.Array,
    *,
    time_sampling: str = "logit_normal",
) -> jax.Array:
    """Rectified-flow loss: mean squared error of the predicted velocity.

    Draws ``t`` and ``noise``, forms ``x_t = (1 - t) * images + t * noise`` and regresses the
    model's output on ``noise - images`` (the :class:`~jaxcache.FlowMatchEuler` convention).

    Args:
      model: ``model(x, t, cond) -> velocity`` (an NNX reference model, or any callable).
      images: clean data ``[B, H, W, C]``.
      cond: the condition (caption ids ``[B, L]``).
      key: PRNG key for ``t`` and the noise.
      time_sampling: see :func:`sample_times`.

    Returns:
      The scalar float32 loss.
    """
    k_t, k_noise = jax.random.split(key)
    t = sample_times(k_t, images.shape[0], time_sampling)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    tb = t[:, None, None, None]
    x_t = (1.0 - tb) * images + tb * noise
    v = model(x_t, t, cond)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - images)))


def epsilon_loss(
    model: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    images: jax.Array,
    cond: jax.Array,
    key: jax.Array,
    *,
    schedule: DDIM = pretrained.EPS.solver,
    min_snr_gamma: float | None = None,
) -> jax.Array:
    """Noise-prediction (DDPM) loss: mean squared error of the predicted noise.

    Draws a training step ``k`` uniformly from ``0..num_train_steps - 1`` and ``noise``, forms
    ``x = sqrt(a) * images + sqrt(1 - a) * noise`` with ``a = schedule.alpha_bar(t)`` and regresses
    the model's output on ``noise``. The model sees ``t = k / num_train_steps``, the times
    :meth:`DDIM.times <jaxcache.DDIM.times>` feeds it when sampling, and ``alpha_bar`` is the
    solver's own, so training and sampling share one schedule.

    With ``min_snr_gamma`` each sample's error is weighted by ``min(snr, gamma) / snr``
    (``snr = a / (1 - a)``; Min-SNR weighting, Hang et al. 2023): the low-noise steps, whose
    noise the plain loss spends most of its effort on, count less, and the high-noise steps
    that decide a digit's shape keep full weight. On the digits it is what lets a noise-prediction
    model reach the flow models' class accuracy in a few thousand steps.

    Args:
      model: ``model(x, t, cond) -> noise`` (an NNX reference model, or any callable).
      images: clean data ``[B, H, W, C]``.
      cond: the condition (caption ids ``[B, L]``).
      key: PRNG key for ``k`` and the noise.
      schedule: the DDIM whose noise schedule is learned (default: the ``"eps"`` recipe's).
      min_snr_gamma: the Min-SNR ``gamma`` (> 0), or None for the plain (unweighted) loss.

    Returns:
      The scalar float32 loss.
    """
    k_t, k_noise = jax.random.split(key)
    n = schedule.num_train_steps
    k = jax.random.randint(k_t, (images.shape[0],), 0, n)
    # A table built as DDIM.times builds its grid, so training sees the very float32 times.
    t = jnp.asarray((np.arange(n) / n).astype(np.float32))[k]
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    a = schedule.alpha_bar(t)
    ab = a[:, None, None, None]
    x_t = jnp.sqrt(ab) * images + jnp.sqrt(1.0 - ab) * noise
    eps = model(x_t, t, cond)
    per_sample = jnp.mean(jnp.square(eps.astype(jnp.float32) - noise), axis=(1, 2, 3))
    if min_snr_gamma is not None:
        snr = a / (1.0 - a)
        per_sample = per_sample * jnp.minimum(snr, min_snr_gamma) / snr
    return jnp.mean(per_sample)


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup to ``learning_rate``, cosine decay to 0 at ``total_steps``.

    Args:
      learning_rate: peak learning rate.
      total_steps: length of the schedule (the planned number of steps).
      warmup_steps: linear warmup steps (clipped to ``total_steps``).
      weight_decay: decoupled weight decay.
      grad_clip: clip the global gradient norm to this (``0`` disables).

    Raises:
      ValueError: for a non-positive learning rate or step count.
    """
    if not learning_rate > 0 or total_steps < 1:
        raise ValueError(
            f"need learning_rate > 0 and total_steps >= 1, got {learning_rate}, {total_steps}"
        )
    warmup = max(0, min(warmup_steps, total_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, total_steps, end_value=0.0
    )
    adam = optax.adamw(schedule, b2=0.99, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip else adam


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
    """The initial :class:`TrainState` of ``model`` (EMA starts at the parameters).

    Returns:
      A state whose arrays are fresh copies (the train step donates them).
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(jnp.array, params)  # own copies: donation must not free the model's
    return TrainState(params, optimizer.init(params), jax.tree.map(jnp.array, params))


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    key: jax.Array,
    batch_size: int,
    caption_len: int,
    null_class: int,
    p_uncond: float = 0.1,
    max_shift: int = 1,
    ema_decay: float = 0.999,
    time_sampling: str = "logit_normal",
    objective: str = "flow",
    min_snr_gamma: float | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """Builds the jitted training step ``step(state, images, labels, i) -> (state, loss)``.

    Step ``i`` draws a batch (with replacement) from ``images``/``labels``, shifts it, drops
    labels to ``null_class`` with probability ``p_uncond`` (for classifier-free guidance), takes
    one optimizer step on the objective's loss and updates the EMA. All randomness comes
    from ``fold_in(key, i)``: the result depends only on the state, the data and ``i``, so a
    resumed run matches an uninterrupted one bit for bit. ``state`` is donated.

    Call it from a Python loop: on CPU, XLA runs the model's ops inside ``lax.scan`` on a slow
    path, and per-step calls let a caller log and checkpoint.

    Args:
      graphdef: the model's graph definition (``nnx.split(model)[0]``).
      optimizer: the optax transformation (e.g. :func:`make_optimizer`).
      key: the run's data key.
      batch_size: images per step.
      caption_len: caption tokens per class id (see :func:`class_tokens`).
      null_class: the id of the unconditional caption.
      p_uncond: probability of dropping a label to ``null_class``.
      max_shift: random translation of up to this many pixels per axis (0 disables).
      ema_decay: EMA decay; warmed up as ``min(ema_decay, (1 + i) / (10 + i))`` so early
        averages are not dominated by the random initialisation.
      time_sampling: see :func:`sample_times` (flow matching only; noise prediction draws its
        training steps uniformly).
      objective: ``"flow"`` (:func:`flow_matching_loss`) or ``"eps"`` (:func:`epsilon_loss` on
        the schedule of :data:`jaxcache.digits.pretrained.EPS`).
      min_snr_gamma: Min-SNR weighting of the ``"eps"`` loss (see :func:`epsilon_loss`); None
        for the plain loss. Only for ``"eps"``.

    Returns:
      The jitted step; ``i`` is an int32 scalar array (one compiled program for all steps).

    Raises:
      ValueError: for an unknown objective or time sampling, or a rate outside its range.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if time_sampling not in _TIME_SAMPLINGS:
        raise ValueError(f"time sampling must be one of {_TIME_SAMPLINGS}, got {time_sampling!r}")
    if objective not in pretrained.OBJECTIVES:
        raise ValueError(f"objective must be one of {pretrained.OBJECTIVES}, got {objective!r}")
    if min_snr_gamma is not None and (objective != "eps" or not min_snr_gamma > 0):
        raise ValueError(
            f"min_snr_gamma must be None or > 0, and only for the eps objective; got "
            f"{min_snr_gamma!r} with {objective!r}"
        )

    def loss_fn(params, x, cond, k):
        model = nnx.merge(graphdef, params)
        if objective == "eps":
            return epsilon_loss(model, x, cond, k, schedule=pretrained.EPS.solver,
                                min_snr_gamma=min_snr_gamma)
        return flow_matching_loss(model, x, cond, k, time_sampling=time_sampling)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: TrainState, images, labels, i):
        k_batch, k_shift, k_drop, k_loss = jax.random.split(jax.random.fold_in(key, i), 4)
        idx = jax.random.randint(k_batch, (batch_size,), 0, images.shape[0])
        x = random_shift(k_shift, images[idx], max_shift)
        y = jnp.where(jax.random.bernoulli(k_drop, p_uncond, (batch_size,)), null_class,
                      labels[idx])
        loss, grads = jax.value_and_grad(loss_fn)(
            state.params, x, class_tokens(y, caption_len), k_loss
        )
        # optax mixes its int32 step count with floats: let it, whatever the caller's promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        fi = i.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + fi) / (10.0 + fi))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        return TrainState(params, opt_state, ema), loss

    return step


def save_train_state(
    path: str,
    model: nnx.Module,
    state: TrainState,
    step: int,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes ``state`` as a checkpoint whose model holds the EMA weights.

    The raw weights go to ``extra["train_params"]`` and the optimizer state to the checkpoint's
    ``opt_state``, so :func:`restore_train_state` gets back the exact state.

    Args:
      path: destination file (written atomically, see :func:`jaxcache.pretrained.save_checkpoint`).
      model: a model of the architecture being trained (only its structure is used; it is not
        modified).
      state: the training state.
      step: the number of steps taken.
      extra: more metadata to store (string keys; ``"train_params"`` is reserved).
    """
    extra = dict(extra or {})
    if "train_params" in extra:
        raise ValueError('extra["train_params"] is reserved for the raw weights')
    extra["train_params"] = serialization.to_state_dict(jax.device_get(state.params))
    ema_model = nnx.merge(nnx.graphdef(model), state.ema)
    pretrained.save_checkpoint(path, ema_model, step=step, opt_state=state.opt_state, extra=extra)


def restore_train_state(
    checkpoint: pretrained.Checkpoint, optimizer: optax.GradientTransformation
) -> TrainState:
    """The :class:`TrainState` stored by :func:`save_train_state`, bit-exact.

    Args:
      checkpoint: the loaded checkpoint (:func:`jaxcache.pretrained.load_checkpoint`).
      optimizer: the run's optimizer (gives the structure of its state).

    Raises:
      ValueError: if the checkpoint holds no training state.
    """
    extra = checkpoint.extra
    if checkpoint.opt_state is None or not isinstance(extra, dict) or "train_params" not in extra:
        raise ValueError("the checkpoint holds no training state (saved without save_train_state)")
    ema = nnx.to_pure_dict(nnx.state(checkpoint.model, nnx.Param))
    params = serialization.from_state_dict(ema, extra["train_params"])
    opt_state = serialization.from_state_dict(optimizer.init(params), checkpoint.opt_state)
    # Fresh device arrays: the train step donates its state.
    return jax.tree.map(jnp.array, TrainState(params, opt_state, ema))
