"""scikit-learn's handwritten digits as a small image data set for the example model.

``sklearn.datasets.load_digits`` holds 1,797 grayscale 8x8 digits (intensities 0..16, ten
classes) and ships inside the scikit-learn wheel, so nothing is downloaded. The images are
upsampled bilinearly to ``size x size`` and mapped to ``[-1, 1]``, the range the flow-matching
model works in.

The train/test split is stratified per class: each class's indices are permuted with a fixed
NumPy RNG and the first ``round(0.2 * n_class)`` go to the test split. With the default
``seed=0`` this gives **1,438 train and 359 test images**; the two splits are disjoint and
together cover all 1,797. The shipped digit classifier is trained on the ``seed=0`` train split,
so held-out scores are only meaningful on the ``seed=0`` test split.

:func:`random_shift` is the augmentation both trainers (generators and classifier) apply.

scikit-learn is an optional dependency (the ``examples`` extra); it is imported only when the
data is first loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcache._checks import check_int

__all__ = [
    "NUM_CLASSES",
    "TEST_FRACTION",
    "load_digits_images",
    "random_shift",
    "split_indices",
]

NUM_CLASSES = 10
"""Digit classes ``0..9``."""
TEST_FRACTION = 0.2

_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns the raw 8x8 images (float64, 0..16) and labels, read once per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # Optional extra: say exactly what to install.
        raise ImportError(
            "jaxcache.digits needs scikit-learn for its bundled digits data set; install it "
            "with `pip install scikit-learn` (or `pip install jaxcache[examples]`)."
        ) from e
    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)
    labels = np.asarray(data.target, dtype=np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """Indices of one split of a stratified 80/20 train/test partition.

    Args:
      labels: ``[N]`` integer class labels of the full data set.
      split: ``"train"``, ``"test"`` or ``"all"``.
      seed: seed of the NumPy RNG that permutes each class's indices.

    Returns:
      Sorted ``int64`` indices into ``labels``.

    Raises:
      ValueError: if ``split`` is not one of the three names.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    labels = np.asarray(labels)
    if split == "all":
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        # floor(x + 0.5): round half up, unlike Python's banker's rounding.
        n_test = int(np.floor(TEST_FRACTION * idx.size + 0.5))
        test.append(rng.permutation(idx)[:n_test])
    is_test = np.zeros(labels.shape[0], dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def load_digits_images(
    size: int = 16, split: str = "train", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Loads the scikit-learn digits as ``[-1, 1]`` images of a given size.

    Intensities ``0..16`` are scaled to ``[0, 1]``, resized bilinearly from 8x8 to
    ``size x size`` (``jax.image.resize``; a convex combination, so values stay in range), then
    mapped to ``[-1, 1]`` (background is ``-1``).

    Args:
      size: output height and width; a multiple of 8, at least 8 (8 returns the originals).
      split: ``"train"`` (1,438 images for ``seed=0``), ``"test"`` (359) or ``"all"`` (1,797, in
        the original order).
      seed: seed of the stratified split; 0 is the split the shipped classifier was trained on.

    Returns:
      ``(images, labels)``: NumPy ``float32 [N, size, size, 1]`` in ``[-1, 1]`` and
      ``int32 [N]`` in ``0..9``, in increasing original-index order.

    Raises:
      ValueError: if ``size`` or ``split`` is invalid.
      ImportError: if scikit-learn is not installed.
    """
    if check_int(size, "size", minimum=8) % 8:
        raise ValueError(f"size must be a multiple of 8, got {size}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    raw, labels = _raw_digits()
    idx = split_indices(labels, split, seed)
    x = jnp.asarray(raw[idx] / 16.0, dtype=jnp.float32)[..., None]
    if size != 8:
        x = jax.image.resize(x, (x.shape[0], size, size, 1), method="bilinear")
    images = np.asarray(jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0, dtype=np.float32)
    return images, np.array(labels[idx], dtype=np.int32)


def random_shift(
    key: jax.Array, images: jax.Array, max_shift: int, fill: float = -1.0
) -> jax.Array:
    """Shifts each image by up to ``max_shift`` pixels per axis, filling with ``fill``.

    Translations keep a digit a digit (unlike flips), so they are a safe augmentation.
    Traceable (it runs inside the jitted training steps).

    Args:
      key: PRNG key for the offsets.
      images: ``[N, H, W, C]`` images.
      max_shift: largest shift in pixels per axis; 0 returns ``images`` unchanged.
      fill: value of the pixels that enter from outside (the background, -1 for the digits).

    Returns:
      The shifted images, same shape and dtype.
    """
    if max_shift == 0:
        return images
    n, h, w, c = images.shape
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    # Pad with the background rather than wrapping, so no stroke enters from the far edge.
    padded = jnp.pad(images, pad, constant_values=fill)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)
