"""Trains a class-conditional digit generator (DiT or MMDiT) on the 16x16 digits.

With ``--objective flow`` (the default) the model learns the velocity ``noise - data`` of
``x_t = (1 - t) * data + t * noise`` (the convention of ``jaxcache.FlowMatchEuler``, sampled
with 20 Euler steps). With ``--objective eps`` it learns the noise of
``x_k = sqrt(a_k) * data + sqrt(1 - a_k) * noise`` on the linear-beta schedule of
``jaxcache.DDIM()`` (1000 training steps, betas 1e-4..0.02; the network sees ``t = k / 1000``),
with Min-SNR-5 loss weighting (``--min-snr-gamma``), sampled with 50 DDIM steps. The checkpoint
records which, so ``pretrained.sample_digits`` picks the solver and step count by itself. Data:
the ``seed=0`` train split of the scikit-learn digits, with the class id as a one-token caption.
Labels are dropped to ``NULL_CLASS`` with probability 0.1 so the model also learns the
unconditional prediction for classifier-free guidance; images get random shifts of up to one
pixel (never flips: a mirrored 2 is no digit). AdamW with warmup and cosine decay; an EMA of the
weights is what gets saved as the model.

Every random draw of step ``i`` comes from ``fold_in(key, i)``, so a run is reproducible from
``--seed`` and ``--resume`` continues bit-exactly from the checkpoint at ``--out`` (which holds
the EMA weights, the raw weights, the optimizer state and the step). Loss lines go to the
console and to ``<out>.log.jsonl``. At the end the script samples 20 digits per class with
``jaxcache.sample`` (uncached, the model's solver and steps) and scores them with the shipped
digit classifier.

The shipped checkpoints were produced with::

    python examples/train_digits.py --arch dit --out out/digits_dit.msgpack \\
        --export jaxcache/digits/assets/digits_dit.msgpack
    python examples/train_digits.py --arch mmdit --out out/digits_mmdit.msgpack \\
        --export jaxcache/digits/assets/digits_mmdit.msgpack
    python examples/train_digits.py --arch dit --objective eps --steps 3000 \\
        --out out/digits_dit_eps.msgpack --export jaxcache/digits/assets/digits_dit_eps.msgpack

(the defaults: ``--steps 1500 --batch-size 128 --lr 3e-3 --seed 0``; for eps
``--min-snr-gamma 5``). ``--export`` writes the EMA weights alone, without optimizer state, which
keeps the shipped files small. The eps model needs more steps than the flow models: in trial runs
(on a GPU; 200 digits, guidance 1.5) the plain eps loss reached 0.42 class accuracy after 1500
steps and 0.89 after 4000; with Min-SNR-5 weighting, 0.62 after 1500 steps and 0.96 after 3000.
On a 2-core CPU:

=======  =========  ==========  ==========  ============================================
model    objective  train time  final loss  classifier accuracy, 200 digits, CFG 1.5
=======  =========  ==========  ==========  ============================================
dit      flow       146 s       0.195       0.975 (20 Euler steps)
mmdit    flow       115 s       0.220       0.965 (20 Euler steps)
dit-eps  eps        927 s *     0.0201      0.945 (50 DDIM steps)
=======  =========  ==========  ==========  ============================================

(final loss: the mean over the last 100 steps; the two objectives' losses are not comparable.
Accuracy: 20 digits per class, noise seed 1, uncached. dit-eps scores 0.975 at guidance 2 and
0.995 at guidance 3. * 3000 steps on cores shared with other work; the architecture is dit's, so
an idle machine should take about twice dit's 146 s.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxcache._checks import check_int
from jaxcache.digits import classifier, pretrained, training
from jaxcache.digits import data as digits
from jaxcache.models.factory import ARCHITECTURES

_HYPER = (
    "arch", "objective", "min_snr_gamma", "steps", "batch_size", "lr", "seed", "warmup",
    "ema_decay", "p_uncond",
)
# Settings that checkpoints written before the setting existed were trained with.
_HYPER_BEFORE = {"objective": "flow", "min_snr_gamma": None}
_DEFAULT_MIN_SNR_GAMMA = 5.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(pretrained.DIGITS_CONFIGS), default="dit")
    p.add_argument("--objective", choices=pretrained.OBJECTIVES, default="flow",
                   help="flow: velocity prediction, Euler sampling; eps: noise prediction on "
                        "DDIM's linear-beta schedule, DDIM sampling")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help=f"eps only: Min-SNR loss weighting min(snr, gamma) / snr (default "
                        f"{_DEFAULT_MIN_SNR_GAMMA:g}; 0 turns it off)")
    p.add_argument("--steps", type=int, default=1500, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--p-uncond", type=float, default=0.1, help="label drop rate (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="training checkpoint (resumable)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out")
    p.add_argument("--export", default=None, help="also write the EMA model alone here")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--eval-per-class", type=int, default=20, help="0 skips the final scoring")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="solver steps of the final scoring (default: the objective's, 20 Euler "
                        "or 50 DDIM)")
    p.add_argument("--guidance", type=float, default=pretrained.DEFAULT_GUIDANCE,
                   help="CFG scale for the final scoring (0 turns guidance off)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "eval_steps"):
        value = getattr(args, name)
        try:
            if value is not None:
                check_int(value, f"--{name.replace('_', '-')}")
        except ValueError as e:
            p.error(str(e))
    if args.objective == "flow":
        if args.min_snr_gamma is not None:
            p.error("--min-snr-gamma applies to --objective eps only")
    else:
        gamma = _DEFAULT_MIN_SNR_GAMMA if args.min_snr_gamma is None else args.min_snr_gamma
        if gamma < 0:
            p.error(f"--min-snr-gamma must be >= 0, got {gamma:g}")
        args.min_snr_gamma = gamma or None  # 0: the plain loss
    return args


def _truncate_log(log_path: str, step: int) -> None:
    """Drops log lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(log_path, "w") as f:
        f.writelines(lines)


def score(
    model, *, per_class: int, num_steps: int | None, guidance: float | None, seed: int = 1
) -> float:
    """Classifier accuracy on ``per_class`` generated digits of each class (uncached).

    The model's recipe gives the solver (and the steps, when ``num_steps`` is None).
    """
    labels = np.repeat(np.arange(10), per_class)
    out = pretrained.sample_digits(
        model, labels, seed=seed, num_steps=num_steps, guidance_scale=guidance
    )
    images = jnp.clip(out.sample, -1.0, 1.0)
    return classifier.accuracy(classifier.default_classifier(), images, labels)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    config = pretrained.DIGITS_CONFIGS[args.arch]
    images, labels = (jnp.asarray(a) for a in digits.load_digits_images(16, "train"))
    init_key, data_key = jax.random.split(jax.random.key(args.seed))
    model = ARCHITECTURES[args.arch](config, rngs=nnx.Rngs(params=init_key))
    # Before the graphdef is taken, so every model merged from it (the EMA) carries the recipe.
    recipe = pretrained.RECIPES[args.objective]
    pretrained.with_recipe(model, recipe)
    graphdef = nnx.graphdef(model)
    optimizer = training.make_optimizer(args.lr, args.steps, warmup_steps=args.warmup)
    state = training.init_train_state(model, optimizer)
    start, prior_seconds = 0, 0.0
    log_path = os.path.splitext(args.out)[0] + ".log.jsonl"

    if args.resume:
        ckpt = pretrained.load_checkpoint(args.out)
        hyper = (ckpt.extra or {}).get("hyper", {})
        saved = {k: hyper.get(k, _HYPER_BEFORE.get(k)) for k in _HYPER}
        mismatch = {k: (saved[k], getattr(args, k)) for k in _HYPER if saved[k] != getattr(args, k)}
        if mismatch:
            print(f"--resume: settings differ from the checkpoint (saved, given): {mismatch}",
                  file=sys.stderr)
            return 2
        state = training.restore_train_state(ckpt, optimizer)
        start, prior_seconds = ckpt.step, float(ckpt.extra["train_seconds"])
        _truncate_log(log_path, start)
        print(f"resumed {args.out} at step {start}")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if os.path.exists(log_path):
            os.remove(log_path)

    step_fn = training.make_train_step(
        graphdef, optimizer, key=data_key, batch_size=args.batch_size,
        caption_len=config.caption_len, null_class=pretrained.NULL_CLASS,
        p_uncond=args.p_uncond, ema_decay=args.ema_decay, objective=args.objective,
        min_snr_gamma=args.min_snr_gamma,
    )
    n_params = sum(int(a.size) for a in jax.tree.leaves(state.params))
    print(f"{args.arch} ({args.objective}): {n_params:,} parameters, {images.shape[0]} training "
          f"images, steps {start}..{args.steps}")

    t0 = time.perf_counter()
    window: list[jax.Array] = []
    last_loss = float("nan")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.no_progress,
               dynamic_ncols=True)
    for i in bar:
        state, loss = step_fn(state, images, labels, jnp.int32(i))
        window.append(loss)
        done = i + 1
        if done % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
        if done % args.log_every == 0 or done == args.steps:
            seconds = prior_seconds + time.perf_counter() - t0
            last_loss = float(jnp.mean(jnp.stack(window)))
            window = []
            line = {"step": done, "loss": round(last_loss, 6), "seconds": round(seconds, 2)}
            bar.write(f"step {done:6d}  loss {last_loss:.4f}  {seconds:7.1f} s")
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        if done % args.ckpt_every == 0 or done == args.steps:
            extra = {"hyper": {k: getattr(args, k) for k in _HYPER},
                     "key": np.asarray(jax.random.key_data(data_key)),
                     "train_seconds": prior_seconds + time.perf_counter() - t0}
            training.save_train_state(args.out, model, state, done, extra=extra)
    bar.close()
    seconds = prior_seconds + time.perf_counter() - t0
    model = nnx.merge(graphdef, state.ema)  # the EMA weights are the model
    print(f"trained {args.steps} steps in {seconds:.1f} s; checkpoint {args.out}")

    result = {"arch": args.arch, "objective": args.objective,
              "min_snr_gamma": args.min_snr_gamma, "steps": args.steps,
              "train_seconds": round(seconds, 1), "final_loss": last_loss}
    if args.eval_per_class:
        guidance = args.guidance or None
        eval_steps = args.eval_steps or recipe.num_steps
        acc = score(model, per_class=args.eval_per_class, num_steps=eval_steps,
                    guidance=guidance)
        result.update(eval_accuracy=acc, eval_steps=eval_steps, eval_guidance=guidance)
        print(f"classifier accuracy on {10 * args.eval_per_class} generated digits "
              f"({eval_steps} {type(recipe.solver).__name__} steps, guidance {guidance}): "
              f"{acc:.3f}")
    if args.export:
        pretrained.save_checkpoint(args.export, model, step=args.steps, extra=result)
        print(f"exported {args.export} ({os.path.getsize(args.export) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
