"""Pieces both reference architectures share: caption encoder, patch + timestep embedding, and
the adaLN final layer.

Each architecture subclasses these and adds only what differs (how the caption meets the image
tokens, which stream the final layer reads). Attribute names and creation order are part of the
parameter layout: checkpoints and seeded initialisation depend on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcache.models import layers
from jaxcache.models.configs import ModelConfig

__all__ = ["CaptionEncoder", "FinalLayer", "PatchTimestepEmbedder"]


class CaptionEncoder(nnx.Module):
    """Token ids to caption states: embedding, 1D positions, an optional linear map, refiners.

    Args:
      config: model config.
      project: add a linear map after the embedding (the context embedder that maps a text
        encoder's states to model width in FLUX-style models).
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, project: bool = False, rngs: nnx.Rngs):
        self.width = config.width
        self.dtype = config.dtype
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.embed = nnx.Embed(config.vocab_size, config.width, **kw)
        if project:
            self.context_embed = nnx.Linear(
                config.width, config.width, kernel_init=layers.INPUT_INIT, **kw
            )
        self.refiners = nnx.List([
            layers.TransformerBlock(
                config.width, config.heads, mlp_ratio=config.mlp_ratio, qk_norm=config.qk_norm,
                attn_implementation=config.attn_implementation, **kw,
            )
            for _ in range(config.caption_refiners)
        ])

    def __call__(self, cond: jax.Array) -> jax.Array:
        """Maps int token ids ``[B, L]`` to states ``[B, L, D]`` in the compute dtype."""
        layers.check_token_ids(cond)
        pos = jnp.asarray(layers.sincos_1d(self.width, cond.shape[1]), self.dtype)
        h = self.embed(cond) + pos[None]
        if hasattr(self, "context_embed"):
            h = self.context_embed(h)
        for block in self.refiners:
            h = block(h)
        return h


class PatchTimestepEmbedder(nnx.Module):
    """Image patches plus 2D positions, and the timestep conditioning vector.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = nnx.Linear(
            config.patch_dim, config.width, kernel_init=layers.INPUT_INIT, dtype=config.dtype,
            param_dtype=config.param_dtype, rngs=rngs,
        )
        self.t_embed = layers.TimestepEmbedder(
            config.width, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )

    def image_and_time(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(image tokens [B, T_img, D], c [B, D])`` in the compute dtype.

        Args:
          x: latents ``[B, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
        """
        cfg = self.config
        layers.check_image(x, cfg.image_shape)
        tokens = self.patch_embed(layers.patchify(x.astype(cfg.dtype), cfg.patch_size))
        pos = layers.sincos_2d(cfg.width, cfg.grid_size, cfg.grid_size)
        tokens = tokens + jnp.asarray(pos, cfg.dtype)[None]
        return tokens, self.t_embed(layers.broadcast_times(t, x.shape[0]))


class FinalLayer(nnx.Module):
    """adaLN final layer: image tokens back to a float32 prediction shaped like the input.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.adaln = layers.AdaLNModulation(config.width, 2, **kw)
        self.linear = nnx.Linear(
            config.width, config.patch_dim, kernel_init=layers.XAVIER_INIT, **kw
        )

    def predict(self, image: jax.Array, c: jax.Array) -> jax.Array:
        """Maps image tokens ``[B, T_img, D]`` to a float32 prediction ``[B, H, W, C]``."""
        cfg = self.config
        shift, scale = self.adaln(c)
        out = self.linear(layers.modulate(layers.layer_norm(image), shift, scale))
        # float32 out: the solver state is float32 and an exact upcast costs nothing.
        out = out.astype(jnp.float32)
        return layers.unpatchify(out, cfg.patch_size, cfg.image_size, cfg.image_size)
