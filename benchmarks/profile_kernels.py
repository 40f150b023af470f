"""Where a compiled sampling run spends its time, kernel by kernel (GPU).

    python benchmarks/profile_kernels.py [OUTDIR] [--only NAME,...]

For each setting below: compile, warm up, time the median of a few runs, then trace one run with
``jax.profiler`` and read the trace back with ``jax.profiler.ProfileData`` (no TensorBoard
needed). Per setting it prints the wall time, the number of device kernels, their summed time
(the rest of the wall time is the GPU waiting on launches and loop predicates), the time by
kind (matrix products, attention, other fusions, copies) and the top kernels by total time.
One JSON line per setting goes to OUTDIR/kernels.jsonl.

``flux19`` is FLUX.1's 19 double-stream blocks alone (the single-stream ones left out, as the
first peer benchmark ran it); ``flux`` is FLUX.1's whole layout, 19 double- then 38
single-stream blocks.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

import jaxcache as jc
from jaxcache.evaluation.bench import build_model
from jaxcache.evaluation.named import named_plan, named_policy
from jaxcache.models import get_config

DIT = ("dit", "dit-xl", dict(), 8, 50)
FLUX19 = ("mmdit", "flux", dict(depth=19, single_depth=0, attn_implementation="cudnn"), 1, 28)
FLUX = ("mmdit", "flux", dict(attn_implementation="cudnn"), 1, 28)  # 19 double + 38 single

# name -> (model, policy: None or (rule, cached layers, reuse mode), one array per layer?)
SETTINGS = {
    "dit/uncached": (DIT, None, False),
    "dit/uncached/unroll": (DIT, None, True),
    "dit/interval3/output": (DIT, ("interval", 14, jc.OutputReuse()), False),
    "dit/interval3/taylor1": (DIT, ("interval", 14, jc.TaylorForecast(1)), False),
    "dit/interval3/output/unroll": (DIT, ("interval", 14, jc.OutputReuse()), True),
    "dit/teacache": (DIT, ("teacache", None, jc.ResidualReuse()), False),
    "dit/first-block": (DIT, ("first-block", None, jc.ResidualReuse()), False),
    "flux19/uncached": (FLUX19, None, False),
    "flux19/uncached/unroll": (FLUX19, None, True),
    "flux/uncached": (FLUX, None, False),
    "flux/uncached/unroll": (FLUX, None, True),
    "flux/interval3/taylor1": (FLUX, ("interval", 24, jc.TaylorForecast(1)), False),
}


def _kind(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cublas", "nvjet", "cutlass", "sm90_xmma", "dot")):
        return "matmul"
    if any(k in lowered for k in ("cudnn", "fmha", "flash", "attention", "custom-call")):
        return "attention"
    if "copy" in lowered or "memcpy" in lowered or "memset" in lowered:
        return "copy"
    if "reduce" in lowered or "fusion" in lowered:
        return "fusion"
    return "other"


def _kernels(trace_dir: str) -> list[tuple[str, str, float, float]]:
    """(kernel name, HLO op, duration, start) of every device event in the trace (us)."""
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for e in line.events:
                stats = dict(e.stats)
                events.append((e.name, str(stats.get("hlo_op", e.name)), e.duration_ns / 1e3,
                               e.start_ns / 1e3))
    return sorted(events, key=lambda e: e[3])


def _gaps(events, minimum_us: float = 5.0) -> tuple[float, list]:
    """Idle time between kernels (gaps of at least ``minimum_us``), by the kernel before it."""
    by_before: dict[str, list[float]] = collections.defaultdict(list)
    end = None
    for kernel, op, us, start in events:
        if end is not None and start - end >= minimum_us:
            by_before[f"{op} [{kernel[:40]}]"].append(start - end)
        end = max(end or 0.0, start + us)
    total = sum(sum(v) for v in by_before.values())
    top = sorted(by_before.items(), key=lambda kv: -sum(kv[1]))[:10]
    return total / 1e3, [(op, len(g), sum(g) / 1e3) for op, g in top]


# The thresholds that computed the profiled rows' share of steps (BENCHMARKS.md).
_THRESHOLDS = {"teacache": 0.6455, "first-block": 1.082}


def _program(setting, built):
    (model, size, overrides, batch, steps), cached, unrolled = setting
    network, params = built
    config = get_config(model, size)
    depth = jc.network.num_layers(params)  # every block, of every kind
    policy, reuse = None, None
    if unrolled:  # every layer in straight-line code, one weight array per layer
        network = dataclasses.replace(network, layer_unroll=True)
    if cached is None:
        plan = jc.CachePlan(network, 0)
    else:
        name, layers, reuse = cached
        plan = named_plan(name, network, depth, cached_layers=layers)
        policy = named_policy(name, interval=3, threshold=_THRESHOLDS.get(name, 0.0))
    seg = plan.split(params)
    k_noise, k_cond = jax.random.split(jax.random.key(1))
    noise = jax.random.normal(k_noise, (batch, *config.image_shape), jnp.float32)
    cond = jax.random.randint(k_cond, (batch, config.caption_len), 1, config.vocab_size)
    kwargs = dict(solver=jc.FlowMatchEuler(), num_steps=steps, policy=policy, reuse=reuse)
    start = time.perf_counter()
    compiled = jc.lower(plan, seg, noise, cond, **kwargs).compile()
    compile_s = time.perf_counter() - start
    return compiled, compile_s  # called with no argument: the ones it was lowered with


def profile(name: str, run, repeats: int = 5) -> dict:
    jax.block_until_ready(run())
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        walls.append(time.perf_counter() - start)
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        out = jax.block_until_ready(run())
    events = _kernels(trace_dir)
    by_kind = collections.Counter()
    by_op: dict[str, list[float]] = collections.defaultdict(list)
    for kernel, op, us, _ in events:
        by_kind[_kind(kernel + " " + op)] += us
        by_op[f"{op} [{kernel[:60]}]"].append(us)
    top = sorted(by_op.items(), key=lambda kv: -sum(kv[1]))
    gap_ms, gap_top = _gaps(events)
    refreshes = int(jnp.sum(out.refreshed)) if out.refreshed is not None else None
    return dict(
        setting=name, device=jax.devices()[0].device_kind, jax=jax.__version__,
        wall_ms=statistics.median(walls) * 1e3, kernels=len(events),
        kernel_ms=sum(e[2] for e in events) / 1e3, refreshes=refreshes, gap_ms=gap_ms,
        gaps_after=gap_top,
        by_kind_ms={k: v / 1e3 for k, v in by_kind.most_common()},
        top=[(op, len(ts), sum(ts) / 1e3) for op, ts in top],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="/tmp")
    parser.add_argument("--only", default=",".join(SETTINGS))
    parser.add_argument("--tag", default="", help="a label for this process (its XLA flags)")
    args = parser.parse_args()
    names = args.only.split(",")
    built: dict = {}
    results = []
    for name in names:
        setting = SETTINGS[name]
        model, size, overrides = setting[0][:3]
        key = (model, size, tuple(sorted(overrides.items())))
        if key not in built:
            built.clear()  # one model in memory at a time
            built[key] = build_model(model, size, "bfloat16", **overrides)
        run, compile_s = _program(setting, built[key])
        r = profile(name, run)
        r.update(tag=args.tag, compile_s=compile_s)
        results.append(r)
        with open(pathlib.Path(args.out) / "kernels.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"\n== {name} {args.tag}: wall {r['wall_ms']:.1f} ms, {r['kernels']} kernels, "
              f"kernel time {r['kernel_ms']:.1f} ms, refreshes {r['refreshes']}", flush=True)
        print("   by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in r["by_kind_ms"].items()))
        for op, count, ms in r["top"][:15]:
            print(f"   {ms:8.2f} ms {count:6d}x  {op}")
        print(f"   idle gaps >= 5 us: {r['gap_ms']:.2f} ms; after:")
        for op, count, ms in r["gaps_after"][:6]:
            print(f"   {ms:8.2f} ms {count:6d}x  {op}")
    print(f"\n{'setting':24s} {'tag':10s} {'wall ms':>8s} {'kernels':>8s} {'kernel ms':>9s} "
          f"{'gaps ms':>8s} {'copy ms':>8s} {'compile s':>9s}")
    for r in results:
        print(f"{r['setting']:24s} {r['tag']:10s} {r['wall_ms']:8.1f} {r['kernels']:8d} "
              f"{r['kernel_ms']:9.1f} {r['gap_ms']:8.2f} {r['by_kind_ms'].get('copy', 0):8.1f} "
              f"{r['compile_s']:9.1f}")


if __name__ == "__main__":
    main()
