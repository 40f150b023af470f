#!/bin/bash
# FLUX.1's layout (19 double + 38 single blocks), both sides in one run on one card, with the
# library's defaults on the jaxcache side (no recipe), then the scanned stack with XLA's
# dynamic-slice fusion for comparison. GPU machine; diffusers as wheels in .whl/ (see wheels.sh).
# Usage: bash benchmarks/peers/flux_layout.sh OUTDIR
set -u
out=${1:-out/flux_layout}
mkdir -p "$out"
. "$(dirname "$0")/wheels.sh"
# Each jaxcache row compiles the uncached program again: the persistent cache makes the repeats
# cheap (the first row's compile time is the real one).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache-compile}
timeout "${DIFFUSERS_TIMEOUT:-200}" python3 benchmarks/peers/flux_diffusers.py --repeats 3 \
  --out "$out/peers.jsonl" > "$out/diffusers.log" 2>&1 || echo "diffusers side: exit $?"
timeout "${JAX_TIMEOUT:-250}" python3 benchmarks/peers/flux_jax.py --repeats 3 \
  --rows taylor,first-block --cached-layers 56 --hand-loop none \
  --out "$out/peers.jsonl" > "$out/jax.log" 2>&1 || echo "jax side: exit $?"
timeout "${STACK_TIMEOUT:-80}" python3 benchmarks/layer_stack_options.py --size flux \
  --repeats 3 --out "$out/stack.jsonl" --settings \
  'scan-cublas-dsf=scan:{"xla_gpu_enable_triton_gemm": false, "xla_gpu_enable_dynamic_slice_fusion": true}' \
  > "$out/stack.log" 2>&1 || echo "stack options: exit $?"
python3 benchmarks/peers/table.py "$out/peers.jsonl"
tail -3 "$out/stack.log"
