"""Writes the optimized HLO of the cached and uncached sampling programs (for inspection).

Usage: python benchmarks/dump_hlo.py OUTDIR [--model dit --size dit-xl --batch 8 --dtype bfloat16]
"""

import argparse
import pathlib

import jax.numpy as jnp
from flax import nnx

import jaxcache as jc
from jaxcache import sampler
from jaxcache.models import create_model, get_config

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--model", default="dit")
p.add_argument("--size", default="dit-xl")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--cached-layers", type=int, default=14)
p.add_argument("--interval", type=int, default=3)
p.add_argument("--dtype", default="bfloat16")
a = p.parse_args()
config = get_config(a.model, a.size)
model = create_model(a.model, a.size, rngs=nnx.Rngs(0), dtype=a.dtype, param_dtype=a.dtype)
network, params = jc.from_nnx(model)
plan = jc.CachePlan(network, a.cached_layers)
seg = plan.split(params, donate=True)
noise = jnp.ones((a.batch, *config.image_shape))
cond = jnp.ones((a.batch, config.caption_len), jnp.int32)
for name, policy in (("cached", jc.IntervalPolicy(a.interval)), ("uncached", None)):
    compiled = sampler.lower(
        plan, seg, noise, cond, solver=jc.FlowMatchEuler(), num_steps=50, policy=policy
    ).compile()
    pathlib.Path(a.out, f"{name}.hlo.txt").write_text(compiled.as_text())
    print(name, "written")
