"""Digit scores of generated images: class accuracy and the Frechet distance to real digits.

The data-side scores of a set of samples, on their own: the shipped digit classifier's accuracy
against the requested classes, and the Frechet distance of its features to the real held-out
digits. Cache settings are scored against full compute by
:class:`jaxcache.digits.harness.Evaluator`, which reports these beside PSNR, SSIM and speed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcache.digits.classifier import (
    DigitClassifier,
    accuracy,
    default_classifier,
    extract_features,
)
from jaxcache.digits.data import load_digits_images
from jaxcache.evaluation import metrics

__all__ = ["digit_scores"]


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
