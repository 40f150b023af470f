"""Builds a reference model by architecture and size name."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from jaxcache.models.configs import ModelConfig, WanConfig, get_config
from jaxcache.models.dit import DiT
from jaxcache.models.mmdit import MMDiT
from jaxcache.models.wan import Wan

__all__ = ["ARCHITECTURES", "check_architecture", "create_model"]

ARCHITECTURES: dict[str, type[nnx.Module]] = {"dit": DiT, "mmdit": MMDiT, "wan": Wan}


def create_model(
    arch: str,
    size: str,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = None,
    **overrides: Any,
) -> DiT | MMDiT | Wan:
    """Creates a reference diffusion transformer from a named config.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxcache.models import create_model
      >>> model = create_model("mmdit", "tiny", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, depth=2)
      >>> model.num_layers, model.config.dtype
      (2, dtype(bfloat16))

    Args:
      arch: ``"dit"``, ``"mmdit"`` or ``"wan"`` (text-to-video, :class:`~jaxcache.models.Wan`).
      size: ``"tiny"``, ``"small"``, ``"dit-xl"``, ``"flux"`` or ``"qwen-image"``; for the
        ``"wan"``, ``"tiny"``, ``"small"`` or ``"wan-1.3b"`` (see
        :mod:`jaxcache.models.configs`).
      rngs: random number streams for initialisation.
      dtype: compute dtype; ``None`` keeps the config's (float32).
      param_dtype: parameter dtype; ``None`` keeps the config's (float32).
      **overrides: other fields of the config to change (``depth=8``, ``single_depth=2`` for
        the ``mmdit``, ``frames=5`` for the ``wan``, ...).

    Returns:
      The initialised model.

    Raises:
      ValueError: for an unknown architecture, size or config field, or an invalid config
        (single-stream blocks, ``single_depth > 0``, for an architecture other than ``mmdit``).
    """
    config = get_config(arch, size)
    fields = {f.name for f in dataclasses.fields(type(config))}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {type(config).__name__} fields {unknown}; valid: {sorted(fields)}"
        )
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    config = dataclasses.replace(config, **overrides)  # re-validates
    check_architecture(arch, config)
    return ARCHITECTURES[arch](config, rngs=rngs)


def check_architecture(arch: str, config: ModelConfig | WanConfig) -> None:
    """Raises ``ValueError`` if ``config`` asks for what architecture ``arch`` does not have.

    Only the ``mmdit`` has FLUX.1's single-stream blocks: any other architecture refuses a
    nonzero ``single_depth`` rather than silently building fewer blocks than asked. The ``wan``
    takes a :class:`~jaxcache.models.WanConfig`, the others a
    :class:`~jaxcache.models.ModelConfig`.
    """
    wanted = WanConfig if arch == "wan" else ModelConfig
    if not isinstance(config, wanted):
        raise ValueError(
            f"the {arch} is built from a {wanted.__name__}, got a {type(config).__name__}"
        )
    if getattr(config, "single_depth", 0) and arch != "mmdit":
        raise ValueError(
            f"single_depth={config.single_depth}: only the mmdit architecture has single-stream "
            f"blocks (FLUX.1's layout); the {arch} has one kind of block, set its depth instead"
        )
