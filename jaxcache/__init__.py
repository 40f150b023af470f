"""jaxcache: step-level feature caching for diffusion transformers in JAX, compiled whole.

The public API (the core; it imports nothing from :mod:`jaxcache.tuning`,
:mod:`jaxcache.models`, :mod:`jaxcache.evaluation` or :mod:`jaxcache.digits`, except that this
module re-exports the tuning layer's :func:`fit_forecast` and :func:`calibrate_teacache` on first
use):

* :class:`StepCache`, :func:`should_refresh`: the reference step cache, as an immutable pytree.
* :class:`Network`, :class:`NetworkParams`, :func:`from_nnx`, :func:`from_linen`: a model cut
  into cacheable pieces; :class:`TimeConvention`, the time the model reads;
  :func:`check_parity` (raises :class:`ParityError`): the glued network against the model's
  own forward; :class:`Static`, a value known while tracing (the input's shape) carried in a
  network's per-step context.
* :class:`CachePlan`, :class:`SegmentParams`: head, cached body and tail; parameters split per
  segment.
* Policies, when the body is recomputed: :class:`RefreshPolicy`; schedules known before
  sampling, :class:`IntervalPolicy`, :class:`StepMaskPolicy`, and per step and body layer
  :class:`LayerMaskPolicy` (with :class:`LayerGates`, its traced form); signal-driven, decided
  on the device per sample, :class:`FirstBlockPolicy`, :class:`TeaCachePolicy` (with
  :func:`calibrate_teacache`, from :mod:`jaxcache.tuning`), :class:`DBCachePolicy`,
  :class:`SenCachePolicy` (reads only the sample and the time: skips the whole network);
  :class:`OnDevice`.
* :class:`CFGCache`: FasterCache's CFG-Cache, the unconditional branch of guidance estimated
  on cache steps (``sample(..., guidance=)``).
* Reuse modes, what a skipped step uses: :class:`ReuseMode`, :class:`OutputReuse`,
  :class:`ResidualReuse`, :class:`TaylorForecast`, :class:`HermiteForecast`,
  :class:`FittedForecast` (with :func:`fit_forecast`, from :mod:`jaxcache.tuning`).
* :class:`Solver` and solvers: :class:`FlowMatchEuler`, :class:`FlowMatchHeun` (rectified flow);
  :class:`DDIM`, :class:`DDPM`, :class:`EulerAncestral`, :class:`DPMSolverPP2M` (noise
  prediction on the DDPM schedule).
* :func:`sample`, :func:`lower`, :class:`SampleResult`: the cached sampling loop, one program.

Above the core, :mod:`jaxcache.tuning` fits settings to a model with the sampler:
:func:`fit_forecast`, :func:`calibrate_teacache` and :func:`jaxcache.tuning.threshold_for` (a
signal policy's threshold for a compute budget).
"""

import importlib as _importlib

from jaxcache._adapters import Blocks
from jaxcache.guidance import CFGCache
from jaxcache.linen import from_linen
from jaxcache.network import (
    Network,
    NetworkParams,
    ParityError,
    Static,
    TimeConvention,
    check_parity,
)
from jaxcache.nnx import from_nnx
from jaxcache.plan import CachePlan, SegmentParams
from jaxcache.policies import (
    DBCachePolicy,
    FirstBlockPolicy,
    IntervalPolicy,
    LayerGates,
    LayerMaskPolicy,
    MagCachePolicy,
    OnDevice,
    RefreshPolicy,
    SenCachePolicy,
    StepMaskPolicy,
    TeaCachePolicy,
)
from jaxcache.reuse import (
    FittedForecast,
    HermiteForecast,
    OutputReuse,
    ResidualReuse,
    ReuseMode,
    TaylorForecast,
)
from jaxcache.sampler import SampleResult, lower, sample
from jaxcache.solvers import (
    DDIM,
    DDPM,
    DPMSolverPP2M,
    EulerAncestral,
    FlowMatchEuler,
    FlowMatchHeun,
    Solver,
    UniPC,
)
from jaxcache.stack import BlockKind, Segments
from jaxcache.step_cache import StepCache, should_refresh

__version__ = "0.2.0"

__all__ = [
    "BlockKind",
    "Blocks",
    "CFGCache",
    "DDIM",
    "DDPM",
    "CachePlan",
    "DBCachePolicy",
    "DPMSolverPP2M",
    "EulerAncestral",
    "FirstBlockPolicy",
    "FittedForecast",
    "FlowMatchEuler",
    "FlowMatchHeun",
    "HermiteForecast",
    "IntervalPolicy",
    "LayerGates",
    "LayerMaskPolicy",
    "MagCachePolicy",
    "Network",
    "NetworkParams",
    "OnDevice",
    "OutputReuse",
    "ParityError",
    "RefreshPolicy",
    "ResidualReuse",
    "ReuseMode",
    "SampleResult",
    "SegmentParams",
    "Segments",
    "SenCachePolicy",
    "Solver",
    "Static",
    "StepCache",
    "StepMaskPolicy",
    "TaylorForecast",
    "TeaCachePolicy",
    "TimeConvention",
    "UniPC",
    "calibrate_teacache",
    "check_parity",
    "fit_forecast",
    "from_linen",
    "from_nnx",
    "lower",
    "sample",
    "should_refresh",
]

# The tuning layer sits above the sampler: the core never imports it, and these names load it on
# first use (``import jaxcache`` alone does not).
_FROM_TUNING = ("calibrate_teacache", "fit_forecast")


def __getattr__(name: str):
    if name in _FROM_TUNING or name == "tuning":
        tuning = _importlib.import_module("jaxcache.tuning")
        return tuning if name == "tuning" else getattr(tuning, name)
    raise AttributeError(f"module 'jaxcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_TUNING, "tuning"})
