"""Builds a reference model by architecture and size name."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from jaxcache.models.configs import ModelConfig, get_config
from jaxcache.models.dit import DiT
from jaxcache.models.mmdit import MMDiT

__all__ = ["ARCHITECTURES", "create_model"]

ARCHITECTURES: dict[str, type[nnx.Module]] = {"dit": DiT, "mmdit": MMDiT}


def create_model(
    arch: str,
    size: str,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = None,
    **overrides: Any,
) -> DiT | MMDiT:
    """Creates a reference diffusion transformer from a named config.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxcache.models import create_model
      >>> model = create_model("mmdit", "tiny", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, depth=2)
      >>> model.num_layers, model.config.dtype
      (2, dtype(bfloat16))

    Args:
      arch: ``"dit"`` or ``"mmdit"``.
      size: ``"tiny"``, ``"small"``, ``"dit-xl"`` or ``"flux"``.
      rngs: random number streams for initialisation.
      dtype: compute dtype; ``None`` keeps the config's (float32).
      param_dtype: parameter dtype; ``None`` keeps the config's (float32).
      **overrides: other :class:`ModelConfig` fields to change (``depth=8``, ...).

    Returns:
      The initialised model.

    Raises:
      ValueError: for an unknown architecture, size or config field, or an invalid config.
    """
    config = get_config(arch, size)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}; valid: {sorted(fields)}")
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    config = dataclasses.replace(config, **overrides)  # re-validates
    return ARCHITECTURES[arch](config, rngs=rngs)
