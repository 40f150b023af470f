"""Test set-up: the tests import the plain-Python reference restatement from this folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
