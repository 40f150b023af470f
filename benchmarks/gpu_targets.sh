#!/usr/bin/env bash
# The GPU targets of BENCHMARKS.md, in one call: each line is one `python -m jaxcache.evaluation.bench` run.
# Usage (repo root, a CUDA machine with jax, flax, optax, chex): bash benchmarks/gpu_targets.sh [OUTDIR]
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
run() {  # name, args...
  local name=$1; shift
  echo "== $name: python -m jaxcache.evaluation.bench $*"
  $py -m jaxcache.evaluation.bench "$@" --json | tee "$out/$name.json"
}
run ditxl_bf16 --model dit --size dit-xl --batch 8 --steps 50 --cached-layers 14 --interval 3 --dtype bfloat16 --repeats 10
run ditxl_f32 --model dit --size dit-xl --batch 8 --steps 50 --cached-layers 14 --interval 3 --dtype float32 --repeats 10
run mmditxl_bf16 --model mmdit --size dit-xl --batch 8 --steps 50 --cached-layers 14 --interval 3 --dtype bfloat16 --repeats 10
run ditxl_bf16_device --model dit --size dit-xl --batch 8 --steps 50 --cached-layers 14 --interval 3 --dtype bfloat16 --repeats 10 --decide device
run mmditxl_bf16_device --model mmdit --size dit-xl --batch 8 --steps 50 --cached-layers 14 --interval 3 --dtype bfloat16 --repeats 10 --decide device
run flux_bf16 --model mmdit --size flux --batch 1 --steps 50 --cached-layers 25 --interval 3 --dtype bfloat16 --repeats 3
$py - "$out" <<'PY'
import json, pathlib, sys
print(f"{'run':20s} {'device':28s} {'uncached_s':>10s} {'cached_s':>9s} {'speedup':>8s} {'ideal':>6s} {'eff':>6s} {'compile_s':>9s} {'max_diff':>9s}")
for f in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
    try:
        r = json.loads(f.read_text().strip().splitlines()[-1])
    except Exception as e:
        print(f.stem, 'failed', e); continue
    print(f"{f.stem:20s} {r['device'][:28]:28s} {r['uncached_s']:10.4f} {r['cached_s']:9.4f} {r['speedup']:8.3f} {r['ideal_speedup']:6.3f} {r['efficiency']:6.3f} {r['compile_s']:9.2f} {r['max_abs_diff']:9.3g}")
PY
