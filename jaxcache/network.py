"""A diffusion transformer as four pure functions, the shape a cache plan can split.

jaxcache never calls a model's ``__call__``. It needs the forward pass cut where caching
happens: a step-independent condition path, a per-step embedding, a stack of identical layers
(the part that is cached), and a final projection. ``Network`` holds those four pure functions;
``NetworkParams`` holds their parameters, with the layers' parameters stacked on a leading axis.

A Flax NNX model becomes a ``Network`` through :func:`from_nnx`; a Linen model, or any pure JAX
code, builds a ``Network`` directly from its ``apply`` functions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from jaxcache.stack import run_layers

PyTree = Any

__all__ = ["Network", "NetworkParams", "from_nnx", "num_layers"]


class NetworkParams(NamedTuple):
    """Parameters of a :class:`Network`, one entry per piece.

    Attributes:
      condition: parameters of the condition path (caption / text encoder head).
      embed: parameters of the per-step embedding (patches, timestep).
      layers: parameters of the layer stack; every leaf has a leading axis of length
        ``num_layers``.
      final: parameters of the final projection.
    """

    condition: PyTree
    embed: PyTree
    layers: PyTree
    final: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A diffusion transformer cut into the pieces a cache plan needs.

    All four functions are pure. A hidden state ``h`` is one array for a single-stream model, or
    a pair ``(image, text)`` for a dual-stream model (the pair goes to the two slot streams of a
    :class:`~jaxcache.StepCache`).

    Attributes:
      condition: ``condition(params.condition, cond) -> constant``. Step-independent (a caption
        or class embedding after its refiners); computed once per guidance branch and kept in the
        cache's constant slot.
      embed: ``embed(params.embed, x, t, constant) -> (h, ctx)``. Runs every step; ``t`` is a
        ``[batch]`` float array in ``[0, 1]``; ``ctx`` carries what every layer reads (the
        timestep conditioning vector, masks).
      layer: ``layer(layer_params, h, ctx) -> h``. One block; ``layer_params`` is one slice of
        ``params.layers`` along its leading axis.
      final: ``final(params.final, h, ctx) -> prediction`` with the shape of ``x``.
      dual_stream: whether ``h`` is an ``(image, text)`` pair (cached in slot streams 1 and 2).
      modulated_input: optional ``modulated_input(layer_params, h, ctx) -> array``: a layer's
        input after its timestep modulation (adaLN shift and scale of the attention branch, on
        the image stream). TeaCache reads it from the first layer; networks without it cannot
        use TeaCache.
    """

    condition: Callable[[PyTree, PyTree], PyTree]
    embed: Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple[PyTree, PyTree]]
    layer: Callable[[PyTree, PyTree, PyTree], PyTree]
    final: Callable[[PyTree, PyTree, PyTree], jax.Array]
    dual_stream: bool = False
    modulated_input: Callable[[PyTree, PyTree, PyTree], jax.Array] | None = None

    def __call__(self, params: NetworkParams, x: jax.Array, t: jax.Array, cond: PyTree):
        """The plain, uncached forward pass (for checks and training)."""
        constant = self.condition(params.condition, cond)
        h, ctx = self.embed(params.embed, x, t, constant)
        h = run_layers(self.layer, params.layers, h, ctx)
        return self.final(params.final, h, ctx)


def num_layers(params: NetworkParams) -> int:
    """The number of stacked layers in ``params`` (the leading axis of ``params.layers``)."""
    leaves = jax.tree.leaves(params.layers)
    if not leaves:
        raise ValueError("params.layers holds no arrays; a network needs at least one layer")
    return int(leaves[0].shape[0])


def _apply(graphdef: nnx.GraphDef, method: str = "__call__") -> Callable[..., Any]:
    """A pure ``apply(state, *args)`` that rebuilds the module from ``graphdef`` and calls it."""

    def apply(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return apply


@functools.lru_cache(maxsize=128)
def _network_for(
    graphdefs: tuple[nnx.GraphDef, ...], dual_stream: bool, has_modulated_input: bool
) -> "Network":
    # One Network per model structure: the sampler compiles once per Network object, so models
    # of the same structure (a reloaded checkpoint, new weights) reuse the compiled program.
    condition, embed, layer, final = (_apply(g) for g in graphdefs)
    modulated = _apply(graphdefs[2], "modulated_input") if has_modulated_input else None
    return Network(
        condition, embed, layer, final, dual_stream=dual_stream, modulated_input=modulated
    )


def from_nnx(model: nnx.Module) -> tuple[Network, NetworkParams]:
    """Turns a Flax NNX diffusion transformer into a :class:`Network` and its parameters.

    The model exposes its pieces as four submodules (the reference models in
    :mod:`jaxcache.models` do):

    * ``model.condition_encoder(cond) -> constant``
    * ``model.embedder(x, t, constant) -> (h, ctx)``
    * ``model.blocks(h, ctx) -> h``: one block whose parameters carry a leading layer axis
      (built with ``nnx.vmap`` over the block constructor); called on one slice at a time.
    * ``model.final_layer(h, ctx) -> prediction``

    and a boolean attribute ``dual_stream`` when ``h`` is an ``(image, text)`` pair. A block
    that defines ``modulated_input(h, ctx)`` (its timestep-modulated input) supports TeaCache.

    Args:
      model: the NNX model.

    Returns:
      ``(network, params)``. The parameters are the model's current state, so call this again
      after training to pick up new weights. Models of the same structure get the same
      ``network``, so they share compiled sampling programs.

    Raises:
      TypeError: if a piece is missing.
    """
    pieces = ("condition_encoder", "embedder", "blocks", "final_layer")
    missing = [p for p in pieces if not isinstance(getattr(model, p, None), nnx.Module)]
    if missing:
        raise TypeError(
            f"from_nnx needs the NNX submodules {pieces}; {type(model).__name__} lacks {missing}"
        )
    graphdefs, states = zip(*(nnx.split(getattr(model, p)) for p in pieces))
    network = _network_for(
        tuple(graphdefs),
        bool(getattr(model, "dual_stream", False)),
        callable(getattr(model.blocks, "modulated_input", None)),
    )
    params = NetworkParams(*states)
    return network, params
