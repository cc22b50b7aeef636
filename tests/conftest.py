import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    # the silent NumPy fallback is a warning for users and an error here: a test that compiles with the
    # LLVM backend must run LLVM code (tests of the fallback itself use pytest.warns)
    config.addinivalue_line("filterwarnings", "error::graphcnn.compiler.BackendFallbackWarning")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def load_example(name):
    """The `model` of examples/<name>.py (a fresh Sequential each call)."""
    import runpy
    return runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"))["model"]
