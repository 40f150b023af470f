"""Reference diffusion transformers for jaxcache (Flax NNX).

Two architectures, both exposing the four pieces :func:`jaxcache.from_nnx` splits:

* :class:`DiT`: single stream, Z-Image style; the caption states are the cache's constant.
* :class:`MMDiT`: dual stream, FLUX / SD3 / Qwen-Image style; the hidden state is the pair
  ``(image, text)``. With ``single_depth > 0`` (the ``flux`` size: 19 + 38) the double-stream
  blocks are followed by FLUX.1's single-stream blocks (:class:`MMDiTSingleBlock`), a second
  block stack of another kind.
* :class:`Wan`: text-to-video, Wan 2.1 style (its own config, :class:`WanConfig`, and sizes
  ``tiny``, ``small``, ``wan-1.3b``); video tokens attend to the text only through each block's
  cross-attention, whose text keys and values a block's ``layer_constant`` computes once per
  sampling run.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxcache.models import create_model
  >>> from jaxcache.nnx import from_nnx
  >>> model = create_model("dit", "tiny", rngs=nnx.Rngs(0))
  >>> network, params = from_nnx(model)
  >>> x = jnp.zeros((1, 8, 8, 4))
  >>> network(params, x, jnp.array([0.3]), jnp.zeros((1, 4), jnp.int32)).shape
  (1, 8, 8, 4)
"""

from jaxcache.models.configs import (
    ARCHS,
    CONFIGS,
    SIZES,
    WAN_CONFIGS,
    WAN_SIZES,
    ModelConfig,
    WanConfig,
    get_config,
)
from jaxcache.models.dit import DiT
from jaxcache.models.factory import create_model
from jaxcache.models.mmdit import MMDiT, MMDiTSingleBlock
from jaxcache.models.wan import Wan

__all__ = [
    "ARCHS",
    "CONFIGS",
    "SIZES",
    "WAN_CONFIGS",
    "WAN_SIZES",
    "DiT",
    "MMDiT",
    "MMDiTSingleBlock",
    "ModelConfig",
    "Wan",
    "WanConfig",
    "create_model",
    "get_config",
]
