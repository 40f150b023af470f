"""A small digit classifier that scores generated digits.

The classifier is trained on the real digits (:mod:`jaxcache.digits`) and used two ways on a
model's samples: its predictions give the accuracy against the requested class, and its
penultimate-layer features feed a Frechet distance to the real images
(:mod:`jaxcache.metrics`).

A trained copy ships with the package (``jaxcache/assets/digit_classifier.npz``, 16x16 images,
trained on the ``seed=0`` train split); :func:`default_classifier` loads it. The file is a plain
``numpy.savez`` archive: one array per parameter under its ``'/'``-joined NNX path, plus the
constructor config as JSON, so it loads without pickle.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcache._checks import check_int
from jaxcache.digits._files import write_atomically
from jaxcache.digits.data import NUM_CLASSES, random_shift

__all__ = [
    "DigitClassifier",
    "accuracy",
    "cross_entropy",
    "default_classifier",
    "extract_features",
    "load_classifier",
    "predict",
    "save_classifier",
    "train_classifier",
]

_FORMAT = "jaxcache.digit_classifier/1"
_CONFIG_KEY = "__config__"
_FORMAT_KEY = "__format__"
_ASSET = "digit_classifier.npz"
# Evaluation runs in fixed-size chunks so any number of images compiles one shape only.
_EVAL_CHUNK = 512


class DigitClassifier(nnx.Module):
    """A small CNN over ``[N, S, S, 1]`` digits in ``[-1, 1]``.

    ``conv3x3 -> relu -> avgpool2 -> conv3x3 -> relu -> avgpool2 -> dense -> relu -> dense``.
    At the defaults (16x16 input) it has 38,282 parameters.

    Attributes:
      config: the constructor arguments, as stored by :func:`save_classifier`.
    """

    def __init__(
        self,
        image_size: int = 16,
        channels1: int = 16,
        channels2: int = 32,
        features: int = 64,
        *,
        rngs: nnx.Rngs,
    ):
        """Builds the network.

        Args:
          image_size: height and width of the input images; a multiple of 4.
          channels1: channels of the first convolution.
          channels2: channels of the second convolution.
          features: width of the penultimate layer (the :meth:`features` dimension).
          rngs: random streams for parameter initialisation.

        Raises:
          ValueError: if a size is not a positive integer or ``image_size`` is not a multiple
            of 4.
        """
        self.config = dict(
            image_size=check_int(image_size, "image_size"),
            channels1=check_int(channels1, "channels1"),
            channels2=check_int(channels2, "channels2"),
            features=check_int(features, "features"),
        )
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.conv1 = nnx.Conv(1, channels1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(channels1, channels2, (3, 3), padding="SAME", rngs=rngs)
        flat = channels2 * (image_size // 4) ** 2
        self.fc = nnx.Linear(flat, features, rngs=rngs)
        self.head = nnx.Linear(features, NUM_CLASSES, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """Penultimate-layer activations ``[N, features]`` (after the ReLU)."""
        x = _avg_pool2(jax.nn.relu(self.conv1(images)))
        x = _avg_pool2(jax.nn.relu(self.conv2(x)))
        return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))

    def __call__(self, images: jax.Array) -> jax.Array:
        """Class logits ``[N, 10]`` for images ``[N, S, S, 1]`` in ``[-1, 1]``."""
        return self.head(self.features(images))


def _avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2: ``nnx.avg_pool``'s arithmetic (window sum, then / 4).

    ``nnx.avg_pool`` divides by an integer NumPy scalar, which strict dtype promotion refuses;
    dividing by the Python float 4.0 gives the same bits.
    """
    window = (1, 2, 2, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / 4.0


def _check_images(images: Any, image_size: int | None = None, name: str = "images") -> jax.Array:
    images = jnp.asarray(images, dtype=jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{name} must have shape [N, S, S, 1], got {tuple(images.shape)}")
    if image_size is not None and images.shape[1] != image_size:
        raise ValueError(
            f"{name} are {images.shape[1]}x{images.shape[2]} but the classifier expects "
            f"{image_size}x{image_size}"
        )
    return images


def _check_labels(labels: Any, n: int) -> jax.Array:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} "
                         f"{labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    return jnp.asarray(labels, dtype=jnp.int32)


@nnx.jit(static_argnames="what")
def _apply(model: DigitClassifier, images: jax.Array, what: str) -> jax.Array:
    return model.features(images) if what == "features" else model(images)


def _chunked(model: DigitClassifier, images: Any, what: str) -> np.ndarray:
    """Runs the model over ``images`` in padded fixed-size chunks; returns host arrays."""
    images = _check_images(images, model.config["image_size"])
    n = images.shape[0]
    chunk = min(_EVAL_CHUNK, max(n, 1))
    out = []
    for start in range(0, n, chunk):
        x = images[start:start + chunk]
        pad = chunk - x.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], -1.0, x.dtype)])
        out.append(np.asarray(_apply(model, x, what))[:chunk - pad])
    width = model.config["features"] if what == "features" else NUM_CLASSES
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def predict(model: DigitClassifier, images: Any) -> np.ndarray:
    """Class logits ``[N, 10]`` as a NumPy array, evaluated in chunks.

    Args:
      model: the classifier.
      images: ``[N, S, S, 1]`` images in ``[-1, 1]``, ``S`` the classifier's ``image_size``.

    Returns:
      ``float32 [N, 10]`` logits.
    """
    return _chunked(model, images, "logits")


def extract_features(model: DigitClassifier, images: Any) -> np.ndarray:
    """Penultimate-layer features ``[N, F]`` as a NumPy array, evaluated in chunks."""
    return _chunked(model, images, "features")


def accuracy(model: DigitClassifier, images: Any, labels: Any) -> float:
    """Fraction of ``images`` whose predicted class equals ``labels``.

    Args:
      model: the classifier.
      images: ``[N, S, S, 1]`` images in ``[-1, 1]``.
      labels: ``[N]`` integer classes in ``0..9``.

    Returns:
      Accuracy in ``[0, 1]``.
    """
    logits = predict(model, images)
    labels = np.asarray(_check_labels(labels, logits.shape[0]))
    if labels.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def cross_entropy(model: DigitClassifier, images: Any, labels: Any) -> float:
    """Mean softmax cross-entropy of the classifier on ``(images, labels)``."""
    logits = predict(model, images)
    labels = _check_labels(labels, logits.shape[0])
    return float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                                 labels).mean())


def train_classifier(
    images: Any,
    labels: Any,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
    max_shift: int = 1,
    weight_decay: float = 1e-4,
) -> DigitClassifier:
    """Trains a :class:`DigitClassifier` with AdamW and a cosine learning-rate decay.

    Each step is one compiled call; the run is deterministic given ``seed`` (parameter init,
    batch sampling with replacement, and augmentation all derive from it).

    Args:
      images: ``[N, S, S, 1]`` training images in ``[-1, 1]``; ``S`` a multiple of 4.
      labels: ``[N]`` integer classes in ``0..9``.
      steps: optimisation steps; 0 returns the freshly initialised model.
      batch_size: images per step.
      learning_rate: peak learning rate.
      seed: seed for initialisation, batches and augmentation.
      max_shift: random translation of up to this many pixels per axis (0 disables); small
        shifts help the classifier generalise to generated digits that sit slightly off-centre.
      weight_decay: decoupled weight decay.

    Returns:
      The trained classifier.

    Raises:
      ValueError: on malformed inputs or hyperparameters.
    """
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0])
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    check_int(steps, "steps", minimum=0)
    check_int(batch_size, "batch_size")
    check_int(max_shift, "max_shift", minimum=0)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    init_key, data_key = jax.random.split(jax.random.key(seed))
    model = DigitClassifier(image_size=images.shape[1], rngs=nnx.Rngs(params=init_key))
    if steps == 0:
        return model

    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # One jitted step driven from Python rather than one lax.scan: XLA:CPU runs convolutions
    # inside a while loop on a slow path (about 25x slower here).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state, images, labels, i):
        k_batch, k_shift = jax.random.split(jax.random.fold_in(data_key, i))
        idx = jax.random.randint(k_batch, (batch_size,), 0, images.shape[0])
        x = random_shift(k_shift, images[idx], max_shift)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, labels[idx])
        # optax mixes its int32 step count with floats: let it, whatever the caller's promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    for i in range(steps):
        params, opt_state, _ = step(params, opt_state, images, labels, jnp.int32(i))
    nnx.update(model, params)
    return model


def _flat_params(model: DigitClassifier) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(k) for k in path): np.asarray(var.get_value()) for path, var in flat}


def save_classifier(model: DigitClassifier, path: str | os.PathLike) -> None:
    """Writes the classifier's parameters and config to ``path`` (a ``.npz`` archive).

    The file is written to a temporary name beside ``path`` and renamed
    (:func:`~jaxcache.digits._files.write_atomically`), so a reader never sees half a file.

    Args:
      model: the classifier to save.
      path: destination file; written exactly there (no ``.npz`` suffix is added).
    """
    path = os.fspath(path)
    arrays = _flat_params(model)
    arrays[_CONFIG_KEY] = np.array(json.dumps(model.config, sort_keys=True))
    arrays[_FORMAT_KEY] = np.array(_FORMAT)
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_classifier(path: str | os.PathLike) -> DigitClassifier:
    """Loads a classifier written by :func:`save_classifier`.

    Args:
      path: the ``.npz`` file.

    Returns:
      The classifier, with parameters bit-identical to the saved ones.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a valid classifier archive (unreadable, wrong format tag,
        missing or extra parameters, or mismatched shapes or dtypes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable classifier archive: {e}") from e
    if arrays.pop(_FORMAT_KEY, None) != _FORMAT:
        raise ValueError(f"{path} is not a jaxcache digit classifier file ({_FORMAT})")
    try:
        config = json.loads(str(arrays.pop(_CONFIG_KEY)))
        # Build abstractly: the parameters are overwritten, so skip the random init.
        model = nnx.eval_shape(lambda: DigitClassifier(**config, rngs=nnx.Rngs(0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has a missing or invalid classifier config: {e}") from e

    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    expected = {"/".join(str(k) for k in p): v for p, v in flat}
    if set(expected) != set(arrays):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ValueError(f"{path} does not match the classifier: missing {missing}, "
                         f"unexpected {extra}")
    for key, var in expected.items():
        want, got = var.get_value(), arrays[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"{path}: parameter {key} is {got.dtype}{list(got.shape)}, "
                             f"expected {want.dtype}{list(want.shape)}")
        var.set_value(jnp.asarray(got))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def default_classifier() -> DigitClassifier:
    """Loads the classifier shipped with jaxcache (16x16 digits, ``seed=0`` train split).

    Returns:
      A fresh :class:`DigitClassifier`; each call loads its own copy.
    """
    ref = importlib.resources.files("jaxcache.digits").joinpath("assets", _ASSET)
    with importlib.resources.as_file(ref) as path:
        return load_classifier(path)
