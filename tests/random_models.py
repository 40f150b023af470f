"""Reference models with seeded random weights, built without compiling their initialisers;
and the random draws of test data, bit for bit ``jax.random``'s, from one program per kind.

``create_model`` runs dozens of small initialiser programs (tens of seconds on a loaded CPU);
``nnx.eval_shape`` gives the same classes, structure and parameter layout for free, and numpy
fills the weights. Every weight is non-zero, so a model's output depends on every input.

``jax.random.normal(key, shape)`` compiles a program per shape (0.2 to 1.5 s each on a CPU, one
of the suite's largest costs). With threefry's partitionable bits (JAX's default) each element's
bits depend on the key and the element's index alone, so the first ``n`` values of a long flat
draw, reshaped, are exactly the draw of any shape of ``n`` elements: :func:`normal`,
:func:`uniform` and :func:`randint` return ``jax.random``'s arrays from one compiled draw each.
"""

from __future__ import annotations

import functools
import math

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


_FLAT = 1 << 16  # elements of the flat draw; larger shapes are drawn as they are


def _prefix(draw, key, shape, *args):
    shape = tuple(shape)
    n = math.prod(shape)
    if n > _FLAT or not jax.config.jax_threefry_partitionable:
        return draw(key, shape, *args)
    flat = np.asarray(draw(key, (_FLAT,), *args))
    return jnp.asarray(flat[:n].reshape(shape))


def normal(key, shape=(), dtype=jnp.float32):
    """``jax.random.normal(key, shape, dtype)``, bit for bit."""
    return _prefix(lambda k, s: jax.random.normal(k, s, dtype), key, shape)


def uniform(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0):
    """``jax.random.uniform(key, shape, dtype, minval, maxval)``, bit for bit."""
    return _prefix(lambda k, s: jax.random.uniform(k, s, dtype, minval, maxval), key, shape)


def randint(key, shape, minval, maxval, dtype=jnp.int32):
    """``jax.random.randint(key, shape, minval, maxval, dtype)``, bit for bit."""
    return _prefix(lambda k, s: jax.random.randint(k, s, minval, maxval, dtype), key, shape)
