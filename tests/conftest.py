import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def load_example(name):
    """The `model` of examples/<name>.py (a fresh Sequential each call)."""
    import runpy
    return runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"))["model"]
