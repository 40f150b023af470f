"""Tests for the training pieces, checkpoint files and the shipped digit models."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

from jaxcache.digits import classifier, harness, pretrained, training
from jaxcache.digits import data as digits
from jaxcache.models import create_model
from jaxcache.solvers import DDIM, FlowMatchEuler

# Tiny settings: 8x8 digits, a 2-block model; every test here runs in seconds.
_TINY = dict(channels=1, vocab_size=11, caption_len=1, depth=2)
_BATCH = 16


@functools.cache
def _tiny_parts(arch: str, seed: int):
    # create_model runs its initialisers op by op (seconds each time): once per arch and seed.
    return nnx.split(create_model(arch, "tiny", rngs=nnx.Rngs(seed), **_TINY))


def _tiny(arch: str = "dit", seed: int = 0) -> nnx.Module:
    """A fresh tiny model (new Variables over the same immutable initial arrays)."""
    return nnx.merge(*_tiny_parts(arch, seed))


@pytest.fixture(scope="module")
def data():
    images, labels = digits.load_digits_images(8, "train")
    return jnp.asarray(images[:256]), jnp.asarray(labels[:256])


def _quick_compile(step, optimizer, data):
    """The step compiled with XLA's backend optimisation off: half the compile time of this
    tiny model's step (13 s -> 6 s on two cores) for 40 steps of 17 ms instead of 6 ms."""
    state = training.init_train_state(_tiny(), optimizer)
    return step.lower(state, *data, jnp.int32(0)).compile({"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def trainer(data):
    """One optimizer and one compiled step for every training test (compiling dominates)."""
    optimizer = training.make_optimizer(3e-3, 40, warmup_steps=2)
    step = training.make_train_step(
        nnx.graphdef(_tiny()), optimizer, key=jax.random.key(1), batch_size=_BATCH,
        caption_len=1, null_class=pretrained.NULL_CLASS, ema_decay=0.9,
    )
    return optimizer, _quick_compile(step, optimizer, data)


def _run(step, state, data, start, stop):
    for i in range(start, stop):
        state, _ = step(state, *data, jnp.int32(i))
    return state


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bit for bit, not allclose


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model))


# --------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("objective", ["flow", "eps"])
def test_loss_goes_down(data, trainer, objective):
    model = _tiny()
    optimizer, step = trainer
    loss = training.flow_matching_loss
    if objective == "eps":
        loss = training.epsilon_loss
        step = training.make_train_step(
            nnx.graphdef(model), optimizer, key=jax.random.key(1), batch_size=_BATCH,
            caption_len=1, null_class=pretrained.NULL_CLASS, ema_decay=0.9, objective="eps",
        )
        step = _quick_compile(step, optimizer, data)
    state = training.init_train_state(model, optimizer)
    graphdef = nnx.graphdef(model)
    x, y = data[0][:64], data[1][:64]
    cond = training.class_tokens(y, 1)
    key = jax.random.key(123)  # the same t and noise before and after: a fair comparison

    @jax.jit
    def eval_loss(params):
        return loss(nnx.merge(graphdef, params), x, cond, key)

    before = float(eval_loss(state.params))
    state = _run(step, state, data, 0, 40)
    after = float(eval_loss(state.params))
    assert np.isfinite(after)
    assert after < 0.8 * before


def test_epsilon_loss_is_zero_for_the_exact_noise_on_ddim_times():
    images = jnp.linspace(-1.0, 1.0, 4 * 8 * 8).reshape(4, 8, 8, 1)
    key = jax.random.key(0)
    _, k_noise = jax.random.split(key)
    noise = jax.random.normal(k_noise, images.shape)
    ddim = DDIM()

    def oracle(x_t, t_in, cond):
        # The times are DDIM's (k / num_train_steps), and x_t follows its alpha_bar.
        k = np.round(np.asarray(t_in) * ddim.num_train_steps)
        np.testing.assert_array_equal(t_in, (k / ddim.num_train_steps).astype(np.float32))
        a = np.asarray(ddim.alpha_bar(t_in))[:, None, None, None]
        np.testing.assert_allclose(x_t, np.sqrt(a) * images + np.sqrt(1 - a) * noise, atol=1e-5)
        return noise

    loss = training.epsilon_loss(oracle, images, jnp.zeros((4, 1), jnp.int32), key, schedule=ddim)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_min_snr_weighting():
    batch = 256  # enough draws that some land at low noise (snr > 5, weight < 1)
    images = jnp.linspace(-1.0, 1.0, batch * 4 * 4).reshape(batch, 4, 4, 1)
    key = jax.random.key(3)
    k_t, k_noise = jax.random.split(key)
    table = jnp.asarray((np.arange(1000) / 1000).astype(np.float32))
    a = np.asarray(DDIM().alpha_bar(table[jax.random.randint(k_t, (batch,), 0, 1000)]))
    snr = a / (1 - a)
    assert np.any(snr > 5) and np.any(snr < 5)

    def zero(x_t, t_in, cond):  # each sample's error is then its noise's mean square
        return jnp.zeros_like(x_t)

    cond = jnp.zeros((batch, 1), jnp.int32)
    per = np.mean(np.square(np.asarray(jax.random.normal(k_noise, images.shape))), axis=(1, 2, 3))
    plain = float(training.epsilon_loss(zero, images, cond, key))
    weighted = float(training.epsilon_loss(zero, images, cond, key, min_snr_gamma=5.0))
    np.testing.assert_allclose(plain, per.mean(), rtol=1e-5)
    np.testing.assert_allclose(weighted, np.mean(per * np.minimum(snr, 5.0) / snr), rtol=1e-5)
    assert weighted < plain


def test_min_snr_only_for_eps():
    with pytest.raises(ValueError, match="min_snr_gamma"):
        training.make_train_step(
            nnx.graphdef(_tiny()), training.make_optimizer(1e-3, 10), key=jax.random.key(0),
            batch_size=2, caption_len=1, null_class=10, min_snr_gamma=5.0,
        )


def test_unknown_objective_raises():
    with pytest.raises(ValueError, match="objective"):
        training.make_train_step(
            nnx.graphdef(_tiny()), training.make_optimizer(1e-3, 10), key=jax.random.key(0),
            batch_size=2, caption_len=1, null_class=10, objective="v",
        )


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    images = jnp.linspace(-1.0, 1.0, 2 * 8 * 8).reshape(2, 8, 8, 1)
    key = jax.random.key(0)
    k_t, k_noise = jax.random.split(key)
    t = training.sample_times(k_t, 2)
    noise = jax.random.normal(k_noise, images.shape)

    def oracle(x_t, t_in, cond):
        # Recovers noise - data from x_t, given the same draws as the loss.
        np.testing.assert_allclose(t_in, t)
        return noise - images

    loss = training.flow_matching_loss(oracle, images, jnp.zeros((2, 1), jnp.int32), key)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_resume_is_bit_identical(tmp_path, data, trainer):
    total, split = 6, 3
    optimizer, step = trainer
    model = _tiny()
    straight = _run(step, training.init_train_state(model, optimizer), data, 0, total)

    model = _tiny()
    first = _run(step, training.init_train_state(model, optimizer), data, 0, split)
    path = tmp_path / "run.msgpack"
    training.save_train_state(path, model, first, split, extra={"seed": 0})
    ckpt = pretrained.load_checkpoint(path)
    assert ckpt.step == split and ckpt.extra["seed"] == 0
    _assert_trees_equal(_pure(ckpt.model), jax.device_get(first.ema))
    resumed = training.restore_train_state(ckpt, optimizer)
    resumed = _run(step, resumed, data, split, total)
    _assert_trees_equal(resumed, straight)


def test_restore_needs_training_state(tmp_path):
    path = tmp_path / "model.msgpack"
    pretrained.save_checkpoint(path, _tiny())
    optimizer = training.make_optimizer(1e-3, 10)
    with pytest.raises(ValueError, match="no training state"):
        training.restore_train_state(pretrained.load_checkpoint(path), optimizer)


def test_random_shift_keeps_pixels_and_fills_background():
    img = jnp.full((1, 8, 8, 1), -1.0).at[0, 4, 4, 0].set(1.0)
    shifted = digits.random_shift(jax.random.key(0), jnp.repeat(img, 32, 0), 1)
    assert shifted.shape == (32, 8, 8, 1)
    np.testing.assert_array_equal(jnp.sum(shifted > 0, axis=(1, 2, 3)), 1)
    assert set(np.unique(np.asarray(shifted))) <= {-1.0, 1.0}


# --------------------------------------------------------------------------------------------
# Checkpoint files


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_checkpoint_round_trip_is_exact(tmp_path, data, arch):
    model = _tiny(arch)
    optimizer = training.make_optimizer(1e-3, 10)
    params = nnx.to_pure_dict(nnx.state(model))
    # One eager update: Adam moments and the step count become non-trivial.
    grads = jax.jit(lambda ps: jax.tree.map(lambda p: jnp.sin(p) + 0.1, ps))(params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
        _, opt_state = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    extra = {"note": "x", "key": np.asarray(jax.random.key_data(jax.random.key(5)))}
    path = tmp_path / "ckpt.msgpack"
    pretrained.save_checkpoint(path, model, step=7, opt_state=opt_state, extra=extra)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.msgpack"]  # no temporary file left behind

    ckpt = pretrained.load_checkpoint(path)
    assert type(ckpt.model) is type(model) and ckpt.model.config == model.config
    assert ckpt.step == 7
    _assert_trees_equal(_pure(ckpt.model), _pure(model))
    restored = serialization.from_state_dict(optimizer.init(params), ckpt.opt_state)
    _assert_trees_equal(restored, jax.device_get(opt_state))
    assert ckpt.extra["note"] == "x"
    np.testing.assert_array_equal(ckpt.extra["key"], extra["key"])
    # The loaded model computes what the saved one did.
    x = data[0][:2]
    cond = jnp.array([[1], [2]], jnp.int32)
    t = jnp.array([0.3, 0.7])
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))  # eager op-by-op dispatch is slow on CPU
    np.testing.assert_array_equal(forward(ckpt.model, x, t, cond), forward(model, x, t, cond))


def test_checkpoint_keeps_the_recipe(tmp_path):
    path = tmp_path / "eps.msgpack"
    model = pretrained.with_recipe(_tiny(), pretrained.EPS)
    pretrained.save_checkpoint(path, model)
    loaded = pretrained.load_checkpoint(path).model
    assert pretrained.recipe_of(loaded) == pretrained.EPS
    assert isinstance(pretrained.recipe_of(loaded).solver, DDIM)
    # A model merged from the graphdef (the trainer's EMA model) keeps it.
    merged = nnx.merge(nnx.graphdef(model), nnx.state(model))
    assert pretrained.recipe_of(merged) == pretrained.EPS


def test_checkpoint_without_recipe_is_flow_matching(tmp_path):
    path = tmp_path / "old.msgpack"
    pretrained.save_checkpoint(path, _tiny())
    payload = serialization.msgpack_restore(path.read_bytes())
    del payload["recipe"]  # as written before recipes existed
    path.write_bytes(serialization.msgpack_serialize(payload))
    assert pretrained.recipe_of(pretrained.load_checkpoint(path).model) == pretrained.FLOW


@pytest.mark.parametrize("recipe", [
    {"objective": "eps", "solver": {"name": "FlowMatchEuler", "shift": 1.0}, "num_steps": 50},
    {"objective": "eps", "solver": {"name": "Heun"}, "num_steps": 50},
    {"objective": "flow", "solver": {"name": "FlowMatchEuler", "shift": 1.0}, "num_steps": 0},
    "flow",
])
def test_checkpoint_with_a_bad_recipe_raises(tmp_path, recipe):
    path = tmp_path / "bad.msgpack"
    pretrained.save_checkpoint(path, _tiny())
    payload = serialization.msgpack_restore(path.read_bytes())
    payload["recipe"] = recipe
    path.write_bytes(serialization.msgpack_serialize(payload))
    with pytest.raises(ValueError, match="recipe"):
        pretrained.load_checkpoint(path)


def test_recipe_checks_its_solver():
    with pytest.raises(ValueError, match="DDIM"):
        pretrained.Recipe("eps", FlowMatchEuler(), 50)
    with pytest.raises(ValueError, match="objective"):
        pretrained.Recipe("x0", DDIM(), 50)
    assert pretrained.Recipe.from_json(pretrained.EPS.to_json()) == pretrained.EPS


def test_checkpoint_without_optimizer_state(tmp_path):
    path = tmp_path / "m.msgpack"
    pretrained.save_checkpoint(path, _tiny("mmdit"))
    ckpt = pretrained.load_checkpoint(path)
    assert ckpt.step == 0 and ckpt.opt_state is None and ckpt.extra is None


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        pretrained.load_checkpoint(tmp_path / "absent.msgpack")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong_format", "shape"])
def test_corrupt_checkpoint_raises_value_error_and_is_left_alone(tmp_path, damage):
    good = tmp_path / "good.msgpack"
    pretrained.save_checkpoint(good, _tiny(), step=3)
    raw = good.read_bytes()
    if damage == "truncated":
        bad_bytes = raw[: len(raw) // 2]
    elif damage == "garbage":
        bad_bytes = b"\x00not a checkpoint" * 10
    elif damage == "empty":
        bad_bytes = b""
    elif damage == "wrong_format":
        bad_bytes = serialization.msgpack_serialize({"format": "something/else", "params": {}})
    else:  # a valid file whose config no longer matches its weights
        payload = serialization.msgpack_restore(raw)
        payload["config"]["width"] = 64
        bad_bytes = serialization.msgpack_serialize(payload)
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(bad_bytes)
    before = os.stat(bad)
    with pytest.raises(ValueError):
        pretrained.load_checkpoint(bad)
    assert bad.read_bytes() == bad_bytes
    assert os.stat(bad).st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["bad.msgpack", "good.msgpack"]


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.msgpack"
    pretrained.save_checkpoint(path, _tiny(), step=1)
    old = path.read_bytes()
    with pytest.raises(TypeError):
        pretrained.save_checkpoint(path, _tiny(), step=2, extra={"bad": object()})
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["c.msgpack"]


# --------------------------------------------------------------------------------------------
# Class captions


def test_class_condition():
    np.testing.assert_array_equal(pretrained.class_condition([0, 9, 3]), [[0], [9], [3]])
    assert pretrained.class_condition(4).shape == (1, pretrained.CAPTION_LEN)
    assert pretrained.class_condition(np.arange(10)).dtype == jnp.int32
    np.testing.assert_array_equal(
        pretrained.class_condition([pretrained.NULL_CLASS], allow_null=True), [[10]]
    )


@pytest.mark.parametrize("bad", [-1, 10, 3.5, [1, 10], [2.0], True])
def test_class_condition_rejects(bad):
    with pytest.raises(ValueError, match="class must be in 0..9"):
        pretrained.class_condition(bad)


def test_class_condition_rejects_out_of_range_even_with_null():
    with pytest.raises(ValueError, match="class must be in 0..10"):
        pretrained.class_condition([11], allow_null=True)


# --------------------------------------------------------------------------------------------
# The shipped models


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown digit model 'unet'"):
        pretrained.load_digits_model("unet")


@pytest.mark.parametrize("name, arch, recipe", [
    ("dit", "dit", pretrained.FLOW),
    ("mmdit", "mmdit", pretrained.FLOW),
    ("dit-eps", "dit", pretrained.EPS),
])
def test_shipped_model_draws_recognisable_digits(name, arch, recipe):
    ref = os.path.join(os.path.dirname(pretrained.__file__), "assets",
                       pretrained.SHIPPED_MODELS[name])
    assert os.path.getsize(ref) < 2 * 1024 * 1024
    model = pretrained.load_digits_model(name)
    assert model.config == pretrained.DIGITS_CONFIGS[arch]
    assert model.num_layers == 8
    assert pretrained.recipe_of(model) == recipe
    labels = np.repeat(np.arange(10), 5)
    out = pretrained.sample_digits(model, labels, seed=11)  # uncached, the recipe's solver
    assert out.sample.shape == (50, 16, 16, 1)
    assert int(out.layer_evaluations) == recipe.num_steps * 8  # 20 Euler or 50 DDIM steps
    acc = classifier.accuracy(
        classifier.default_classifier(), jnp.clip(out.sample, -1.0, 1.0), labels
    )
    assert acc >= 0.9, f"{name}: classifier accuracy {acc:.2f} on generated digits"


@pytest.mark.parametrize("recipe", [pretrained.FLOW, pretrained.EPS])
def test_the_harness_follows_the_recipe(recipe):
    # A 16x16 tiny model (the classifier's size): the figures are not the point, the solver is.
    model = create_model("dit", "tiny", rngs=nnx.Rngs(0), channels=1, vocab_size=11,
                         caption_len=1, depth=2, image_size=16, patch_size=4)
    pretrained.with_recipe(model, recipe)
    evaluator = harness.Evaluator(model, [0, 1], repeats=1)
    assert (evaluator.solver, evaluator.num_steps) == (recipe.solver, recipe.num_steps)
    steps = evaluator.num_steps
    full, cached = evaluator.evaluate([
        harness.Setting.full(steps), harness.Setting.interval(2, num_steps=steps, cached_layers=1),
    ])
    assert full.layer_evaluations == steps * 2
    assert cached.layer_evaluations == steps * 2 - (steps - len(range(0, steps, 2)))
    # Full compute is what sample_digits draws by the recipe: its solver, steps and noise.
    drawn = pretrained.sample_digits(model, [0, 1]).sample
    np.testing.assert_array_equal(evaluator.images(harness.Setting.full(steps)),
                                  np.asarray(jnp.clip(drawn, -1.0, 1.0)))
