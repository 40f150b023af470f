"""Test set-up: the tests import the plain-Python reference restatement from this folder.

Strict dtype promotion holds for the whole suite: an implicit promotion between array dtypes
(``float32 + bfloat16``, ``int32 + float32``) is an error rather than a silent upcast.
"""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))

jax.config.update("jax_numpy_dtype_promotion", "strict")
