#!/usr/bin/env bash
# Kernel profiles (benchmarks/profile_kernels.py) of the scanned and the unrolled layer stacks,
# then the FLUX-shaped peer rows with the unrolled stack (GPU).
#   bash benchmarks/profile_kernels.sh OUTDIR
set -uo pipefail
out=${1:-/tmp}
export PYTHONPATH=.
quiet() { grep -v "^W0\|^I0\|Deprecation\|stats = dict"; }
python3 benchmarks/profile_kernels.py "$out" --only \
  flux19/uncached,flux19/uncached/unroll,dit/uncached,dit/uncached/unroll,dit/interval3/output,dit/interval3/output/unroll \
  2>&1 | quiet > "$out/default.log"
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 benchmarks/profile_kernels.py "$out" \
  --tag notriton --only flux19/uncached/unroll 2>&1 | quiet > "$out/notriton.log"
python3 benchmarks/peers/flux_jax.py --rows cudnn,taylor --unroll-layers --hand-loop cudnn \
  --out "$out/peers-unrolled.jsonl" 2>&1 | quiet > "$out/peers.log"
tail -9 "$out/default.log"; tail -3 "$out/notriton.log"
python3 - "$out/peers-unrolled.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["row"], {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                     if k in ("uncached_s", "uncached_compile_s", "hand_loop_s", "cached_s",
                              "compile_s", "efficiency", "uncached_tflops")})
PY
