"""jaxcache: step-level feature caching for diffusion transformers in JAX, compiled whole.

The public API:

* :class:`StepCache`, :func:`should_refresh`: the reference step cache, as an immutable pytree.
* :class:`Network`, :class:`NetworkParams`, :func:`from_nnx`: a model cut into cacheable pieces.
* :class:`CachePlan`, :class:`SegmentParams`: which layers are cached; parameters split per segment.
* :class:`RefreshPolicy`, :class:`IntervalPolicy`, :class:`StepMaskPolicy`, :class:`OnDevice`:
  when to recompute.
* :class:`Solver`, :class:`FlowMatchEuler`, :class:`DDIM`: solver steps.
* :func:`sample`, :class:`SampleResult`: the cached sampling loop, one compiled program.
"""

from jaxcache.network import Network, NetworkParams, from_nnx
from jaxcache.plan import CachePlan, SegmentParams
from jaxcache.policies import IntervalPolicy, OnDevice, RefreshPolicy, StepMaskPolicy
from jaxcache.sampler import SampleResult, sample
from jaxcache.solvers import DDIM, FlowMatchEuler, Solver
from jaxcache.step_cache import StepCache, should_refresh

__version__ = "0.1.0"

__all__ = [
    "CachePlan",
    "DDIM",
    "FlowMatchEuler",
    "IntervalPolicy",
    "Network",
    "NetworkParams",
    "OnDevice",
    "RefreshPolicy",
    "SampleResult",
    "SegmentParams",
    "Solver",
    "StepCache",
    "StepMaskPolicy",
    "from_nnx",
    "sample",
    "should_refresh",
]
