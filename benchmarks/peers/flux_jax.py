"""The jaxcache side of the FLUX peer benchmark: the MMDiT in FLUX.1's layout.

The ``flux`` size: width 3072, 24 heads, 19 double-stream blocks then 38 single-stream blocks
(diffusers' ``FluxTransformer2DModel(num_layers=19, num_single_layers=38)``; ``--depth`` and
``--single-depth`` change the counts), 1024 image tokens (a 64x64x16 latent in 2x2 patches) and
512 text tokens, bfloat16, batch 1, ``--steps`` Euler steps, through
:func:`jaxcache.evaluation.bench.run_benchmark` (uncached ``jaxcache.sample``, the hand-written
jitted loop over the same forward, and the cached run; compile times apart). Rows, each with its
uncached run: XLA and cuDNN attention at interval 3 over the first ``--cached-layers`` of the 57
blocks (the body crosses from the double- into the single-stream blocks); cuDNN at interval 3
with the order-1 forecast (``IntervalPolicy(3)`` + ``TaylorForecast(1)``); cuDNN First-Block at
the same number of computed steps as diffusers' First-Block Cache made (``--fbc-computed``, or
read from the diffusers rows in ``--out``). One JSON object per row, appended to ``--out``.

Usage (GPU machine, after ``flux_diffusers.py``)::

    python3 benchmarks/peers/flux_jax.py --out out/peers.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

from jaxcache.evaluation.bench import BenchSettings, build_model, run_benchmark
from jaxcache.models import SIZES, get_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_flops import block_flops  # noqa: E402

KEEP = ("uncached_s", "uncached_compile_s", "hand_loop_s", "hand_loop_compile_s", "cached_s",
        "compile_s", "speedup", "ideal_speedup", "efficiency", "layer_evaluations",
        "refreshes", "threshold", "uncached_over_hand_loop", "speedup_over_hand_loop",
        "max_abs_diff")
ROWS = ("xla", "cudnn", "taylor", "first-block")


def _fbc_computed(path: str | None) -> int | None:
    if not path or not Path(path).exists():
        return None
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if row.get("row") == "diffusers FBC eager":
            return len(row["computed_steps"])
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="flux", choices=SIZES,
                   help="the mmdit size (default flux: 19 + 38); a smaller one for a CPU smoke "
                   "test")
    p.add_argument("--depth", type=int, default=None,
                   help="double-stream blocks (default: the size's, 19 for flux)")
    p.add_argument("--single-depth", type=int, default=None,
                   help="single-stream blocks after them (default: the size's, 38 for flux; 0: "
                   "the double-stream blocks alone, as the first peer runs)")
    p.add_argument("--cached-layers", type=int, default=27,
                   help="interval rows: the blocks [0, n) cached (default 27 of 57, about half; "
                   "capped at the depth)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fbc-computed", type=int, default=None)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--hand-loop", choices=["xla", "cudnn", "none"], default="xla",
                   help="which attention's row also times the hand-written loop")
    p.add_argument("--unroll-layers", action="store_true",
                   help="Network.layer_unroll=True: one weight array per block, no layer loop")
    p.add_argument("--compiler-options", type=json.loads, default=None,
                   help='XLA options for every compile, as JSON: \'{"xla_gpu_autotune_level": 0}\'')
    p.add_argument("--tag", default="", help="a label for this process (e.g. its XLA flags)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = set(filter(None, args.rows.split(",")))
    if rows - set(ROWS):
        p.error(f"unknown rows {sorted(rows - set(ROWS))}; valid: {', '.join(ROWS)} (the "
                "FLOP-equal 'equiv' row went when both sides took FLUX.1's full layout)")
    layout = {k: v for k, v in (("depth", args.depth), ("single_depth", args.single_depth))
              if v is not None}
    config = dataclasses.replace(get_config("mmdit", args.size), **layout)
    double, single = config.depth, config.single_depth
    total = double + single
    # A single-stream block has the same matrix FLOPs as a double-stream one (peer_flops.py).
    per_block = block_flops(config.width, config.num_image_tokens + config.caption_len)

    def emit(name, result):
        row = {k: result[k] for k in KEEP if k in result}
        uncached = per_block * result["depth"] * args.steps
        row.update(row=name + (" unrolled" if args.unroll_layers else ""), tag=args.tag,
                   compiler_options=args.compiler_options,
                   jax=jax.__version__, device=result["device"],
                   steps=args.steps, blocks=f"{double}+{single}",
                   uncached_tflops=uncached / result["uncached_s"] / 1e12,
                   cached_tflops_equiv=uncached / result["cached_s"] / 1e12)
        if "hand_loop_s" in result:
            row["hand_loop_tflops"] = uncached / result["hand_loop_s"] / 1e12
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    common = dict(model="mmdit", size=args.size, steps=args.steps, batch=1, dtype="bfloat16",
                  repeats=args.repeats, layer_unroll=True if args.unroll_layers else None,
                  compiler_options=args.compiler_options)
    cached = min(args.cached_layers, total)
    for attn in ("xla", "cudnn"):
        wanted = [r for r in ROWS if r in rows
                  and (r == attn or (attn == "cudnn" and r in ("taylor", "first-block")))]
        if not wanted:
            continue
        overrides = dict(layout, attn_implementation=attn)
        built = build_model("mmdit", args.size, "bfloat16", **overrides)
        settings = dict(policy="interval", interval=3, cached_layers=cached)
        where = f"({cached} of {double}+{single})"
        if attn in rows:
            # The hand-written loop (unrolled) compiles for over a minute at this size: once.
            emit(f"jaxcache {attn} interval 3 {where} reuse",
                 run_benchmark(BenchSettings(**common, **settings, overrides=overrides,
                                             hand_loop=attn == args.hand_loop), built=built))
        if "taylor" in wanted:
            emit(f"jaxcache {attn} interval 3 {where} taylor1",
                 run_benchmark(BenchSettings(**common, **settings, reuse="taylor", order=1,
                                             overrides=overrides, hand_loop=False),
                               built=built))
        if "first-block" in wanted:
            computed = args.fbc_computed or _fbc_computed(args.out) or 10
            emit(f"jaxcache {attn} first-block residual ({computed} of {args.steps} computed)",
                 run_benchmark(BenchSettings(**common, policy="first-block",
                                             refresh_target=computed / args.steps,
                                             overrides=overrides, hand_loop=False),
                               built=built))
        del built


if __name__ == "__main__":
    main()
