"""Cached sampling sharded over 8 simulated CPU devices, with JAX's own sharding.

Three ways, each checked against sampling on one device:

1. ``jax.jit`` with ``NamedSharding`` inputs: the batch split over a ``data`` axis; XLA's
   sharding propagation splits the whole loop.
2. ``jax.shard_map`` over a ``data x seq`` mesh: the batch over ``data``, each sample's tokens
   over ``seq`` (sequence parallelism, ``sequence_axis="seq"``); the network's layers mix
   tokens through a ``lax.pmean`` over ``seq``.
3. ``jax.jit`` with the parameters split over a ``model`` axis (the matrices' output features)
   and the batch over ``data``: a model too large for one device.

For each it prints the largest difference from one device, the steps whose body ran, and the
collectives of the compiled program with the bytes they move. See docs/sharding.md.

    python examples/sharded.py

The device count is fixed when JAX starts, so the flag is set before ``import jax``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxcache  # noqa: E402
from jaxcache.sharding import place, place_params, traffic  # noqa: E402

BATCH, TOKENS, WIDTH, CHANNELS, LAYERS, STEPS = 8, 16, 16, 4, 4, 8


def network(sequence_axis=None):
    """A tiny token network ``[batch, tokens, channels]``. Its layers mix tokens through a mean
    over the tokens; with ``sequence_axis`` (tokens split over that shard_map axis) the mean is
    a ``pmean`` of each device's mean, the same value."""

    def token_mean(h):
        m = jnp.mean(h, axis=1, keepdims=True)
        return m if sequence_axis is None else jax.lax.pmean(m, sequence_axis)

    def condition(p, labels):
        return p[labels]

    def embed(p, x, t, c):
        return x @ p + c[:, None, :] + t[:, None, None], t

    def layer(p, h, t):
        return h + jnp.tanh(h @ p["w"] + token_mean(h) @ p["u"] + t[:, None, None] * p["b"])

    def final(p, h, t):
        return h @ p

    return jaxcache.Network(condition, embed, layer, final)


def parameters():
    k = jax.random.split(jax.random.key(0), 6)
    return jaxcache.NetworkParams(
        condition=jax.random.normal(k[0], (10, WIDTH)),
        embed=jax.random.normal(k[1], (CHANNELS, WIDTH)) / 2,
        layers={"w": jax.random.normal(k[2], (LAYERS, WIDTH, WIDTH)) / 4,
                "u": jax.random.normal(k[3], (LAYERS, WIDTH, WIDTH)) / 4,
                "b": jax.random.normal(k[4], (LAYERS, WIDTH))},
        final=jax.random.normal(k[5], (WIDTH, CHANNELS)) / 4,
    )


def settings(labels):
    """First-Block Cache (decided on the device, per sample) with guidance."""
    return dict(solver=jaxcache.FlowMatchEuler(), num_steps=STEPS,
                policy=jaxcache.FirstBlockPolicy(0.3), reuse=jaxcache.ResidualReuse(),
                uncond=jnp.zeros_like(labels), guidance_scale=2.0)


def per_step(compiled_text):
    """``{op: bytes}`` each device's collectives move per step (see jaxcache.sharding.traffic)."""
    return {op: round(v) for op, v in traffic(compiled_text, STEPS)["per_step"].items()}


def main(verbose=True):
    devices = np.array(jax.devices())
    assert len(devices) >= 8, "run as a script: the flag above must be set before JAX starts"
    params = parameters()
    noise = jax.random.normal(jax.random.key(1), (BATCH, TOKENS, CHANNELS))
    labels = jnp.arange(BATCH, dtype=jnp.int32) % 9 + 1
    plan = jaxcache.CachePlan.around(network(), LAYERS, first=1)  # First-Block Cache's layout
    seg = plan.split(params)
    single = jaxcache.sample(plan, seg, noise, labels, **settings(labels))
    results = {}

    # 1. jit with the batch split over "data".
    mesh = Mesh(devices[:8], ("data",))
    rows = NamedSharding(mesh, P("data"))
    run = jax.jit(lambda seg, x, c: jaxcache.sample(plan, seg, x, c, **settings(c)).sample,
                  out_shardings=rows)
    args = (seg, place(noise, mesh, P("data"), "noise"), place(labels, mesh, P("data"), "labels"))
    out = run(*args)
    results["jit, batch over data"] = (out, per_step(run.lower(*args).compile().as_text()))

    # 2. shard_map: batch over "data", each sample's tokens over "seq".
    mesh = Mesh(devices[:8].reshape(2, 4), ("data", "seq"))
    split_plan = jaxcache.CachePlan.around(network("seq"), LAYERS, first=1)
    split_seg = split_plan.split(params)

    def per_device(x, c):
        return jaxcache.sample(split_plan, split_seg, x, c, sequence_axis="seq",
                               **settings(c)).sample

    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data", "seq"), P("data")),
                                out_specs=P("data", "seq")))
    out = run(noise, labels)
    results["shard_map, batch over data, tokens over seq"] = (
        out, per_step(run.lower(noise, labels).compile().as_text()))

    # 3. jit with the weights' output features over "model", the batch over "data".
    mesh = Mesh(devices[:8].reshape(2, 4), ("data", "model"))
    rows = NamedSharding(mesh, P("data"))
    run = jax.jit(lambda seg, x, c: jaxcache.sample(plan, seg, x, c, **settings(c)).sample,
                  out_shardings=rows)
    args = (place_params(seg, mesh, "model"), jax.device_put(noise, rows),
            jax.device_put(labels, rows))
    out = run(*args)
    results["jit, weights over model, batch over data"] = (
        out, per_step(run.lower(*args).compile().as_text()))

    report = {}
    for name, (out, moved) in results.items():
        diff = float(jnp.max(jnp.abs(out - single.sample)))
        assert diff < 1e-4, (name, diff)
        report[name] = {"max_diff": diff, "bytes_per_step": moved}
        if verbose:
            print(f"{name}: max |sharded - one device| = {diff:.2e}; each device's collectives "
                  f"per step (bytes): {moved or 'none'}")
    computed = np.asarray(single.body_computed)
    if verbose:
        print(f"body computed for {computed.sum()} of {computed.size} (step, branch, sample) "
              f"decisions, layer evaluations {int(single.layer_evaluations)} of "
              f"{STEPS * LAYERS}")
    return report


if __name__ == "__main__":
    main()
