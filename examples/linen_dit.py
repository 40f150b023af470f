"""Bring your own model: a Linen DiT as public ports write it, sampled by its own loop and cached.

The model below is written the way public Flax ports of DiT are: one ``nn.compact`` ``__call__``
that builds the patch embedding, the time and label embedders, blocks ``DiTBlock_0..N-1`` and a
final layer inline, a ``pos_embed`` parameter, integer training-step timesteps, and a
``learn_sigma`` output of twice the input channels. Nothing in it knows about jaxcache.

The script then does what a user with such a model does:

1. samples with its own loop (DDIM over the 1000-step DDPM schedule, classifier-free guidance);
2. wraps the model with ``jaxcache.from_linen`` (the blocks by name, three small functions for
   the inline parts, ``TimeConvention.index(1000)``) and checks parity with the model's own
   forward (on zero-initialised weights the check warns that the output is identically zero,
   so the weights are randomised first);
3. samples uncached with jaxcache (the same images as its own loop), then cached, and prints
   the cached speedup against its own loop.

Run: ``python examples/linen_dit.py`` (``--size small`` by default; ``--size tiny`` for a quick
check, ``base`` and ``xl`` for DiT-B/2 and DiT-XL/2 on 32x32 latents; ``--solver ddpm`` or
``dpm++2m`` for an ancestral or a multistep solver).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxcache

# ------------------------------------------------------------------------------ the model


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding, ``[grid_size**2, embed_dim]``."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate(
        [one_axis(embed_dim // 2, grid_h), one_axis(embed_dim // 2, grid_w)], axis=1
    )


class TimestepEmbedder(nn.Module):
    """Integer diffusion steps to vectors: sinusoidal frequencies, then a two-layer MLP."""

    hidden_size: int
    frequency_embedding_size: int = 256

    @nn.compact
    def __call__(self, t):
        x = self.timestep_embedding(t)
        x = nn.Dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02))(x)
        x = nn.silu(x)
        return nn.Dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02))(x)

    def timestep_embedding(self, t, max_period: int = 10000):
        half = self.frequency_embedding_size // 2
        freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class LabelEmbedder(nn.Module):
    """Class labels to vectors; one extra row is the null class of classifier-free guidance."""

    num_classes: int
    hidden_size: int
    dropout_prob: float

    @nn.compact
    def __call__(self, labels, train: bool, force_drop_ids=None):
        use_cfg_embedding = int(self.dropout_prob > 0)
        table = nn.Embed(
            self.num_classes + use_cfg_embedding, self.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
        )
        if train and self.dropout_prob > 0:
            drop = jax.random.bernoulli(self.make_rng("label_dropout"), self.dropout_prob,
                                        labels.shape)
            labels = jnp.where(drop, self.num_classes, labels)
        if force_drop_ids is not None:
            labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
        return table(labels)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens (a strided convolution)."""

    patch_size: int
    hidden_size: int

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=nn.initializers.xavier_uniform())(x)
        return x.reshape(b, -1, self.hidden_size)


class Mlp(nn.Module):
    hidden_features: int
    out_features: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden_features, kernel_init=nn.initializers.xavier_uniform())(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(self.out_features, kernel_init=nn.initializers.xavier_uniform())(x)


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention and MLP, each shifted, scaled and gated by the condition."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x, c):
        c = nn.silu(c)
        c = nn.Dense(6 * self.hidden_size, kernel_init=nn.initializers.zeros)(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(c, 6, axis=-1)
        x_norm = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)(x)
        x_mod = modulate(x_norm, shift_msa, scale_msa)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform()
        )(x_mod, x_mod)
        x = x + gate_msa[:, None] * attn
        x_norm = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)(x)
        x_mod = modulate(x_norm, shift_mlp, scale_mlp)
        mlp = Mlp(int(self.hidden_size * self.mlp_ratio), self.hidden_size)(x_mod)
        return x + gate_mlp[:, None] * mlp


class FinalLayer(nn.Module):
    patch_size: int
    out_channels: int
    hidden_size: int

    @nn.compact
    def __call__(self, x, c):
        c = nn.Dense(2 * self.hidden_size, kernel_init=nn.initializers.zeros)(nn.silu(c))
        shift, scale = jnp.split(c, 2, axis=-1)
        x = modulate(nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)(x), shift, scale)
        return nn.Dense(self.patch_size**2 * self.out_channels,
                        kernel_init=nn.initializers.zeros)(x)


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero blocks, class-conditional, predicting noise."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    @nn.compact
    def __call__(self, x, t, y, train: bool = False, force_drop_ids=None):
        grid = self.input_size // self.patch_size
        pos_embed = self.param(
            "pos_embed",
            lambda _, shape: jnp.asarray(get_2d_sincos_pos_embed(shape[-1], grid)[None],
                                         jnp.float32),
            (1, grid * grid, self.hidden_size),
        )
        x = PatchEmbed(self.patch_size, self.hidden_size)(x) + pos_embed
        t = TimestepEmbedder(self.hidden_size)(t)
        y = LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob)(
            y, train, force_drop_ids
        )
        c = t + y
        for _ in range(self.depth):
            x = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio)(x, c)
        x = FinalLayer(self.patch_size, self.out_channels, self.hidden_size)(x, c)
        return self.unpatchify(x)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def unpatchify(self, x):
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = jnp.einsum("nhwpqc->nhpwqc", x)
        return x.reshape(x.shape[0], h * p, w * p, c)


SIZES = {
    "tiny": dict(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=2,
                 num_classes=10),
    "small": dict(input_size=16, patch_size=2, hidden_size=256, depth=12, num_heads=4,
                  num_classes=10),
    "base": dict(input_size=32, patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "xl": dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}


def randomise(variables, seed: int = 1, scale: float = 0.02):
    """Adds small noise to every parameter: an untrained DiT outputs exactly zero otherwise.

    On the host with numpy: nothing to compile for a one-off perturbation.
    """
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(seed)
    noisy = [jnp.asarray(np.asarray(a) + scale * rng.normal(size=a.shape).astype(a.dtype))
             for a in leaves]
    return jax.tree.unflatten(treedef, noisy)


# --------------------------------------------------------------------- the user's own loop


def own_ddim_loop(model: DiT, steps: int, guidance: float, num_train_steps: int = 1000):
    """A sampling script as users write it: DDIM with guidance, a jitted step in a Python loop."""
    betas = np.linspace(1e-4, 0.02, num_train_steps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    timesteps = np.round(np.linspace(num_train_steps - 1, 0, steps)).astype(np.int64)

    @jax.jit
    def step(variables, x, y, k, a, a_prev):
        null = jnp.full_like(y, model.num_classes)
        t = jnp.full((2 * x.shape[0],), k, jnp.int32)
        out = model.apply(variables, jnp.concatenate([x, x]), t, jnp.concatenate([y, null]))
        eps_cond, eps_uncond = jnp.split(out[..., : model.in_channels], 2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

    def run(variables, noise, y):
        x = noise
        for i, k in enumerate(timesteps):
            a_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x = step(variables, x, y, int(k), np.float32(alphas_cumprod[k]), np.float32(a_prev))
        return x

    return run


# --------------------------------------------------------------------------- with jaxcache


def condition(m, y):
    return m.LabelEmbedder_0(y, False)


def embed(m, x, t, y_emb):
    return m.PatchEmbed_0(x) + m.params["pos_embed"], m.TimestepEmbedder_0(t) + y_emb


def final(m, h, c):
    # learn_sigma: the first in_channels of the output are the noise prediction.
    return m.unpatchify(m.FinalLayer_0(h, c))[..., : m.in_channels]


def wrap(model: DiT, variables, noise, labels):
    """The model as a jaxcache Network: the blocks by name, the inline parts as functions."""
    t = jnp.zeros((noise.shape[0],), jnp.int32)
    return jaxcache.from_linen(
        model, variables, (noise, t, labels), blocks="DiTBlock",
        condition=condition, embed=embed, final=final,
        time=jaxcache.TimeConvention.index(1000),
    )


def _best_of(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--cached-layers", type=int, default=None,
                        help="layers cached from the first (default: half the depth)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--solver", choices=("ddim", "ddpm", "dpm++2m"), default="ddim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unroll-layers", action="store_true",
                        help="run the layer stack unrolled (Network.layer_unroll=True), as the "
                             "model's own forward does; pays on small models on a GPU")
    args = parser.parse_args(argv)

    model = DiT(**SIZES[args.size])
    k_noise, k_label, k_init = jax.random.split(jax.random.key(0), 3)
    shape = (args.batch, model.input_size, model.input_size, model.in_channels)
    noise = jax.random.normal(k_noise, shape)
    labels = jax.random.randint(k_label, (args.batch,), 0, model.num_classes)
    variables = jax.jit(model.init)(k_init, noise, jnp.zeros((args.batch,), jnp.int32), labels)

    network, params = wrap(model, variables, noise, labels)

    def forward(v):
        return lambda x, t, y: model.apply(v, x, t, y)[..., : model.in_channels]

    t_check = jnp.asarray(np.round(np.linspace(999, 0, args.batch)) / 1000, jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jaxcache.check_parity(network, params, forward(variables), noise, t_check, labels)
    if caught:
        print(f"freshly initialised: {caught[0].message}")
    variables = randomise(variables)
    network, params = wrap(model, variables, noise, labels)  # the same network object
    # Full float32 matrix products for the check (GPUs default to TF32 in float32 matmuls).
    with jax.default_matmul_precision("float32"):
        diff = jaxcache.check_parity(network, params, forward(variables), noise, t_check, labels,
                                     rtol=1e-4, atol=1e-4)
    print(f"parity with the model's own forward: max |difference| {diff:.2e}")

    depth = model.depth
    cached = args.cached_layers if args.cached_layers is not None else depth // 2
    solver = {"ddim": jaxcache.DDIM(), "ddpm": jaxcache.DDPM(),
              "dpm++2m": jaxcache.DPMSolverPP2M()}[args.solver]
    key = jax.random.key(42) if solver.uses_key else None
    null = jnp.full_like(labels, model.num_classes)
    if args.unroll_layers:
        network = dataclasses.replace(network, layer_unroll=True)
    plan = jaxcache.CachePlan(network, cached_layers=cached)
    seg = plan.split(params)

    def run(policy):
        return jaxcache.sample(plan, seg, noise, labels, solver=solver, num_steps=args.steps,
                               policy=policy, uncond=null, guidance_scale=args.guidance, key=key)

    own = own_ddim_loop(model, args.steps, args.guidance)
    policy = jaxcache.IntervalPolicy(args.interval)
    result = {"size": args.size, "solver": args.solver, "steps": args.steps,
              "interval": args.interval, "cached_layers": cached, "depth": depth}
    if args.solver == "ddim":
        gap = float(jnp.max(jnp.abs(run(None).sample - own(variables, noise, labels))))
        print(f"jaxcache uncached vs its own DDIM loop: max |difference| {gap:.2e}")
        result["uncached_vs_own"] = gap
    reference = run(None).sample
    out = run(policy)
    err = float(jnp.mean(jnp.abs(out.sample - reference)) / jnp.mean(jnp.abs(reference)))
    layer_evals = int(out.layer_evaluations)
    print(f"cached: {cached} of {depth} layers, refreshed every {args.interval} steps: "
          f"{layer_evals} of {args.steps * depth} layer evaluations, relative L1 to uncached "
          f"{err:.3f}")

    t_own = _best_of(lambda: own(variables, noise, labels), args.repeats)
    t_uncached = _best_of(lambda: run(None).sample, args.repeats)
    t_cached = _best_of(lambda: run(policy).sample, args.repeats)
    print(f"own loop {t_own * 1e3:.1f} ms | jaxcache uncached {t_uncached * 1e3:.1f} ms | "
          f"cached {t_cached * 1e3:.1f} ms: {t_own / t_cached:.2f}x faster than its own loop "
          f"(ideal {args.steps * depth / layer_evals:.2f}x on the layers; {jax.devices()[0]})")
    result.update(parity=diff, relative_l1=err, layer_evaluations=layer_evals,
                  own_s=t_own, uncached_s=t_uncached, cached_s=t_cached)
    return result


if __name__ == "__main__":
    main()
