"""A plain-Python restatement of the reference StepCache and of how its models used it.

The tests compare jaxcache against this: slots are Python lists holding arrays or None, exactly
as the reference's slices of array pointers, and sampling is a Python loop over steps and layers
with the reference's per-layer Get/Set logic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.cache
def _compiled_pieces(network):
    """The network's pieces, each jitted on its own: the loop stays a plain Python loop with
    the reference's logic, without compiling every operation of a piece one by one."""
    return (jax.jit(network.condition), jax.jit(network.embed), jax.jit(network.layer),
            jax.jit(network.final))


class ReferenceStepCache:
    """The reference cache: two lists of ``n`` slots (None when empty) and a constant."""

    def __init__(self, n: int):
        if n < 0:
            raise ValueError("negative length")
        self.layers = [None] * n
        self.layers2 = [None] * n
        self.constant = None

    @staticmethod
    def should_refresh(step: int, interval: int) -> bool:
        return step % interval == 0

    def get(self, i):
        return self.layers[i] if i < len(self.layers) else None

    def set(self, i, a):
        if i < len(self.layers):  # past the end: a silent no-op
            self.layers[i] = a

    def get2(self, i):
        return self.layers2[i] if i < len(self.layers2) else None

    def set2(self, i, a):
        if i < len(self.layers2):
            self.layers2[i] = a

    def free(self):
        self.layers = [None] * len(self.layers)
        self.layers2 = [None] * len(self.layers2)
        self.constant = None

    def arrays(self):
        out = [] if self.constant is None else [self.constant]
        out += [a for a in self.layers if a is not None]
        out += [a for a in self.layers2 if a is not None]
        return out


def reference_sample(network, params, noise, cond, *, solver, num_steps, cached_layers,
                     refresh_at, uncond=None, guidance_scale=None, shared_cache=False):
    """Samples with a Python loop over steps and layers, the reference's per-layer logic.

    Guidance runs the two branches as separate passes, each with its own cache (or, with
    ``shared_cache=True``, one cache for both: the reference's bug, kept to show it is detected).

    Args:
      refresh_at: ``refresh_at(step) -> bool``, the policy.
    """
    n = cached_layers
    condition, embed, layer, final = _compiled_pieces(network)
    layers = params.layers
    total = jax.tree.leaves(layers)[0].shape[0]
    times, next_times = solver.times(num_steps)
    branches = [cond] if guidance_scale is None else [cond, uncond]
    caches = [ReferenceStepCache(n)]
    caches = caches * len(branches) if shared_cache else [ReferenceStepCache(n) for _ in branches]
    x = noise
    for step in range(num_steps):
        refresh = refresh_at(step)
        t = jnp.full((x.shape[0],), times[step], jnp.float32)
        predictions = []
        for sc, c in zip(caches, branches):
            # Z-Image: the caption embedding is computed at step 0 and kept in the constant slot.
            if sc.constant is None:
                sc.constant = condition(params.condition, c)
            h, ctx = embed(params.embed, x, t, sc.constant)
            for i in range(total):
                if i < n and not refresh and sc.get(i) is not None:
                    h = (sc.get(i), sc.get2(i)) if network.dual_stream else sc.get(i)
                else:
                    p = jax.tree.map(lambda a, i=i: a[i], layers)
                    h = layer(p, h, ctx)
                    if i < n and refresh:
                        if network.dual_stream:
                            sc.set(i, h[0])
                            sc.set2(i, h[1])
                        else:
                            sc.set(i, h)
            predictions.append(final(params.final, h, ctx))
        if guidance_scale is None:
            prediction = predictions[0]
        else:
            positive, negative = predictions
            prediction = negative + guidance_scale * (positive - negative)
        x = solver.step(x, prediction, times[step], next_times[step])
    return x, caches
