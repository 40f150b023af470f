"""Cached vs uncached sampling on a reference model, timed in one run.

Usage::

    python -m jaxcache.evaluation.bench       # small DiT on whatever device JAX sees
    python -m jaxcache.evaluation.bench --model mmdit --size flux --steps 50 --cached-layers 25 \\
        --interval 3 --batch 1 --dtype bfloat16 --json

Both loops are compiled first (compile time reported on its own), warmed up, then timed over
``--repeats`` runs each, interleaved, and the medians compared. ``ideal_speedup`` is the compute
ratio from the matrix FLOPs of each piece and the layer evaluations actually made; ``efficiency``
is measured speedup over ideal speedup.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcache import sampler
from jaxcache.evaluation.flops import ideal_speedup
from jaxcache.models import ARCHS, SIZES, create_model, get_config
from jaxcache.network import from_nnx
from jaxcache.plan import CachePlan
from jaxcache.policies import IntervalPolicy, OnDevice
from jaxcache.solvers import DDIM, FlowMatchEuler

__all__ = ["main", "run_benchmark"]

_SOLVERS = {"euler": FlowMatchEuler, "ddim": DDIM}


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be an integer, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"--{name} must be positive, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxcache.evaluation.bench",
        description="Time cached vs uncached sampling of a reference diffusion transformer.",
    )
    p.add_argument("--model", choices=ARCHS, default="dit", help="architecture (default: dit)")
    p.add_argument("--size", choices=SIZES, default="small", help="named size (default: small)")
    p.add_argument("--steps", type=_positive("steps"), default=30, help="denoising steps")
    p.add_argument("--interval", type=_positive("interval"), default=3, help="refresh interval")
    p.add_argument(
        "--cached-layers", type=int, default=None,
        help="how many of the first layers are cached (default: half the depth)",
    )
    p.add_argument("--batch", type=_positive("batch"), default=4, help="samples per batch")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--solver", choices=sorted(_SOLVERS), default="euler")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (off by default)")
    p.add_argument(
        "--decide", choices=["static", "device"], default="static",
        help="static: the interval schedule compiles to a loop with no decision in it; "
        "device: decide every step on the device, as signal-driven policies must",
    )
    p.add_argument("--repeats", type=_positive("repeats"), default=5, help="timed runs each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _time(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run_benchmark(
    model: str = "dit",
    size: str = "small",
    steps: int = 30,
    interval: int = 3,
    cached_layers: int | None = None,
    batch: int = 4,
    dtype: str = "float32",
    solver: str = "euler",
    guidance: float | None = None,
    decide: str = "static",
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its figures (see the module docstring).

    Raises:
      ValueError: for a cached-layer count outside ``[1, depth]`` and other bad settings.
    """
    config = get_config(model, size)
    n = config.depth // 2 if cached_layers is None else cached_layers
    if not 1 <= n <= config.depth:
        raise ValueError(f"--cached-layers must be in [1, {config.depth}] for {size}, got {n}")
    compute_dtype = jnp.dtype(dtype)
    net_model = create_model(
        model, size, rngs=nnx.Rngs(seed), dtype=compute_dtype, param_dtype=compute_dtype
    )
    network, params = from_nnx(net_model)
    plan = CachePlan(network, n)
    # Split once, freeing the unsplit layers as we go; both loops use the split parameters.
    seg = plan.split(params, donate=True)
    del net_model, params

    k_noise, k_cond = jax.random.split(jax.random.key(seed + 1))
    noise = jax.random.normal(k_noise, (batch, *config.image_shape), jnp.float32)
    cond = jax.random.randint(k_cond, (batch, config.caption_len), 1, config.vocab_size)
    guided = {}
    if guidance is not None:
        guided = dict(uncond=jnp.zeros_like(cond), guidance_scale=float(guidance))
    common = dict(solver=_SOLVERS[solver](), num_steps=steps, **guided)
    policy = IntervalPolicy(interval) if decide == "static" else OnDevice(IntervalPolicy(interval))

    # Compile both programs, timed on their own.
    compiled, compile_s = {}, {}
    for name, pol in (("uncached", None), ("cached", policy)):
        lowered = sampler.lower(plan, seg, noise, cond, policy=pol, **common)
        start = time.perf_counter()
        # A compiled sampler takes (params, noise, cond, uncond, policy, reuse).
        compiled[name] = functools.partial(
            lowered.compile(), seg, noise, cond, guided.get("uncond"), pol, None
        )
        compile_s[name] = time.perf_counter() - start

    outputs = {name: fn() for name, fn in compiled.items()}  # warm-up
    jax.block_until_ready(outputs)
    times = {"uncached": [], "cached": []}
    for _ in range(repeats):  # interleaved, so drifts in clocks hit both alike
        for name, fn in compiled.items():
            times[name].append(_time(fn))
    uncached_s = statistics.median(times["uncached"])
    cached_s = statistics.median(times["cached"])

    evaluations = int(outputs["cached"].layer_evaluations)
    depth = config.depth
    ideal = ideal_speedup(
        network, seg, noise, cond, uncond=guided.get("uncond"), num_steps=steps,
        layer_evaluations=evaluations,
    )
    speedup = uncached_s / cached_s
    diff = jnp.abs(outputs["cached"].sample - outputs["uncached"].sample)
    return {
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": model,
        "size": size,
        "dtype": dtype,
        "batch": batch,
        "steps": steps,
        "interval": interval,
        "cached_layers": n,
        "depth": depth,
        "guidance": guidance,
        "decide": decide,
        "layer_evaluations": evaluations,
        "uncached_layer_evaluations": steps * depth,
        "uncached_s": uncached_s,
        "cached_s": cached_s,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "compile_s": compile_s["cached"],
        "uncached_compile_s": compile_s["uncached"],
        "max_abs_diff": float(jnp.max(diff)),
        "mean_abs_diff": float(jnp.mean(diff)),
        "repeats": repeats,
    }


def _table(r: dict[str, Any]) -> str:
    head = (
        f"jaxcache bench · {r['model']}/{r['size']} · {r['dtype']} · batch {r['batch']} · "
        f"{r['steps']} steps · cached layers {r['cached_layers']}/{r['depth']} · "
        f"interval {r['interval']} ({r['decide']} decisions) · {r['device']}"
    )
    rows = [
        ("", "time (s)", "compile (s)", "layer evals"),
        ("uncached", f"{r['uncached_s']:.4f}", f"{r['uncached_compile_s']:.2f}",
         str(r["uncached_layer_evaluations"])),
        ("cached", f"{r['cached_s']:.4f}", f"{r['compile_s']:.2f}", str(r["layer_evaluations"])),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head, ""]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines += [
        "",
        f"speedup {r['speedup']:.3f}x   ideal {r['ideal_speedup']:.3f}x   "
        f"efficiency {r['efficiency']:.3f}   max |cached - uncached| {r['max_abs_diff']:.3g}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        result = run_benchmark(
            model=args.model, size=args.size, steps=args.steps, interval=args.interval,
            cached_layers=args.cached_layers, batch=args.batch, dtype=args.dtype,
            solver=args.solver, guidance=args.guidance, decide=args.decide, repeats=args.repeats,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
