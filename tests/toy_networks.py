"""Small networks for sampler tests: pure functions, a dual-stream pair, and a Flax Linen model."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import random_models as rand

import jaxcache as jc

D = 8
LAYERS = 6
VOCAB = 10


def _shared(build):
    """``build`` made once per process: the same Network object every call (jaxcache compiles
    once per Network and static arguments, so tests that sample alike share their programs),
    with fresh copies of its parameter arrays (a test may donate or delete them)."""
    once = functools.cache(build)

    @functools.wraps(build)
    def made():
        network, params = once()
        return network, jax.tree.map(jnp.copy, params)

    return made


@_shared
def single_stream():
    """A single-stream network of plain functions; the caption goes to the constant slot."""

    def condition(p, cond):
        return p[cond]  # [B, D]

    def embed(p, x, t, c):
        return x @ p + c + t[:, None], t

    def layer(p, h, t):
        return h + jnp.tanh(h @ p["w"] + t[:, None] * p["b"])

    def final(p, h, t):
        return h @ p

    k = jax.random.split(jax.random.key(0), 5)
    params = jc.NetworkParams(
        condition=rand.normal(k[0], (VOCAB, D)),
        embed=rand.normal(k[1], (D, D)) / 3,
        layers={
            "w": rand.normal(k[2], (LAYERS, D, D)) / 3,
            "b": rand.normal(k[3], (LAYERS, D)),
        },
        final=rand.normal(k[4], (D, D)) / 3,
    )
    return jc.Network(condition, embed, layer, final), params


@_shared
def dual_stream():
    """A dual-stream network: image and text states exchange information in every layer."""

    def condition(p, cond):
        return p[cond]  # [B, 3, D] text states

    def embed(p, x, t, c):
        return (x @ p + t[:, None], c), t

    def layer(p, h, t):
        img, txt = h
        mix = jnp.mean(txt, axis=1)
        img = img + jnp.tanh(img @ p["wi"] + mix + t[:, None])
        txt = txt + jnp.tanh(txt @ p["wt"] + img[:, None, :])
        return img, txt

    def final(p, h, t):
        return h[0] @ p

    k = jax.random.split(jax.random.key(1), 5)
    params = jc.NetworkParams(
        condition=rand.normal(k[0], (VOCAB, 3, D)),
        embed=rand.normal(k[1], (D, D)) / 3,
        layers={
            "wi": rand.normal(k[2], (LAYERS, D, D)) / 3,
            "wt": rand.normal(k[3], (LAYERS, D, D)) / 3,
        },
        final=rand.normal(k[4], (D, D)) / 3,
    )
    return jc.Network(condition, embed, layer, final, dual_stream=True), params


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, t):
        mod = nn.Dense(D)(jax.nn.silu(t[:, None] * jnp.ones((1, D))))
        return h + nn.Dense(D)(nn.gelu(nn.LayerNorm()(h) + mod))


class _Embed(nn.Module):
    @nn.compact
    def __call__(self, x, t, c):
        return nn.Dense(D)(x) + c, t


@_shared
def linen():
    """A Flax Linen model wired into a Network through ``apply``."""
    block, emb = _Block(), _Embed()
    cond_table = nn.Embed(VOCAB, D)
    out = nn.Dense(D)
    h0, t0 = jnp.zeros((2, D)), jnp.zeros((2,))
    keys = jax.random.split(jax.random.key(2), LAYERS + 3)
    layers = jax.vmap(lambda k: block.init(k, h0, t0))(keys[:LAYERS])
    params = jc.NetworkParams(
        condition=cond_table.init(keys[-3], jnp.zeros((2,), jnp.int32)),
        embed=emb.init(keys[-2], h0, t0, h0),
        layers=layers,
        final=out.init(keys[-1], h0),
    )
    network = jc.Network(
        condition=lambda p, cond: cond_table.apply(p, cond),
        embed=emb.apply,
        layer=block.apply,
        final=lambda p, h, t: out.apply(p, h),
    )
    return network, params


def trace_counted(network):
    """``network`` with a layer that counts its traces: ``(network, traces)``, a list that grows
    by one each time JAX traces the layer (a recompile traces it again)."""
    traces = []

    def layer(p, h, t):
        traces.append(1)
        return network.layer(p, h, t)

    counted = jc.Network(network.condition, network.embed, layer, network.final,
                         modulated_input=network.modulated_input)
    return counted, traces


def inputs(batch=3, seed=3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    noise = rand.normal(k1, (batch, D))
    cond = rand.randint(k2, (batch,), 1, VOCAB)
    uncond = jnp.zeros((batch,), jnp.int32)
    return noise, cond, uncond


def projections(jaxpr, lhs_shape: tuple[int, ...], width: int, depth: int = 0, found=None):
    """``(loop depth, weight shape)`` of every dot_general projecting an operand of
    ``lhs_shape`` by a weight ``[..., width, width]`` (a text state's key or value projection),
    walking into the nested jaxprs of loops and calls; depth counts the enclosing scans and
    while loops (0: outside every loop)."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
            if lhs == tuple(lhs_shape) and rhs[-2:] == (width, width):
                found.append((depth, rhs))
        inner = depth + (name in ("scan", "while"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    projections(sub.jaxpr, lhs_shape, width, inner, found)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    projections(sub, lhs_shape, width, inner, found)
    return found
