"""Bytes a sampler carries for reuse, against the activation it holds, on the reference models.

    python benchmarks/cache_bytes.py

Shapes only (``jax.eval_shape``; nothing is allocated): the reuse mode's state at DiT-XL/2
(batch 8), Qwen-Image's layout (60 double-stream blocks, batch 1; the row BENCHMARKS.md records
as FLUX scale, from before the ``flux`` size took FLUX.1's layout) and FLUX.1's layout (19
double- then 38 single-stream blocks, batch 1; the body, 24 layers, ends inside the
single-stream blocks and the cache holds its output as the ``(image, text)`` pair), bfloat16,
for each reuse mode. ``activation`` is one body
output (the hidden state a skipped step needs); ``constant`` is the caption state kept once per
run (the condition path's output), listed apart.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import jaxcache as jc
from jaxcache.models import create_model, get_config


def nbytes(tree) -> int:
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def main() -> None:
    rows = [("dit", "dit-xl", 8, 14), ("mmdit", "qwen-image", 1, 25), ("mmdit", "flux", 1, 24)]
    modes = {
        "output (default: body output only)": jc.OutputReuse(),
        "output, all_layers=True (the reference layout)": jc.OutputReuse(all_layers=True),
        "residual": jc.ResidualReuse(),
        "taylor order 1": jc.TaylorForecast(1),
        "taylor order 2": jc.TaylorForecast(2),
        "taylor order 1, float32 differences": jc.TaylorForecast(1, dtype=jnp.float32),
    }
    print("| model | batch | cached layers | reuse mode | state bytes | activation bytes | "
          "state / activation | constant bytes |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for arch, size, batch, n in rows:
        config = get_config(arch, size)
        model = nnx.eval_shape(lambda a=arch, s=size: create_model(
            a, s, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
        network, params = jc.from_nnx(model)
        plan = jc.CachePlan(network, n)
        seg = jax.eval_shape(plan.split, params)
        noise = jax.ShapeDtypeStruct((batch, *config.image_shape), jnp.float32)
        cond = jax.ShapeDtypeStruct((batch, config.caption_len), jnp.int32)
        constant = jax.eval_shape(network.condition, seg.condition, cond)
        t = jax.ShapeDtypeStruct((batch,), jnp.float32)
        _, body, _ = jax.eval_shape(plan.run_head, seg, noise, t, constant)
        activation = nbytes(body)
        for name, mode in modes.items():
            state = jax.eval_shape(lambda c, m=mode, p=plan, b=body: m.init(p, b, c), constant)
            held = nbytes(state)
            const = nbytes(constant) if isinstance(mode, jc.OutputReuse) else 0
            held -= const  # the caption constant rides in the StepCache's constant slot
            print(f"| {arch}/{size} | {batch} | {n} | {name} | {held:,} | {activation:,} | "
                  f"{held / activation:.3f} | {const:,} |")


if __name__ == "__main__":
    main()
