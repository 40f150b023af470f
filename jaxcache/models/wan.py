"""Text-to-video diffusion transformer in the style of Wan 2.1.

Video latents ``[B, F, H, W, C]`` are cut into 3D patches (``(1, 2, 2)``: one frame, two rows,
two columns) and embedded as ``F * H/2 * W/2`` tokens with a fixed 3D sin-cos position embedding.
Every block runs self-attention over the video tokens, **cross-attention to the text states**
(the only way text reaches the video), and a feed-forward, with Wan's six-way timestep
modulation (a learned per-block table plus a projection of the timestep embedding: shift, scale
and gate of the self-attention and of the feed-forward). A final layer, modulated two ways,
maps the tokens back to patches and unpatchifies them with the input's shape.

The keys and values of the text in each block's cross-attention depend only on the text states
and the block's weights, not on the step: :meth:`WanBlock.layer_constant` computes them, and
:func:`jaxcache.from_nnx` finds that method, so a sampling run computes them once per block
before the loop (:attr:`jaxcache.Network.layer_constant`) instead of at every evaluation. The
model's own :meth:`Wan.__call__` computes them in each block at every call, as Wan does.

The input's shape reaches the final layer in the per-step context (:class:`WanContext`'s
``video_shape``, a :class:`jaxcache.network.Static`), so any video size the patches divide is
accepted at call time.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxcache.models import Wan, get_config
  >>> cfg = get_config("wan", "tiny")
  >>> model = Wan(cfg, rngs=nnx.Rngs(0))
  >>> x = jnp.zeros((2, *cfg.latent_shape))
  >>> text = jnp.zeros((2, cfg.text_len, cfg.text_dim))
  >>> model(x, jnp.array([0.5, 0.5]), text).shape
  (2, 2, 4, 4, 4)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcache.models import layers
from jaxcache.models.configs import WanConfig
from jaxcache.network import Static

__all__ = [
    "Wan",
    "WanBlock",
    "WanContext",
    "WanEmbedder",
    "WanFinalLayer",
    "WanTextEncoder",
    "check_video",
    "patchify_3d",
    "sincos_3d",
    "unpatchify_3d",
]

_F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Video patches and positions


def check_video(x: jax.Array, channels: int, patch_size: tuple[int, int, int]) -> None:
    """Raises ``ValueError`` unless ``x`` is ``[B, F, H, W, channels]`` with F, H, W divisible
    by the patch."""
    if x.ndim != 5 or x.shape[-1] != channels:
        raise ValueError(
            f"x must be video latents [batch, frames, height, width, {channels}], got "
            f"shape {tuple(x.shape)}"
        )
    for name, size, patch in zip(("frames", "height", "width"), x.shape[1:4], patch_size):
        if size % patch:
            raise ValueError(
                f"x has {size} {name}, which its patch size {patch} does not divide "
                f"(patch_size {tuple(patch_size)}, shape {tuple(x.shape)})"
            )


def patchify_3d(x: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """``[B, F, H, W, C]`` to ``[B, (F/pf)(H/ph)(W/pw), pf*ph*pw*C]`` tokens (frame-major).

    A linear map of these tokens is Wan's patch embedding (a 3D convolution whose stride is its
    kernel).
    """
    b, f, h, w, c = x.shape
    pf, ph, pw = patch_size
    x = x.reshape(b, f // pf, pf, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (f // pf) * (h // ph) * (w // pw), pf * ph * pw * c)


def unpatchify_3d(
    tokens: jax.Array, patch_size: tuple[int, int, int], video_shape: tuple[int, int, int]
) -> jax.Array:
    """Inverse of :func:`patchify_3d`: tokens to ``[B, F, H, W, C]`` for ``video_shape = (F, H,
    W)``."""
    b, n, d = tokens.shape
    pf, ph, pw = patch_size
    f, h, w = video_shape
    gf, gh, gw = f // pf, h // ph, w // pw
    if gf * gh * gw != n or d % (pf * ph * pw):
        raise ValueError(
            f"cannot unpatchify {n} tokens of size {d} into video {tuple(video_shape)} with "
            f"patch {tuple(patch_size)}"
        )
    c = d // (pf * ph * pw)
    x = tokens.reshape(b, gf, gh, gw, pf, ph, pw, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f, h, w, c)


def _sincos(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_3d(dim: int, frames: int, rows: int, columns: int) -> np.ndarray:
    """Fixed 3D sin-cos position embedding of a frame-major patch grid.

    The rows and the columns get ``2 * (dim // 6)`` features each, the frames the rest (as
    Wan's 3D RoPE splits its head dimension). A numpy constant, read-only.

    Args:
      dim: embedding size (even).
      frames: patches along time.
      rows: patches along the height.
      columns: patches along the width.

    Returns:
      Float32 ``[frames * rows * columns, dim]``.
    """
    if dim % 2:
        raise ValueError(f"3D sin-cos embedding size must be even, got {dim}")
    side = 2 * (dim // 6)
    f, r, c = np.meshgrid(np.arange(frames), np.arange(rows), np.arange(columns), indexing="ij")
    emb = np.concatenate(
        [_sincos(dim - 2 * side, f.reshape(-1)), _sincos(side, r.reshape(-1)),
         _sincos(side, c.reshape(-1))],
        axis=1,
    ).astype(np.float32)
    emb.flags.writeable = False  # shared through the cache: guard against in-place edits
    return emb


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` in float32 (as Wan modulates), back in ``x``'s dtype."""
    out = x.astype(_F32) * (1 + scale[:, None]) + shift[:, None]
    return out.astype(x.dtype)


def _gated(x: jax.Array, y: jax.Array, gate: jax.Array) -> jax.Array:
    """``x + y * gate``, the gate in float32."""
    return x + (y.astype(_F32) * gate[:, None]).astype(x.dtype)


class _AffineLayerNorm(nnx.Module):
    """LayerNorm with a learned scale and bias, statistics in float32 (Wan's ``norm3``)."""

    def __init__(self, width: int, *, epsilon: float, param_dtype=_F32):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((width,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layers.layer_norm(x, self.epsilon).astype(_F32)
        y = y * self.scale[...].astype(_F32) + self.bias[...].astype(_F32)
        return y.astype(x.dtype)


def _modulation_table(rngs: nnx.Rngs, rows: int, width: int, param_dtype) -> nnx.Param:
    """A learned ``[rows, width]`` modulation table, ``normal / sqrt(width)`` as Wan's."""
    value = jax.random.normal(rngs.params(), (rows, width), _F32) / math.sqrt(width)
    return nnx.Param(value.astype(param_dtype))


# --------------------------------------------------------------------------------------------
# The pieces


class WanContext(NamedTuple):
    """What every block and the final layer read at one step.

    Attributes:
      e: the timestep embedding ``[B, D]`` (float32); the final layer's modulation.
      e0: its projection to the blocks' six modulation vectors ``[B, 6, D]`` (float32).
      video_shape: the input's ``(frames, height, width)``, for the final layer's unpatchify
        (a :class:`~jaxcache.network.Static`: known while tracing, no array).
    """

    e: jax.Array
    e0: jax.Array
    video_shape: Static


class WanTextEncoder(nnx.Module):
    """Text states ``[B, L, text_dim]`` (a text encoder's output) to ``[B, L, D]``.

    Wan's text embedding: ``Linear -> GELU (tanh) -> Linear``. Step-independent: the condition
    path.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(config.text_dim, config.width, kernel_init=layers.INPUT_INIT, **kw)
        self.fc2 = nnx.Linear(config.width, config.width, kernel_init=layers.XAVIER_INIT, **kw)

    def __call__(self, cond: jax.Array) -> jax.Array:
        """Maps float text states ``[B, L, text_dim]`` to ``[B, L, D]`` in the compute dtype."""
        cfg = self.config
        if cond.ndim != 3 or cond.shape[-1] != cfg.text_dim or not jnp.issubdtype(
            cond.dtype, jnp.floating
        ):
            raise ValueError(
                f"cond must be float text states [batch, tokens, {cfg.text_dim}] (a text "
                f"encoder's output), got {cond.dtype}{list(cond.shape)}"
            )
        h = self.fc1(cond.astype(cfg.dtype))
        return self.fc2(jax.nn.gelu(h, approximate=True))


class WanEmbedder(nnx.Module):
    """Per-step embedding: 3D patches plus positions, and the timestep's modulation.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(param_dtype=config.param_dtype, rngs=rngs)
        self.patch_embed = nnx.Linear(
            config.patch_dim, config.width, kernel_init=layers.INPUT_INIT, dtype=config.dtype,
            **kw,
        )
        # The timestep path runs in float32, as Wan's does.
        self.time_fc1 = nnx.Linear(config.freq_dim, config.width, kernel_init=layers.INPUT_INIT,
                                   dtype=_F32, **kw)
        self.time_fc2 = nnx.Linear(config.width, config.width, kernel_init=layers.INPUT_INIT,
                                   dtype=_F32, **kw)
        self.time_projection = nnx.Linear(
            config.width, 6 * config.width, kernel_init=layers.ADALN_INIT,
            bias_init=layers.ZEROS_INIT, dtype=_F32, **kw,
        )

    def __call__(
        self, x: jax.Array, t: jax.Array, constant: jax.Array
    ) -> tuple[jax.Array, WanContext]:
        """Embeds one denoising step's input.

        Args:
          x: video latents ``[B, F, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
          constant: the text states (unused here: text reaches the blocks through their
            cross-attention's keys and values).

        Returns:
          ``(tokens, ctx)``: video tokens ``[B, N, D]`` in the compute dtype and the
          :class:`WanContext`.
        """
        del constant
        cfg = self.config
        check_video(x, cfg.channels, cfg.patch_size)
        tokens = self.patch_embed(patchify_3d(x.astype(cfg.dtype), cfg.patch_size))
        grid = tuple(s // p for s, p in zip(x.shape[1:4], cfg.patch_size))
        tokens = tokens + jnp.asarray(sincos_3d(cfg.width, *grid), cfg.dtype)[None]
        t = layers.broadcast_times(t, x.shape[0])
        freq = layers.timestep_embedding(t, cfg.freq_dim)  # of 1000 t, as Wan's integer steps
        e = self.time_fc2(jax.nn.silu(self.time_fc1(freq)))
        e0 = self.time_projection(jax.nn.silu(e)).reshape(x.shape[0], 6, cfg.width)
        return tokens, WanContext(e, e0, Static(tuple(int(s) for s in x.shape[1:4])))


class WanBlock(nnx.Module):
    """One Wan block: self-attention, cross-attention to the text, feed-forward.

    With ``(shift, scale, gate)`` for the self-attention and for the feed-forward from the
    block's modulation table plus the step's projection ``e0``:

        ``x += gate_a * self_attn(LN(x) * (1 + scale_a) + shift_a)``
        ``x += cross_attn(LN_affine(x), text keys, text values)``
        ``x += gate_f * ffn(LN(x) * (1 + scale_f) + shift_f)``

    Queries and keys are RMS-normalised over the whole width (``qk_norm``).

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        width = config.width
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.eps = config.eps
        self.attn_implementation = config.attn_implementation
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        linear = functools.partial(nnx.Linear, width, width, kernel_init=layers.XAVIER_INIT, **kw)

        def norm():
            if not config.qk_norm:
                return None
            return layers.RMSNorm(width, epsilon=config.eps, param_dtype=config.param_dtype)

        self.modulation = _modulation_table(rngs, 6, width, config.param_dtype)
        self.self_q, self.self_k, self.self_v, self.self_o = linear(), linear(), linear(), linear()
        self.self_norm_q, self.self_norm_k = norm(), norm()
        self.norm3 = (
            _AffineLayerNorm(width, epsilon=config.eps, param_dtype=config.param_dtype)
            if config.cross_attn_norm else None
        )
        self.cross_q, self.cross_k = linear(), linear()
        self.cross_v, self.cross_o = linear(), linear()
        self.cross_norm_q, self.cross_norm_k = norm(), norm()
        self.ffn = layers.Mlp(width, config.ffn_dim, **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def _modulation(self, ctx: WanContext) -> tuple[jax.Array, ...]:
        e = self.modulation[...].astype(_F32)[None] + ctx.e0  # [B, 6, D], float32
        return tuple(e[:, i] for i in range(6))

    def layer_constant(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cross-attention's keys and values of the text states (step-independent).

        Args:
          text: text states ``[B, L, D]`` (the condition path's output).

        Returns:
          ``(keys, values)``, each ``[B, L, heads, head_dim]``.
        """
        k = self.cross_k(text)
        if self.cross_norm_k is not None:
            k = self.cross_norm_k(k)
        return self._heads(k), self._heads(self.cross_v(text))

    def modulated_input(self, x: jax.Array, ctx: WanContext) -> jax.Array:
        """The self-attention's input after timestep modulation (TeaCache's signal)."""
        shift, scale, *_ = self._modulation(ctx)
        return _modulate(layers.layer_norm(x, self.eps), shift, scale)

    def __call__(
        self, x: jax.Array, ctx: WanContext, layer_constant: tuple[jax.Array, jax.Array]
    ) -> jax.Array:
        """``[B, N, D]`` video tokens to ``[B, N, D]``.

        Args:
          x: video tokens.
          ctx: the step's :class:`WanContext`.
          layer_constant: this block's text keys and values (:meth:`layer_constant`).
        """
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self._modulation(ctx)
        y = _modulate(layers.layer_norm(x, self.eps), shift_a, scale_a)
        q, k = self.self_q(y), self.self_k(y)
        if self.self_norm_q is not None:
            q, k = self.self_norm_q(q), self.self_norm_k(k)
        a = layers.attention(self._heads(q), self._heads(k), self._heads(self.self_v(y)),
                             implementation=self.attn_implementation)
        x = _gated(x, self.self_o(layers.merge_heads(a)), gate_a)

        text_k, text_v = layer_constant
        q = self.cross_q(x if self.norm3 is None else self.norm3(x))
        if self.cross_norm_q is not None:
            q = self.cross_norm_q(q)
        a = layers.attention(self._heads(q), text_k.astype(q.dtype), text_v.astype(q.dtype),
                             implementation=self.attn_implementation)
        x = x + self.cross_o(layers.merge_heads(a))

        y = self.ffn(_modulate(layers.layer_norm(x, self.eps), shift_f, scale_f))
        return _gated(x, y, gate_f)


class WanFinalLayer(nnx.Module):
    """Wan's head: two-way modulated LayerNorm, a linear map to patches, the unpatchify.

    Args:
      config: model config.
      rngs: random number streams for initialisation.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.modulation = _modulation_table(rngs, 2, config.width, config.param_dtype)
        # Not zero-initialised (Wan's is): a fresh model's output depends on its input.
        self.linear = nnx.Linear(
            config.width, config.patch_dim, kernel_init=layers.XAVIER_INIT, dtype=config.dtype,
            param_dtype=config.param_dtype, rngs=rngs,
        )

    def __call__(self, h: jax.Array, ctx: WanContext) -> jax.Array:
        """Maps tokens ``[B, N, D]`` to a float32 prediction shaped like the input video."""
        cfg = self.config
        e = self.modulation[...].astype(_F32)[None] + ctx.e[:, None]  # [B, 2, D]
        out = self.linear(_modulate(layers.layer_norm(h, cfg.eps), e[:, 0], e[:, 1]))
        # float32 out: the solver state is float32 and an exact upcast costs nothing.
        return unpatchify_3d(out.astype(_F32), cfg.patch_size, ctx.video_shape.value)


class Wan(nnx.Module):
    """Text-to-video diffusion transformer (Wan 2.1 style) with stacked blocks.

    Pieces (the :func:`jaxcache.from_nnx` protocol):

    * ``condition_encoder(cond) -> constant``: float text states ``[B, L, text_dim]`` to
      ``[B, L, D]``.
    * ``embedder(x, t, constant) -> (tokens, ctx)``: ``[B, F, H, W, C]`` video latents to
      ``[B, N, D]`` tokens and a :class:`WanContext` (which carries the video's shape).
    * ``blocks(tokens, ctx, layer_constant) -> tokens``: one :class:`WanBlock`, parameters
      stacked on a leading axis of length ``depth``; ``blocks.layer_constant(constant)`` gives a
      block's text keys and values, computed once per sampling run by :func:`jaxcache.sample`.
    * ``final_layer(tokens, ctx) -> prediction``: float32 ``[B, F, H, W, C]``.

    Time: ``t`` in ``[0, 1]``, scaled by 1000 inside the timestep embedding
    (``TimeConvention.continuous()``, the default of ``from_nnx(model)``).

    Args:
      config: model config.
      rngs: random number streams for initialisation.

    Attributes:
      config: the model config.
      num_layers: number of blocks (``config.depth``).
      dual_stream: False: the hidden state is the video tokens alone.
    """

    dual_stream = False

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, WanConfig):
            raise TypeError(
                f"Wan needs a WanConfig (get_config('wan', size)), got {type(config).__name__}"
            )
        self.config = config
        self.num_layers = config.depth
        self.condition_encoder = WanTextEncoder(config, rngs=rngs)
        self.embedder = WanEmbedder(config, rngs=rngs)
        self.blocks = layers.stack_blocks(
            functools.partial(_make_block, config), config.depth, rngs
        )
        self.final_layer = WanFinalLayer(config, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        """The full, uncached forward pass.

        Each block computes its text keys and values here, at every call, as Wan does.

        Args:
          x: video latents ``[B, F, H, W, C]``.
          t: ``[B]`` (or scalar) times in ``[0, 1]``.
          cond: float text states ``[B, L, text_dim]``.

        Returns:
          Float32 prediction ``[B, F, H, W, C]``.
        """
        text = self.condition_encoder(cond)
        h, ctx = self.embedder(x, t, text)
        graphdef, state = nnx.split(self.blocks)

        def layer(h, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(h, ctx, block.layer_constant(text)), None

        h, _ = jax.lax.scan(layer, h, state)
        return self.final_layer(h, ctx)


def _make_block(config: WanConfig, rngs: nnx.Rngs) -> WanBlock:
    return WanBlock(config, rngs=rngs)
