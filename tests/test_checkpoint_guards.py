"""Bad parameters are refused where they enter, with short messages: a checkpoint of the wrong
architecture or with non-finite weights, a parameter given as a Python list."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcache.digits import pretrained
from jaxcache.models import create_model


def _save(tmp_path, arch, name, poison=False):
    model = create_model(arch, "tiny", depth=1, rngs=nnx.Rngs(0))
    if poison:  # one NaN in one weight, as a diverged run leaves it
        graphdef, state = nnx.split(model)
        pure = nnx.to_pure_dict(state)
        leaves, treedef = jax.tree.flatten(pure)
        leaves[0] = jnp.asarray(leaves[0]).at[(0,) * np.ndim(leaves[0])].set(jnp.nan)
        nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
        model = nnx.merge(graphdef, state)
    path = tmp_path / name
    pretrained.save_checkpoint(path, model)
    return path


def test_the_other_architecture_under_the_expected_name_is_refused(tmp_path):
    path = _save(tmp_path, "dit", "digits_mmdit.msgpack")
    assert type(pretrained.load_checkpoint(path).model).__name__ == "DiT"  # no expectation
    with pytest.raises(ValueError, match="holds a dit model, expected a mmdit model"):
        pretrained.load_checkpoint(path, expect_arch="mmdit")
    assert pretrained.load_checkpoint(path, expect_arch="dit").model is not None
    with pytest.raises(ValueError, match="expect_arch must be one of"):
        pretrained.load_checkpoint(path, expect_arch="unet")


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    path = _save(tmp_path, "dit", "diverged.msgpack", poison=True)
    with pytest.raises(ValueError, match=r"holds 1 non-finite values .*allow_non_finite=True"):
        pretrained.load_checkpoint(path)
    model = pretrained.load_checkpoint(path, allow_non_finite=True).model
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    assert any(not np.all(np.isfinite(np.asarray(a))) for a in leaves)


def test_the_shipped_models_load_as_their_architecture():
    for name in pretrained.SHIPPED_MODELS:
        model = pretrained.load_digits_model(name)
        assert type(model).__name__.lower() == name.split("-")[0]


def test_a_parameter_given_as_a_list_is_named_in_a_short_message():
    import jaxcache as jc

    from toy_networks import single_stream

    network, params = single_stream()
    listed = params._replace(layers={"w": np.asarray(params.layers["w"]).tolist(),
                                     "b": params.layers["b"]})
    with pytest.raises(TypeError, match=r"params.*\['w'\]\[0\]\[0\]\[0\] is a float, not an "
                                        r"array.*jnp.asarray") as info:
        jc.CachePlan(network, 3).split(listed)
    assert len(str(info.value)) < 400
    plan = jc.CachePlan(network, 3)
    seg = plan.split(params)._replace(final=np.asarray(params.final).tolist())
    with pytest.raises(TypeError, match=r"params.*final.*is a float, not an array"):
        jc.sample(plan, seg, jnp.ones((2, 8)), jnp.array([1, 2]), solver=jc.FlowMatchEuler(),
                  num_steps=4)
