"""The sampling run every tuning function fits settings on, and its arguments written once.

Every function of :mod:`jaxcache.tuning` samples a batch of the user's own with the sampler
itself, so each takes the same arguments as :func:`jaxcache.sample`'s first half: the plan, its
split parameters, the noise and condition, and how to sample them (solver, step count,
guidance, key). :class:`CalibrationRun` holds them, and :func:`takes_a_run` gives a function
written as ``function(run: CalibrationRun, *, its own options)`` the public signature
``function(plan, params, noise, cond, *, solver, num_steps, uncond=None, guidance_scale=None,
key=None, its own options)``, so that the block is written, checked and documented here only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax

from jaxcache.sampler import SampleResult, sample

PyTree = Any

__all__ = ["CalibrationRun", "takes_a_run"]


@dataclasses.dataclass(frozen=True)
class CalibrationRun:
    """A batch to fit settings on, and how it is sampled (the arguments of
    :func:`jaxcache.sample` that every tuning function shares).

    Attributes:
      plan: the :class:`~jaxcache.CachePlan` to sample with.
      params: its split parameters (:meth:`~jaxcache.CachePlan.split`).
      noise: the batch's initial noise (samples of its own, not the ones you score).
      cond: its condition.
      solver: the solver you will sample with.
      num_steps: its step count.
      uncond: the negative condition for guidance (None: unguided).
      guidance_scale: the guidance scale.
      key: the PRNG key of an ancestral solver.
    """

    plan: Any
    params: Any
    noise: jax.Array
    cond: PyTree
    solver: Any
    num_steps: int
    uncond: PyTree = None
    guidance_scale: float | None = None
    key: jax.Array | None = None

    @property
    def evaluations(self) -> int:
        """Model evaluations per run (``num_steps`` for one-stage solvers)."""
        return len(self.solver.times(self.num_steps)[0])

    def sample(self, **options: Any) -> SampleResult:
        """:func:`jaxcache.sample` on this batch; ``options``: its other arguments (``policy=``,
        ``reuse=``, ``record=``, ``remat=``, ...)."""
        return sample(self.plan, self.params, self.noise, self.cond, solver=self.solver,
                      num_steps=self.num_steps, uncond=self.uncond,
                      guidance_scale=self.guidance_scale, key=self.key, **options)


# The public signature's first half, in the order of jaxcache.sample.
_RUN_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for name in ("plan", "params", "noise", "cond")
] + [
    inspect.Parameter("solver", inspect.Parameter.KEYWORD_ONLY),
    inspect.Parameter("num_steps", inspect.Parameter.KEYWORD_ONLY, annotation=int),
] + [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    for name in ("uncond", "guidance_scale", "key")
]


def takes_a_run(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function(run, *, options)`` as ``function(plan, params, noise, cond, *, solver,
    num_steps, uncond=None, guidance_scale=None, key=None, options)``.

    The wrapper builds the :class:`CalibrationRun` and passes it on; its signature (for
    ``help`` and editors) is the run's parameters followed by ``function``'s own keywords.
    ``function``'s docstring documents ``run`` in one line, pointing here. The wrapper's
    ``on_run`` is ``function`` itself, for one tuning function calling another on its run.
    """
    own = list(inspect.signature(function).parameters.values())[1:]

    @functools.wraps(function)
    def public(plan, params, noise, cond, *, solver, num_steps, uncond=None,
               guidance_scale=None, key=None, **options):
        run = CalibrationRun(plan, params, noise, cond, solver, num_steps, uncond,
                             guidance_scale, key)
        return function(run, **options)

    public.__signature__ = inspect.signature(function).replace(
        parameters=[*_RUN_PARAMETERS, *own])
    public.on_run = function  # for a tuning function that calls another on its own run
    return public
