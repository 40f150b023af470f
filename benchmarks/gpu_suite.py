"""The GPU rows of BENCHMARKS.md in one process per model: every policy and reuse mode.

    python benchmarks/gpu_suite.py dit-unrolled-cublas [OUTDIR]  # DiT-XL/2, bf16, b8, 50 steps
    python benchmarks/gpu_suite.py qwen-image-scanned [OUTDIR]   # 60 double-stream blocks, b1
    python benchmarks/gpu_suite.py flux [OUTDIR]                 # FLUX.1: 19 + 38 blocks, b1
    python benchmarks/gpu_suite.py wan-peer [OUTDIR]   # Wan 2.1 1.3B, 81 frames 480p, the peer's
    python benchmarks/gpu_suite.py wan-peer-17f [OUTDIR]  # the same at 17 frames (7800 tokens)
    python benchmarks/gpu_suite.py dit-peer [OUTDIR]   # DiT-XL/2 guided: CFG-Cache, SenCache

Each row is one ``jaxcache.evaluation.bench.run_benchmark`` call on a model built once (random,
non-zero weights); signal-driven rows search the threshold that refreshes about a third of the
steps (thresholds are traced, so the search reuses the compiled program). One JSON line per row
goes to OUTDIR/<suite>.jsonl; a table is printed last.

The peer suites (``wan-peer``, ``dit-peer``) time the JAX peer's caches on the same footing:
CFG-Cache alone (no layer cache) and on the interval cache, SenCache, MagCache, each beside its
host loop (the peer's way: CFG-Cache's full and cache steps as two jitted functions, SenCache's
decision read back every step, a known schedule read off the host), and on Wan the text keys
and values computed once against at every layer call (``constants_per_step``).

Suites are named for what they measure; each one whose name gives a layer stack pins it and its
XLA options, so its command reproduces its rows whatever the backend's defaults. Attention follows
the models' default (``"auto"``: cuDNN in bfloat16 on a CUDA GPU); rows recorded before that
default ran XLA attention. Raw results are named after their suite
(``benchmarks/results/<suite>.jsonl``).
"""

import json
import pathlib
import sys
import time

import jax

from jaxcache.evaluation.bench import BenchSettings, build_model, run_benchmark

DIT = dict(model=("dit", "dit-xl"), common=dict(batch=8, steps=50, dtype="bfloat16", repeats=10))
# Qwen-Image's layout, 60 double-stream blocks (the size called flux before FLUX.1's layout).
QWEN = dict(model=("mmdit", "qwen-image"),
            common=dict(batch=1, steps=50, dtype="bfloat16", repeats=3))
# FLUX.1's layout: 19 double-stream then 38 single-stream blocks (57 layers of two kinds).
FLUX = dict(model=("mmdit", "flux"), common=dict(batch=1, steps=50, dtype="bfloat16", repeats=3))
# Wan2.1-T2V-1.3B (30 blocks, width 1536) at its nominal input: 21 x 60 x 104 latents, 81 frames
# at 480p, 32760 video tokens and 512 text tokens; UniPC at Wan 2.1's 480p shift, guidance 5.
# About a second a guided step on one GPU (uncached): two timed runs each.
WAN = dict(model=("wan", "wan-1.3b"),
           common=dict(batch=1, steps=50, dtype="bfloat16", repeats=2, solver="unipc", shift=3.0,
                       guidance=5.0))
# The same model on 5 latent frames (17 video frames at 480p, 7800 video tokens): a tenth of the
# full input's time a step, so every peer row fits one device call.
WAN_17F = dict(WAN, common=dict(WAN["common"], overrides={"frames": 5}))
# DiT-XL/2 as in DIT, with guidance (4, DiT's sampling scale) for CFG-Cache.
DIT_GUIDED = dict(DIT, common=dict(DIT["common"], guidance=4.0))
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
    # Planned schedules, fitted to the model by one full-compute calibration run; the body is
    # every layer. MagCache's published warm-up (a fifth of the steps) and at most 2 skips in a
    # row keep it above about 0.47 of the steps computed.
    "magcache/residual": dict(policy="magcache", refresh_target=0.5),
    "planned/residual": dict(policy="planned", refresh_target=0.34),
    "planned/taylor1": dict(policy="planned", refresh_target=0.34, reuse="taylor"),
    # Per-(step, layer): each layer refreshes every 3 steps, staggered (3 distinct step bodies).
    "layer-mask/output": dict(policy="layer-mask", interval=3),
    "layer-mask/residual": dict(policy="layer-mask", interval=3, reuse="residual"),
}
PLANNED_ROWS = ["magcache/residual", "planned/residual", "planned/taylor1", "layer-mask/output",
                "layer-mask/residual"]
# The JAX peer's caches. CFG-Cache as FasterCache publishes it: the gap refreshed every 5
# evaluations after about a third of the run in full (17 of 50). On the interval cache (the
# whole stack, as the peer's caches skip it) every 3 evaluations, which 5 does not divide, so
# some refreshes run the conditional branch alone.
CFG = dict(cfg_cache=5, cfg_warmup=17)
PEER_ROWS = {  # in the order they matter, so a run cut short keeps the first
    "cfg-cache": dict(CFG, policy="none", host_loop=True),
    "cfg-cache+interval/taylor1": dict(CFG, **INTERVAL, reuse="taylor", host_loop=True),
    # Wan's text keys and values recomputed at every layer call (a port without the hook), in
    # the cached program and in uncached sampling (policy none: "cached" is the uncached one).
    "interval/taylor1/kv-per-step": dict(INTERVAL, reuse="taylor", constants_per_step=True),
    # SenCache: its tolerance searched to half the steps; its last prediction reused.
    "sencache/output": dict(policy="sencache", refresh_target=0.5, host_loop=True),
    "interval/taylor1/host": dict(INTERVAL, reuse="taylor", host_loop=True),
    "magcache/residual/host": dict(policy="magcache", refresh_target=0.5, host_loop=True),
    "none/kv-per-step": dict(policy="none", constants_per_step=True),
}
ROWS.update(PEER_ROWS)


def _stack(suite, layer_unroll, options=None):
    """The suite with its layer stack, XLA options and attention (XLA's) pinned, not the
    backend's defaults, so its command reproduces the rows BENCHMARKS.md recorded with it."""
    common = dict(suite["common"], layer_unroll=layer_unroll,
                  compiler_options={} if options is None else options,
                  overrides={"attn_implementation": "xla"})
    return dict(suite, common=common)


CUBLAS = {"xla_gpu_enable_triton_gemm": False}  # cuBLAS GEMMs instead of XLA's Triton GEMMs
# CUDA-graph command buffers with device-side conditionals and loops: no predicate read-backs.
GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
          "CONDITIONAL,WHILE"}
SIGNAL_ROWS = ["first-block/residual", "teacache/residual", "dbcache/residual"]
SCANNED, UNROLLED = 1, True


def _suite(base, cached_layers, names):
    rows = []
    for name in names:
        row = dict(ROWS[name])
        if row["policy"] == "interval":
            row["cached_layers"] = cached_layers
        rows.append((name, row))
    return dict(base, rows=rows)


# Named for what they measure: model, layer stack (scanned: one layer in the program;
# unrolled: one weight array per layer), XLA options, rows. The suites without a stack in
# their name run the library's defaults for the backend.
SUITES = {
    # DiT-XL/2, every policy, the scanned stack, no XLA options.
    "dit-scanned": _stack(_suite(DIT, 14, [
        "interval/output", "interval/taylor1", "interval/output/device",
        "first-block/residual", "first-block/res/0.2+host", "teacache/residual",
        "dbcache/residual"]), SCANNED),
    # The same stack with forecast variants; run with the command-buffer XLA_FLAGS.
    "dit-scanned-forecasts": _stack(_suite(DIT, 14, [
        "interval/output", "interval/taylor1", "interval/taylor1/f32", "interval/taylor0",
        "first-block/residual", "first-block/res/0.2+host", "teacache/residual",
        "dbcache/residual"]), SCANNED),
    "dit-unrolled": _stack(_suite(DIT, 14, ["interval/output", "interval/taylor1"]), UNROLLED),
    "dit-unrolled-cublas": _stack(_suite(DIT, 14, [
        "interval/output", "interval/taylor1", *SIGNAL_ROWS]), UNROLLED, CUBLAS),
    # The signal-driven rows without and with device-side decisions in CUDA graphs.
    "dit-unrolled-signal": _stack(_suite(DIT, 14, SIGNAL_ROWS), UNROLLED),
    "dit-unrolled-graphs": _stack(_suite(DIT, 14, SIGNAL_ROWS), UNROLLED, GRAPHS),
    # The fitted forecast beside Taylor and plain reuse.
    "dit-fitted-scanned": _stack(_suite(DIT, 14, [
        "interval/output", "interval/taylor1", "interval/fitted1"]), SCANNED),
    # Qwen-Image's layout (60 double-stream blocks), scanned.
    "qwen-image-scanned": _stack(_suite(QWEN, 25, [
        "interval/output", "interval/taylor1", "first-block/residual",
        "teacache/residual"]), SCANNED),
    "qwen-image-dbcache-scanned": _stack(_suite(QWEN, 25, ["dbcache/residual"]), SCANNED),
    "qwen-image-fitted-scanned": _stack(_suite(QWEN, 25, [
        "interval/output", "interval/taylor1", "interval/fitted1"]), SCANNED),
    # FLUX.1's real layout with the library's defaults: the interval body spans both kinds.
    "flux": _suite(FLUX, 24, ["interval/output", "interval/taylor1", "first-block/residual",
                              "teacache/residual"]),
    "flux-dbcache": _suite(FLUX, 24, ["dbcache/residual"]),
    "flux-fitted": _suite(FLUX, 24, ["interval/output", "interval/taylor1", "interval/fitted1"]),
    # Planned schedules (step masks and a per-(step, layer) mask) with the library's defaults.
    # The step-mask rows first (not measured yet); per-layer output reuse beside residual
    # reuse tells whether the residual's extra read and add is the per-layer mask's gap.
    "dit-planned": _suite(DIT, 14, ["planned/taylor1", "magcache/residual", "layer-mask/output",
                                    "layer-mask/residual"]),
    "dit-planned-all": _suite(DIT, 14, ["interval/output", *PLANNED_ROWS]),
    "flux-planned": _suite(FLUX, 24, ["layer-mask/residual", "planned/residual"]),
    # The JAX peer's caches with the library's defaults (cuDNN attention in bfloat16 on a GPU:
    # XLA's would hold Wan's 32760 x 32760 attention scores). Interval rows cache every layer.
    "wan-peer": _suite(WAN, 30, list(PEER_ROWS)),
    "wan-peer-17f": _suite(WAN_17F, 30, list(PEER_ROWS)),
    "dit-peer": _suite(DIT_GUIDED, 28, [
        "cfg-cache", "cfg-cache+interval/taylor1", "interval/taylor1/host", "sencache/output"]),
}


def main() -> None:
    suite = SUITES[sys.argv[1]]
    out = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp")
    print("jax", jax.__version__, jax.devices(), flush=True)
    start = time.perf_counter()
    built = build_model(*suite["model"], suite["common"]["dtype"],
                        **suite["common"].get("overrides", {}))
    print(f"built {suite['model']} in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for name, row in suite["rows"]:
        start = time.perf_counter()
        r = run_benchmark(BenchSettings(*suite["model"], **suite["common"], **row,
                                        hand_loop=False), built=built)
        r["row"] = name
        r["wall_s"] = time.perf_counter() - start
        results.append(r)
        with open(out / f"{sys.argv[1]}.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    print(f"\n{'row':28s} {'uncached':>9s} {'cached':>9s} {'speedup':>8s} {'ideal':>6s} "
          f"{'eff':>6s} {'refresh':>7s} {'thr':>8s} {'compile':>7s} {'host x':>6s}")
    for r in results:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        host = f"{r['host_over_compiled']:.2f}" if "host_over_compiled" in r else "-"
        print(f"{r['row']:28s} {r['uncached_s']:9.4f} {r['cached_s']:9.4f} {r['speedup']:8.3f} "
              f"{r['ideal_speedup']:6.3f} {r['efficiency']:6.3f} {r['refresh_fraction']:7.2f} "
              f"{thr:>8s} {r['compile_s']:7.1f} {host:>6s}")
        if "per_step_constants_s" in r:  # the same program, K/V at every layer call
            print(f"{'':28s} K/V per step {r['per_step_constants_s']:.4f} s: once is "
                  f"{r['constants_once_speedup']:.3f}x faster")


if __name__ == "__main__":
    main()
