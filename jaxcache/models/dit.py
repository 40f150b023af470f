"""Single-stream diffusion transformer in the style of Z-Image.

Caption tokens are refined once (step-independent: the cache's constant slot), then appended to
the image tokens; every main block is an adaLN DiT block over the joint sequence, modulated by
the timestep embedding. The model exposes the four pieces :func:`jaxcache.from_nnx`
needs: ``condition_encoder``, ``embedder``, ``blocks`` (stacked) and ``final_layer``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxcache.models import DiT, get_config
  >>> cfg = get_config("dit", "tiny")
  >>> model = DiT(cfg, rngs=nnx.Rngs(0))
  >>> x = jnp.zeros((2, *cfg.image_shape))
  >>> cond = jnp.zeros((2, cfg.caption_len), jnp.int32)
  >>> model(x, jnp.array([0.5, 0.5]), cond).shape
  (2, 8, 8, 4)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcache.models import layers, pieces
from jaxcache.models.configs import ModelConfig

__all__ = ["DiT", "DiTBlock", "DiTCaptionEncoder", "DiTEmbedder", "DiTFinalLayer"]


class DiTCaptionEncoder(pieces.CaptionEncoder):
    """Caption token ids to caption states: embedding, 1D position embedding, refiners.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, project=False, rngs=rngs)


class DiTEmbedder(pieces.PatchTimestepEmbedder):
    """Per-step embedding: image patches plus 2D positions, the timestep vector, the caption.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __call__(
        self, x: jax.Array, t: jax.Array, constant: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Embeds one denoising step's input.

        Args:
          x: latents ``[B, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
          constant: caption states ``[B, L, D]`` from the caption encoder.

        Returns:
          ``(h, c)``: tokens ``[B, T_img + L, D]`` (image first, then caption) and the
          conditioning vector ``[B, D]``, both in the compute dtype.
        """
        tokens, c = self.image_and_time(x, t)
        return jnp.concatenate([tokens, constant.astype(self.config.dtype)], axis=1), c


class DiTBlock(nnx.Module):
    """One adaLN DiT block over the joint image + caption sequence.

    Shift, scale and gate for the attention and the MLP branch come from the conditioning
    vector (SiLU + Linear to ``6 * D``).

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.attn_implementation = config.attn_implementation
        self.adaln = layers.AdaLNModulation(config.width, 6, **kw)
        self.qkv = layers.QKVProjection(
            config.width, config.heads, qk_norm=config.qk_norm, **kw
        )
        self.proj = nnx.Linear(config.width, config.width, kernel_init=layers.XAVIER_INIT, **kw)
        self.mlp = layers.Mlp(config.width, int(config.width * config.mlp_ratio), **kw)

    def modulated_input(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """The attention branch's input after timestep modulation (TeaCache's signal)."""
        shift_a, scale_a, *_ = self.adaln(c)
        return layers.modulate(layers.layer_norm(h), shift_a, scale_a)

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """``[B, T, D]`` tokens and ``[B, D]`` conditioning to ``[B, T, D]`` tokens."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(c)
        q, k, v = self.qkv(layers.modulate(layers.layer_norm(h), shift_a, scale_a))
        a = layers.attention(q, k, v, implementation=self.attn_implementation)
        h = h + gate_a[:, None] * self.proj(layers.merge_heads(a))
        m = self.mlp(layers.modulate(layers.layer_norm(h), shift_m, scale_m))
        return h + gate_m[:, None] * m


class DiTFinalLayer(pieces.FinalLayer):
    """adaLN final layer on the image tokens of the joint sequence.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        """Maps tokens ``[B, T_img + L, D]`` to a float32 prediction ``[B, H, W, C]``."""
        return self.predict(h[:, : self.config.num_image_tokens], c)


class DiT(nnx.Module):
    """Single-stream diffusion transformer (Z-Image style) with stacked main blocks.

    Pieces (the :func:`jaxcache.from_nnx` protocol):

    * ``condition_encoder(cond) -> constant``: int32 caption ids ``[B, L]`` to ``[B, L, D]``.
    * ``embedder(x, t, constant) -> (h, c)``: ``h`` is ``[B, T_img + L, D]``, ``c`` is ``[B, D]``.
    * ``blocks(h, c) -> h``: one :class:`DiTBlock`; parameters stacked on a leading axis of
      length ``num_layers``, so call it on one slice at a time.
    * ``final_layer(h, c) -> prediction``: float32 ``[B, H, W, C]``.

    Args:
      config: model config.
      rngs: random number streams for initialisation.

    Attributes:
      config: the model config.
      num_layers: number of stacked main blocks (``config.depth``).
      dual_stream: False: one hidden state, cached in slot stream 1.
    """

    dual_stream = False

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if config.single_depth:
            raise ValueError(
                f"the DiT has one kind of block: single_depth must be 0, got "
                f"{config.single_depth} (single-stream blocks belong to the mmdit's FLUX layout)"
            )
        self.config = config
        self.num_layers = config.depth
        self.condition_encoder = DiTCaptionEncoder(config, rngs=rngs)
        self.embedder = DiTEmbedder(config, rngs=rngs)
        self.blocks = layers.stack_blocks(
            functools.partial(_make_block, config), config.depth, rngs
        )
        self.final_layer = DiTFinalLayer(config, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        """The full, uncached forward pass.

        Args:
          x: latents ``[B, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
          cond: int caption token ids ``[B, L]``.

        Returns:
          Float32 prediction ``[B, H, W, C]``.
        """
        constant = self.condition_encoder(cond)
        h, c = self.embedder(x, t, constant)
        h = layers.scan_blocks(self.blocks, h, c)
        return self.final_layer(h, c)


def _make_block(config: ModelConfig, rngs: nnx.Rngs) -> DiTBlock:
    return DiTBlock(config, rngs=rngs)
