"""The constant slot with leaves that are not batch-major (a shared RoPE table beside a caption).

``condition`` may return leaves shared by every sample (a RoPE table ``[tokens, dim]``) beside
per-sample ones (a caption ``[rows, L, D]``). The per-branch caches of a guided run cut only the
per-sample leaves; a shared leaf is kept whole.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_models as rand

import jaxcache as jc

B, L, D, LAYERS, VOCAB = 3, 4, 8, 4, 10
SOLVER = jc.FlowMatchEuler(shift=3.0)


def rope_network(tokens: int):
    """A single-stream network whose condition returns a caption and a shared RoPE table, and
    whose layers read both (through ``ctx``)."""

    def condition(p, cond):
        return {"caption": p["captions"][cond], "rope": p["rope"]}  # [rows, L, D], [tokens, D]

    def embed(p, x, t, c):
        return x @ p + c["rope"][None], (t, c["caption"], c["rope"])

    def layer(p, h, ctx):
        t, caption, rope = ctx
        mix = jnp.mean(caption, axis=1) @ p["c"]  # [rows, D]
        return h + jnp.tanh(h @ p["w"] + mix[:, None, :] + rope * p["r"] + t[:, None, None])

    def final(p, h, ctx):
        return h @ p

    k = jax.random.split(jax.random.key(7), 7)
    params = jc.NetworkParams(
        condition={
            "captions": rand.normal(k[0], (VOCAB, L, D)),
            "rope": rand.normal(k[1], (tokens, D)),
        },
        embed=rand.normal(k[2], (D, D)) / 3,
        layers={
            "w": rand.normal(k[3], (LAYERS, D, D)) / 3,
            "c": rand.normal(k[4], (LAYERS, D, D)) / 3,
            "r": rand.normal(k[5], (LAYERS, D)) / 3,
        },
        final=rand.normal(k[6], (D, D)) / 3,
    )
    return jc.Network(condition, embed, layer, final), params


def _inputs(tokens: int):
    k1, k2 = jax.random.split(jax.random.key(11))
    noise = rand.normal(k1, (B, tokens, D))
    cond = rand.randint(k2, (B,), 1, VOCAB)
    return noise, cond, jnp.zeros((B,), jnp.int32)


def _sample(network, params, tokens, cached, policy, reuse=None, guided=True):
    noise, cond, uncond = _inputs(tokens)
    plan = jc.CachePlan(network, cached)
    kwargs = dict(uncond=uncond, guidance_scale=4.0) if guided else {}
    return jc.sample(plan, plan.split(params), noise, cond, solver=SOLVER, num_steps=6,
                     policy=policy, reuse=reuse, **kwargs)


# tokens 7 > 2B (the old code cut the table silently), 5 < 2B (it failed to slice).
@pytest.mark.parametrize("tokens", [7, 5])
def test_guided_caches_keep_the_rope_table_whole(tokens):
    network, params = rope_network(tokens)
    _, cond, uncond = _inputs(tokens)
    out = _sample(network, params, tokens, 2, jc.IntervalPolicy(2), jc.OutputReuse())
    assert len(out.caches) == 2
    rope = np.asarray(params.condition["rope"])
    captions = np.asarray(params.condition["captions"])
    for cache, rows in zip(out.caches, (cond, uncond)):
        constant = cache.get_constant()
        assert constant["rope"].shape == (tokens, D)
        np.testing.assert_array_equal(np.asarray(constant["rope"]), rope)
        assert constant["caption"].shape == (B, L, D)
        np.testing.assert_array_equal(np.asarray(constant["caption"]), captions[np.asarray(rows)])
        assert cache.get(0).shape == (B, tokens, D)  # the slot streams are cut per branch
        assert bool(cache.has_constant())
    assert np.all(np.isfinite(np.asarray(out.sample)))


def test_device_decided_run_keeps_the_table_whole_too():
    network, params = rope_network(7)
    static = _sample(network, params, 7, 2, jc.IntervalPolicy(2), jc.OutputReuse())
    device = _sample(network, params, 7, 2, jc.OnDevice(jc.IntervalPolicy(2)), jc.OutputReuse())
    np.testing.assert_array_equal(np.asarray(device.sample), np.asarray(static.sample))
    for cache in device.caches:
        assert cache.constant_value["rope"].shape == (7, D)


def test_unguided_cache_keeps_the_table_whole():
    network, params = rope_network(7)
    out = _sample(network, params, 7, 2, jc.IntervalPolicy(2), jc.OutputReuse(), guided=False)
    (cache,) = out.caches
    assert cache.constant_value["rope"].shape == (7, D)
    assert cache.constant_value["caption"].shape == (B, L, D)


@pytest.mark.parametrize("reuse", [jc.OutputReuse(), jc.OutputReuse(all_layers=True)],
                         ids=["output", "all_layers"])
def test_interval_one_equals_uncached_bitwise(reuse):
    network, params = rope_network(7)
    uncached = _sample(network, params, 7, 0, None)
    got = _sample(network, params, 7, 2, jc.IntervalPolicy(1), reuse)
    np.testing.assert_array_equal(np.asarray(got.sample), np.asarray(uncached.sample))


def test_rows_cuts_exactly_the_leaves_whose_leading_axis_is_the_row_count():
    """The documented rule, on a hand-filled cache of 4 rows (2 branches of 2)."""
    network, _ = rope_network(7)
    constant = {
        "per_row": jnp.arange(4.0)[:, None] * jnp.ones((4, 3)),  # [rows, 3]: cut
        "table": jnp.arange(7.0 * 3).reshape(7, 3),  # [tokens, 3]: whole
        "one": jnp.ones((1, 5)),  # leading axis 1: whole at any batch
        "scalar": jnp.float32(2.0),  # whole
        "ambiguous": jnp.arange(4.0 * 2).reshape(4, 2),  # shared, but 4 = rows: cut
    }
    mode = jc.OutputReuse()
    state = mode.init(jc.CachePlan(network, 2), jax.ShapeDtypeStruct((4, 7, D), jnp.float32),
                      constant)
    for j in range(2):
        part = mode.rows(state, 2 * j, 2 * j + 2).get_constant()
        np.testing.assert_array_equal(part["per_row"], constant["per_row"][2 * j:2 * j + 2])
        np.testing.assert_array_equal(part["ambiguous"], constant["ambiguous"][2 * j:2 * j + 2])
        for name in ("table", "one", "scalar"):
            np.testing.assert_array_equal(part[name], constant[name])
