"""Tests of ``jaxcache.plan``: how a plan splits parameters and runs head, body and tail."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcache as jc
from jaxcache.plan import CachePlan, SegmentParams

import toy_networks as toy

N = toy.LAYERS
TOYS = {"single": toy.single_stream, "dual": toy.dual_stream}


@functools.cache
def _toy(kind: str):
    return TOYS[kind]()


def _segments(first_layers: int, cached_layers: int):
    """Head, body and tail layer ranges, written out."""
    stop = first_layers + cached_layers
    return range(0, first_layers), range(first_layers, stop), range(stop, N)


plans = st.integers(0, N).flatmap(lambda f: st.tuples(st.just(f), st.integers(0, N - f)))


# ------------------------------------------------------------------------------------ split


@settings(max_examples=6, deadline=None)
@given(plan=plans, kind=st.sampled_from(sorted(TOYS)))
def test_split_slices_head_body_tail(plan, kind):
    first, cached = plan
    network, params = _toy(kind)
    cp = CachePlan(network, cached, first_layers=first)
    assert (cp.body_start, cp.body_stop) == (first, first + cached)
    seg = cp.split(params)
    assert isinstance(seg, SegmentParams)
    assert seg.condition is params.condition
    assert seg.embed is params.embed
    assert seg.final is params.final
    for name, layers in zip(("head", "body", "tail"), _segments(first, cached)):
        part = getattr(seg, name)
        assert jax.tree.structure(part) == jax.tree.structure(params.layers)
        for got, full in zip(jax.tree.leaves(part), jax.tree.leaves(params.layers)):
            assert got.shape == (len(layers), *full.shape[1:])
            assert got.dtype == full.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(full)[list(layers)])
    assert CachePlan.total_layers(seg) == N
    cp.check(seg)


def test_split_rejects_more_layers_than_the_network_has():
    network, params = _toy("single")
    CachePlan(network, N).split(params)
    CachePlan(network, 2, first_layers=N - 2).split(params)
    for first, cached in [(0, N + 1), (1, N), (N, 1), (N + 1, 0)]:
        with pytest.raises(ValueError, match=f"first_layers={first} \\+ cached_layers={cached}"):
            CachePlan(network, cached, first_layers=first).split(params)


def test_split_rejects_params_without_layers():
    network, params = _toy("single")
    with pytest.raises(ValueError, match="at least one layer"):
        CachePlan(network, 0).split(params._replace(layers={}))


@pytest.mark.parametrize("name", ["cached_layers", "first_layers"])
@pytest.mark.parametrize("bad", [-1, True, False, 1.0, "2", None])
def test_bad_arguments(name, bad):
    network, _ = _toy("single")
    kwargs = {"cached_layers": 1, name: bad}
    with pytest.raises(ValueError, match=name):
        CachePlan(network, **kwargs)


def test_network_must_be_a_network():
    _, params = _toy("single")
    with pytest.raises(TypeError, match="Network"):
        CachePlan(params, 1)


def test_numpy_ints_are_accepted():
    network, params = _toy("single")
    cp = CachePlan(network, np.int64(2), first_layers=np.int32(1))
    assert CachePlan.total_layers(cp.split(params)) == N


# ------------------------------------------------------------------------------------ check


def test_check_accepts_its_own_split_and_an_equal_plans():
    network, params = _toy("single")
    seg = CachePlan(network, 3, first_layers=1).split(params)
    CachePlan(network, 3, first_layers=1).check(seg)


@pytest.mark.parametrize("other", [(0, 3), (1, 2), (2, 3), (0, 0), (0, N)])
def test_check_rejects_params_split_by_another_plan(other):
    network, params = _toy("single")
    seg = CachePlan(network, 3, first_layers=1).split(params)
    first, cached = other
    with pytest.raises(ValueError, match="first_layers=1, cached_layers=3"):
        CachePlan(network, cached, first_layers=first).check(seg)


def test_check_rejects_unsplit_params():
    network, params = _toy("single")
    with pytest.raises(TypeError, match="SegmentParams"):
        CachePlan(network, 3).check(params)


# ----------------------------------------------------------------------------------- donate


def test_donate_deletes_the_unsplit_arrays():
    network, params = toy.single_stream()  # fresh arrays: they are deleted
    seg = CachePlan(network, 3, first_layers=1).split(params, donate=True)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params.layers))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(seg))
    fresh_network, fresh = toy.single_stream()
    expected = CachePlan(fresh_network, 3, first_layers=1).split(fresh)
    for got, want in zip(jax.tree.leaves(seg), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_without_donate_nothing_is_deleted():
    network, params = toy.single_stream()
    CachePlan(network, 3, first_layers=1).split(params)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("first, cached", [(0, N), (0, 0), (N, 0)])
def test_donate_keeps_a_segment_that_spans_every_layer(first, cached):
    # jax returns the array itself for a full slice (leaf[0:N] is leaf): deleting the stack
    # would delete that segment too.
    network, params = toy.single_stream()
    seg = CachePlan(network, cached, first_layers=first).split(params, donate=True)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(seg))
    fresh_network, fresh = toy.single_stream()
    expected = CachePlan(fresh_network, cached, first_layers=first).split(fresh)
    for got, want in zip(jax.tree.leaves(seg), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# -------------------------------------------------------------------------------- segments


def _inputs():
    noise = jnp.asarray(np.random.default_rng(3).normal(size=(3, toy.D)), jnp.float32)
    t = jnp.asarray([0.9, 0.5, 0.1], jnp.float32)
    return noise, t, jnp.asarray([2, 7, 5], jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _composed(cp, seg, x, t, cond):
    constant = cp.network.condition(seg.condition, cond)
    _, h, ctx = cp.run_head(seg, x, t, constant)
    h = cp.run_body(seg, h, ctx)
    return cp.run_tail(seg, h, ctx)


@pytest.mark.parametrize("kind", sorted(TOYS))
@pytest.mark.parametrize("first, cached", [(0, 0), (0, 3), (1, N - 1), (2, 3), (N, 0)])
def test_segments_compose_to_the_network_bitwise(kind, first, cached):
    network, params = _toy(kind)
    x, t, cond = _inputs()
    expected = jax.jit(network)(params, x, t, cond)
    cp = CachePlan(network, cached, first_layers=first)
    got = _composed(cp, cp.split(params), x, t, cond)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("kind", sorted(TOYS))
def test_run_head_returns_embedding_and_head_output(kind):
    network, params = _toy(kind)
    x, t, cond = _inputs()
    cp = CachePlan(network, 2, first_layers=2)

    @jax.jit
    def run(seg, params, x, t, cond):
        constant = network.condition(params.condition, cond)
        want_embedded, want_ctx = network.embed(params.embed, x, t, constant)
        want_h = want_embedded
        for i in range(2):
            layer = jax.tree.map(lambda a, i=i: a[i], params.layers)
            want_h = network.layer(layer, want_h, want_ctx)
        return cp.run_head(seg, x, t, constant), (want_embedded, want_h, want_ctx)

    head, expected = run(cp.split(params), params, x, t, cond)
    for got, want in zip(head, expected):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_run_body_observes_each_body_layer():
    network, params = _toy("single")
    x, t, cond = _inputs()
    cp = CachePlan(network, 3, first_layers=1)
    seg = cp.split(params)
    constant = network.condition(params.condition, cond)
    _, h, ctx = cp.run_head(seg, x, t, constant)

    def observe(state, index, out):
        return state.at[index].set(out)

    out, seen = cp.run_body(seg, h, ctx, observe=observe, state=jnp.zeros((3, *h.shape)))
    np.testing.assert_array_equal(np.asarray(seen[-1]), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(cp.run_body(seg, h, ctx)), np.asarray(out))
    # The body of an empty plan hands the state back untouched.
    empty = CachePlan(network, 0, first_layers=1)
    same, state = empty.run_body(empty.split(params), h, ctx, observe=observe, state="untouched")
    assert same is h and state == "untouched"


# --------------------------------------------------------------------------------- streams


def test_streams_and_join_single_stream():
    network, _ = _toy("single")
    cp = CachePlan(network, 1)
    h = jnp.arange(6.0).reshape(2, 3)
    value1, value2 = cp.streams(h)
    assert value1 is h and value2 is None
    assert cp.join(value1, value2) is h


def test_streams_and_join_dual_stream():
    network, _ = _toy("dual")
    cp = CachePlan(network, 1)
    h = (jnp.zeros((2, 8)), jnp.ones((2, 3, 8)))
    value1, value2 = cp.streams(h)
    assert value1 is h[0] and value2 is h[1]
    joined = cp.join(value1, value2)
    assert isinstance(joined, tuple) and joined[0] is h[0] and joined[1] is h[1]


def test_plan_is_frozen_and_hashable():
    network, _ = _toy("single")
    cp = CachePlan(network, 2, first_layers=1)
    assert cp == CachePlan(network, 2, first_layers=1)
    assert hash(cp) == hash(CachePlan(network, 2, first_layers=1))
    with pytest.raises(AttributeError):
        cp.cached_layers = 3
    assert jc.CachePlan is CachePlan
