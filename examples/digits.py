"""The main job: is caching worth it? Cached sampling of digits on the shipped trained models
against full compute and against the honest baseline, fewer steps at the same compute.

Samples a grid of digits (every class, several samples each) on the shipped class-conditional
models (the flow-matching single-stream DiT and dual-stream MMDiT, and the noise-prediction DiT
sampled with DDIM). The headline is the recommended setting (every layer cached, the order-1
forecast, a refresh every 2 steps) beside uncached sampling with as many steps as fit the same
layer evaluations, in one summary line per model. Then a table per model: full compute, the
chosen settings (cached layers, interval, reuse), and beside each the fewer-steps run at its
compute (layer evaluations, ideal and measured speedup with its spread, PSNR, SSIM, class
accuracy, Frechet distance; a legend says what each column means and which way is better). A
side-by-side PNG grid (full | cached) per model.

    python examples/digits.py                          # dit and mmdit, 4 cached layers, interval 3
    python examples/digits.py --arch dit --cached-layers 6 --interval 2
    python examples/digits.py --arch dit-eps           # the noise-prediction DiT, 50 DDIM steps
    python examples/digits.py --sweep                  # intervals 1-5 x cached layers 2,4,6,8
    python examples/digits.py --checkpoint my.msgpack  # a model trained with train_digits.py

Each model is sampled with its own solver and step count (its checkpoint's recipe) unless
--steps says otherwise. Class accuracy is the share of the samples of each setting (--per-class
times the number of --classes) that the shipped digit classifier labels as the requested class;
the Frechet distance compares the classifier's features of the same samples with those of the
359 held-out real digits.

Outputs go to --out (default ``out/``): ``digits_<model>.png``, ``results.json`` and, with
--sweep, ``sweep.png`` (PSNR against ideal speedup). Nothing is written when an argument is bad
or --out cannot take the files, and that is checked before any sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxcache._checks import check_int
from jaxcache.digits import pretrained
from jaxcache.digits.harness import REUSE_MODES, Evaluator, Row, Setting

SWEEP_INTERVALS = (1, 2, 3, 4, 5)
# The recommended setting (the README's): every layer cached, the order-1 forecast, interval 2.
RECOMMENDED_INTERVAL, RECOMMENDED_REUSE = 2, "taylor1"
LEGEND = """columns: layer evals = per sample (lower: less compute); ideal x = matrix FLOPs of full
compute over this run's (what a perfect implementation gains); speedup x = measured wall time of
full compute over this run's, median [slowest-fastest] of --repeats (noisy on a CPU; above ideal
is noise); PSNR dB, SSIM = against full compute with the same noise (higher: closer; inf: equal);
rel L1 = mean relative difference to full compute (lower: closer); class acc = the share the
digit classifier labels as the requested class (higher: better); Frechet = distance of the
classifier's features to 359 real held-out digits (lower: more like real digits; on few samples
it moves by a point or two either way, so full compute is no floor). "N steps" rows: uncached
sampling with N steps, the most that fit the compute of the cached rows above them."""
SWEEP_LAYERS = (2, 4, 6, 8)
# --arch: the shipped models, and the two groups.
_ARCH_GROUPS = {"both": ["dit", "mmdit"], "all": list(pretrained.SHIPPED_MODELS)}
_DEFAULT_ARCH = "both"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Default None, not "both": a given --arch must be told apart from the default, since it
    # cannot go with --checkpoint.
    p.add_argument("--arch", choices=[*pretrained.SHIPPED_MODELS, *_ARCH_GROUPS], default=None,
                   help=f"shipped model(s): {', '.join(pretrained.SHIPPED_MODELS)}, both (dit "
                        f"and mmdit, the default) or all; not with --checkpoint, whose file "
                        f"decides the model")
    p.add_argument("--checkpoint", help="a checkpoint file instead of the shipped models (its "
                                        "architecture and recipe come from the file)")
    p.add_argument("--cached-layers", type=int, default=4, help="layers [0, n) cached")
    p.add_argument("--interval", type=int, default=3, help="refresh every this many steps")
    p.add_argument("--reuse", default="reuse,taylor1",
                   help="what skipped steps use, comma-separated, of "
                   f"{sorted(REUSE_MODES)} (default: plain reuse beside the order-1 forecast)")
    p.add_argument("--sweep", action="store_true",
                   help=f"intervals {SWEEP_INTERVALS} x cached layers {SWEEP_LAYERS}")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated classes")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: each model's own: 20 Euler steps for the flow "
                        "models, 50 DDIM steps for dit-eps)")
    p.add_argument("--guidance", type=float, default=pretrained.DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (0 turns it off)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="output folder (created if missing)")
    return p


def _reuse_names(args) -> list[str]:
    names = [r.strip() for r in args.reuse.split(",") if r.strip()]
    unknown = [r for r in names if r not in REUSE_MODES]
    if unknown or not names:
        raise ValueError(f"--reuse takes names of {sorted(REUSE_MODES)}, got {args.reuse!r}")
    return names


def _check(args) -> list[int]:
    """Validates everything before any work or any write; returns the class list."""
    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {args.classes!r}")
    if not classes:
        raise ValueError("--classes is empty")
    pretrained.class_condition(classes)  # raises for a class outside 0..9
    for name in ("interval", "per_class", "steps", "repeats"):
        if getattr(args, name) is not None:  # --steps None: each model's own
            check_int(getattr(args, name), f"--{name.replace('_', '-')}")  # the flag's name
    if args.checkpoint and args.arch is not None:
        raise ValueError(
            f"--arch {args.arch} cannot go with --checkpoint: the checkpoint decides the model "
            "(leave --arch out)"
        )
    _reuse_names(args)
    return classes


def _check_out(out: Path, names: list[str]) -> None:
    """Raises ValueError unless the files ``names`` can be written in the folder ``out``.

    Checked without writing anything: ``out`` is a folder we may write in, or can be created
    (its nearest existing ancestor is a folder we may write in), and no target name is taken by
    something that is not a file.
    """
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out} is a folder this user cannot write in")
        for name in names:
            target = out / name
            if target.exists() and not target.is_file():
                raise ValueError(f"--out {out}: {target} exists and is not a file")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be created: this user cannot write in {parent}")


def _model_name(model) -> str:
    """The name of a checkpoint's model in outputs: its architecture, plus ``-eps`` for noise
    prediction (the shipped names)."""
    arch = type(model).__name__.lower()
    objective = pretrained.recipe_of(model).objective
    return arch if objective == "flow" else f"{arch}-{objective}"


def _grid(images: np.ndarray, rows: int) -> np.ndarray:
    """``[rows * cols, H, W, 1]`` in [-1, 1] -> one grey image with 1-pixel gaps."""
    n, h, w, _ = images.shape
    cols = n // rows
    out = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32)
    for k in range(n):
        r, c = divmod(k, cols)
        out[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = (
            images[k, :, :, 0] + 1.0
        ) / 2.0
    return out


def _save_side_by_side(path: Path, panels: list[np.ndarray], rows: int, scale=6):
    from matplotlib import image as mpimg

    grids = [_grid(p, rows) for p in panels]
    gap = np.ones((grids[0].shape[0], 4), np.float32)
    both = np.concatenate([x for g in grids for x in (g, gap)][:-1], axis=1)
    both = np.kron(both, np.ones((scale, scale), np.float32))  # nearest-neighbour upscale
    mpimg.imsave(path, both, cmap="gray", vmin=0.0, vmax=1.0)


def _save_sweep_plot(path: Path, sweeps: dict[str, list[Row]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
    for ax, (arch, reports) in zip(axes[0], sweeps.items()):
        for n in sorted({r.cached_layers for r in reports}):
            rs = sorted((r for r in reports if r.cached_layers == n), key=lambda r: r.knob)
            finite = [r for r in rs if np.isfinite(r.psnr)]
            ax.plot([r.ideal_speedup for r in finite], [r.psnr for r in finite], "o-",
                    label=f"{n} cached layers")
            for r in finite:
                ax.annotate(str(r.knob), (r.ideal_speedup, r.psnr), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("ideal speedup (matrix FLOPs, uncached / cached)")
        ax.set_ylabel("PSNR vs full compute (dB)")
        ax.set_title(f"{arch}: speed vs quality (labels: interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _evaluations(steps: int, depth: int, cached_layers: int, interval: int) -> int:
    """Layer evaluations per sample of an interval schedule (refreshes at 0, k, 2k, ...)."""
    refreshes = len(range(0, steps, interval))
    return steps * depth - (steps - refreshes) * cached_layers


def _same_compute_steps(steps: int, depth: int, cached_layers: int, interval: int) -> int:
    """The most uncached steps within a cached setting's layer evaluations (at least 1)."""
    return max(1, _evaluations(steps, depth, cached_layers, interval) // depth)


def _spread(r: Row) -> str:
    return f"{r.speedup:.2f} [{r.speedup_min:.2f}-{r.speedup_max:.2f}]"


def _summary(name: str, recommended: Row, baseline: Row, depth: int) -> str:
    def db(x):
        return "inf" if np.isinf(x) else f"{x:.1f}"

    better = "better" if recommended.psnr > baseline.psnr else "NOT better"
    return (
        f"{name}: every layer ({depth}) cached with the order-1 forecast, refresh every "
        f"{recommended.knob} steps: PSNR {db(recommended.psnr)} dB against "
        f"{db(baseline.psnr)} dB for {baseline.num_steps} uncached steps at the same compute "
        f"({recommended.layer_evaluations:g} vs {baseline.layer_evaluations:g} layer "
        f"evaluations): "
        f"caching is {better}; ideal {recommended.ideal_speedup:.2f}x, measured "
        f"{_spread(recommended)}x"
    )


def _table(title: str, full: Row, reports: list[Row]) -> str:
    head = ("layers", "interval", "reuse", "layer evals", "ideal x", "speedup x [spread]",
            "PSNR dB", "SSIM", "rel L1", "class acc", "Frechet")
    rows = [head]
    for r in [full, *reports]:
        plain = r.cached_layers == 0
        rows.append((
            "full" if plain else str(r.cached_layers),
            "-" if plain else str(r.knob),
            (f"{r.num_steps} steps" if r.family == "fewer steps" else "-") if plain else r.mode,
            f"{r.layer_evaluations:g}", f"{r.ideal_speedup:.2f}", _spread(r),
            "inf" if np.isinf(r.psnr) else f"{r.psnr:.1f}", f"{r.ssim:.4f}",
            f"{r.relative_l1:.4f}", f"{r.accuracy:.3f}", f"{r.frechet:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [title]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the job; returns the exit status."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        classes = _check(args)
        if args.checkpoint:
            model = pretrained.load_checkpoint(args.checkpoint).model
            models = {_model_name(model): model}
        else:
            arch = args.arch or _DEFAULT_ARCH
            names = _ARCH_GROUPS.get(arch, [arch])
            models = {name: pretrained.load_digits_model(name) for name in names}
        for model in models.values():
            if not 1 <= args.cached_layers <= model.config.depth:
                depth = model.config.depth
                raise ValueError(
                    f"--cached-layers must be in [1, {depth}], got {args.cached_layers}"
                )
        # Every file this run writes, known now so --out is checked before any sampling.
        files = [f"digits_{name}.png" for name in models] + ["results.json"]
        files += ["sweep.png"] if args.sweep else []
        _check_out(out, files)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    labels = [c for c in classes for _ in range(args.per_class)]
    guidance = args.guidance if args.guidance else None
    main_settings = [(args.cached_layers, args.interval, r) for r in _reuse_names(args)]
    scored = (f"class acc, Frechet: over the {len(labels)} samples of each setting "
              f"({args.per_class} per class x {len(classes)} classes, noise seed {args.seed}), "
              "scored by the shipped digit classifier")
    results, recipes, images, sweeps, recommended_rows, fewer_rows = {}, {}, {}, {}, {}, {}
    for name, model in models.items():
        settings = list(main_settings)
        if args.sweep:
            depth = model.config.depth
            settings += [
                (n, k, "reuse") for n in SWEEP_LAYERS if n <= depth for k in SWEEP_INTERVALS
                if (n, k, "reuse") not in main_settings
            ]
        recipe = pretrained.recipe_of(model)
        steps = args.steps or recipe.num_steps
        # A forecast needs order + 1 computed steps; drop those a short run cannot feed.
        fed = [key for key in settings
               if REUSE_MODES[key[2]].history() <= len(range(0, steps, key[1]))]
        for n, k, reuse in settings:
            if (n, k, reuse) not in fed:
                print(f"{name}: skipping {reuse} at interval {k}: it needs "
                      f"{REUSE_MODES[reuse].history()} computed steps, {steps} steps give "
                      f"{len(range(0, steps, k))}", flush=True)
        settings = fed
        depth = model.config.depth
        recommended = (depth, RECOMMENDED_INTERVAL, RECOMMENDED_REUSE)
        feeds = REUSE_MODES[RECOMMENDED_REUSE].history() <= len(range(0, steps, 2))
        if feeds and recommended not in settings:
            settings.append(recommended)
        # Beside each cached setting, uncached sampling with the steps its compute buys.
        fewer = sorted({_same_compute_steps(steps, depth, n, k) for n, k, _ in settings})
        fewer = [k for k in fewer if k < steps]
        solver = type(recipe.solver).__name__
        recipes[name] = dict(objective=recipe.objective, solver=solver, num_steps=steps,
                             guidance_scale=guidance)
        start = time.perf_counter()
        # The cached settings, then beside them the fewer-steps runs, full compute first.
        cached = [Setting.interval(k, reuse, num_steps=steps, cached_layers=n)
                  for n, k, reuse in settings]
        try:
            evaluator = Evaluator(model, labels, seed=args.seed, guidance=guidance,
                                  repeats=args.repeats)
            full, *reports = evaluator.evaluate(
                [Setting.full(steps), *cached, *[Setting.fewer_steps(k) for k in fewer]]
            )
        except ValueError as e:  # a setting the solver refuses, e.g. more DDIM steps than 1000
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        by_key = dict(zip(settings, reports))
        baseline = dict(zip(fewer, reports[len(settings):]))
        if feeds and _same_compute_steps(steps, depth, *recommended[:2]) in baseline:
            print(_summary(name, by_key[recommended],
                           baseline[_same_compute_steps(steps, depth, *recommended[:2])], depth),
                  flush=True)
        rows = []
        for key in settings:  # each cached setting, then the fewer-steps run at its compute
            rows.append(by_key[key])
            k = _same_compute_steps(steps, depth, *key[:2])
            if k in baseline and baseline[k] not in rows:
                rows.append(baseline[k])
        title = (f"{name}: full compute, cached, and fewer steps at the same compute (same "
                 f"noise, same classes; {steps} {solver} steps, guidance {guidance})\n{scored}")
        print(_table(title, full, rows) + f"\n({time.perf_counter() - start:.1f} s)",
              flush=True)
        images[name] = [evaluator.images(Setting.full(steps))] + [
            evaluator.images(setting) for key, setting in zip(settings, cached)
            if key in main_settings
        ]
        results[name] = [full.as_json()] + [by_key[s].as_json() for s in settings
                                            if s != recommended or s in main_settings]
        recommended_rows[name] = (by_key[recommended].as_json() if recommended in by_key
                                  else None)
        fewer_rows[name] = [b.as_json() for b in baseline.values()]
        sweeps[name] = [by_key[s] for s in settings]

    os.makedirs(out, exist_ok=True)
    for name, panels in images.items():
        _save_side_by_side(out / f"digits_{name}.png", panels, rows=len(classes))
    payload = dict(
        settings=dict(vars(args)), labels=labels, models=recipes, scored=scored,
        results=results, recommended=recommended_rows, fewer_steps=fewer_rows,
        legend=LEGEND,
    )
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    if args.sweep:
        _save_sweep_plot(out / "sweep.png", sweeps)
    print("\n" + LEGEND)
    print(f"\nwrote {out}/: " + ", ".join(files))
    panels = ", then ".join(f"cached with {r}" for r in _reuse_names(args))
    print(f"each PNG, left to right: full compute, then {panels} ({args.cached_layers} layers, "
          f"interval {args.interval})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
