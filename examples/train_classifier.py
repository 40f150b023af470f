"""Retrains the digit classifier that jaxcache ships and overwrites its weights file.

The classifier scores generated digits (class accuracy and a Frechet distance on its features,
see ``jaxcache.metrics``). It is trained on the ``seed=0`` train split of the scikit-learn digits
at 16x16 and checked on the held-out test split.

Usage::

    pip install -e ".[examples]"   # jaxcache plus scikit-learn
    python examples/train_classifier.py [--steps 1500] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
from flax import nnx

from jaxcache.digits import classifier
from jaxcache.digits import data as digits

_ASSET = os.path.join(os.path.dirname(classifier.__file__), "assets", "digit_classifier.npz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16, help="image side (multiple of 8)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.95,
                        help="refuse to write weights scoring below this on the test split")
    parser.add_argument("--out", default=_ASSET, help="output .npz (default: the shipped asset)")
    args = parser.parse_args(argv)

    x_train, y_train = digits.load_digits_images(args.size, "train")
    x_test, y_test = digits.load_digits_images(args.size, "test")
    start = time.perf_counter()
    model = classifier.train_classifier(
        x_train, y_train, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed,
    )
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - start
    train_acc = classifier.accuracy(model, x_train, y_train)
    test_acc = classifier.accuracy(model, x_test, y_test)
    print(f"trained {args.steps} steps in {seconds:.1f} s on {len(x_train)} images")
    print(f"train accuracy {train_acc:.4f}, "
          f"held-out accuracy {test_acc:.4f} ({len(x_test)} images)")
    # Guard the shipped asset: a bad run must not silently replace good weights.
    if test_acc < args.min_accuracy:
        print(f"held-out accuracy below {args.min_accuracy}; not writing {args.out}",
              file=sys.stderr)
        return 1
    classifier.save_classifier(model, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
