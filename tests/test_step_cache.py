"""StepCache against the reference's semantics, method by method and as a random op sequence."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxcache import StepCache, should_refresh

from reference import ReferenceStepCache

SLOT = jax.ShapeDtypeStruct((2, 3), jnp.float32)


def value(k: float):
    return jnp.full((2, 3), k, jnp.float32)


def make(n=4, layer2=True, constant=True):
    return StepCache.create(
        n,
        layer=SLOT,
        layer2=jax.ShapeDtypeStruct((5,), jnp.int32) if layer2 else None,
        constant=jnp.zeros((7,), jnp.bfloat16) if constant else None,
    )


# ------------------------------------------------------------------------------- creation
def test_create_is_empty():
    cache = make()
    assert cache.num_layers == 4
    assert not any(bool(cache.has(i)) for i in range(4))
    assert not any(bool(cache.has2(i)) for i in range(4))
    assert not bool(cache.has_constant())
    assert cache.arrays() == []


@pytest.mark.parametrize("n", [-1, 1.5, True, "3"])
def test_create_rejects_bad_length(n):
    with pytest.raises(ValueError, match="num_layers"):
        StepCache.create(n, layer=SLOT)


def test_zero_length_stores_nothing():
    cache = StepCache.create(0, layer=SLOT)
    cache = cache.set(0, value(1.0))
    assert cache.get(0) is None
    assert not bool(cache.has(0))
    assert cache.arrays() == []


def test_pytree_slot():
    cache = StepCache.create(2, layer={"out": SLOT, "res": jnp.zeros((4,), jnp.float16)})
    v = {"out": value(2.0), "res": jnp.ones((4,), jnp.float16)}
    cache = cache.set(1, v)
    chex.assert_trees_all_equal(cache.get(1), v)


# ------------------------------------------------------------------------------- get / set
def test_set_then_get():
    cache = make().set(2, value(3.0))
    chex.assert_trees_all_equal(cache.get(2), value(3.0))
    assert bool(cache.has(2)) and not bool(cache.has(1))


def test_set_is_immutable():
    cache = make()
    cache.set(0, value(1.0))
    assert not bool(cache.has(0))


def test_set_past_end_is_noop_and_get_past_end_is_none():
    cache = make().set(1, value(1.0))
    after = cache.set(4, value(9.0)).set(100, value(9.0))
    chex.assert_trees_all_equal(after, cache)
    assert cache.get(4) is None and cache.get2(4) is None
    assert not bool(cache.has(4)) and not bool(cache.has2(99))


@pytest.mark.parametrize("method", ["get", "has", "get2", "has2"])
def test_negative_static_index_raises(method):
    with pytest.raises(IndexError, match="-1"):
        getattr(make(), method)(-1)


def test_negative_static_index_raises_on_set():
    with pytest.raises(IndexError):
        make().set(-2, value(1.0))
    with pytest.raises(IndexError):
        make().set2(-1, jnp.zeros((5,), jnp.int32))


def test_set_none_clears():
    cache = make().set(0, value(1.0)).set(0, None)
    assert not bool(cache.has(0))
    chex.assert_trees_all_equal(cache.get(0), value(0.0))


def test_overwrite_replaces_previous():
    cache = make().set(0, value(1.0)).set(0, value(2.0))
    chex.assert_trees_all_equal(cache.get(0), value(2.0))


@pytest.mark.parametrize(
    "bad, msg",
    [
        (jnp.zeros((3, 2), jnp.float32), r"expected float32\[2, 3\], got float32\[3, 2\]"),
        (jnp.zeros((2, 3), jnp.float16), r"expected float32\[2, 3\], got float16\[2, 3\]"),
        ((value(1.0), value(1.0)), "expected"),
    ],
)
def test_wrong_value_names_expected_and_got(bad, msg):
    with pytest.raises(ValueError, match=msg):
        make().set(0, bad)


def test_missing_stream2_and_constant_raise():
    cache = make(layer2=False, constant=False)
    for call in (
        lambda: cache.get2(0),
        lambda: cache.has2(0),
        lambda: cache.set2(0, value(1.0)),
    ):
        with pytest.raises(ValueError, match="no second stream"):
            call()
    for call in (cache.get_constant, cache.has_constant, lambda: cache.set_constant(1.0)):
        with pytest.raises(ValueError, match="no constant slot"):
            call()


def test_constant_slot():
    cache = make()
    c = jnp.arange(7).astype(jnp.bfloat16)
    cache = cache.set_constant(c)
    assert bool(cache.has_constant())
    chex.assert_trees_all_equal(cache.get_constant(), c)
    cache = cache.set_constant(None)
    assert not bool(cache.has_constant())
    with pytest.raises(ValueError, match="expected bfloat16"):
        cache.set_constant(jnp.zeros((7,), jnp.float32))


# ------------------------------------------------------------------------------- traced index
@pytest.mark.parametrize("i, stored", [(0, True), (3, True), (4, False), (9, False), (-1, False)])
def test_traced_index_out_of_range_is_past_the_end(i, stored):
    cache = make()
    new = jax.jit(lambda c, i: c.set(i, value(5.0)))(cache, i)
    got, has = jax.jit(lambda c, i: (c.get(i), c.has(i)))(new, i)
    assert bool(has) == stored
    chex.assert_trees_all_equal(got, value(5.0 if stored else 0.0))
    # Nothing else moved.
    assert int(jnp.sum(new.stream1.filled)) == int(stored)


def test_scan_over_layers_with_traced_index():
    def body(cache, i):
        prev = jnp.where(cache.has(i - 1), cache.get(i - 1), value(0.0))
        return cache.set(i, prev + 1.0), cache.has(i)

    cache, had = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(4)))(make())
    assert not np.any(had)
    for i in range(4):
        chex.assert_trees_all_equal(cache.get(i), value(i + 1.0))


def test_cache_is_a_scan_carry_with_fixed_shapes():
    cache = make()
    shapes = jax.tree.map(jnp.shape, cache)

    def step(cache, k):
        cache = cache.set(k % 4, jnp.full((2, 3), k, jnp.float32))
        return cache.set2(k % 4, jnp.full((5,), k, jnp.int32)), None

    out, _ = jax.lax.scan(step, cache, jnp.arange(6))
    assert jax.tree.map(jnp.shape, out) == shapes
    chex.assert_trees_all_equal(out.get(0), value(4.0))
    chex.assert_trees_all_equal(out.get2(1), jnp.full((5,), 5, jnp.int32))


def test_traced_index_must_be_integer():
    with pytest.raises(TypeError):
        jax.jit(lambda c, i: c.get(i))(make(), 1.0)


# ------------------------------------------------------------------------------- free / arrays
def test_free_empties_and_drops_old_buffers():
    cache = make().set(0, value(1.0)).set2(3, jnp.ones((5,), jnp.int32))
    cache = cache.set_constant(jnp.ones((7,), jnp.bfloat16))
    old = jax.tree.leaves(cache)
    freed = cache.free()
    assert freed.num_layers == 4
    assert freed.arrays() == []
    new = jax.tree.leaves(freed)
    old_ids = {id(a) for a in old}
    old_ptrs = {a.unsafe_buffer_pointer() for a in old}
    assert not any(id(a) in old_ids for a in new)
    # Distinct device buffers, so dropping the old cache releases its memory.
    assert not any(a.unsafe_buffer_pointer() in old_ptrs for a in new)
    assert all(not np.any(np.asarray(a)) for a in new)
    twice = freed.free()
    assert twice.arrays() == [] and twice.num_layers == 4
    # A freed cache is reusable.
    chex.assert_trees_all_equal(twice.set(1, value(2.0)).get(1), value(2.0))


def test_arrays_order_constant_then_stream1_then_stream2():
    cache = make()
    cache = cache.set2(0, jnp.full((5,), 7, jnp.int32)).set(3, value(3.0)).set(1, value(1.0))
    cache = cache.set_constant(jnp.full((7,), 2, jnp.bfloat16))
    got = cache.arrays()
    assert len(got) == 4
    chex.assert_trees_all_equal(got[0], jnp.full((7,), 2, jnp.bfloat16))
    chex.assert_trees_all_equal(got[1], value(1.0))
    chex.assert_trees_all_equal(got[2], value(3.0))
    chex.assert_trees_all_equal(got[3], jnp.full((5,), 7, jnp.int32))


def test_arrays_under_jit_is_a_clear_error():
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda c: c.arrays())(make())


# ------------------------------------------------------------------------------- should_refresh
def test_should_refresh():
    assert should_refresh(0, 3) and not should_refresh(1, 3) and should_refresh(6, 3)
    assert all(should_refresh(s, 1) for s in range(10))
    traced = jax.jit(lambda s: should_refresh(s, 3))(jnp.arange(7))
    np.testing.assert_array_equal(traced, np.arange(7) % 3 == 0)


@pytest.mark.parametrize("interval", [0, -3, 2.0, None])
def test_should_refresh_rejects_bad_interval(interval):
    with pytest.raises(ValueError, match="interval"):
        should_refresh(3, interval)


# ------------------------------------------------------------------------------- vs the reference
N = 3
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, N + 2), st.one_of(st.none(), st.integers(1, 9))),
        st.tuples(st.just("set2"), st.integers(0, N + 2), st.one_of(st.none(), st.integers(1, 9))),
        st.tuples(st.just("free"), st.just(0), st.just(0)),
    ),
    max_size=12,
)


def _apply(cache, op, i, k, traced):
    if op == "free":
        return cache.free()
    idx = jnp.int32(i) if traced else i
    if op == "set":
        return cache.set(idx, None if k is None else value(float(k)))
    return cache.set2(idx, None if k is None else jnp.full((5,), k, jnp.int32))


@settings(max_examples=40, deadline=None)
@given(ops, st.booleans())
def test_matches_reference_on_random_op_sequences(sequence, traced):
    ref = ReferenceStepCache(N)
    cache = make(N, constant=False)
    for op, i, k in sequence:
        cache = _apply(cache, op, i, k, traced)
        if op == "free":
            ref.free()
        elif op == "set":
            ref.set(i, None if k is None else value(float(k)))
        else:
            ref.set2(i, None if k is None else jnp.full((5,), k, jnp.int32))
    for i in range(N + 3):
        assert bool(cache.has(i)) == (ref.get(i) is not None)
        assert bool(cache.has2(i)) == (ref.get2(i) is not None)
        if ref.get(i) is not None:
            chex.assert_trees_all_equal(cache.get(i), ref.get(i))
        if ref.get2(i) is not None:
            chex.assert_trees_all_equal(cache.get2(i), ref.get2(i))
    got, want = cache.arrays(), ref.arrays()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        chex.assert_trees_all_equal(g, w)

