"""The jaxcache side of the FLUX peer benchmark: the MMDiT at the diffusers model's shape.

Width 3072, 24 heads, ``--depth`` dual-stream blocks, 1024 image tokens (a 64x64x16 latent in
2x2 patches) and 512 text tokens, bfloat16, batch 1, ``--steps`` Euler steps, through
:func:`jaxcache.evaluation.bench.run_benchmark` (uncached ``jaxcache.sample``, the hand-written
jitted loop over the same forward, and the cached run; compile times apart). Rows: XLA and cuDNN
attention at interval 3 over 9 of 19 blocks; cuDNN with the order-1 forecast; cuDNN First-Block
at the same number of computed steps as diffusers' First-Block Cache made (``--fbc-computed``,
or read from the diffusers rows in ``--out``). One JSON object per row, appended to ``--out``.

Usage (GPU machine, after ``flux_diffusers.py``)::

    python3 benchmarks/peers/flux_jax.py --out out/peers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from jaxcache.evaluation.bench import build_model, run_benchmark
from jaxcache.models import get_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_flops import block_flops  # noqa: E402

KEEP = ("uncached_s", "uncached_compile_s", "hand_loop_s", "hand_loop_compile_s", "cached_s",
        "compile_s", "speedup", "ideal_speedup", "efficiency", "layer_evaluations",
        "refreshes", "threshold", "uncached_over_hand_loop", "speedup_over_hand_loop",
        "max_abs_diff")


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
    p.add_argument("--size", default="flux", help="a smaller size for a CPU smoke test")
    p.add_argument("--depth", type=int, default=19)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fbc-computed", type=int, default=None)
    p.add_argument("--rows", default="xla,cudnn,taylor,first-block,equiv")
    p.add_argument("--equiv-depth", type=int, default=12,
                   help="blocks of the row matching diffusers' reduced 19 + 38 layout in FLOPs")
    p.add_argument("--hand-loop", choices=["xla", "cudnn", "none"], default="xla",
                   help="which attention's row also times the hand-written loop")
    p.add_argument("--unroll-layers", action="store_true",
                   help="Network.layer_unroll=True: one weight array per block, no layer loop")
    p.add_argument("--compiler-options", type=json.loads, default=None,
                   help='XLA options for every compile, as JSON: \'{"xla_gpu_autotune_level": 0}\'')
    p.add_argument("--tag", default="", help="a label for this process (e.g. its XLA flags)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = set(args.rows.split(","))
    config = get_config("mmdit", args.size)
    per_block = block_flops(config.width, config.num_image_tokens + config.caption_len)

    def emit(name, result):
        row = {k: result[k] for k in KEEP if k in result}
        uncached = per_block * result["depth"] * args.steps
        row.update(row=name + (" unrolled" if args.unroll_layers else ""), tag=args.tag,
                   compiler_options=args.compiler_options,
                   jax=jax.__version__, device=result["device"],
                   steps=args.steps, blocks=f"{result['depth']} dual",
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
                  repeats=args.repeats, layer_unroll=args.unroll_layers,
                  compiler_options=args.compiler_options)
    for attn in ("xla", "cudnn"):
        wanted = [r for r in ("xla", "cudnn", "taylor", "first-block") if r in rows
                  and (r == attn or (attn == "cudnn" and r in ("taylor", "first-block")))]
        if not wanted:
            continue
        overrides = dict(depth=args.depth, attn_implementation=None if attn == "xla" else attn)
        built = build_model("mmdit", args.size, "bfloat16", **overrides)
        cached = min(9, args.depth)
        settings = dict(policy="interval", interval=3, cached_layers=cached)
        if attn in rows:
            # The hand-written loop (unrolled) compiles for over a minute at this size: once.
            emit(f"jaxcache {attn} interval 3 ({cached} of {args.depth}) reuse",
                 run_benchmark(**common, **settings, built=built, overrides=overrides,
                               hand_loop=attn == args.hand_loop))
        if "taylor" in wanted:
            emit(f"jaxcache {attn} interval 3 ({cached} of {args.depth}) taylor1",
                 run_benchmark(**common, **settings, reuse="taylor", order=1, built=built,
                               overrides=overrides, hand_loop=False))
        if "first-block" in wanted:
            computed = args.fbc_computed or _fbc_computed(args.out) or 10
            emit(f"jaxcache {attn} first-block residual ({computed} of {args.steps} computed)",
                 run_benchmark(**common, policy="first-block", refresh_target=computed
                               / args.steps, built=built, overrides=overrides,
                               hand_loop=False))
        del built
    if "equiv" in rows:
        # jaxcache has dual-stream blocks only; a single-stream FLUX block has the same matrix
        # FLOPs, so the reduced full layout is matched by the same total number of blocks.
        overrides = dict(depth=args.equiv_depth, attn_implementation="cudnn")
        result = run_benchmark(**common, policy="interval", interval=3,
                               cached_layers=min(9, args.equiv_depth), overrides=overrides,
                               hand_loop=False)
        emit("jaxcache cudnn, FLOP-equal to the reduced full layout", result)


if __name__ == "__main__":
    main()
