"""Reference models with seeded random weights, built without compiling their initialisers.

``create_model`` runs dozens of small initialiser programs (tens of seconds on a loaded CPU);
``nnx.eval_shape`` gives the same classes, structure and parameter layout for free, and numpy
fills the weights. Every weight is non-zero, so a model's output depends on every input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcache.models import create_model


@functools.cache
def random_model(arch: str, size: str = "tiny", seed: int = 0, scale: float = 0.3, **overrides):
    """A reference model of a named config with seeded ``scale * normal`` weights."""
    abstract = nnx.eval_shape(lambda: create_model(arch, size, rngs=nnx.Rngs(0), **overrides))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray(scale * rng.normal(size=a.shape), a.dtype) for a in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
