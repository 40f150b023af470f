#!/bin/bash
# The FLUX peer benchmark, both sides in one run on one card (GPU machine; diffusers as a
# wheel in .whl/, see wheels.sh and BENCHMARKS.md "Running them").
# Usage: bash benchmarks/peers/run.sh OUTDIR
# Row settings: flux_diffusers.py --help and flux_jax.py --help.
set -u
out=${1:-out/peers}
mkdir -p "$out"
. "$(dirname "$0")/wheels.sh"
timeout "${DIFFUSERS_TIMEOUT:-330}" python3 benchmarks/peers/flux_diffusers.py \
  --out "$out/peers.jsonl" > "$out/diffusers.log" 2>&1 || echo "diffusers side: exit $?"
timeout "${JAX_TIMEOUT:-230}" python3 benchmarks/peers/flux_jax.py \
  --out "$out/peers.jsonl" > "$out/jax.log" 2>&1 || echo "jax side: exit $?"
python3 benchmarks/peers/table.py "$out/peers.jsonl"
