"""Quality at equal compute on the shipped digit models: caching against fewer steps.

For each model: full compute, fewer steps (the baseline), the interval schedule with plain reuse
and every forecast (with --fitted, also the forecast whose per-step gains are fitted to the
model on a batch of its own), and the signal-driven policies (First-Block, TeaCache, DBCache)
with residual reuse and with the Taylor forecast at the same compute; with --planned, the planned
schedules too (DeepCache's centered schedule, MagCache, the planner's refresh steps, a
Learning-to-Cache router), each fitted on a batch of its own, at every interval's compute;
with --peer, the JAX peer's caches (CFG-Cache alone and on the layer cache, SenCache).
Prints a markdown table per model (the one in BENCHMARKS.md), and writes ``tradeoff.json`` and
``tradeoff.png`` (PSNR against ideal speedup, the fewer-steps curve drawn in) to --out.

    python examples/tradeoff.py                       # both flow models, 500 digits each
    python examples/tradeoff.py --arch dit --per-class 8 --targets ""   # a quick look
    python examples/tradeoff.py --modes taylor1 --fitted --targets ""   # the fitted forecast
    python examples/tradeoff.py --modes reuse,taylor1 --fitted --planned --targets ""
    python examples/tradeoff.py --arch dit --modes taylor1 --peer --targets 2,2.86 \
        --signal-policies first-block,teacache       # CFG-Cache and SenCache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jaxcache as jc
from jaxcache.digits import peer, planned, pretrained, tradeoff
from jaxcache.digits.harness import REUSE_MODES, Row

# Models and how they are sampled: flow matching with Euler at 20 steps; the noise-prediction
# DiT with DDIM at 50 steps (the regime DeepCache and Learning-to-Cache report on).
MODELS = {
    "dit": (jc.FlowMatchEuler(), pretrained.DEFAULT_STEPS, (2, 3, 4)),
    "mmdit": (jc.FlowMatchEuler(), pretrained.DEFAULT_STEPS, (2, 3, 4)),
    "dit-eps": (jc.DDIM(), 50, (2, 3, 4)),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="dit,mmdit", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--per-class", type=int, default=50, help="digits per class (default 50)")
    p.add_argument("--targets", default="2,2.86",
                   help="ideal speedups for the signal-driven rows (empty: none)")
    p.add_argument("--signal-only", action="store_true",
                   help="full compute and the signal-driven rows only (no fewer-steps or "
                        "interval rows), e.g. to add a speedup target to an earlier run")
    p.add_argument("--modes", default=",".join(tradeoff.DEFAULT_MODES),
                   help="comma-separated reuse modes of the interval rows, of "
                        f"{list(REUSE_MODES)} (default: {','.join(tradeoff.DEFAULT_MODES)}"
                        "; empty: none)")
    p.add_argument("--fitted", action="store_true",
                   help="add interval rows with a FittedForecast, its gains fitted per interval "
                        "with Optax on a batch of its own (seed + 1)")
    p.add_argument("--fit-per-class", type=int, default=20,
                   help="digits per class of the fitting batch (default 20)")
    p.add_argument("--fit-iterations", type=int, default=60,
                   help="Adam steps of each fit (default 60)")
    p.add_argument("--fit-order", type=int, choices=(1, 2), default=1,
                   help="Taylor order whose terms the fit scales (default 1)")
    p.add_argument("--planned", action="store_true",
                   help="add the planned schedules (jaxcache.digits.planned: centered, "
                        "magcache, planned, learned) at each interval's compute, fitted on a "
                        "batch of their own (seed + 1), with --modes' step-mask rows (and the "
                        "fitted forecast with --fitted)")
    p.add_argument("--families", default=",".join(planned.FAMILIES),
                   help=f"the planned families of --planned, of {list(planned.FAMILIES)}")
    p.add_argument("--router-iterations", type=int, default=150,
                   help="Adam steps of each Learning-to-Cache router (default 150)")
    p.add_argument("--signal-policies", default=",".join(tradeoff.DEFAULT_SIGNAL_POLICIES),
                   help="comma-separated signal-driven policies of --targets, of "
                        f"{list(tradeoff.SIGNAL_POLICIES)} (default: "
                        f"{','.join(tradeoff.DEFAULT_SIGNAL_POLICIES)})")
    p.add_argument("--peer", action="store_true",
                   help="add the JAX peer's caches (jaxcache.digits.peer): CFG-Cache alone and "
                        "on the interval layer cache with --modes' forecasts, fewer steps at "
                        "each one's compute, and SenCache among the signal-driven policies")
    p.add_argument("--guidance", type=float, default=pretrained.DEFAULT_GUIDANCE)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="output folder")
    return p


def _plot(path: Path, results: dict[str, list[Row]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (arch, rows) in zip(axes[0], results.items()):
        groups: dict[str, list[Row]] = {}
        for r in rows:
            if r.family != "full":
                groups.setdefault(f"{r.family} / {r.mode}" if r.mode != "-" else r.family,
                                  []).append(r)
        for label, rs in groups.items():
            rs = sorted(rs, key=lambda r: r.ideal_speedup)
            style = "k--o" if label == "fewer steps" else "o-"
            ax.plot([r.ideal_speedup for r in rs], [r.psnr for r in rs], style, label=label,
                    markersize=4, linewidth=2.2 if label == "fewer steps" else 1.2)
        ax.set_xlabel("ideal speedup (matrix FLOPs per sample, full / setting)")
        ax.set_ylabel("PSNR vs full compute (dB)")
        ax.set_title(f"{arch}: quality at equal compute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """Runs the comparison; returns the exit status."""
    args = _parser().parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in MODELS]
    if unknown or not archs:
        print(f"error: --arch must name models of {sorted(MODELS)}, got {args.arch!r}",
              file=sys.stderr)
        return 2
    try:
        targets = [float(v) for v in args.targets.split(",") if v.strip()]
    except ValueError:
        print(f"error: --targets must be comma-separated numbers, got {args.targets!r}",
              file=sys.stderr)
        return 2
    if min(args.per_class, args.fit_per_class, args.fit_iterations,
           args.router_iterations) < 1:
        print("error: --per-class, --fit-per-class, --fit-iterations and --router-iterations "
              "must be positive", file=sys.stderr)
        return 2
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if any(f not in planned.FAMILIES for f in families):
        print(f"error: --families must name families of {list(planned.FAMILIES)}, got "
              f"{args.families!r}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in REUSE_MODES for m in modes):
        print(f"error: --modes must name modes of {list(REUSE_MODES)}, got "
              f"{args.modes!r}", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.signal_policies.split(",") if p.strip()]
    if args.peer and "sencache" not in policies:
        policies.append("sencache")
    if any(p not in tradeoff.SIGNAL_POLICIES for p in policies):
        print(f"error: --signal-policies must name policies of "
              f"{list(tradeoff.SIGNAL_POLICIES)}, got {args.signal_policies!r}", file=sys.stderr)
        return 2
    if args.peer and not args.guidance:
        print("error: --peer needs guidance (CFG-Cache caches the gap between the branches)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot use --out {out}: {e}", file=sys.stderr)
        return 2
    labels = [c for c in range(10) for _ in range(args.per_class)]
    guidance = args.guidance or None
    results = {}
    for arch in archs:
        solver, steps, intervals = MODELS[arch]
        model = pretrained.load_digits_model(arch)
        settings = tradeoff.default_settings(steps, intervals, modes)
        if args.fitted and not args.signal_only:
            settings += tradeoff.fitted_settings(
                model, steps, intervals, seed=args.seed + 1, per_class=args.fit_per_class,
                guidance=guidance, solver=solver, order=args.fit_order,
                iterations=args.fit_iterations,
                log=lambda line: print(line, flush=True),
            )
        if args.planned and not args.signal_only:
            settings += planned.planned_settings(
                model, steps, intervals, seed=args.seed + 1, per_class=args.fit_per_class,
                guidance=guidance, solver=solver, modes=[m for m in modes if m in
                                                         ("reuse", "residual", "taylor1")],
                fitted=args.fitted, families=families, fit_iterations=args.fit_iterations,
                router_iterations=args.router_iterations,
                log=lambda line: print(line, flush=True),
            )
        if args.peer and not args.signal_only:
            settings += [s for s in peer.cfg_cache_settings(
                steps, solver, layer_intervals=intervals[:2],
                layer_modes=[m for m in modes if m != "reuse"] or ["taylor1"])
                if s not in settings]  # a fewer-steps row the intervals already have
        print(f"\n{arch}: {len(labels)} digits, {type(solver).__name__} {steps} steps, "
              f"guidance {guidance}; scored against full compute\n{tradeoff.TABLE_HEADER}",
              flush=True)
        results[arch] = tradeoff.evaluate(
            model, labels, settings[:1] if args.signal_only else settings, seed=args.seed,
            guidance=guidance, solver=solver, repeats=args.repeats, signal_targets=targets,
            signal_policies=policies, log=lambda line: print(line, flush=True),
        )
    payload = {
        "settings": vars(args),
        "results": {arch: [r.as_json() for r in rows] for arch, rows in results.items()},
    }
    (out / "tradeoff.json").write_text(json.dumps(payload, indent=1))
    _plot(out / "tradeoff.png", results)
    print(f"\nwrote {out / 'tradeoff.json'}, {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
