"""Tests for the digits data set and the digit classifier."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("sklearn")

from jaxcache.digits import classifier as C  # noqa: E402
from jaxcache.digits import data as digits  # noqa: E402

N_ALL, N_TRAIN, N_TEST = 1797, 1438, 359


@pytest.fixture(scope="module")
def test_split():
    return digits.load_digits_images(16, "test")


@pytest.fixture(scope="module")
def shipped():
    return C.default_classifier()


# --- data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 32])
def test_shapes_dtype_and_range(size):
    x, y = digits.load_digits_images(size, "all")
    assert x.shape == (N_ALL, size, size, 1) and x.dtype == np.float32
    assert y.shape == (N_ALL,) and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_size_8_is_the_original_intensities():
    from sklearn.datasets import load_digits

    x, y = digits.load_digits_images(8, "all")
    raw = load_digits()
    np.testing.assert_allclose(x[..., 0], raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y, raw.target)


def test_upsampling_is_smooth():
    # Bilinear: every upsampled value lies between neighbouring originals; mean is preserved
    # up to edge effects, and there are far more distinct levels than the 17 originals.
    x8, _ = digits.load_digits_images(8, "all")
    x16, _ = digits.load_digits_images(16, "all")
    assert abs(x8.mean() - x16.mean()) < 0.02
    assert len(np.unique(x16)) > 17


def test_split_sizes_disjoint_and_covering():
    _, labels = digits._raw_digits()
    train = digits.split_indices(labels, "train")
    test = digits.split_indices(labels, "test")
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(N_ALL))
    # Stratified: every class puts round(20%) of its images in the test split.
    counts = np.bincount(labels)
    np.testing.assert_array_equal(np.bincount(labels[test]), np.floor(0.2 * counts + 0.5))

    x_tr, y_tr = digits.load_digits_images(16, "train")
    x_te, y_te = digits.load_digits_images(16, "test")
    x_all, y_all = digits.load_digits_images(16, "all")
    assert len(x_tr) == N_TRAIN and len(x_te) == N_TEST
    np.testing.assert_array_equal(x_all[test], x_te)
    np.testing.assert_array_equal(y_all[train], y_tr)


def test_split_is_deterministic_and_seeded():
    _, labels = digits._raw_digits()
    a = digits.split_indices(labels, "test", seed=0)
    np.testing.assert_array_equal(a, digits.split_indices(labels, "test", seed=0))
    assert not np.array_equal(a, digits.split_indices(labels, "test", seed=1))


@pytest.mark.parametrize("size", [0, 4, 12, 20, -8, 16.0, True, "16"])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match="size"):
        digits.load_digits_images(size)


@pytest.mark.parametrize("split", ["val", "", "TRAIN", None])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="split"):
        digits.load_digits_images(16, split)


def test_missing_sklearn_says_what_to_install(monkeypatch):
    digits._raw_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            digits.load_digits_images(16)
    finally:
        digits._raw_digits.cache_clear()


# --- classifier ---------------------------------------------------------------------------------


def test_shipped_classifier_is_accurate(shipped, test_split):
    x, y = test_split
    assert shipped.config["image_size"] == 16
    assert C.accuracy(shipped, x, y) >= 0.95


def test_shipped_asset_is_small():
    path = os.path.join(os.path.dirname(C.__file__), "assets", "digit_classifier.npz")
    assert os.path.getsize(path) < 500 * 1024


def test_outputs_shapes(shipped, test_split):
    x, _ = test_split
    assert shipped(x[:5]).shape == (5, 10)
    assert shipped.features(x[:5]).shape == (5, 64)
    assert C.predict(shipped, x).shape == (N_TEST, 10)
    assert C.extract_features(shipped, x).shape == (N_TEST, 64)
    # Chunked evaluation matches a direct call.
    np.testing.assert_allclose(C.predict(shipped, x[:7]), np.asarray(shipped(x[:7])), atol=1e-5)


def test_wrong_image_size_raises(shipped):
    x, y = digits.load_digits_images(8, "test")
    with pytest.raises(ValueError, match="expects 16x16"):
        C.accuracy(shipped, x, y)
    with pytest.raises(ValueError, match="labels"):
        C.accuracy(shipped, np.zeros((3, 16, 16, 1)), np.array([0, 1, 10]))


def test_save_load_round_trip_is_exact(shipped, test_split, tmp_path):
    path = tmp_path / "clf.npz"
    C.save_classifier(shipped, path)
    loaded = C.load_classifier(path)
    assert loaded.config == shipped.config
    a, b = C._flat_params(shipped), C._flat_params(loaded)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])
    x, _ = test_split
    np.testing.assert_array_equal(C.predict(shipped, x), C.predict(loaded, x))


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        C.load_classifier(tmp_path / "nope.npz")


def test_corrupt_file_raises(shipped, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match="not a readable classifier archive"):
        C.load_classifier(garbage)

    good = tmp_path / "good.npz"
    C.save_classifier(shipped, good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError):
        C.load_classifier(truncated)

    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a jaxcache digit classifier"):
        C.load_classifier(other)


def test_mismatched_parameters_raise(shipped, tmp_path):
    path = tmp_path / "clf.npz"
    C.save_classifier(shipped, path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}

    bad_shape = dict(arrays, **{"fc/bias": np.zeros(3, np.float32)})
    np.savez(tmp_path / "shape.npz", **bad_shape)
    with pytest.raises(ValueError, match="fc/bias"):
        C.load_classifier(tmp_path / "shape.npz")

    missing = {k: v for k, v in arrays.items() if k != "head/kernel"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match="missing"):
        C.load_classifier(tmp_path / "missing.npz")

    bad_config = dict(arrays, __config__=np.array('{"image_size": 15}'))
    np.savez(tmp_path / "config.npz", **bad_config)
    with pytest.raises(ValueError, match="config"):
        C.load_classifier(tmp_path / "config.npz")


def test_short_training_reduces_loss_and_is_deterministic():
    x, y = digits.load_digits_images(16, "train")
    x, y = x[:512], y[:512]
    fresh = C.train_classifier(x, y, steps=0, seed=3)
    trained = C.train_classifier(x, y, steps=40, batch_size=64, seed=3)
    assert C.cross_entropy(trained, x, y) < 0.7 * C.cross_entropy(fresh, x, y)
    again = C.train_classifier(x, y, steps=40, batch_size=64, seed=3)
    a, b = C._flat_params(trained), C._flat_params(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_train_rejects_bad_arguments():
    x, y = digits.load_digits_images(16, "test")
    with pytest.raises(ValueError, match="steps"):
        C.train_classifier(x, y, steps=-1)
    with pytest.raises(ValueError, match="labels"):
        C.train_classifier(x, y[:-1], steps=1)
    with pytest.raises(ValueError, match="images"):
        C.train_classifier(x[..., 0], y, steps=1)


def test_constructor_validates():
    with pytest.raises(ValueError, match="multiple of 4"):
        C.DigitClassifier(image_size=18, rngs=nnx.Rngs(0))
    m = C.DigitClassifier(rngs=nnx.Rngs(0))
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n_params == 38282
