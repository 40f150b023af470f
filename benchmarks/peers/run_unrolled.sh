#!/bin/bash
# After the layer-stack change: diffusers (eager, torch.compile) and jaxcache with the unrolled
# stack in one run on one card, then the DiT-XL/2 efficiency rows unrolled (GPU machine).
# A second argument gives the jaxcache programs XLA options (Network.compiler_options, JSON)
# and skips the DiT-XL/2 rows.
#   bash benchmarks/peers/run_unrolled.sh OUTDIR ['{"xla_gpu_enable_triton_gemm": false}']
set -u
out=${1:-out/peers}
options=${2:-null}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import diffusers.hooks, diffusers.models" 2> /dev/null || python3 -m pip install -q \
  --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/huggingface_hub-*.whl
timeout 150 python3 benchmarks/peers/flux_diffusers.py --skip fbc,full \
  --out "$out/peers.jsonl" > "$out/diffusers.log" 2>&1 || echo "diffusers side: exit $?"
timeout 170 python3 benchmarks/peers/flux_jax.py --rows cudnn,taylor --unroll-layers \
  --hand-loop none --compiler-options "$options" --tag "${2:-}" --out "$out/peers.jsonl" \
  > "$out/jax.log" 2>&1 || echo "jax side: exit $?"
python3 benchmarks/peers/table.py "$out/peers.jsonl"
[ "$options" = null ] || exit 0
timeout 200 python3 benchmarks/gpu_suite.py dit-u "$out" 2>&1 | grep -v "^W0\|^I0" | tail -4
