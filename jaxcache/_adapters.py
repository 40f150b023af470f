"""What the model adapters share: :mod:`jaxcache.nnx` and :mod:`jaxcache.linen` side by side.

Both adapters turn a model as written into a :class:`~jaxcache.Network` the same way: the
blocks are found and their parameters stacked (one :class:`Blocks` per list of blocks of one
kind), and small functions say what ``__call__`` does around them. This module holds what they
have in common: :class:`Blocks`, the check that ``time=`` was given, the default ``layer`` and
``condition`` functions, :func:`block_constant` (a per-layer constant named by a block method),
:func:`glued_network` (the four pieces built from those functions), and :class:`NetworkCache`,
which keeps one Network per model structure so that equal models share compiled sampling
programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jaxcache.network import Network, TimeConvention
from jaxcache.stack import BlockKind, Segments

PyTree = Any

__all__ = [
    "Blocks",
    "NetworkCache",
    "as_block_lists",
    "block_constant",
    "check_time",
    "default_layer",
    "glued_network",
    "hashable_key",
    "identity_condition",
    "layer_field",
    "stacked_layers",
]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One list of blocks of a model as written, for a model with several kinds of block.

    FLUX is 19 double-stream blocks then 38 single-stream blocks; its port keeps them in two
    lists. Give :func:`jaxcache.from_nnx` / :func:`jaxcache.from_linen` one ``Blocks`` per
    list, in the order ``__call__`` runs them::

        blocks=[jaxcache.Blocks("double_blocks"),
                jaxcache.Blocks("single_blocks", layer=single, enter=join, leave=split)]

    Layer indices then run across the lists (double blocks 0-18, single blocks 19-56), and a
    cache plan may span the boundary.

    Attributes:
      path: where the blocks are. NNX: an attribute or dotted path (``"double_blocks"``,
        ``"transformer.blocks"``) holding a list, an ``nnx.Sequential`` or one stacked
        (``nnx.vmap``) module; or a list of such paths, one block each. Linen: the blocks'
        name prefix (``"DoubleBlock"`` matches ``DoubleBlock_0, DoubleBlock_1, ...``), the
        name of an ``nn.scan`` stack, or a list of names.
      layer: ``layer(block, state, ctx) -> state``: how ``__call__`` calls one block of this
        list; default the ``layer=`` given to the adapter, else ``block(state, ctx)``. With a
        ``layer_constant`` it also receives ``layer_constant=``, with ``layer_index`` also
        ``layer_index=`` (the default passes them on to the block as these keywords).
      enter: ``enter(h, ctx) -> state``: the hidden state as the previous list left it, in
        this list's form (FLUX's single blocks: the ``(image, text)`` pair concatenated into
        one token sequence). None: the same form.
      leave: ``leave(state, h, ctx) -> h``: back to the first list's form (split the tokens
        again; ``h`` is the value the list entered with, for its shapes). Required with
        ``enter``.
      name: a label for messages (default: the path).
      layer_constant: what each block of this list computes from its own parameters and the
        condition path's output alone, once per sampling run instead of at every step (a
        cross-attention block's text keys and values): the name of a block method,
        ``block.<name>(constant) -> pytree of arrays``, or a function
        ``(block, constant) -> pytree of arrays``. Default: the adapter's ``layer_constant=``.
        See :attr:`jaxcache.Network.layer_constant`.
      layer_index: pass each block its index in the network (int32, counted across the lists)
        as ``layer_index=``.
    """

    path: str | tuple[str, ...]
    layer: Callable[..., PyTree] | None = None
    enter: Callable[[PyTree, PyTree], PyTree] | None = None
    leave: Callable[[PyTree, PyTree, PyTree], PyTree] | None = None
    name: str = ""
    layer_constant: str | Callable[..., PyTree] | None = None
    layer_index: bool = False

    def __post_init__(self):
        path = self.path
        if isinstance(path, (list, tuple)):
            if not path or not all(isinstance(p, str) for p in path):
                raise ValueError(f"Blocks.path must be a name or a list of names, got {path!r}")
            object.__setattr__(self, "path", tuple(path))
        elif not isinstance(path, str) or not path:
            raise ValueError(f"Blocks.path must be a name or a list of names, got {path!r}")
        BlockKind(default_layer, self.enter, self.leave, self.label)  # checks enter/leave
        block_constant(self.layer_constant, f"Blocks({self.label!r}).layer_constant")
        if not isinstance(self.layer_index, bool):
            raise TypeError(f"Blocks.layer_index must be a bool, got {self.layer_index!r}")

    @property
    def label(self) -> str:
        """The name in messages."""
        if self.name:
            return self.name
        return self.path if isinstance(self.path, str) else f"{self.path[0]}..."


def as_block_lists(blocks: Any, where: str) -> list[Blocks] | None:
    """``blocks`` as a list of :class:`Blocks` when it names several kinds, else None."""
    if isinstance(blocks, Blocks):
        return [blocks]
    if isinstance(blocks, (list, tuple)) and blocks and any(isinstance(b, Blocks) for b in blocks):
        if not all(isinstance(b, Blocks) for b in blocks):
            raise TypeError(
                f"{where}: blocks= mixes jaxcache.Blocks with plain names; give every list of "
                "blocks as a Blocks (e.g. [Blocks('double_blocks'), Blocks('single_blocks', "
                "...)])"
            )
        return list(blocks)
    return None


def layer_field(kinds: tuple[BlockKind, ...]):
    """What ``Network.layer`` takes: a plain function for one kind that needs no conversion
    and binds nothing to its layers."""
    if len(kinds) == 1 and kinds[0].enter is None and not kinds[0].binds:
        return kinds[0].layer
    return kinds


def block_constant(given: Any, where: str = "layer_constant") -> Callable[..., PyTree] | None:
    """A list's ``layer_constant`` as a function ``(block, constant) -> pytree`` (or None).

    A string names a block method, called as ``block.<name>(constant)``.
    """
    if given is None or callable(given):
        return given
    if isinstance(given, str) and given.isidentifier():

        def method(block, constant):
            return getattr(block, given)(constant)

        method.__name__ = given
        return method
    raise TypeError(
        f"{where} must be the name of a block method (e.g. 'layer_constant') or a function "
        f"(block, constant) -> pytree of arrays, got {given!r}"
    )


def hashable_key(key: tuple) -> tuple | None:
    """``key`` if it can be hashed (to share one Network between equal models), else None.

    A model may keep unhashable settings (a list of RoPE axes, a config object): it then gets
    a Network of its own per call, and the sampler compiles once per Network.
    """
    try:
        hash(key)
    except TypeError:
        return None
    return key


class NetworkCache:
    """A small memo of Networks by model structure (oldest dropped past ``size``)."""

    def __init__(self, size: int = 128):
        self._entries: dict[tuple, Network] = {}
        self._size = size

    def get(self, key: tuple | None, build: Callable[[], Network]) -> Network:
        """The Network stored under ``key``, built and stored if missing (``None``: not kept)."""
        if key is None:
            return build()
        network = self._entries.get(key)
        if network is None:
            network = build()
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = network
        return network


def check_time(time: Any, where: str) -> TimeConvention:
    """``time``, checked: a TypeError naming ``where`` unless it is a :class:`TimeConvention`.

    An adapter of a model as written cannot see which time the model's embedding reads, so it
    asks for it (the message says how to find out).
    """
    if time is None:
        raise TypeError(
            f"{where} needs time=: say which time the model's embedding reads, "
            "jaxcache.TimeConvention.continuous() (t in [0, 1]), .index(1000) (the integer "
            "training step of a 1000-step DDPM schedule: DiT, ADM) or .scaled(1000.0) "
            "(the model's own loop passes 1000 t). Look where the model multiplies t: FLUX's "
            "JAX ports scale t in [0, 1] inside their embedding, so they are continuous(). A "
            "wrong choice runs without error and gives wrong images"
        )
    if not isinstance(time, TimeConvention):
        raise TypeError(f"time must be a jaxcache.TimeConvention, got {time!r}")
    return time


def identity_condition(model, cond):
    """The default ``condition``: the condition as given is the constant."""
    return cond


def default_layer(block, h, ctx, **extras):
    """The default ``layer``: ``__call__`` calls a block as ``block(h, ctx)`` (with the list's
    ``layer_constant=`` / ``layer_index=`` keywords, when it takes them)."""
    return block(h, ctx, **extras)


def stacked_layers(stacks: Sequence[PyTree]) -> PyTree:
    """``params.layers`` from the stacks of the lists of blocks, in layer order: the one stack,
    or a :class:`~jaxcache.Segments` of one stacked piece per list (kinds 0, 1, ...)."""
    return stacks[0] if len(stacks) == 1 else Segments(stacks, range(len(stacks)))


def glued_network(
    model_of: Callable[[PyTree], Any],
    kinds: tuple[BlockKind, ...],
    modulated: Callable[..., Any] | None,
    embed: Callable[..., tuple[PyTree, PyTree]],
    final: Callable[..., Any],
    condition: Callable[..., PyTree] | None,
    time: TimeConvention,
    dual_stream: bool,
) -> Network:
    """A Network whose inline pieces call the user's functions on the model.

    ``model_of(rest)`` rebuilds the model (blocks left out) from ``rest``, the parameters of
    each inline piece (``NetworkParams(rest, rest, layers, rest)``); ``embed``, ``final`` and
    ``condition`` (default :func:`identity_condition`) receive it. ``kinds`` and ``modulated``
    already bind a block.
    """
    condition = condition or identity_condition
    return Network(
        condition=lambda rest, cond: condition(model_of(rest), cond),
        embed=lambda rest, x, t, constant: embed(model_of(rest), x, t, constant),
        layer=layer_field(kinds),
        final=lambda rest, h, ctx: final(model_of(rest), h, ctx),
        dual_stream=dual_stream,
        modulated_input=modulated,
        time=time,
    )
