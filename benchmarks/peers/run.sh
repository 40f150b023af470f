#!/bin/bash
# The FLUX peer benchmark, both sides in one run on one card (GPU machine; diffusers as a wheel
# in .whl/, see README.md's "Benchmarks"). Usage: bash benchmarks/peers/run.sh OUTDIR
# The wheels, fetched where pip can reach a registry (pure Python, any platform):
#   pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata "huggingface_hub>=1.32,<2"
# Row settings: flux_diffusers.py --help and flux_jax.py --help.
set -u
out=${1:-out/peers}
mkdir -p "$out"
if ls .whl/diffusers-*.whl > /dev/null 2>&1; then
  # diffusers and importlib_metadata first; a newer huggingface_hub only if the machine's is
  # too old for diffusers' imports.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  if ! python3 -c "import diffusers.hooks, diffusers.models" 2> /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/huggingface_hub-*.whl || exit 1
  fi
else
  export PYTHONPATH=$PWD
fi
timeout "${DIFFUSERS_TIMEOUT:-330}" python3 benchmarks/peers/flux_diffusers.py \
  --out "$out/peers.jsonl" > "$out/diffusers.log" 2>&1 || echo "diffusers side: exit $?"
timeout "${JAX_TIMEOUT:-230}" python3 benchmarks/peers/flux_jax.py \
  --out "$out/peers.jsonl" > "$out/jax.log" 2>&1 || echo "jax side: exit $?"
python3 benchmarks/peers/table.py "$out/peers.jsonl"
