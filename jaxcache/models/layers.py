"""Building blocks shared by the reference diffusion transformers.

Everything here is architecture-neutral: input checks, timestep and position embeddings,
patchify, attention, float32 normalisation, adaLN modulation, the MLP, the unmodulated pre-norm
block used by caption refiners, and the two helpers that build and run a stack of identical
blocks with parameters on a leading layer axis.

Layouts: images are NHWC ``[B, H, W, C]``; token sequences are ``[B, T, D]``; attention heads are
``[B, T, heads, head_dim]`` (the layout ``jax.nn.dot_product_attention`` takes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcache.stack import run_layers

PyTree = Any
DType = Any

__all__ = [
    "AdaLNModulation",
    "Mlp",
    "QKVProjection",
    "RMSNorm",
    "TimestepEmbedder",
    "TransformerBlock",
    "attention",
    "attention_implementation",
    "broadcast_times",
    "check_image",
    "check_token_ids",
    "layer_norm",
    "merge_heads",
    "modulate",
    "patchify",
    "scan_blocks",
    "sincos_1d",
    "sincos_2d",
    "stack_blocks",
    "timestep_embedding",
    "unpatchify",
]

# Initialisers. Nothing is zero-initialised (unlike DiT's adaLN-Zero): a fresh model must map
# different timesteps to different outputs, or cached and uncached runs would be trivially equal.
# Inputs are projected with fan-in scaling so tokens start at unit scale; the transformer's own
# projections use Xavier as in DiT; the adaLN projection uses fan-in scaling, which keeps gates and
# scales at a standard deviation of about 0.3, so a residual update is modest and activations stay
# O(1) through many layers.
INPUT_INIT = nnx.initializers.lecun_normal()
XAVIER_INIT = nnx.initializers.xavier_uniform()
ADALN_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
ZEROS_INIT = nnx.initializers.zeros_init()


# --------------------------------------------------------------------------------------------
# Input checks (static: they run at trace time)


def check_image(x: jax.Array, image_shape: tuple[int, int, int]) -> None:
    """Raises ``ValueError`` unless ``x`` is a batch of images ``[B, *image_shape]``."""
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"x must have shape [batch, *{tuple(image_shape)}], got {x.shape}")


def check_token_ids(ids: jax.Array) -> None:
    """Raises ``ValueError`` unless ``ids`` is an integer array ``[B, L]``."""
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"cond must be integer token ids [batch, length], got {ids.dtype}{list(ids.shape)}"
        )


def broadcast_times(t: jax.Array, batch: int) -> jax.Array:
    """``t`` as a ``[batch]`` float32 array; a scalar is broadcast to the batch."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape [{batch}], got {t.shape}")
    return t


# --------------------------------------------------------------------------------------------
# Timestep embedding


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of a diffusion time in ``[0, 1]``.

    The time is scaled by 1000 first, so the frequencies match models trained on integer
    timesteps ``0..999`` (DiT, Z-Image, FLUX).

    Args:
      t: ``[B]`` times in ``[0, 1]``.
      dim: embedding size (even).
      max_period: the longest period of the sinusoids.

    Returns:
      ``[B, dim]`` float32 embedding, ``concat([cos, sin])``.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding size must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (jnp.asarray(t, jnp.float32) * 1000.0)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """Sinusoidal timestep embedding followed by a two-layer SiLU MLP.

    Args:
      width: output size ``D``.
      freq_dim: size of the sinusoidal embedding fed to the MLP.
      dtype: compute dtype of the MLP.
      param_dtype: dtype of the MLP's parameters.
      rngs: random number streams for initialisation.
    """

    def __init__(
        self,
        width: int,
        *,
        freq_dim: int = 256,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.freq_dim = freq_dim
        self.dtype = dtype
        linear = functools.partial(
            nnx.Linear, kernel_init=INPUT_INIT, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.fc1 = linear(freq_dim, width)
        self.fc2 = linear(width, width)

    def __call__(self, t: jax.Array) -> jax.Array:
        """Maps ``[B]`` times in ``[0, 1]`` to ``[B, D]`` conditioning vectors in ``dtype``."""
        emb = timestep_embedding(t, self.freq_dim).astype(self.dtype)
        return self.fc2(jax.nn.silu(self.fc1(emb)))


# --------------------------------------------------------------------------------------------
# Patches and positions


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Cuts ``[B, H, W, C]`` images into ``[B, (H/p)*(W/p), p*p*C]`` patch tokens (row major)."""
    b, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, T, p*p*C]`` tokens to ``[B, height, width, C]``."""
    b, t, d = tokens.shape
    p = patch_size
    gh, gw = height // p, width // p
    if gh * gw != t or d % (p * p):
        raise ValueError(
            f"cannot unpatchify {t} tokens of size {d} into {height}x{width} with patch {p}"
        )
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def _sincos(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[len(positions), dim]`` sin-cos features (float64), ``concat([sin, cos])``."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_1d(dim: int, length: int) -> np.ndarray:
    """Fixed 1D sin-cos position embedding for text tokens.

    A numpy constant (not a parameter): it enters a traced computation as a constant, is never
    trained and is not part of a model's state.

    Args:
      dim: embedding size (even).
      length: number of positions.

    Returns:
      Read-only float32 array ``[length, dim]``.
    """
    if dim % 2:
        raise ValueError(f"1D sin-cos embedding size must be even, got {dim}")
    emb = _sincos(dim, np.arange(length)).astype(np.float32)
    emb.flags.writeable = False  # Shared through the cache: guard against in-place edits.
    return emb


@functools.lru_cache(maxsize=32)
def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding for a row-major patch grid (as in MAE and DiT).

    Half of the features encode the row, half the column. A numpy constant, like
    :func:`sincos_1d`.

    Args:
      dim: embedding size (divisible by 4).
      grid_h: number of patch rows.
      grid_w: number of patch columns.

    Returns:
      Read-only float32 array ``[grid_h * grid_w, dim]``.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding size must be divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate(
        [_sincos(dim // 2, rows.reshape(-1)), _sincos(dim // 2, cols.reshape(-1))], axis=1
    ).astype(np.float32)
    emb.flags.writeable = False
    return emb


# --------------------------------------------------------------------------------------------
# Attention


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = "auto"
) -> jax.Array:
    """Unmasked multi-head attention over ``[B, T, heads, head_dim]`` arrays.

    Wraps ``jax.nn.dot_product_attention``, whose XLA path computes logits and softmax in float32
    even for bfloat16 inputs.

    Args:
      q: queries ``[B, T, H, Dh]``.
      k: keys ``[B, S, H, Dh]``.
      v: values ``[B, S, H, Dh]``.
      implementation: ``"auto"``: cuDNN flash attention where it runs (see
        :func:`attention_implementation`), else XLA; ``None``/``"xla"``: XLA; ``"cudnn"``
        (GPU, bf16/fp16 only).

    Returns:
      ``[B, T, H, Dh]`` in the dtype of ``q``.
    """
    chosen = attention_implementation(q, k, v, implementation)
    # jax promotes bf16 logits to f32 implicitly, which strict promotion would reject.
    with jax.numpy_dtype_promotion("standard"):
        if implementation == "auto" and chosen == "cudnn":
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (NotImplementedError, RuntimeError):  # cuDNN refused these (trace time)
                chosen = "xla"
        return jax.nn.dot_product_attention(q, k, v, implementation=chosen)


_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_implementation(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = "auto"
) -> str | None:
    """The implementation :func:`attention` uses for these arrays (decided at trace time).

    ``"auto"`` becomes ``"cudnn"`` when JAX's default backend is a CUDA GPU, ``q``, ``k`` and
    ``v`` share a dtype cuDNN's flash attention takes (bfloat16 or float16), and the head size
    is one it takes (a multiple of 8, at most 128; 256 from compute capability 9.0, Hopper);
    otherwise ``"xla"``, so on a CPU (and for float32 anywhere) ``"auto"`` computes exactly what
    XLA does. Any other value comes back as given.

    Args:
      q: queries ``[B, T, H, Dh]`` (arrays, tracers or shapes).
      k: keys ``[B, S, H, Dh]``.
      v: values ``[B, S, H, Dh]``.
      implementation: ``"auto"``, ``None``, ``"xla"`` or ``"cudnn"``.

    Returns:
      ``"cudnn"`` or ``"xla"`` for ``"auto"``; ``implementation`` otherwise.
    """
    if implementation != "auto":
        return implementation
    if jax.default_backend() != "gpu":
        return "xla"
    dtypes = {jnp.dtype(a.dtype) for a in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in _CUDNN_DTYPES:
        return "xla"
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim or head_dim % 8:
        return "xla"
    capability = _cuda_capability()
    if capability is None:
        return "xla"
    return "cudnn" if head_dim <= (256 if capability >= (9, 0) else 128) else "xla"


def _cuda_capability() -> tuple[int, ...] | None:
    """The compute capability of the default backend's first device if it is a CUDA GPU."""
    try:
        device = jax.devices()[0]
        if "cuda" not in str(device.client.platform_version).lower():
            return None
        return tuple(int(x) for x in str(device.compute_capability).split("."))
    except (AttributeError, RuntimeError, ValueError):
        return None


def merge_heads(x: jax.Array) -> jax.Array:
    """``[B, T, H, Dh]`` to ``[B, T, H*Dh]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class QKVProjection(nnx.Module):
    """Fused query/key/value projection with optional RMSNorm on queries and keys.

    Args:
      width: model width ``D``.
      heads: number of attention heads (divides ``width``).
      qk_norm: normalise queries and keys per head (RMSNorm with a learned scale), which keeps
        attention logits bounded, as in Z-Image, FLUX and SD3.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: random number streams for initialisation.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        qk_norm: bool = True,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nnx.Linear(
            width, 3 * width, kernel_init=XAVIER_INIT, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, param_dtype=param_dtype)
            self.k_norm = RMSNorm(self.head_dim, param_dtype=param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projects ``[B, T, D]`` tokens to ``(q, k, v)``, each ``[B, T, heads, head_dim]``."""
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


# --------------------------------------------------------------------------------------------
# Normalisation, modulation and MLP


def layer_norm(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without scale or bias (adaLN supplies them).

    Statistics are computed in float32 whatever the input dtype (bfloat16 variances are too
    coarse); the result has the dtype of ``x``. Written out rather than ``nnx.LayerNorm`` so the
    casts are explicit and the models also run under strict dtype promotion.
    """
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale, computed in float32.

    Args:
      num_features: size of the last axis.
      epsilon: added to the mean square.
      param_dtype: dtype of the scale.
    """

    def __init__(
        self, num_features: int, *, epsilon: float = 1e-6, param_dtype: DType = jnp.float32
    ):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x``; the result has the dtype of ``x``."""
        xf = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(ms + self.epsilon) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x * (1 + scale) + shift``: ``[B, T, D]`` tokens, ``[B, D]`` vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNModulation(nnx.Module):
    """``SiLU -> Linear`` from the conditioning vector to ``chunks`` vectors of size ``D``.

    Args:
      width: model width ``D``.
      chunks: number of modulation vectors (6 for a block: shift/scale/gate for attention and
        MLP; 2 for a final layer: shift/scale).
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: random number streams for initialisation.
    """

    def __init__(
        self,
        width: int,
        chunks: int,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.chunks = chunks
        self.linear = nnx.Linear(
            width, chunks * width, kernel_init=ADALN_INIT, bias_init=ZEROS_INIT, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        """Maps ``[B, D]`` conditioning to a tuple of ``chunks`` arrays ``[B, D]``."""
        return tuple(jnp.split(self.linear(jax.nn.silu(c)), self.chunks, axis=-1))


class Mlp(nnx.Module):
    """Two-layer MLP with tanh-approximated GELU.

    Args:
      width: input and output size ``D``.
      hidden: hidden size.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: random number streams for initialisation.
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        linear = functools.partial(
            nnx.Linear, kernel_init=XAVIER_INIT, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.fc1 = linear(width, hidden)
        self.fc2 = linear(hidden, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class TransformerBlock(nnx.Module):
    """Unmodulated pre-norm transformer block (RMSNorm, self-attention, MLP).

    Used to refine caption / text tokens before they meet the image; it does not see the
    timestep, so its output is step-independent.

    Args:
      width: model width ``D``.
      heads: number of attention heads.
      mlp_ratio: hidden size of the MLP over ``D``.
      qk_norm: RMSNorm on queries and keys.
      attn_implementation: passed to :func:`attention`.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: random number streams for initialisation.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        attn_implementation: str | None = "auto",
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.attn_implementation = attn_implementation
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(width, param_dtype=param_dtype)
        self.qkv = QKVProjection(width, heads, qk_norm=qk_norm, **kw)
        self.proj = nnx.Linear(width, width, kernel_init=XAVIER_INIT, **kw)
        self.norm2 = RMSNorm(width, param_dtype=param_dtype)
        self.mlp = Mlp(width, int(width * mlp_ratio), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        q, k, v = self.qkv(self.norm1(x))
        x = x + self.proj(merge_heads(attention(q, k, v, implementation=self.attn_implementation)))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# Stacked blocks


def stack_blocks(
    make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
    """Builds ``num_layers`` independent copies of a block as one module with stacked parameters.

    Every parameter of the returned module has a leading axis of length ``num_layers``; each
    layer gets its own random initialisation. Call it on one layer's slice at a time (see
    :func:`scan_blocks`); that is the layout :func:`jaxcache.from_nnx` expects.

    Args:
      make_block: constructor ``rngs -> block``.
      num_layers: number of layers.
      rngs: random number streams; split into one stream per layer.

    Returns:
      The stacked block module.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make_block(rngs)

    return create(rngs)


def scan_blocks(blocks: nnx.Module, h: PyTree, ctx: PyTree) -> PyTree:
    """Runs a stacked block module (from :func:`stack_blocks`) layer after layer.

    A ``lax.scan`` over the leading layer axis, so the trace holds one block whatever the depth.

    Args:
      blocks: the stacked block module, called as ``block(h, ctx) -> h`` per layer.
      h: hidden state (an array or a pytree such as ``(image, text)``).
      ctx: what every layer reads (the conditioning vector).

    Returns:
      The hidden state after the last layer.
    """
    graphdef, state = nnx.split(blocks)

    def layer(layer_state, h, ctx):
        return nnx.merge(graphdef, layer_state)(h, ctx)

    return run_layers(layer, state, h, ctx)
