"""Learning-to-Cache: training a per-(step, layer) router with Optax (jaxcache.tuning.router)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcache as jc
from jaxcache.tuning.router import Router, train_router

import toy_networks as toy

STEPS = 5
SOLVER = jc.FlowMatchEuler()


def _setup(network=None):
    net, params = toy.single_stream()
    net = net if network is None else network
    noise, cond, _ = toy.inputs(batch=4)
    plan = jc.CachePlan(net, toy.LAYERS - 1, first_layers=1)
    return plan, plan.split(params), noise, cond


def _train(plan, seg, noise, cond, **kwargs):
    kwargs = dict(dict(solver=SOLVER, num_steps=STEPS, iterations=4, progress=False), **kwargs)
    return train_router(plan, seg, noise, cond, **kwargs)


def test_the_gradient_of_the_loss_in_the_logits_is_finite_and_nonzero():
    plan, seg, noise, cond = _setup()
    target = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS).sample

    def loss(logits):
        out = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS,
                        policy=jc.LayerGates(jax.nn.sigmoid(logits)), reuse=jc.ResidualReuse(),
                        remat=True)
        return jnp.mean(jnp.square(out.sample - target))

    grad = jax.grad(loss)(jnp.zeros((STEPS, plan.cached_layers)))
    assert np.all(np.isfinite(grad))
    assert np.count_nonzero(np.asarray(grad)) > grad.size // 2


def test_lam_zero_and_threshold_zero_compute_everything_and_equal_uncached_exactly():
    plan, seg, noise, cond = _setup()
    router = _train(plan, seg, noise, cond, lam=0.0)
    policy = router.policy(threshold=0.0)
    assert np.all(router.mask(0.0)) and router.computed_fraction(0.0) == 1.0
    out = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS, policy=policy,
                    reuse=jc.ResidualReuse())
    plain = jc.sample(plan, seg, noise, cond, solver=SOLVER, num_steps=STEPS)
    np.testing.assert_array_equal(out.sample, plain.sample)


def test_a_larger_lam_learns_to_compute_less():
    plan, seg, noise, cond = _setup()
    low = _train(plan, seg, noise, cond, lam=0.0, iterations=15, learning_rate=0.2)
    high = _train(plan, seg, noise, cond, lam=5.0, iterations=15, learning_rate=0.2)
    assert high.gates.mean() < low.gates.mean() - 0.1
    assert high.computed_fraction(0.5) < low.computed_fraction(0.5)


def test_training_compiles_once():
    def traces_of(iterations):  # a fresh network each time: nothing cached from before
        net, _ = toy.single_stream()
        counted, traces = toy.trace_counted(net)
        plan, seg, noise, cond = _setup(counted)
        _train(plan, seg, noise, cond, iterations=iterations, batch_size=2)
        return len(traces)

    # Eight iterations over two minibatches trace the layers exactly as often as one iteration.
    assert traces_of(8) == traces_of(1) > 0


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    plan, seg, noise, cond = _setup()
    straight = _train(plan, seg, noise, cond, iterations=6, batch_size=2, lam=0.1)
    path = tmp_path / "router.npz"
    _train(plan, seg, noise, cond, iterations=3, batch_size=2, lam=0.1, checkpoint=path,
           checkpoint_every=2)
    resumed = _train(plan, seg, noise, cond, iterations=6, batch_size=2, lam=0.1,
                     checkpoint=path)
    np.testing.assert_array_equal(resumed.logits, straight.logits)
    with pytest.raises(ValueError, match="was written with settings"):
        _train(plan, seg, noise, cond, iterations=8, batch_size=2, lam=0.2, checkpoint=path)


def test_a_saved_router_loads_to_the_same_mask_and_is_refused_elsewhere(tmp_path):
    plan, seg, noise, cond = _setup()
    router = _train(plan, seg, noise, cond, iterations=2)
    router.save(tmp_path / "r.npz")
    loaded = Router.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(loaded.mask(0.6), router.mask(0.6))
    loaded.check(plan, seg, solver=SOLVER, num_steps=STEPS)
    with pytest.raises(ValueError, match="num_steps: trained for 5, given 7"):
        loaded.check(plan, seg, solver=SOLVER, num_steps=7)
    other = jc.CachePlan(plan.network, toy.LAYERS)
    with pytest.raises(ValueError, match="first_layers: trained for 1, given 0"):
        loaded.check(other, other.split(toy.single_stream()[1]), solver=SOLVER,
                     num_steps=STEPS)
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a saved router"):
        Router.load(tmp_path / "x.npz")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lam=-1.0), ValueError, "lam must be a finite number >= 0"),
    (dict(iterations=0), ValueError, "iterations must be an int >= 1"),
    (dict(batch_size=9), ValueError, r"batch_size must be an int in \[1, 4\]"),
    (dict(learning_rate=0.0), ValueError, "learning_rate must be > 0"),
])
def test_bad_training_settings_are_refused_before_training(kwargs, error, message):
    plan, seg, noise, cond = _setup()
    with pytest.raises(error, match=message):
        _train(plan, seg, noise, cond, **kwargs)


@pytest.mark.parametrize("threshold", [-0.1, 1.0, float("nan")])
def test_a_threshold_outside_zero_one_is_refused(threshold):
    router = Router(np.zeros((STEPS, 3), np.float32), {})
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        router.policy(threshold)


def test_a_budget_mask_computes_that_share_by_the_largest_gates_and_every_layer_at_step_0():
    logits = np.array([[-5, -5, -5], [3, -1, 0.5], [2, 1, -3], [0, 4, -2]], np.float32)
    router = Router(logits, {})
    mask = router.budget_mask(0.5)  # 6 of 12: step 0's three, then gates 4, 3, 2
    assert mask.sum() == 6 and mask[0].all()
    assert mask[1:].tolist() == [[True, False, False], [True, False, False],
                                 [False, True, False]]
    assert router.budget_mask(0.01).sum() == 3 and router.budget_mask(1.0).all()
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        router.budget_mask(0.0)
