"""The peer side of the FLUX benchmark: diffusers' FLUX transformer, eager and torch.compile.

Runs on the GPU machine only (torch and diffusers are not dependencies of jaxcache; diffusers
travels as a wheel). Random weights (diffusers' default initialisation is non-zero), bfloat16,
batch 1, an Euler loop of ``--steps`` steps over the transformer, as a user's own script would
write it. Prints one JSON object per row (and appends it to ``--out``):

* ``matmul``: the card's measured bf16 matrix rate (8192^3 GEMMs), the denominator of every
  utilisation figure;
* ``eager``, ``compile``: FLUX.1's layout, ``FluxTransformer2DModel(num_layers=19,
  num_single_layers=38)`` (``--double`` and ``--single``; ``--single 0`` gives the double-stream
  blocks alone, as the first runs of this benchmark did), eager and compiled;
* ``fbc``: the same with diffusers' First-Block Cache (a threshold sweep in eager mode, the
  count of fully computed steps for each, then the compiled run at the chosen threshold; the
  first double-stream block decides, the other 56 blocks, single-stream ones included, are
  skipped together).

The jaxcache side (``flux_jax.py``) runs the same 19 + 38 layout, its ``flux`` size.

Matrix FLOPs are counted analytically (see ``peer_flops.py``), the same way for both sides.

Usage (GPU machine)::

    python3 benchmarks/peers/flux_diffusers.py --out out/peers.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_flops import flux_step_flops  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(size: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 GEMM rate of the card in TFLOP/s (median of ``repeats``)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b

    def ten():
        for _ in range(10):
            a @ b

    seconds = _median_time(ten, repeats) / 10
    return 2 * size**3 / seconds / 1e12


def build(double: int, single: int, width: int, heads: int):
    from diffusers import FluxTransformer2DModel

    with torch.device("cuda"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
            attention_head_dim=width // heads, num_attention_heads=heads,
            joint_attention_dim=4096, pooled_projection_dim=768,
        )
    return model.to(torch.bfloat16).eval()


def inputs(image_tokens: int, text_tokens: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    side = int(round(image_tokens**0.5))
    img_ids = torch.zeros(side, side, 3, device="cuda")
    img_ids[..., 1] = torch.arange(side, device="cuda")[:, None]
    img_ids[..., 2] = torch.arange(side, device="cuda")[None, :]
    return dict(
        noise=torch.randn(1, image_tokens, 64, device="cuda", generator=g, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text_tokens, 4096, device="cuda", generator=g,
                                          dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, device="cuda", generator=g, dtype=torch.bfloat16),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3, device="cuda"),
    )


def euler_loop(model, data, steps: int, on_step=None):
    """A user's own sampler: Python loop, one transformer call per step, Euler update."""
    times = torch.linspace(1.0, 0.0, steps + 1, device="cuda")
    t_rows = [times[i].reshape(1).to(torch.bfloat16) for i in range(steps)]
    dts = [(times[i + 1] - times[i]).to(torch.bfloat16) for i in range(steps)]

    def run():
        x = data["noise"]
        for i in range(steps):
            v = model(
                hidden_states=x, encoder_hidden_states=data["encoder_hidden_states"],
                pooled_projections=data["pooled_projections"], timestep=t_rows[i],
                img_ids=data["img_ids"], txt_ids=data["txt_ids"], return_dict=False,
            )[0]
            if on_step is not None:
                on_step(i)
            x = x + dts[i] * v
        return x

    return run


def timed(name: str, run, repeats: int, flops: float, rate: float, **extra) -> dict:
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    run()  # a second warm-up: compiled graphs may specialise on the first call
    seconds = _median_time(run, repeats)
    return dict(row=name, seconds=seconds, first_call_s=first, tflops=flops / seconds / 1e12,
                of_matmul_rate=flops / seconds / 1e12 / rate, repeats=repeats, **extra)


def fbc_counter(model):
    """Counts the steps on which First-Block Cache computed the remaining blocks."""
    from diffusers.hooks import HookRegistry

    hook = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    computed: list[int] = []

    def on_step(i):
        if hook.state_manager.get_state().should_compute:
            computed.append(i)

    return computed, on_step


def fbc_run(model, data, steps, counter=None, owner=None):
    """An Euler loop under First-Block Cache; ``owner`` holds the hooks (``model`` itself or
    the module a compiled ``model`` wraps)."""
    owner = model if owner is None else owner
    loop = euler_loop(model, data, steps, on_step=counter)

    def run():
        owner._reset_stateful_cache()
        with owner.cache_context("cond"):
            return loop()

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--double", type=int, default=19, help="double-stream blocks (19)")
    p.add_argument("--single", type=int, default=38,
                   help="single-stream blocks after them (38: FLUX.1; 0: double-stream only)")
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--thresholds", default="0.05,0.1,0.2,0.3,0.5,0.7,1.0,1.5,2.0")
    p.add_argument("--target-computed", type=int, default=10,
                   help="FBC: pick the threshold whose computed-step count is nearest this")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", default="",
                   help="comma list of rows to skip: eager, compile, fbc, fbc-compile")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cuda.matmul.allow_tf32 = True
    import diffusers

    def emit(row):
        row.update(torch=torch.__version__, diffusers=diffusers.__version__,
                   device=torch.cuda.get_device_name(), steps=args.steps, width=args.width,
                   heads=args.heads, image_tokens=args.image_tokens,
                   text_tokens=args.text_tokens)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    rate = matmul_rate()
    emit(dict(row="matmul", tflops=rate))
    data = inputs(args.image_tokens, args.text_tokens)
    tokens = args.image_tokens + args.text_tokens
    blocks = args.double + args.single
    label = f"{args.double}+{args.single}"
    with torch.inference_mode():
        model = build(args.double, args.single, args.width, args.heads)
        # A single-stream block has the same matrix FLOPs as a double-stream one.
        step = flux_step_flops(args.width, tokens, blocks)
        total = step * args.steps
        if "eager" not in skip:
            emit(timed("diffusers eager", euler_loop(model, data, args.steps), args.repeats,
                       total, rate, blocks=label))
        if "compile" not in skip:
            compiled = torch.compile(model)
            emit(timed("diffusers torch.compile", euler_loop(compiled, data, args.steps),
                       args.repeats, total, rate, blocks=label))
            del compiled
            torch._dynamo.reset()
        if "fbc" not in skip:
            from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

            apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))
            hook_model = model
            sweep = []
            leader = None
            for threshold in [float(x) for x in args.thresholds.split(",")]:
                from diffusers.hooks import HookRegistry

                leader = HookRegistry.check_if_exists_or_initialize(
                    model.transformer_blocks[0]).get_hook("fbc_leader_block_hook")
                leader.threshold = threshold
                computed, on_step = fbc_counter(hook_model)
                fbc_run(hook_model, data, args.steps, on_step)()
                sweep.append(dict(threshold=threshold, computed_steps=list(computed)))
            emit(dict(row="diffusers FBC sweep (eager)", sweep=sweep))
            best = min(sweep, key=lambda s: abs(len(s["computed_steps"]) - args.target_computed))
            leader.threshold = best["threshold"]
            n = len(best["computed_steps"])
            # The leader block runs every step; the other blocks (double- and single-stream)
            # on computed steps.
            fbc_flops = flux_step_flops(args.width, tokens, 1) * args.steps + flux_step_flops(
                args.width, tokens, blocks - 1) * n
            emit(timed("diffusers FBC eager", fbc_run(hook_model, data, args.steps),
                       args.repeats, fbc_flops, rate, threshold=best["threshold"],
                       computed_steps=best["computed_steps"], blocks=label))
            if "fbc-compile" not in skip:
                compiled = torch.compile(hook_model)
                compiled_count, on_step = fbc_counter(hook_model)
                row = timed("diffusers FBC torch.compile",
                            fbc_run(compiled, data, args.steps, owner=hook_model),
                            args.repeats, fbc_flops, rate, threshold=best["threshold"],
                            blocks=label)
                compiled_count.clear()
                fbc_run(compiled, data, args.steps, on_step, owner=hook_model)()
                row["computed_steps"] = list(compiled_count)
                emit(row)
                del compiled
                torch._dynamo.reset()
        del model
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
