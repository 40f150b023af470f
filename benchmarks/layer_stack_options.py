"""How the layer stack is compiled, measured: scanned or one array per layer, XLA options.

For one model (default: the MMDiT at FLUX.1's layout), each setting runs the uncached sampler
and a cached one (interval 3 with the order-1 forecast, every block but the last cached) and
reports run time (median of ``--repeats``), compile time and the efficiency against the
FLOP-weighted ideal. Each setting is a ``name=unroll:options`` item: ``unroll`` is ``scan``
(``Network.layer_unroll=1``), ``unroll`` (``True``) or ``auto`` (the library's default for the
backend); ``options`` is a JSON object of XLA options (``Network.compiler_options``), or
``auto``. One JSON object per setting is appended to ``--out``; a table is printed last.

Usage (GPU machine)::

    python3 benchmarks/layer_stack_options.py --out out/stack.jsonl \\
        --settings 'default=auto:auto' 'scan=scan:{}' 'unrolled-cublas=unroll:{"xla_gpu_enable_triton_gemm": false}'
"""

from __future__ import annotations

import argparse
import json

import jax

from jaxcache.evaluation.bench import BenchSettings, build_model, run_benchmark
from jaxcache.network import num_layers

KEEP = ("uncached_s", "uncached_compile_s", "cached_s", "compile_s", "speedup", "ideal_speedup",
        "efficiency", "layer_unroll", "compiler_options", "refreshes", "depth")


def _setting(text: str) -> tuple[str, bool | int | str, dict | str | None]:
    name, _, spec = text.partition("=")
    unroll, _, options = spec.partition(":")
    layer_unroll = {"scan": 1, "unroll": True, "auto": "auto"}[unroll]
    return name, layer_unroll, ("auto" if options in ("", "auto") else json.loads(options))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mmdit")
    p.add_argument("--size", default="flux")
    p.add_argument("--overrides", default="{}", help="ModelConfig fields as JSON")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--reuse", default="taylor")
    p.add_argument("--settings", nargs="+", default=["default=auto:auto"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    overrides = json.loads(args.overrides)
    built = build_model(args.model, args.size, "bfloat16", 0, **overrides)
    depth = num_layers(built[1])
    rows = []
    for text in args.settings:
        name, unroll, options = _setting(text)
        try:
            result = run_benchmark(BenchSettings(
                model=args.model, size=args.size, batch=args.batch, steps=args.steps,
                dtype="bfloat16", repeats=args.repeats, interval=args.interval,
                reuse=args.reuse, cached_layers=depth - 1, hand_loop=False,
                overrides=overrides, layer_unroll=unroll, compiler_options=options,
            ), built=built)
        except Exception as error:  # noqa: BLE001 (an option this XLA lacks: say so, go on)
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        row = {"setting": name, "device": result["device"], "jax": jax.__version__,
               "model": args.model, "size": args.size, "overrides": overrides,
               "batch": args.batch, "steps": args.steps,
               **{k: result[k] for k in KEEP}}
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n{'setting':24s} {'uncached ms':>11s} {'compile s':>9s} {'cached ms':>9s} "
          f"{'compile s':>9s} {'ideal':>6s} {'effic.':>6s}")
    for r in rows:
        print(f"{r['setting']:24s} {1e3 * r['uncached_s']:11.1f} {r['uncached_compile_s']:9.1f} "
              f"{1e3 * r['cached_s']:9.1f} {r['compile_s']:9.1f} {r['ideal_speedup']:6.3f} "
              f"{r['efficiency']:6.3f}")


if __name__ == "__main__":
    main()
