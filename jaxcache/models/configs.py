"""Sizes of the reference diffusion transformers.

``ModelConfig`` holds every hyperparameter; named sizes go from a CPU-test toy (``tiny``) to
DiT-XL/2, FLUX.1 and Qwen-Image. Both architectures have every size:

* ``tiny``, ``small`` and ``dit-xl`` are one config, shared by both architectures.
* ``flux``: for the ``mmdit``, FLUX.1's layout: 19 double-stream blocks followed by 38
  single-stream blocks (``depth=19, single_depth=38``), width 3072, 24 heads, 1024 image tokens
  (a 64x64x16 latent in 2x2 patches) and 512 text tokens.
* ``qwen-image``: for the ``mmdit``, Qwen-Image's layout: 60 double-stream blocks at the same
  width, heads and tokens (what ``flux`` named before it took FLUX.1's layout).
* The ``dit`` (single stream) has no double / single split, so a nonzero ``single_depth`` is
  refused and both large sizes keep what they have always been for it: 60 blocks at width
  3072, 24 heads, 1024 image and 512 caption tokens (``dit``'s ``flux`` and ``qwen-image`` are
  the same config). The rule: a size means one config for both architectures, except that the
  ``mmdit``'s ``flux`` moves its blocks into FLUX.1's 19 + 38 split.

The Wan-style video model (:class:`jaxcache.models.Wan`) is a family of its own, with a config of
its own (:class:`WanConfig`: video latents, text states from a text encoder, a feed-forward size
of its own) and its own sizes (:data:`WAN_SIZES`): ``tiny``, ``small`` and ``wan-1.3b``
(Wan2.1-T2V-1.3B: width 1536, 30 blocks, 12 heads, feed-forward 8960, text states of 4096 over
512 tokens). ``get_config("wan", size)`` returns one.

Example:
  >>> from jaxcache.models import get_config
  >>> cfg = get_config("dit", "dit-xl")
  >>> cfg.width, cfg.depth, cfg.num_image_tokens
  (1152, 28, 256)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

__all__ = [
    "ARCHS",
    "ATTN_IMPLEMENTATIONS",
    "CONFIGS",
    "SIZES",
    "WAN_CONFIGS",
    "WAN_SIZES",
    "ModelConfig",
    "WanConfig",
    "get_config",
]

ARCHS: tuple[str, ...] = ("dit", "mmdit")
SIZES: tuple[str, ...] = ("tiny", "small", "dit-xl", "flux", "qwen-image")

ATTN_IMPLEMENTATIONS: tuple[str | None, ...] = ("auto", None, "xla", "cudnn")
"""Valid ``ModelConfig.attn_implementation`` values (see ``jaxcache.models.layers.attention``)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a reference diffusion transformer.

    Attributes:
      width: hidden size ``D``.
      depth: number of main (cached) transformer blocks; for the ``mmdit``, its double-stream
        blocks.
      heads: attention heads; ``width`` must be divisible by it.
      mlp_ratio: MLP hidden size over ``width``.
      image_size: side of the square input latent ``[B, image_size, image_size, channels]``.
      channels: latent channels.
      patch_size: side of a square patch; ``image_size`` must be divisible by it.
      caption_len: nominal caption / text length ``L`` (any length is accepted at call time).
      vocab_size: size of the caption token vocabulary.
      caption_refiners: unmodulated blocks refining the caption before it meets the image.
      dtype: compute dtype (activations); ``bfloat16`` for speed.
      param_dtype: parameter storage dtype.
      qk_norm: RMSNorm on attention queries and keys.
      attn_implementation: ``"auto"`` (default): cuDNN flash attention where it runs (a CUDA
        GPU, bfloat16 or float16, a supported head size), else XLA, decided at trace time;
        ``None`` or ``"xla"``: XLA; ``"cudnn"``: cuDNN (GPU, bf16/fp16 only). It selects a
        kernel, not a model, so it takes no part in comparing configs: two configs that differ
        only here are equal (a checkpoint saved with ``None`` loads as the config it was
        trained with).
      single_depth: single-stream blocks after the ``depth`` double-stream blocks (FLUX.1's
        layout; ``mmdit`` only, the ``dit`` refuses a nonzero value). 0: none.
    """

    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    image_size: int = 32
    channels: int = 4
    patch_size: int = 2
    caption_len: int = 8
    vocab_size: int = 1024
    caption_refiners: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    qk_norm: bool = True
    attn_implementation: str | None = dataclasses.field(default="auto", compare=False)
    single_depth: int = 0

    def __post_init__(self):
        # Canonical numpy dtypes: hashable and comparable, so configs compare equal whether
        # given jnp.bfloat16 or "bfloat16".
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        positive = ("width", "depth", "heads", "image_size", "channels", "patch_size",
                    "caption_len", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.single_depth < 0:
            raise ValueError(f"single_depth must be >= 0, got {self.single_depth}")
        if self.caption_refiners < 0:
            raise ValueError(f"caption_refiners must be >= 0, got {self.caption_refiners}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 4:
            # The 2D sin-cos position embedding splits the width in four.
            raise ValueError(f"width must be divisible by 4, got {self.width}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be 'auto', None, 'xla' or 'cudnn', "
                f"got {self.attn_implementation!r}"
            )

    @property
    def num_layers(self) -> int:
        """All main blocks, double- and single-stream: ``depth + single_depth``."""
        return self.depth + self.single_depth

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per sample, ``(image_size / patch_size) ** 2``."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Size of a flattened patch, ``patch_size**2 * channels``."""
        return self.patch_size**2 * self.channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one input latent, ``(H, W, C)``."""
        return (self.image_size, self.image_size, self.channels)


_SIZES: dict[str, ModelConfig] = {
    # CPU tests: a forward pass takes milliseconds.
    "tiny": ModelConfig(
        width=32, depth=4, heads=2, image_size=8, channels=4, patch_size=2, caption_len=4,
        vocab_size=16, caption_refiners=1,
    ),
    "small": ModelConfig(
        width=256, depth=12, heads=4, image_size=16, channels=4, patch_size=2, caption_len=8,
        vocab_size=64, caption_refiners=2,
    ),
    # DiT-XL/2 at 256 px (32x32x4 latent).
    "dit-xl": ModelConfig(
        width=1152, depth=28, heads=16, image_size=32, channels=4, patch_size=2, caption_len=8,
        vocab_size=1024, caption_refiners=2,
    ),
    # Qwen-Image's layout: 3072 wide, 60 double-stream blocks, 1024 image tokens (64x64x16).
    "qwen-image": ModelConfig(
        width=3072, depth=60, heads=24, image_size=64, channels=16, patch_size=2, caption_len=512,
        vocab_size=1024, caption_refiners=1,
    ),
}

_BY_ARCH: dict[str, dict[str, ModelConfig]] = {
    # A single-stream DiT at FLUX width: the same 60 blocks as its qwen-image size.
    "dit": {"flux": _SIZES["qwen-image"]},
    # FLUX.1's layout: 19 double-stream then 38 single-stream blocks, the same width and tokens.
    "mmdit": {"flux": dataclasses.replace(_SIZES["qwen-image"], depth=19, single_depth=38)},
}

CONFIGS: Mapping[str, Mapping[str, ModelConfig]] = types.MappingProxyType({
    arch: types.MappingProxyType({size: _BY_ARCH[arch].get(size) or _SIZES[size] for size in SIZES})
    for arch in ARCHS
})
"""Named configs, ``CONFIGS[arch][size]`` (the module docstring says how the sizes map)."""


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Hyperparameters of the Wan-style text-to-video diffusion transformer.

    Latents are video ``[B, frames, latent_height, latent_width, channels]``, cut into 3D
    patches of ``patch_size`` (frames, rows, columns): ``frames * latent_height *
    latent_width / prod(patch_size)`` tokens. Text reaches the image tokens only through each
    block's cross-attention.

    Attributes:
      width: hidden size ``D`` (Wan's ``dim``).
      depth: number of blocks.
      heads: attention heads; ``width`` must be divisible by it.
      ffn_dim: the feed-forward's hidden size.
      text_dim: size of the text encoder's states (umT5-XXL: 4096).
      text_len: the number of text tokens (Wan pads its prompts to 512).
      channels: latent channels, in and out.
      patch_size: ``(frames, rows, columns)`` of a patch.
      frames: latent frames of the nominal input (inputs of other sizes are accepted).
      latent_height: latent rows of the nominal input.
      latent_width: latent columns of the nominal input.
      freq_dim: size of the sinusoidal timestep embedding.
      eps: epsilon of the normalisations.
      qk_norm: RMSNorm on queries and keys (over the whole width, as Wan).
      cross_attn_norm: a LayerNorm with scale and bias before the cross-attention (Wan 2.1).
      dtype: compute dtype.
      param_dtype: parameter storage dtype.
      attn_implementation: as :attr:`ModelConfig.attn_implementation` (not compared).
    """

    width: int
    depth: int
    heads: int
    ffn_dim: int
    text_dim: int = 4096
    text_len: int = 512
    channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_implementation: str | None = dataclasses.field(default="auto", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        positive = ("width", "depth", "heads", "ffn_dim", "text_dim", "text_len", "channels",
                    "frames", "latent_height", "latent_width", "freq_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(
                f"patch_size must be three positive sizes (frames, rows, columns), got "
                f"{self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.width % 2 or self.freq_dim % 2:
            # The 3D sin-cos position embedding and the timestep embedding are sin-cos pairs.
            raise ValueError(f"width and freq_dim must be even, got {self.width}, {self.freq_dim}")
        for name, size, patch in zip(("frames", "latent_height", "latent_width"),
                                     self.video_shape, self.patch_size):
            if size % patch:
                raise ValueError(f"{name} {size} is not divisible by its patch size {patch}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be 'auto', None, 'xla' or 'cudnn', "
                f"got {self.attn_implementation!r}"
            )

    @property
    def num_layers(self) -> int:
        """The number of blocks (``depth``)."""
        return self.depth

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.width // self.heads

    @property
    def video_shape(self) -> tuple[int, int, int]:
        """``(frames, latent_height, latent_width)`` of the nominal input."""
        return (self.frames, self.latent_height, self.latent_width)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Shape of one nominal input latent, ``(F, H, W, C)``."""
        return (*self.video_shape, self.channels)

    @property
    def patch_dim(self) -> int:
        """Size of a flattened patch, ``prod(patch_size) * channels``."""
        pf, ph, pw = self.patch_size
        return pf * ph * pw * self.channels

    @property
    def num_tokens(self) -> int:
        """Video tokens of the nominal input."""
        pf, ph, pw = self.patch_size
        return (self.frames // pf) * (self.latent_height // ph) * (self.latent_width // pw)


WAN_SIZES: tuple[str, ...] = ("tiny", "small", "wan-1.3b")

WAN_CONFIGS: Mapping[str, WanConfig] = types.MappingProxyType({
    # CPU tests: 8 video tokens, 5 text tokens.
    "tiny": WanConfig(
        width=32, depth=3, heads=2, ffn_dim=64, text_dim=24, text_len=5, channels=4,
        frames=2, latent_height=4, latent_width=4, freq_dim=32,
    ),
    "small": WanConfig(
        width=256, depth=8, heads=4, ffn_dim=1024, text_dim=512, text_len=32, channels=16,
        frames=4, latent_height=16, latent_width=16, freq_dim=256,
    ),
    # Wan2.1-T2V-1.3B: 81 frames at 480x832 are 21 x 60 x 104 latents, 32760 tokens.
    "wan-1.3b": WanConfig(
        width=1536, depth=30, heads=12, ffn_dim=8960, text_dim=4096, text_len=512, channels=16,
        frames=21, latent_height=60, latent_width=104, freq_dim=256,
    ),
})
"""Named sizes of the Wan-style model, ``WAN_CONFIGS[size]``."""


def get_config(arch: str, size: str) -> ModelConfig | WanConfig:
    """The named config of a reference model.

    Args:
      arch: ``"dit"`` (single stream, Z-Image style), ``"mmdit"`` (dual stream, FLUX style) or
        ``"wan"`` (text-to-video, Wan 2.1 style).
      size: ``"tiny"``, ``"small"``, ``"dit-xl"``, ``"flux"`` or ``"qwen-image"``; for
        ``"wan"``: ``"tiny"``, ``"small"`` or ``"wan-1.3b"``.

    Returns:
      The config (frozen; derive variants with ``dataclasses.replace``): a
      :class:`ModelConfig`, or a :class:`WanConfig` for ``"wan"``.

    Raises:
      ValueError: for an unknown architecture or size.
    """
    if arch == "wan":
        if size not in WAN_CONFIGS:
            raise ValueError(f"unknown size {size!r} for 'wan'; valid: {', '.join(WAN_CONFIGS)}")
        return WAN_CONFIGS[size]
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join([*CONFIGS, 'wan'])}")
    sizes = CONFIGS[arch]
    if size not in sizes:
        raise ValueError(f"unknown size {size!r} for {arch!r}; valid: {', '.join(sizes)}")
    return sizes[size]
