"""Dual-stream diffusion transformer (MMDiT) in the style of FLUX, SD3 and Qwen-Image.

Image and text tokens keep separate weights (modulation, projections, MLPs) and meet only in a
joint attention over ``concat(text, image)``. The hidden state is the pair ``(image, text)``,
which maps onto the two slot streams of a step cache. The model exposes the four pieces
:func:`jaxcache.from_nnx` needs.

With ``config.single_depth > 0`` the double-stream blocks are followed by FLUX.1's
single-stream blocks (:class:`MMDiTSingleBlock`), which work on the concatenated
``concat([text, image])`` tokens with one set of weights; the model then has two block stacks
(``block_stacks = ("blocks", "single_blocks")``), which :func:`jaxcache.from_nnx`
turns into a network of two block kinds whose layer indices run across both.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxcache.models import MMDiT, get_config
  >>> cfg = get_config("mmdit", "tiny")
  >>> model = MMDiT(cfg, rngs=nnx.Rngs(0))
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

__all__ = [
    "MMDiT",
    "MMDiTBlock",
    "MMDiTEmbedder",
    "MMDiTFinalLayer",
    "MMDiTSingleBlock",
    "MMDiTTextEncoder",
]


class MMDiTTextEncoder(pieces.CaptionEncoder):
    """Text token ids to text states: embedding, 1D positions, a linear map, refiners.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        # The linear map stands in for the context embedder that maps a text encoder's states
        # to model width.
        super().__init__(config, project=True, rngs=rngs)


class MMDiTEmbedder(pieces.PatchTimestepEmbedder):
    """Per-step embedding: image patches plus 2D positions, and the timestep vector.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __call__(
        self, x: jax.Array, t: jax.Array, constant: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """Embeds one denoising step's input.

        Args:
          x: latents ``[B, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
          constant: text states ``[B, L, D]`` from the text encoder.

        Returns:
          ``((image, text), c)``: image tokens ``[B, T_img, D]``, text tokens ``[B, L, D]`` and
          the conditioning vector ``[B, D]``, all in the compute dtype.
        """
        img, c = self.image_and_time(x, t)
        return (img, constant.astype(self.config.dtype)), c


class _Stream(nnx.Module):
    """The per-stream weights of a dual-stream block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.adaln = layers.AdaLNModulation(config.width, 6, **kw)
        self.qkv = layers.QKVProjection(
            config.width, config.heads, qk_norm=config.qk_norm, **kw
        )
        self.proj = nnx.Linear(config.width, config.width, kernel_init=layers.XAVIER_INIT, **kw)
        self.mlp = layers.Mlp(config.width, int(config.width * config.mlp_ratio), **kw)


class MMDiTBlock(nnx.Module):
    """One dual-stream block: per-stream adaLN, projections and MLPs; joint attention.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_implementation = config.attn_implementation
        self.img = _Stream(config, rngs=rngs)
        self.txt = _Stream(config, rngs=rngs)

    def modulated_input(self, h: tuple[jax.Array, jax.Array], c: jax.Array) -> jax.Array:
        """The image stream's attention input after timestep modulation (TeaCache's signal)."""
        shift, scale, *_ = self.img.adaln(c)
        return layers.modulate(layers.layer_norm(h[0]), shift, scale)

    def __call__(
        self, h: tuple[jax.Array, jax.Array], c: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """``((image [B, T, D], text [B, L, D]), c [B, D]) -> (image, text)``."""
        img, txt = h
        img_mod = self.img.adaln(c)
        txt_mod = self.txt.adaln(c)
        qi, ki, vi = self.img.qkv(layers.modulate(layers.layer_norm(img), *img_mod[:2]))
        qt, kt, vt = self.txt.qkv(layers.modulate(layers.layer_norm(txt), *txt_mod[:2]))
        # Joint attention over text then image tokens, as in FLUX / SD3.
        q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((qt, qi), (kt, ki), (vt, vi)))
        a = layers.merge_heads(
            layers.attention(q, k, v, implementation=self.attn_implementation)
        )
        n_txt = txt.shape[1]
        txt_a, img_a = a[:, :n_txt], a[:, n_txt:]
        img = self._residual(self.img, img, img_a, img_mod)
        txt = self._residual(self.txt, txt, txt_a, txt_mod)
        return img, txt

    @staticmethod
    def _residual(
        stream: _Stream, x: jax.Array, attn_out: jax.Array, mod: tuple[jax.Array, ...]
    ) -> jax.Array:
        _, _, gate_a, shift_m, scale_m, gate_m = mod
        x = x + gate_a[:, None] * stream.proj(attn_out)
        m = stream.mlp(layers.modulate(layers.layer_norm(x), shift_m, scale_m))
        return x + gate_m[:, None] * m


class MMDiTSingleBlock(nnx.Module):
    """One single-stream block (FLUX.1's): one set of weights over the joint text + image tokens.

    ``x`` is ``concat([text, image], axis=1)``; with ``(shift, scale, gate)`` from the
    conditioning vector, ``m = LayerNorm(x) * (1 + scale) + shift``; one fused linear maps ``m``
    to the queries, keys, values and the MLP's hidden units in parallel; queries and keys are
    RMS-normalised per head (``qk_norm``); then

        ``x + gate * linear2(concat(attention(q, k, v), gelu(mlp_hidden)))``.

    The MLP's hidden size is ``width * mlp_ratio``. The block works on one token sequence, not
    on the network's ``(image, text)`` pair: :meth:`enter` and :meth:`leave` convert (see
    :class:`jaxcache.BlockKind`).

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.attn_implementation = config.attn_implementation
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.mlp_hidden = int(config.width * config.mlp_ratio)
        width = config.width
        self.adaln = layers.AdaLNModulation(width, 3, **kw)
        self.linear1 = nnx.Linear(
            width, 3 * width + self.mlp_hidden, kernel_init=layers.XAVIER_INIT, **kw
        )
        if config.qk_norm:
            self.q_norm = layers.RMSNorm(self.head_dim, param_dtype=config.param_dtype)
            self.k_norm = layers.RMSNorm(self.head_dim, param_dtype=config.param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None
        self.linear2 = nnx.Linear(
            width + self.mlp_hidden, width, kernel_init=layers.XAVIER_INIT, **kw
        )

    @staticmethod
    def enter(h: tuple[jax.Array, jax.Array], ctx: jax.Array) -> jax.Array:
        """The network's ``(image, text)`` pair as one sequence ``concat([text, image])``."""
        del ctx
        image, text = h
        return jnp.concatenate([text, image], axis=1)

    @staticmethod
    def leave(
        state: jax.Array, h: tuple[jax.Array, jax.Array], ctx: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Splits ``concat([text, image])`` back into ``(image, text)``; ``h`` (the pair the
        stack entered with) gives the text length."""
        del ctx
        n_text = h[1].shape[1]
        return state[:, n_text:], state[:, :n_text]

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """``x [B, L + T, D]`` (text then image) and ``c [B, D]`` to ``[B, L + T, D]``."""
        shift, scale, gate = self.adaln(c)
        b, n, d = x.shape
        fused = self.linear1(layers.modulate(layers.layer_norm(x), shift, scale))
        qkv = fused[..., : 3 * d].reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        a = layers.merge_heads(
            layers.attention(q, k, v, implementation=self.attn_implementation)
        )
        mlp = jax.nn.gelu(fused[..., 3 * d :], approximate=True)
        return x + gate[:, None] * self.linear2(jnp.concatenate([a, mlp], axis=-1))


class MMDiTFinalLayer(pieces.FinalLayer):
    """adaLN final layer on the image stream.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __call__(self, h: tuple[jax.Array, jax.Array], c: jax.Array) -> jax.Array:
        """Maps ``(image, text)`` tokens to a float32 prediction ``[B, H, W, C]``."""
        return self.predict(h[0], c)


class MMDiT(nnx.Module):
    """Dual-stream diffusion transformer (FLUX / SD3 / Qwen-Image style) with stacked blocks.

    Pieces (the :func:`jaxcache.from_nnx` protocol):

    * ``condition_encoder(cond) -> constant``: int32 text ids ``[B, L]`` to ``[B, L, D]``.
    * ``embedder(x, t, constant) -> ((image, text), c)``: image ``[B, T_img, D]``, text
      ``[B, L, D]``, conditioning ``[B, D]``.
    * ``blocks((image, text), c) -> (image, text)``: one :class:`MMDiTBlock`; parameters
      stacked on a leading axis of length ``config.depth``.
    * ``single_blocks(tokens, c) -> tokens`` (only with ``config.single_depth > 0``): one
      :class:`MMDiTSingleBlock` on ``concat([text, image])``, stacked on a leading axis of
      length ``config.single_depth``; it runs after the double-stream blocks, between its
      ``enter`` and ``leave``.
    * ``final_layer((image, text), c) -> prediction``: float32 ``[B, H, W, C]``.

    Args:
      config: model config.
      rngs: random number streams for initialisation.

    Attributes:
      config: the model config.
      num_layers: number of stacked blocks of both kinds (``depth + single_depth``).
      dual_stream: True: the hidden state is ``(image, text)``; a cache keeps image states in
        slot stream 1 and text states in stream 2.
      block_stacks: ``("blocks", "single_blocks")`` when there are single-stream blocks (the
        stacks :func:`jaxcache.from_nnx` reads, in layer order); not set otherwise.
    """

    dual_stream = True

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.num_layers = config.depth + config.single_depth
        self.condition_encoder = MMDiTTextEncoder(config, rngs=rngs)
        self.embedder = MMDiTEmbedder(config, rngs=rngs)
        self.blocks = layers.stack_blocks(
            functools.partial(_make_block, config), config.depth, rngs
        )
        if config.single_depth:
            self.single_blocks = layers.stack_blocks(
                functools.partial(_make_single_block, config), config.single_depth, rngs
            )
            self.block_stacks = ("blocks", "single_blocks")
        self.final_layer = MMDiTFinalLayer(config, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        """The full, uncached forward pass.

        Args:
          x: latents ``[B, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
          cond: int text token ids ``[B, L]``.

        Returns:
          Float32 prediction ``[B, H, W, C]``.
        """
        constant = self.condition_encoder(cond)
        h, c = self.embedder(x, t, constant)
        h = layers.scan_blocks(self.blocks, h, c)
        if self.config.single_depth:
            tokens = MMDiTSingleBlock.enter(h, c)
            tokens = layers.scan_blocks(self.single_blocks, tokens, c)
            h = MMDiTSingleBlock.leave(tokens, h, c)
        return self.final_layer(h, c)


def _make_block(config: ModelConfig, rngs: nnx.Rngs) -> MMDiTBlock:
    return MMDiTBlock(config, rngs=rngs)


def _make_single_block(config: ModelConfig, rngs: nnx.Rngs) -> MMDiTSingleBlock:
    return MMDiTSingleBlock(config, rngs=rngs)
