"""Small trained digit generators that ship with jaxcache, and their checkpoint files.

Three class-conditional models trained on the 16x16 scikit-learn digits (:mod:`jaxcache.digits`)
by ``examples/train_digits.py``, in the two regimes the sampler serves:

* ``"dit"``: :class:`~jaxcache.models.DiT`, single stream (the class token is the cache's
  constant slot); flow matching (velocity prediction), sampled with 20
  :class:`~jaxcache.FlowMatchEuler` steps.
* ``"mmdit"``: :class:`~jaxcache.models.MMDiT`, dual stream (the class token is the text stream);
  flow matching, 20 Euler steps.
* ``"dit-eps"``: the same DiT architecture and config as ``"dit"``, trained for noise (epsilon)
  prediction on the variance-preserving linear-beta schedule of :class:`~jaxcache.DDIM`;
  sampled with 50 DDIM steps.

The class is the caption: ``caption_len`` copies of the class id ``0..9``; ``NULL_CLASS`` (10)
is the empty caption used as the negative branch of classifier-free guidance. All models are
8 blocks deep, so caching 2, 4 or 6 layers is a meaningful choice.

How a model is sampled (what it predicts, the solver, the step count) is its :class:`Recipe`,
kept on the model (``model.recipe``, read with :func:`recipe_of`) and in its checkpoint;
:func:`sample_digits` and :class:`jaxcache.digits.harness.Evaluator` follow it unless told
otherwise. A model without one is a flow-matching model (:data:`FLOW`).

Checkpoints are single msgpack files (Flax serialization) holding a format tag, the
architecture, the :class:`~jaxcache.models.ModelConfig` fields, the sampling recipe, the model's
parameters and, for resuming training, optionally the optimizer state, the step and extra
metadata. Arrays are stored raw, so a save/load round trip is bit-exact. Files without a recipe
(written before it existed) load as flow-matching models.

Example:
  >>> from jaxcache.digits import pretrained
  >>> model = pretrained.load_digits_model("dit")                      # doctest: +SKIP
  >>> out = pretrained.sample_digits(model, [0, 1, 2, 3])              # doctest: +SKIP
  >>> out.sample.shape                                                 # doctest: +SKIP
  (4, 16, 16, 1)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from jaxcache._checks import check_int
from jaxcache.digits._files import write_atomically
from jaxcache.digits.data import NUM_CLASSES
from jaxcache.models import ModelConfig
from jaxcache.models.factory import ARCHITECTURES
from jaxcache.nnx import from_nnx
from jaxcache.plan import CachePlan
from jaxcache.policies import RefreshPolicy
from jaxcache.sampler import SampleResult, sample
from jaxcache.solvers import DDIM, FlowMatchEuler, Solver

__all__ = [
    "CAPTION_LEN",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DIGITS_CONFIGS",
    "EPS",
    "FLOW",
    "NULL_CLASS",
    "OBJECTIVES",
    "RECIPES",
    "SHIPPED_MODELS",
    "Checkpoint",
    "Recipe",
    "class_condition",
    "load_checkpoint",
    "load_digits_model",
    "recipe_of",
    "sample_digits",
    "save_checkpoint",
    "with_recipe",
]

NULL_CLASS = NUM_CLASSES
"""The caption id of "no class" (the unconditional branch of classifier-free guidance)."""
CAPTION_LEN = 1
"""Caption tokens per class: the class id, once."""

# 8 blocks so that caching 2/4/6 layers is meaningful. Widths keep each shipped file under 2 MB
# of float32 weights; 4x4 patches (16 image tokens) keep training both models to a few minutes on
# a 2-core CPU (2x2 patches measured 4x the time per training image, and lower class accuracy
# after equal training time).
DIGITS_CONFIGS: dict[str, ModelConfig] = {
    "dit": ModelConfig(
        width=56, depth=8, heads=4, mlp_ratio=2.0, image_size=16, channels=1, patch_size=4,
        caption_len=CAPTION_LEN, vocab_size=NUM_CLASSES + 1, caption_refiners=1,
    ),
    "mmdit": ModelConfig(
        width=40, depth=8, heads=4, mlp_ratio=2.0, image_size=16, channels=1, patch_size=4,
        caption_len=CAPTION_LEN, vocab_size=NUM_CLASSES + 1, caption_refiners=1,
    ),
}
"""Configs of the shipped digit models, by architecture."""

DEFAULT_STEPS = 20
"""Euler steps the shipped flow-matching models are meant to be sampled with."""
DEFAULT_GUIDANCE: float | None = 1.5
"""Classifier-free guidance scale for the shipped models (None: no guidance)."""

OBJECTIVES = ("flow", "eps")
"""Training objectives: ``"flow"`` (velocity ``noise - data``) and ``"eps"`` (the noise)."""
# The solver that integrates each objective's prediction.
_SOLVER_OF = {"flow": FlowMatchEuler, "eps": DDIM}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a digit model is sampled: what its network predicts, the solver and the step count.

    Attributes:
      objective: ``"flow"`` (the network predicts the velocity; :class:`~jaxcache.FlowMatchEuler`)
        or ``"eps"`` (it predicts the noise of a variance-preserving schedule;
        :class:`~jaxcache.DDIM`, whose schedule the model was trained on).
      solver: the solver, of the objective's kind.
      num_steps: solver steps.
    """

    objective: str
    solver: Solver
    num_steps: int

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        want = _SOLVER_OF[self.objective]
        if type(self.solver) is not want:
            raise ValueError(
                f"the {self.objective!r} objective is sampled with {want.__name__}, got "
                f"{type(self.solver).__name__}"
            )
        check_int(self.num_steps, "num_steps")

    def to_json(self) -> dict[str, Any]:
        """The recipe as msgpack/JSON types (what checkpoints store)."""
        return {
            "objective": self.objective,
            "solver": {"name": type(self.solver).__name__, **dataclasses.asdict(self.solver)},
            "num_steps": self.num_steps,
        }

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        """Inverse of :meth:`to_json`; raises ValueError for anything else."""
        try:
            solver = dict(data["solver"])
            name = solver.pop("name")
            kinds = {c.__name__: c for c in _SOLVER_OF.values()}
            if name not in kinds:
                raise ValueError(f"unknown solver {name!r}")
            return cls(data["objective"], kinds[name](**solver), data["num_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid sampling recipe {data!r}: {e}") from e


FLOW = Recipe("flow", FlowMatchEuler(), DEFAULT_STEPS)
"""The flow-matching recipe of ``"dit"`` and ``"mmdit"``: 20 Euler steps."""
EPS = Recipe("eps", DDIM(num_train_steps=1000, beta_start=1e-4, beta_end=0.02), 50)
"""The noise-prediction recipe of ``"dit-eps"``: 50 DDIM steps on the linear-beta schedule."""
RECIPES = {"flow": FLOW, "eps": EPS}
"""The recipe of each training objective."""

SHIPPED_MODELS: dict[str, str] = {
    "dit": "digits_dit.msgpack",
    "mmdit": "digits_mmdit.msgpack",
    "dit-eps": "digits_dit_eps.msgpack",
}
"""The shipped models, by name: their files in ``jaxcache/digits/assets``."""


def recipe_of(model: nnx.Module) -> Recipe:
    """The sampling recipe of a digit model (:data:`FLOW` for a model that carries none)."""
    recipe = getattr(model, "recipe", None)
    if recipe is None:
        return FLOW
    if not isinstance(recipe, Recipe):
        raise TypeError(f"model.recipe must be a Recipe, got {type(recipe).__name__}")
    return recipe


def with_recipe(model: nnx.Module, recipe: Recipe) -> nnx.Module:
    """Sets ``model.recipe`` and returns the model.

    The recipe is static model data (part of ``nnx.graphdef``), so models merged from the
    graphdef of this one (the training loop's EMA model, say) carry it too.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    model.recipe = recipe
    return model

_FORMAT = "jaxcache.checkpoint/1"


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    Attributes:
      model: the model, parameters bit-identical to the saved ones.
      step: the training step stored with it.
      opt_state: the optimizer state as restored (nested dicts of arrays, the layout of
        ``flax.serialization.to_state_dict``), or None if none was saved; put it back into a
        live optax state with ``flax.serialization.from_state_dict(optimizer.init(...), raw)``.
      extra: the extra metadata saved with it (msgpack types and arrays), or None.
    """

    model: nnx.Module
    step: int
    opt_state: Any
    extra: Any


def class_condition(labels: Any, *, allow_null: bool = False) -> jax.Array:
    """Class ids as the captions the digit models read.

    Args:
      labels: an int or a 1-D sequence of ints in ``0..9``.
      allow_null: also accept ``NULL_CLASS`` (the unconditional caption).

    Returns:
      ``int32 [B, CAPTION_LEN]`` caption ids (a scalar gives ``B = 1``).

    Raises:
      ValueError: if a label is not an integer in range, or ``labels`` is empty or not 0-D or
        1-D.
    """
    arr = np.asarray(labels)
    if arr.ndim > 1:
        raise ValueError(f"labels must be an int or a 1-D sequence, got shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError("labels is empty; give at least one class")
    high = NULL_CLASS if allow_null else NUM_CLASSES - 1
    # Booleans and floats are rejected outright: 3.0 or True as a class is a caller's bug.
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        bad = [v for v in arr.tolist() if not (isinstance(v, int) and not isinstance(v, bool))]
        raise ValueError(f"class must be in 0..{high}, got {bad[0] if bad else arr!r}")
    bad = arr[(arr < 0) | (arr > high)]
    if bad.size:
        raise ValueError(f"class must be in 0..{high}, got {int(bad[0])}")
    return jnp.asarray(np.repeat(arr[:, None], CAPTION_LEN, axis=1), jnp.int32)


def sample_digits(
    model: nnx.Module,
    labels: Any,
    *,
    seed: int = 0,
    num_steps: int | None = None,
    guidance_scale: float | None = DEFAULT_GUIDANCE,
    cached_layers: int = 0,
    policy: RefreshPolicy | None = None,
    solver: Solver | None = None,
) -> SampleResult:
    """Generates one digit per label with :func:`jaxcache.sample`, as the model's recipe says.

    Args:
      model: a digit model (:func:`load_digits_model`, or one being trained).
      labels: classes ``0..9``, one per sample.
      seed: seed of the initial noise.
      num_steps: solver steps; None: the recipe's (20 Euler steps for flow matching, 50 DDIM
        steps for noise prediction).
      guidance_scale: classifier-free guidance scale against ``NULL_CLASS``; None turns it off.
      cached_layers: layers ``[0, n)`` that ``policy`` may cache.
      policy: the refresh policy; None samples uncached.
      solver: the solver; None: the recipe's (:func:`recipe_of`).

    Returns:
      The :class:`~jaxcache.SampleResult`; ``.sample`` is ``[B, 16, 16, 1]``, roughly in
      ``[-1, 1]`` (clip before display).
    """
    recipe = recipe_of(model)
    cond = class_condition(labels)
    network, params = from_nnx(model)
    plan = CachePlan(network, cached_layers)
    noise = jax.random.normal(jax.random.key(seed), (cond.shape[0], *model.config.image_shape))
    uncond = None if guidance_scale is None else jnp.full_like(cond, NULL_CLASS)
    return sample(
        plan, plan.split(params), noise, cond, solver=solver or recipe.solver,
        num_steps=recipe.num_steps if num_steps is None else num_steps, policy=policy,
        uncond=uncond, guidance_scale=guidance_scale,
    )


# --------------------------------------------------------------------------------------------
# Checkpoint files


def _arch_of(model: nnx.Module) -> str:
    for arch, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return arch
    raise TypeError(f"cannot checkpoint {type(model).__name__}; expected one of "
                    f"{[c.__name__ for c in ARCHITECTURES.values()]}")


def _config_to_json(config: ModelConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    fields["dtype"] = jnp.dtype(config.dtype).name
    fields["param_dtype"] = jnp.dtype(config.param_dtype).name
    return fields


def save_checkpoint(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    step: int = 0,
    opt_state: Any = None,
    extra: Any = None,
) -> None:
    """Writes a model (and optionally training state) to one msgpack file, atomically.

    The bytes are written to a temporary file in the same folder, flushed to disk, and renamed
    over ``path`` (:func:`~jaxcache.digits._files.write_atomically`): a crash leaves either the
    old file or the new one, never half a file.

    Args:
      path: destination file.
      model: a :class:`~jaxcache.models.DiT` or :class:`~jaxcache.models.MMDiT`.
      step: the training step to record.
      opt_state: optimizer state (any pytree of arrays; stored through
        ``flax.serialization.to_state_dict``), or None.
      extra: extra metadata (msgpack types: dicts with string keys, lists, numbers, strings,
        None, NumPy/JAX arrays), or None. Typed PRNG keys must go through
        ``jax.random.key_data`` first.

    The model's sampling recipe (:func:`recipe_of`) is stored with it.

    Raises:
      TypeError: if the model is not a reference model, or ``extra``/``opt_state`` holds
        something msgpack cannot store (nothing is written then).
    """
    path = os.fspath(path)
    check_int(step, "step", minimum=0)
    state = nnx.to_pure_dict(nnx.state(model))
    payload = {
        "format": _FORMAT,
        "arch": _arch_of(model),
        "config": _config_to_json(model.config),
        "recipe": recipe_of(model).to_json(),
        "params": serialization.to_state_dict(jax.device_get(state)),
        "step": int(step),
        "opt_state": (
            None if opt_state is None else serialization.to_state_dict(jax.device_get(opt_state))
        ),
        "extra": None if extra is None else jax.device_get(extra),
    }
    data = serialization.msgpack_serialize(payload)  # raises before anything touches the disk
    write_atomically(path, lambda f: f.write(data))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested string-keyed dicts to ``{'a/b/c': leaf}``."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def load_checkpoint(
    path: str | os.PathLike, *, expect_arch: str | None = None, allow_non_finite: bool = False
) -> Checkpoint:
    """Reads a checkpoint written by :func:`save_checkpoint` (never writes anything).

    Args:
      path: the checkpoint file.
      expect_arch: the architecture the caller expects (``"dit"`` or ``"mmdit"``); a file of
        another one is refused (without it, a checkpoint of the other architecture under the
        expected file name would load as that architecture).
      allow_non_finite: load parameters holding NaN or infinity (a diverged run) instead of
        refusing them.

    Returns:
      A :class:`Checkpoint`; its model carries the stored sampling recipe (:data:`FLOW` for a
      file that stores none).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a readable checkpoint: truncated or corrupt bytes, a wrong
        format tag, an unknown architecture or not ``expect_arch``, an invalid config or
        recipe, parameters that do not match the model the config describes (names, shapes or
        dtypes), or non-finite parameters; or ``expect_arch`` is not an architecture.
    """
    if expect_arch is not None and expect_arch not in ARCHITECTURES:
        raise ValueError(f"expect_arch must be one of {list(ARCHITECTURES)}, got {expect_arch!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        payload = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types for bad bytes
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated): {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a jaxcache checkpoint (expected format {_FORMAT!r})")
    arch = payload.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown architecture {arch!r}; valid: {list(ARCHITECTURES)}")
    if expect_arch is not None and arch != expect_arch:
        raise ValueError(f"{path} holds a {arch} model, expected a {expect_arch} model")
    try:
        config = ModelConfig(**payload["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has a missing or invalid model config: {e}") from e
    raw_recipe = payload.get("recipe")
    try:
        recipe = FLOW if raw_recipe is None else Recipe.from_json(raw_recipe)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    step = payload.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: invalid step {step!r}")

    # Build abstractly: every parameter is overwritten, so skip the random initialisation.
    abstract = nnx.eval_shape(lambda: ARCHITECTURES[arch](config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    expected = _flat(serialization.to_state_dict(target))
    got = _flat(payload.get("params"))
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(
            f"{path}: parameters do not match a {arch} model of this config: missing "
            f"{missing[:5]}, unexpected {extra[:5]}"
        )
    for name, want in expected.items():
        have = got[name]
        if not isinstance(have, np.ndarray) or have.shape != want.shape or have.dtype != want.dtype:
            desc = f"{have.dtype}{list(have.shape)}" if isinstance(have, np.ndarray) else repr(have)
            raise ValueError(
                f"{path}: parameter {name} is {desc}, expected {want.dtype}{list(want.shape)}"
            )
        if not allow_non_finite and not np.all(np.isfinite(have)):
            bad = int(np.size(have) - np.count_nonzero(np.isfinite(have)))
            raise ValueError(
                f"{path}: parameter {name} holds {bad} non-finite values (NaN or infinity: a "
                "diverged run?); pass allow_non_finite=True to load it anyway"
            )
    params = serialization.from_state_dict(target, payload["params"])
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    model = with_recipe(nnx.merge(graphdef, state), recipe)
    return Checkpoint(model, step, payload.get("opt_state"), payload.get("extra"))


def load_digits_model(name: str = "dit") -> nnx.Module:
    """Loads a shipped digit model (``jaxcache/digits/assets``, see :data:`SHIPPED_MODELS`).

    Args:
      name: ``"dit"``, ``"mmdit"`` or ``"dit-eps"``.

    Returns:
      A fresh model carrying its sampling recipe; each call loads its own copy.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown digit model {name!r}; valid: {', '.join(SHIPPED_MODELS)}")
    ref = importlib.resources.files("jaxcache.digits").joinpath("assets", SHIPPED_MODELS[name])
    with importlib.resources.as_file(ref) as path:
        return load_checkpoint(path, expect_arch=name.split("-")[0]).model
