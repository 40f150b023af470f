"""Signal-driven policies on DiT-XL/2 with XLA's CUDA-graph conditionals for one program only.

With ``Network.compiler_options`` a user can give the cached program device-side conditionals
and loops (``xla_gpu_enable_command_buffer`` with CONDITIONAL and WHILE: no predicate read back
to the host) while the uncached program keeps the defaults. Runs First-Block and TeaCache
(residual, a third of the steps refreshed) with one array per layer, without and with the
option, and prints absolute times (GPU machine).

    python benchmarks/cmdbuf_decisions.py OUTDIR [first-block,teacache,dbcache]
"""

import json
import pathlib
import sys

from jaxcache.evaluation.bench import build_model, run_benchmark

EXTRA = {"dbcache": dict(first=1, warmup=2)}  # DBCache F1B0, two warm-up steps, as gpu_suite
GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
          "CONDITIONAL,WHILE"}


def main() -> None:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp") / "cmdbuf.jsonl"
    built = build_model("dit", "dit-xl", "bfloat16")
    common = dict(batch=8, steps=50, dtype="bfloat16", repeats=10, hand_loop=False, built=built,
                  layer_unroll=True, refresh_target=0.34)
    policies = sys.argv[2].split(",") if len(sys.argv) > 2 else ["first-block", "teacache"]
    for policy in policies:
        for name, options in (("default", None), ("graphs", GRAPHS)):
            r = run_benchmark("dit", "dit-xl", policy=policy, compiler_options=options,
                              **EXTRA.get(policy, {}), **common)
            r["row"] = f"{policy}/{name}"
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['row']:22s} uncached {r['uncached_s']:.4f} cached {r['cached_s']:.4f} "
                  f"ideal {r['ideal_speedup']:.3f} eff {r['efficiency']:.3f}", flush=True)


if __name__ == "__main__":
    main()
