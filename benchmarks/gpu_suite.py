"""The GPU rows of BENCHMARKS.md in one process per model: every policy and reuse mode.

    python benchmarks/gpu_suite.py dit  [OUTDIR]         # DiT-XL/2, bf16, batch 8, 50 steps
    python benchmarks/gpu_suite.py qwen-image [OUTDIR]  # 60 double-stream blocks, batch 1
    python benchmarks/gpu_suite.py flux [OUTDIR]        # FLUX.1: 19 double + 38 single, batch 1

Each row is one ``jaxcache.evaluation.bench.run_benchmark`` call on a model built once (random,
non-zero weights); signal-driven rows search the threshold that refreshes about a third of the
steps (thresholds are traced, so the search reuses the compiled program). One JSON line per row
goes to OUTDIR/<suite>.jsonl; a table is printed last.

The FLUX-scale rows of BENCHMARKS.md recorded before the ``flux`` size took FLUX.1's layout
(``gpu_suite.py flux``, ``flux-dbcache``, ``flux-fitted`` then) ran 60 double-stream blocks:
those suites are now ``qwen-image``, ``qwen-image-dbcache`` and ``qwen-image-fitted``. Attention
follows the models' default (``"auto"``: cuDNN in bfloat16 on a CUDA GPU); rows recorded before
that default ran XLA attention.
"""

import json
import pathlib
import sys
import time

import jax

from jaxcache.evaluation.bench import build_model, run_benchmark

DIT = dict(model=("dit", "dit-xl"), common=dict(batch=8, steps=50, dtype="bfloat16", repeats=10))
# Qwen-Image's layout, 60 double-stream blocks (the size called flux before FLUX.1's layout).
QWEN = dict(model=("mmdit", "qwen-image"),
            common=dict(batch=1, steps=50, dtype="bfloat16", repeats=3))
# FLUX.1's layout: 19 double-stream then 38 single-stream blocks (57 layers of two kinds).
FLUX = dict(model=("mmdit", "flux"), common=dict(batch=1, steps=50, dtype="bfloat16", repeats=3))
# cached_layers: 14 of 28 (DiT), 25 of 60 (Qwen-Image), 24 of 57 (FLUX: 19 double + 5 single)
INTERVAL = dict(policy="interval", interval=3)
ROWS = {
    "interval/output": dict(INTERVAL),
    "interval/taylor1": dict(INTERVAL, reuse="taylor"),
    "interval/taylor1/f32": dict(INTERVAL, reuse="taylor", forecast_dtype="float32"),
    "interval/fitted1": dict(INTERVAL, reuse="fitted"),  # FittedForecast (gains of one)
    "interval/taylor0": dict(INTERVAL, reuse="taylor", order=0),
    "interval/hermite2": dict(INTERVAL, reuse="hermite", order=2),
    "interval/output/device": dict(INTERVAL, decide="device"),
    "first-block/residual": dict(policy="first-block", refresh_target=0.34),
    "first-block/taylor1": dict(policy="first-block", refresh_target=0.34, reuse="taylor"),
    "first-block/residual/host": dict(policy="first-block", refresh_target=0.34, host_loop=True),
    "first-block/res/0.2+host": dict(policy="first-block", refresh_target=0.2, host_loop=True),
    "teacache/residual": dict(policy="teacache", refresh_target=0.34),
    "dbcache/residual": dict(policy="dbcache", refresh_target=0.34, first=1, warmup=2),
}


def _unrolled(suite):
    """The suite with one weight array per layer (``Network.layer_unroll=True``)."""
    return dict(suite, common=dict(suite["common"], layer_unroll=True))


def _with_options(suite, options):
    """The suite with XLA options for its programs only (``Network.compiler_options``)."""
    return dict(suite, common=dict(suite["common"], compiler_options=options))


CUBLAS = {"xla_gpu_enable_triton_gemm": False}  # cuBLAS GEMMs instead of XLA's Triton GEMMs
# CUDA-graph command buffers with device-side conditionals and loops: no predicate read-backs.
GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
          "CONDITIONAL,WHILE"}
SIGNAL_ROWS = ["first-block/residual", "teacache/residual", "dbcache/residual"]


def _suite(base, cached_layers, names):
    rows = []
    for name in names:
        row = dict(ROWS[name])
        if row["policy"] == "interval":
            row["cached_layers"] = cached_layers
        rows.append((name, row))
    return dict(base, rows=rows)


SUITES = {
    # Pass 1 (no flags, one-stage signal reductions at the time).
    "dit": _suite(DIT, 14, ["interval/output", "interval/taylor1", "interval/hermite2",
                            "interval/output/device", "first-block/residual/host",
                            "first-block/taylor1", "teacache/residual", "dbcache/residual"]),
    # The per-step decision's cost with other structures (run with XLA_FLAGS set).
    "dit-decisions": _suite(DIT, 14, ["interval/output/device", "first-block/residual"]),
    # Pass 2 (run with the command-buffer XLA flags): forecast variants and every policy.
    "dit-b": _suite(DIT, 14, ["interval/output", "interval/taylor1", "interval/taylor1/f32",
                              "interval/taylor0", "first-block/residual",
                              "first-block/res/0.2+host", "teacache/residual",
                              "dbcache/residual"]),
    # Pass 3, the current code without flags (the BENCHMARKS.md table).
    "dit-c": _suite(DIT, 14, ["interval/output", "interval/taylor1", "interval/output/device",
                              "first-block/residual", "first-block/res/0.2+host",
                              "teacache/residual", "dbcache/residual"]),
    # Pass 4 (2026-11-30, afternoon): the forecast and TeaCache rows again, beside their baseline.
    "dit-d": _suite(DIT, 14, ["interval/output", "interval/taylor1", "teacache/residual"]),
    # Pass 5: every layer stack unrolled with one weight array per layer (no weight copies).
    "dit-u": _unrolled(_suite(DIT, 14, ["interval/output", "interval/taylor1"])),
    "dit-u-teacache": _unrolled(_suite(DIT, 14, ["teacache/residual"])),
    "qwen-image-dbcache": _suite(QWEN, 25, ["dbcache/residual"]),
    # Pass 6: one array per layer and cuBLAS GEMMs (Network.compiler_options): every policy.
    "dit-uc": _with_options(_unrolled(_suite(DIT, 14, [
        "interval/output", "interval/taylor1", *SIGNAL_ROWS])), CUBLAS),
    # Pass 7: the signal-driven rows with one array per layer, without and with device-side
    # decisions in CUDA graphs (run one after the other, on one machine).
    "dit-u-signal": _unrolled(_suite(DIT, 14, SIGNAL_ROWS)),
    "dit-ug": _with_options(_unrolled(_suite(DIT, 14, SIGNAL_ROWS)), GRAPHS),
    "qwen-image": _suite(QWEN, 25, ["interval/output", "interval/taylor1",
                                    "first-block/residual", "teacache/residual"]),
    # Pass 8 (2026-12-01): the fitted forecast beside Taylor and plain reuse, scanned default.
    "dit-fitted": _suite(DIT, 14, ["interval/output", "interval/taylor1", "interval/fitted1"]),
    "qwen-image-fitted": _suite(QWEN, 25, ["interval/output", "interval/taylor1",
                                           "interval/fitted1"]),
    # FLUX.1's real layout: the body of the interval rows spans both kinds of block.
    "flux": _suite(FLUX, 24, ["interval/output", "interval/taylor1", "first-block/residual",
                              "teacache/residual"]),
    "flux-dbcache": _suite(FLUX, 24, ["dbcache/residual"]),
    "flux-fitted": _suite(FLUX, 24, ["interval/output", "interval/taylor1", "interval/fitted1"]),
}


def main() -> None:
    suite = SUITES[sys.argv[1]]
    out = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp")
    print("jax", jax.__version__, jax.devices(), flush=True)
    start = time.perf_counter()
    built = build_model(*suite["model"], suite["common"]["dtype"])
    print(f"built {suite['model']} in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for name, row in suite["rows"]:
        start = time.perf_counter()
        r = run_benchmark(*suite["model"], **suite["common"], **row, hand_loop=False,
                          built=built)
        r["row"] = name
        r["wall_s"] = time.perf_counter() - start
        results.append(r)
        with open(out / f"{sys.argv[1]}.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    print(f"\n{'row':24s} {'uncached':>9s} {'cached':>9s} {'speedup':>8s} {'ideal':>6s} "
          f"{'eff':>6s} {'refresh':>7s} {'thr':>8s} {'compile':>7s} {'host x':>6s}")
    for r in results:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        host = f"{r['host_over_compiled']:.2f}" if "host_over_compiled" in r else "-"
        print(f"{r['row']:24s} {r['uncached_s']:9.4f} {r['cached_s']:9.4f} {r['speedup']:8.3f} "
              f"{r['ideal_speedup']:6.3f} {r['efficiency']:6.3f} {r['refresh_fraction']:7.2f} "
              f"{thr:>8s} {r['compile_s']:7.1f} {host:>6s}")


if __name__ == "__main__":
    main()
