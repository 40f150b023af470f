"""Does a change touch the programs the GPU rows time? Lowered programs compared across commits.

    python benchmarks/program_drift.py REV [--show]

For the policies of the GPU suites (uncached; interval 3 with plain reuse and the order-1
forecast; First-Block, TeaCache, DBCache with residual reuse) on the tiny DiT and a tiny FLUX
layout (2 double + 2 single blocks), both layer stacks (one array per layer, scanned), this
lowers each program with ``REV``'s jaxcache and with the working tree's, in two processes, and
prints per program how many lines changed once SSA names are normalised (a line only moved
elsewhere is counted apart). Zero changed lines: the step loop a GPU row times is the same
program, so the row stands without a re-measurement (the program text does not depend on the
model's size; run it on the jax version the rows used). ``--show`` prints the differing lines:
a change outside the loop (the FLOP count after it, say) leaves the timed loop as it was. Runs
on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Runs inside the tree under test (only the API every commit since 2026-11-30 has).
DUMP = r'''
import dataclasses, pathlib, sys
import jax, jax.numpy as jnp
import jaxcache as jc
from jaxcache.evaluation.bench import build_model
from jaxcache.models.configs import get_config
from jaxcache.network import num_layers

out = pathlib.Path(sys.argv[1])
for arch, over in [("dit", {}), ("flux", {"single_depth": 2})]:
    model = "mmdit" if arch == "flux" else "dit"
    try:
        net, params = build_model(model, "tiny", "bfloat16", **over)
    except Exception:  # a commit before the FLUX layout
        continue
    config = dataclasses.replace(get_config(model, "tiny"), **over)
    k_noise, k_cond = jax.random.split(jax.random.key(1))
    shape = (config.image_size, config.image_size, config.channels)
    noise = jax.random.normal(k_noise, (2, *shape), jnp.float32)
    cond = jax.random.randint(k_cond, (2, config.caption_len), 1, config.vocab_size)
    depth = num_layers(params)
    rows = {
        "uncached": (dict(cached_layers=depth // 2), {}),
        "interval-output": (dict(cached_layers=depth // 2), dict(policy=jc.IntervalPolicy(3))),
        "interval-taylor1": (dict(cached_layers=depth // 2),
                             dict(policy=jc.IntervalPolicy(3), reuse=jc.TaylorForecast(1))),
        "first-block": (dict(cached_layers=depth - 1, first_layers=1),
                        dict(policy=jc.FirstBlockPolicy(0.1), reuse=jc.ResidualReuse())),
        "teacache": (dict(cached_layers=depth),
                     dict(policy=jc.TeaCachePolicy(0.1), reuse=jc.ResidualReuse())),
        "dbcache": (dict(cached_layers=depth - 2, first_layers=1),
                    dict(policy=jc.DBCachePolicy(0.1, warmup_steps=2), reuse=jc.ResidualReuse())),
    }
    for stack, unroll in [("unrolled", True), ("scanned", 1)]:
        network = dataclasses.replace(net, layer_unroll=unroll)
        for name, (plan_args, options) in rows.items():
            plan = jc.CachePlan(network, **plan_args)
            text = jc.lower(plan, plan.split(params), noise, cond, solver=jc.FlowMatchEuler(),
                            num_steps=12, **options).as_text()
            (out / f"{arch}-{stack}-{name}.txt").write_text(text)
'''


def _dump(tree: pathlib.Path, out: pathlib.Path) -> None:
    out.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", DUMP, str(out)], cwd=tree, check=True,
                   env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                   capture_output=True)


def _normalised(path: pathlib.Path) -> list[str]:
    return [re.sub(r"%[\w#]+", "%v", line) for line in path.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the commit the GPU rows were measured at")
    p.add_argument("--show", action="store_true", help="print the differing lines")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old = pathlib.Path(tmp, "old")
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.rev, "jaxcache"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        _dump(old, pathlib.Path(tmp, "old-programs"))
        _dump(ROOT, pathlib.Path(tmp, "new-programs"))
        changed = 0
        for before in sorted(pathlib.Path(tmp, "old-programs").glob("*.txt")):
            after = pathlib.Path(tmp, "new-programs", before.name)
            diff = [line for line in difflib.unified_diff(
                _normalised(before), _normalised(after), lineterm="", n=0)
                if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            # A line removed in one place and added in another only moved (an order XLA's
            # scheduler sets again); the others changed.
            removed = collections.Counter(line[1:] for line in diff if line[0] == "-")
            added = collections.Counter(line[1:] for line in diff if line[0] == "+")
            moved = sum((removed & added).values())
            real = len(diff) - 2 * moved
            changed += bool(real)
            print(f"{before.stem:32s} {real:5d} lines changed, {moved} moved")
            if args.show:
                print("\n".join(f"    {line[:200]}" for line in diff))
    print(f"{changed} programs differ from {args.rev}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
