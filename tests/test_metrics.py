"""Tests for jaxcache.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("dm_pix")

from jaxcache.evaluation import metrics as M  # noqa: E402


def _images(seed=0, shape=(4, 16, 16, 1)):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --- PSNR ---------------------------------------------------------------------------------------


def test_identical_images_give_inf_psnr_and_unit_ssim():
    x = _images()
    assert np.all(np.isposinf(np.asarray(M.psnr(x, x))))
    s = np.asarray(M.ssim(x, x))
    assert s.shape == (4,) and np.all(s == 1.0)
    # Flat images (all background) are the case where rounding would otherwise bite.
    flat = -np.ones((2, 16, 16, 1), np.float32)
    assert np.all(np.asarray(M.ssim(flat, flat)) == 1.0)


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
@pytest.mark.parametrize("delta_frac", [0.01, 0.05, 0.25])
def test_constant_offset_psnr_is_exact(data_range, delta_frac):
    delta = delta_frac * data_range
    b = _images() * (data_range / 4)
    a = b + np.float32(delta)
    expected = 10 * math.log10(data_range**2 / delta**2)
    np.testing.assert_allclose(np.asarray(M.psnr(a, b, data_range)), expected, atol=1e-4)


@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.3])
def test_gaussian_noise_psnr(sigma):
    b = np.zeros((1, 512, 512, 1), np.float32)
    a = b + np.random.default_rng(1).normal(0, sigma, b.shape).astype(np.float32)
    expected = 20 * math.log10(2.0 / sigma)
    assert abs(float(M.psnr(a, b)[0]) - expected) < 0.2


def test_psnr_matches_dm_pix_on_unit_range():
    import dm_pix

    a, b = (_images(0) + 1) / 2, (_images(1) + 1) / 2
    np.testing.assert_allclose(np.asarray(M.psnr(a, b, 1.0)), np.asarray(dm_pix.psnr(a, b)),
                               rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), s1=st.floats(0.01, 0.5), s2=st.floats(0.01, 0.5))
def test_psnr_symmetric_and_monotone_in_noise(seed, s1, s2):
    b = _images(seed, (2, 16, 16, 1))
    noise = np.random.default_rng(seed + 1).normal(size=b.shape).astype(np.float32)
    lo, hi = sorted((s1, s2))
    p_lo = np.asarray(M.psnr(b + lo * noise, b))
    p_hi = np.asarray(M.psnr(b + hi * noise, b))
    np.testing.assert_array_equal(p_lo, np.asarray(M.psnr(b, b + lo * noise)))
    assert np.all(p_lo >= p_hi - 1e-4)


# --- SSIM ---------------------------------------------------------------------------------------


def test_ssim_range_and_decreases_with_noise():
    b = _images(2) * 0.5
    noise = np.random.default_rng(3).normal(size=b.shape).astype(np.float32)
    s_small = np.asarray(M.ssim(b + 0.05 * noise, b))
    s_big = np.asarray(M.ssim(b + 0.5 * noise, b))
    assert np.all(s_small < 1.0) and np.all(s_big < s_small) and np.all(s_big > -1.0)


def test_ssim_low_and_range_conventions():
    a, b = _images(4), _images(5)
    ref = np.asarray(M.ssim((a + 1) / 2, (b + 1) / 2, 1.0, low=0.0))
    np.testing.assert_allclose(np.asarray(M.ssim(a, b)), ref, rtol=1e-5, atol=1e-6)
    # Shifting images and `low` together changes nothing.
    np.testing.assert_allclose(np.asarray(M.ssim(a + 3, b + 3, 2.0, low=2.0)), ref,
                               rtol=1e-4, atol=1e-5)


def test_ssim_filter_size():
    a, b = _images(6), _images(7)
    assert M.ssim(a, b, filter_size=11).shape == (4,)
    assert M.ssim(a[:, :8, :8], b[:, :8, :8]).shape == (4,)
    with pytest.raises(ValueError, match="filter_size"):
        M.ssim(a, b, filter_size=17)
    with pytest.raises(ValueError, match="filter_size"):
        M.ssim(a, b, filter_size=0)


# --- relative L1 --------------------------------------------------------------------------------


def test_relative_l1_known_values():
    a = _images(8)
    np.testing.assert_array_equal(np.asarray(M.relative_l1(a, a)), 0.0)
    ones = np.ones((2, 4, 4, 1), np.float32)
    np.testing.assert_allclose(np.asarray(M.relative_l1(1.5 * ones, ones)), 0.5)
    np.testing.assert_allclose(np.asarray(M.relative_l1(ones, -2 * ones)), 1.5)
    zeros = np.zeros_like(ones)
    np.testing.assert_array_equal(np.asarray(M.relative_l1(zeros, zeros)), 0.0)
    assert np.all(np.isposinf(np.asarray(M.relative_l1(ones, zeros))))


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [M.psnr, M.ssim, M.relative_l1])
def test_shape_validation(fn):
    x = _images()
    with pytest.raises(ValueError, match="same shape"):
        fn(x, x[:2])
    with pytest.raises(ValueError, match="^a must"):
        fn(x[0], x[0])
    with pytest.raises(ValueError, match="^b must"):
        fn(x, x[..., 0])


def test_data_range_validation():
    x = _images()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="data_range"):
            M.psnr(x, x, bad)


# --- Frechet distance ---------------------------------------------------------------------------


def _gauss(n=2000, f=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, f)) @ rng.normal(size=(f, f))


def test_frechet_self_is_zero():
    x = _gauss()
    assert M.frechet_distance(x, x) < 1e-8 * np.trace(np.cov(x, rowvar=False))


def test_frechet_shift_is_squared_mean_difference():
    x = _gauss()
    mu = np.arange(8, dtype=np.float64) / 4
    np.testing.assert_allclose(M.frechet_distance(x + mu, x), mu @ mu, rtol=1e-7)


def test_frechet_matches_sqrtm_reference():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = _gauss(500, 6, 1), _gauss(700, 6, 2) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy_linalg.sqrtm(ca @ cb).real
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * cross)
    np.testing.assert_allclose(M.frechet_distance(a, b), ref, rtol=1e-8)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 40), f=st.integers(1, 6))
def test_frechet_nonnegative_and_symmetric(seed, n, f):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, f)), rng.normal(size=(n + 3, f)) * 2
    d_ab, d_ba = M.frechet_distance(a, b), M.frechet_distance(b, a)
    assert d_ab >= 0
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-7, atol=1e-9)


def test_frechet_validation():
    x = _gauss(10, 3)
    with pytest.raises(ValueError, match="feats_a"):
        M.frechet_distance(x[:, 0], x)
    with pytest.raises(ValueError, match="feats_b"):
        M.frechet_distance(x, x[:1])
    with pytest.raises(ValueError, match="feature dimension"):
        M.frechet_distance(x, x[:, :2])
    with pytest.raises(ValueError, match="non-finite"):
        M.frechet_distance(x, np.full_like(x, np.nan))


# --- digit scores -------------------------------------------------------------------------------


def test_digit_scores_on_real_and_noisy_digits():
    pytest.importorskip("sklearn")
    from jaxcache.digits import classifier
    from jaxcache.digits import data as digits
    from jaxcache.digits.quality import digit_scores

    x_train, y_train = digits.load_digits_images(16, "train")
    real = digit_scores(x_train, y_train)
    assert set(real) == {"accuracy", "frechet"}
    assert real["accuracy"] >= 0.95
    noise = np.random.default_rng(0).normal(size=x_train.shape).astype(np.float32)
    noisy = digit_scores(np.clip(x_train + 0.5 * noise, -1, 1), y_train)
    assert noisy["frechet"] > 2 * real["frechet"]
    # Wrong labels are scored as wrong.
    wrong = digit_scores(x_train, (y_train + 1) % 10)
    assert wrong["accuracy"] < 0.05

    x_test, y_test = digits.load_digits_images(16, "test")
    same = digit_scores(x_test, y_test, real_images=x_test)
    assert same["frechet"] < 1e-6
    assert classifier.accuracy(classifier.default_classifier(), x_test, y_test) >= 0.95

    x8, y8 = digits.load_digits_images(8, "test")
    with pytest.raises(ValueError, match="16x16"):
        digit_scores(x8, y8)


def test_mean_image_scores_are_the_metrics_means_in_one_program():
    rng = np.random.default_rng(4)
    a = rng.uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32)
    b = np.clip(a + 0.05 * rng.normal(size=a.shape), -1, 1).astype(np.float32)
    got = M.mean_image_scores(a, b)
    want = (np.mean(M.psnr(a, b)), np.mean(M.ssim(a, b)),
            np.mean(M.relative_l1(a, b)))
    np.testing.assert_allclose(got, [float(w) for w in want], rtol=1e-5)
    assert M.mean_image_scores(a, a) == (float("inf"), 1.0, 0.0)
