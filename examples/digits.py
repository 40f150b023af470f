"""The main job: cached vs full-compute sampling of digits on the shipped trained models.

Samples a grid of digits (every class, several samples each) with and without caching on the
shipped class-conditional models (the flow-matching single-stream DiT and dual-stream MMDiT, and
the noise-prediction DiT sampled with DDIM), prints a table per setting (cached layers,
interval: layer evaluations, speedups, PSNR, SSIM, class accuracy, Frechet distance) and saves a
side-by-side PNG grid (full | cached).

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
from jaxcache.digits.quality import REUSE_MODES, SettingReport, evaluate_settings

SWEEP_INTERVALS = (1, 2, 3, 4, 5)
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


def _save_sweep_plot(path: Path, sweeps: dict[str, list[SettingReport]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
    for ax, (arch, reports) in zip(axes[0], sweeps.items()):
        for n in sorted({r.cached_layers for r in reports}):
            rs = sorted((r for r in reports if r.cached_layers == n), key=lambda r: r.interval)
            finite = [r for r in rs if np.isfinite(r.psnr)]
            ax.plot([r.ideal_speedup for r in finite], [r.psnr for r in finite], "o-",
                    label=f"{n} cached layers")
            for r in finite:
                ax.annotate(str(r.interval), (r.ideal_speedup, r.psnr), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("ideal speedup (matrix FLOPs, uncached / cached)")
        ax.set_ylabel("PSNR vs full compute (dB)")
        ax.set_title(f"{arch}: speed vs quality (labels: interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(title: str, full: SettingReport, reports: list[SettingReport]) -> str:
    head = ("layers", "interval", "reuse", "layer evals", "ideal x", "speedup x", "PSNR dB", "SSIM",
            "rel L1", "class acc", "Frechet")
    rows = [head]
    for r in [full, *reports]:
        rows.append((
            "full" if r.cached_layers == 0 else str(r.cached_layers),
            "-" if r.cached_layers == 0 else str(r.interval),
            "-" if r.cached_layers == 0 else r.reuse,
            str(r.layer_evaluations), f"{r.ideal_speedup:.2f}", f"{r.speedup:.2f}",
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
    results, recipes, images, sweeps = {}, {}, {}, {}
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
        solver = type(recipe.solver).__name__
        recipes[name] = dict(objective=recipe.objective, solver=solver, num_steps=steps,
                             guidance_scale=guidance)
        start = time.perf_counter()
        try:
            full, reports, imgs = evaluate_settings(
                model, labels, settings, seed=args.seed, num_steps=steps,
                guidance_scale=guidance, repeats=args.repeats,
            )
        except ValueError as e:  # a setting the solver refuses, e.g. more DDIM steps than 1000
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        title = (f"{name}: full compute vs cached (same noise, same classes; {steps} {solver} "
                 f"steps, guidance {guidance})\n{scored}")
        print(_table(title, full, reports) + f"\n({time.perf_counter() - start:.1f} s)",
              flush=True)
        images[name] = [imgs[(0, 1, "reuse")]] + [imgs[s] for s in main_settings if s in imgs]
        results[name] = [vars(full)] + [vars(r) for r in reports]
        sweeps[name] = reports

    os.makedirs(out, exist_ok=True)
    for name, panels in images.items():
        _save_side_by_side(out / f"digits_{name}.png", panels, rows=len(classes))
    payload = dict(
        settings=dict(vars(args)), labels=labels, models=recipes, scored=scored,
        results={a: [{k: (None if isinstance(v, float) and np.isinf(v) else v)
                      for k, v in r.items()} for r in rs] for a, rs in results.items()},
    )
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    if args.sweep:
        _save_sweep_plot(out / "sweep.png", sweeps)
    print(f"\nwrote {out}/: " + ", ".join(files))
    panels = ", then ".join(f"cached with {r}" for r in _reuse_names(args))
    print(f"each PNG, left to right: full compute, then {panels} ({args.cached_layers} layers, "
          f"interval {args.interval})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
