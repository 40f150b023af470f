#!/usr/bin/env bash
# Compile time of the FLUX-shaped model (19 dual-stream blocks, cuDNN attention, one weight
# array per block) under per-program XLA options, each in a fresh process (XLA keeps its GEMM
# autotuning results in the process), then the persistent compilation cache (GPU machine).
#   bash benchmarks/compile_time.sh OUTDIR
set -uo pipefail
out=${1:-/tmp}
mkdir -p "$out"
export PYTHONPATH=.
quiet() { grep -v "^W0\|^I0\|Deprecation"; }
run() {  # tag, compiler options (JSON), extra arguments
  timeout 150 python3 benchmarks/peers/flux_jax.py --rows cudnn --unroll-layers --hand-loop none \
    --repeats 3 --tag "$1" --compiler-options "$2" "${@:3}" --out "$out/compile.jsonl" 2>&1 \
    | quiet > "$out/$1.log" || echo "$1: exit $?"
}
run default null
run notriton '{"xla_gpu_enable_triton_gemm": false}'
run notriton-autotune0 '{"xla_gpu_enable_triton_gemm": false, "xla_gpu_autotune_level": 0}'
run autotune0 '{"xla_gpu_autotune_level": 0}'
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache-cc JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
run cache-cold '{"xla_gpu_enable_triton_gemm": false}'
run cache-warm '{"xla_gpu_enable_triton_gemm": false}'
unset JAX_COMPILATION_CACHE_DIR
lib=$(python3 -c "import jaxlib, os; print(os.path.dirname(jaxlib.__file__))")
grep -rhaoE "xla_gpu_[a-z_]*(parallel|autotun)[a-z_]*" "$lib"/.. 2>/dev/null | sort -u | head -20
python3 - "$out/compile.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f'{r["tag"]:20s} uncached {r["uncached_s"]*1e3:7.1f} ms compile {r["uncached_compile_s"]:5.1f} s'
          f' | cached {r["cached_s"]*1e3:7.1f} ms compile {r["compile_s"]:5.1f} s eff {r["efficiency"]:.3f}')
PY
