"""Memory and time of fit_forecast on DiT-XL/2, with and without rematerialised steps.

    python benchmarks/fit_memory.py REMAT [BATCH] [STEPS] [SIZE]   # REMAT 1 or 0; SIZE dit-xl

Fits a FittedForecast's gains (interval 3, the first 14 of 28 layers cached, bf16, random
non-zero weights) for 3 Adam steps and prints one JSON line: the device's peak memory in use,
the first step (the uncached target's run and both compiles included) and the median of the
others. Run each setting in a fresh
process: the peak is per process.
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxcache as jc
from jaxcache.evaluation.bench import build_model
from jaxcache.models import get_config


def main() -> None:
    remat = sys.argv[1] == "1"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    size = sys.argv[4] if len(sys.argv) > 4 else "dit-xl"
    config = get_config("dit", size)
    network, params = build_model("dit", size, "bfloat16")
    plan = jc.CachePlan(network, config.depth // 2)
    seg = plan.split(params)
    k_noise, k_cond = jax.random.split(jax.random.key(1))
    noise = jax.random.normal(k_noise, (batch, *config.image_shape), jnp.float32)
    cond = jax.random.randint(k_cond, (batch, config.caption_len), 1, config.vocab_size)
    stamps = [time.perf_counter()]
    result = dict(remat=remat, batch=batch, steps=steps, size=size,
                  device=str(jax.devices()[0]))
    try:
        jc.fit_forecast(plan, seg, noise, cond, solver=jc.FlowMatchEuler(), num_steps=steps,
                        policy=jc.IntervalPolicy(3), iterations=3, remat=remat,
                        log=lambda i, loss: stamps.append(time.perf_counter()))
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        result.update(first_step_s=gaps[0], step_s=statistics.median(gaps[1:]))
    except Exception as error:  # noqa: BLE001 - an out-of-memory is a result here
        result.update(error=f"{type(error).__name__}: {str(error)[:300]}")
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
