"""Test set-up: the tests import the plain-Python reference restatement from this folder.

Strict dtype promotion holds for the whole suite: an implicit promotion between array dtypes
(``float32 + bfloat16``, ``int32 + float32``) is an error rather than a silent upcast.

The suite compiles several hundred small programs on the CPU, where most of its time goes to
LLVM's optimisation passes; it runs them at a lower optimisation level (set before JAX starts
its backend, and only when the caller has not set ``XLA_FLAGS``). Results stay exact where the
tests demand it: both sides of every bitwise comparison are compiled the same way.
"""

import os
import sys

os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

jax.config.update("jax_numpy_dtype_promotion", "strict")
