"""Test set-up: the tests import the plain-Python reference restatement from this folder.

Strict dtype promotion holds for the whole suite: an implicit promotion between array dtypes
(``float32 + bfloat16``, ``int32 + float32``) is an error rather than a silent upcast.
"""

import os
import shutil
import sys
import tempfile

# The tests check what programs compute and how XLA builds them (the optimised HLO, which this
# leaves alone); LLVM's optimisation of the CPU code they run only changes a test's speed, and
# on the suite's tiny programs its compile time outweighs the run (about a quarter of the
# suite's time). Set before jax is imported, so the subprocesses the tests start inherit it;
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"))

jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config):
    """A compilation cache on disk for this run, shared by the xdist workers.

    Many tests compile the same program (equal models built anew in each test, the same toy
    networks in several modules); with the cache each program compiles once per run (about a
    sixth of the suite's time). Every program is kept, however quick its compile: most of the
    suite's programs compile in well under 0.2 s, and equal ones recur across tests and modules
    (a tenth of the suite's CPU time, measured). The run's controller makes a fresh directory,
    the workers inherit it through the environment, and the controller removes it at the end,
    so every run starts cold. ``JAXCACHE_TEST_XLA_CACHE=DIR`` keeps a directory of one's own
    across runs instead.
    """
    if "JAXCACHE_TEST_XLA_CACHE" not in os.environ and not hasattr(config, "workerinput"):
        os.environ["JAXCACHE_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxcache-xla-")
        config._jaxcache_xla_cache = os.environ["JAXCACHE_TEST_XLA_CACHE"]
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXCACHE_TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    made = getattr(config, "_jaxcache_xla_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        del os.environ["JAXCACHE_TEST_XLA_CACHE"]


# Every module by its time on the two-core CI machine, longest first (measured 2026-12-08 with
# --durations=0; modules not listed follow in name order). With ``--dist loadfile``
# (pyproject.toml) a worker takes the next module whenever it runs out, so the long ones start
# first and the run ends on short ones: longest-first keeps the two workers' finishing times
# within the shortest module's. ``test_sharding.py`` runs its checks in one subprocess for most
# of its time, so it goes first. Re-measure and re-order when a module grows by much.
LONGEST_FIRST = (
    "test_sharding.py",
    "test_cli.py",
    "test_pretrained.py",
    "test_byom.py",
    "test_sampler.py",
    "test_solvers_stateful.py",
    "test_layer_constants.py",
    "test_docs.py",
    "test_layer_mask.py",
    "test_block_kinds.py",
    "test_cfg_cache.py",
    "test_wan.py",
    "test_policies.py",
    "test_fitted_forecast.py",
    "test_planned_study.py",
    "test_flux_layout.py",
    "test_metrics.py",
    "test_program.py",
    "test_harness.py",
    "test_unipc.py",
    "test_reuse.py",
    "test_bench_peer.py",
    "test_models.py",
    "test_sencache.py",
    "test_linen_kinds.py",
    "test_router.py",
    "test_planner.py",
    "test_digits.py",
    "test_time_conventions.py",
    "test_main_job.py",
    "test_readme.py",
    "test_tuning.py",
    "test_named.py",
    "test_layout.py",
    "test_network.py",
    "test_magcache.py",
    "test_errors_early.py",
    "test_constant_slot.py",
    "test_training_schedules.py",
    "test_solvers.py",
    "test_plan.py",
    "test_step_cache.py",
    "test_checkpoint_guards.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
