"""Reference diffusion transformers for jaxcache (Flax NNX).

Two architectures, both exposing the four pieces :func:`jaxcache.network.from_nnx` splits:

* :class:`DiT`: single stream, Z-Image style; the caption states are the cache's constant.
* :class:`MMDiT`: dual stream, FLUX / SD3 / Qwen-Image style; the hidden state is the pair
  ``(image, text)``. With ``single_depth > 0`` (the ``flux`` size: 19 + 38) the double-stream
  blocks are followed by FLUX.1's single-stream blocks (:class:`MMDiTSingleBlock`), a second
  block stack of another kind.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxcache.models import create_model
  >>> from jaxcache.network import from_nnx
  >>> model = create_model("dit", "tiny", rngs=nnx.Rngs(0))
  >>> network, params = from_nnx(model)
  >>> x = jnp.zeros((1, 8, 8, 4))
  >>> network(params, x, jnp.array([0.3]), jnp.zeros((1, 4), jnp.int32)).shape
  (1, 8, 8, 4)
"""

from jaxcache.models.configs import ARCHS, CONFIGS, SIZES, ModelConfig, get_config
from jaxcache.models.dit import DiT
from jaxcache.models.factory import create_model
from jaxcache.models.mmdit import MMDiT, MMDiTSingleBlock

__all__ = [
    "ARCHS",
    "CONFIGS",
    "SIZES",
    "DiT",
    "MMDiT",
    "MMDiTSingleBlock",
    "ModelConfig",
    "create_model",
    "get_config",
]
