"""Image-quality and digit scores for judging cached sampling.

Two kinds of score:

* **Fidelity to the full-compute output** (same model, seed and condition): :func:`psnr`,
  :func:`ssim` and :func:`relative_l1`, one value per image, ``b`` being the reference.
* **Data-side scores**: :func:`frechet_distance` between two feature sets (e.g. a classifier's
  features of generated and of real images; :func:`jaxcache.digits.quality.digit_scores`).

Images are NHWC (``[N, H, W, C]``) in the model's ``[-1, 1]`` range unless a ``data_range``
says otherwise. These functions run outside the sampling loop; the per-image metrics are
jittable, the set-level ones work on the host in float64.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "frechet_distance",
    "mean_image_scores",
    "psnr",
    "relative_l1",
    "ssim",
]


def _dm_pix():
    try:
        import dm_pix
    except ImportError as e:  # Only PSNR / SSIM need it; fail with the fix, not a bare name.
        raise ImportError(
            "jaxcache.metrics.psnr / ssim need dm-pix; install it with `pip install dm-pix`."
        ) from e
    return dm_pix


def _pair(a: Any, b: Any) -> tuple[jax.Array, jax.Array]:
    """Validates two NHWC image batches of equal shape and returns them as float32."""
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be an NHWC batch [N, H, W, C], got shape {tuple(x.shape)} "
                f"(add a leading axis for a single image)"
            )
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got a {tuple(a.shape)} and "
                         f"b {tuple(b.shape)}")
    return a.astype(jnp.float32), b.astype(jnp.float32)


def _check_range(data_range: float) -> float:
    data_range = float(data_range)
    if not data_range > 0 or not np.isfinite(data_range):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    return data_range


def psnr(a: Any, b: Any, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range**2 / MSE)`` in dB.

    ``dm_pix.psnr`` assumes a dynamic range of 1 (``-10 log10(MSE)``); dividing both images by
    ``data_range`` first gives the PSNR for any range (the default 2.0 is the ``[-1, 1]`` range).

    Args:
      a: ``[N, H, W, C]`` images.
      b: ``[N, H, W, C]`` reference images, same shape as ``a``.
      data_range: difference between the largest and smallest possible pixel value.

    Returns:
      ``float32 [N]``; ``+inf`` where the two images are identical.

    Raises:
      ValueError: if the shapes differ or are not NHWC, or ``data_range`` is not positive.
    """
    a, b = _pair(a, b)
    r = _check_range(data_range)
    return _dm_pix().psnr(a / r, b / r)


def ssim(
    a: Any,
    b: Any,
    data_range: float = 2.0,
    *,
    low: float | None = None,
    filter_size: int = 7,
    filter_sigma: float = 1.5,
) -> jax.Array:
    """Structural similarity per image (mean of the SSIM map), via ``dm_pix.ssim``.

    SSIM's luminance term is not shift-invariant, so the images are first mapped to ``[0, 1]``
    with ``(x - low) / data_range`` (``low`` defaults to ``-data_range / 2``, i.e. the ``[-1, 1]``
    model range maps to ``[0, 1]``, as is usual before scoring generated images) and compared
    with ``max_val=1``. The Gaussian window is ``filter_size`` wide ("valid" filtering, so each
    image side must be at least that long); the default 7 fits 8x8 and 16x16 digits, where the
    common 11 would leave only a 6x6 map on 16x16 images. Identical images give exactly 1.0.

    Args:
      a: ``[N, H, W, C]`` images.
      b: ``[N, H, W, C]`` reference images, same shape as ``a``.
      data_range: width of the pixel value range.
      low: smallest possible pixel value; ``None`` means ``-data_range / 2``.
      filter_size: side of the Gaussian window, ``1 <= filter_size <= min(H, W)``.
      filter_sigma: standard deviation of the Gaussian window, in pixels.

    Returns:
      ``float32 [N]`` in ``[-1, 1]``.

    Raises:
      ValueError: if the shapes differ or are not NHWC, the window does not fit, or
        ``data_range`` / ``filter_sigma`` is not positive.
    """
    a, b = _pair(a, b)
    r = _check_range(data_range)
    if isinstance(filter_size, bool) or not isinstance(filter_size, (int, np.integer)) or not (
        1 <= filter_size <= min(a.shape[1], a.shape[2])
    ):
        raise ValueError(f"filter_size must be an integer in [1, min(H, W)] = "
                         f"[1, {min(a.shape[1], a.shape[2])}], got {filter_size!r}")
    if not filter_sigma > 0:
        raise ValueError(f"filter_sigma must be positive, got {filter_sigma}")
    lo = -r / 2 if low is None else float(low)
    return _ssim_program(a, b, jnp.float32(lo), jnp.float32(r), int(filter_size),
                         float(filter_sigma))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _ssim_program(a, b, lo, r, filter_size, filter_sigma):
    """SSIM of checked images as one compiled program (op by op, each new image shape would
    compile every one of dm-pix's operations on its own)."""
    # dm-pix mixes Python floats and int32 arrays, which strict dtype promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        value = _dm_pix().ssim((a - lo) / r, (b - lo) / r, max_val=1.0,
                               filter_size=filter_size, filter_sigma=filter_sigma)
    # Flat regions of identical images make the clipped (co)variances differ by rounding;
    # pin identical pairs to exactly 1, the value SSIM defines for them.
    same = jnp.all(a == b, axis=(1, 2, 3))
    return jnp.where(same, jnp.float32(1.0), value)


def relative_l1(a: Any, b: Any) -> jax.Array:
    """Relative L1 error per image, ``mean|a - b| / mean|b|``, with ``b`` the reference.

    Args:
      a: ``[N, H, W, C]`` images.
      b: ``[N, H, W, C]`` reference images, same shape as ``a``.

    Returns:
      ``float32 [N]``; 0 where ``a == b`` (even if ``b`` is all zero), ``inf`` where ``b`` is
      all zero and ``a`` is not.

    Raises:
      ValueError: if the shapes differ or are not NHWC.
    """
    a, b = _pair(a, b)
    num = jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))
    den = jnp.mean(jnp.abs(b), axis=(1, 2, 3))
    return jnp.where(num == 0, jnp.float32(0.0), num / den)


@jax.jit
def _mean_image_scores(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.mean(psnr(a, b)), jnp.mean(ssim(a, b)), jnp.mean(relative_l1(a, b))


def mean_image_scores(images: Any, reference: Any) -> tuple[float, float, float]:
    """Mean PSNR, SSIM and relative L1 of a batch of images against a reference batch.

    One compiled program (with the defaults of :func:`psnr` and :func:`ssim`: images in
    ``[-1, 1]``), rather than each metric's operations dispatched one by one.

    Returns:
      ``(psnr, ssim, relative_l1)`` as Python floats (PSNR is ``inf`` for identical batches).
    """
    return tuple(float(v) for v in _mean_image_scores(jnp.asarray(images), jnp.asarray(reference)))


def _features(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a [N, F] feature matrix, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` with sample means and
    unbiased covariances (``ddof=1``), in float64. The trace term is computed as
    ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))`` -- the same value, but the inner matrix is symmetric
    positive semi-definite, so two eigen-decompositions give it with no complex intermediate
    (``scipy.linalg.sqrtm`` of the non-symmetric ``S_a S_b`` returns tiny imaginary parts that
    would have to be clipped). Eigenvalues below zero from rounding are clipped to zero, and so
    is a final result of order ``-1e-12``.

    Args:
      feats_a: ``[N_a, F]`` features, ``N_a >= 2``.
      feats_b: ``[N_b, F]`` features, ``N_b >= 2``, same ``F``.

    Returns:
      The distance, ``>= 0``. With few samples per feature (``N < F``) the covariances are
      rank-deficient and the estimate is strongly biased upwards; compare values at equal ``N``.

    Raises:
      ValueError: if an input is not 2-D, has fewer than 2 rows or non-finite values, or the
        feature dimensions differ.
    """
    a = _features(feats_a, "feats_a")
    b = _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return float(max(fd, 0.0))
