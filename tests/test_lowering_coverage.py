"""Every registered op runs natively in both backends, and the NumPy fallback cannot hide a missing
lowering: it is a BackendFallbackWarning for users and an error under this test suite (conftest.py)."""
import numpy as np
import pytest

import graphcnn as gc
from backends.llvm import lowering
from backends.llvm.layout import VIEW_OPS
from backends.numpy.codegen import MissingKernelError, has_kernel
from graphcnn.compiler import BackendFallbackWarning
from ir.ops import REGISTRY

# read at collection time, so ops registered by any module imported so far are all checked
OPS = sorted(REGISTRY)


@pytest.mark.parametrize("op", OPS)
def test_op_has_an_llvm_lowering(op):
    assert op in lowering.LOWERINGS or op in VIEW_OPS, f"LLVM backend: no lowering for registered op {op!r}"


@pytest.mark.parametrize("op", OPS)
def test_op_has_a_numpy_kernel(op):
    assert has_kernel(op), f"NumPy backend: no kernel for registered op {op!r}"


def _relu_graph():
    g = gc.Graph("fallback")
    x = g.input("x", (None, 3))
    g.output(gc.ops.relu(x))
    return g


def test_fallback_is_an_error_under_the_test_suite(monkeypatch):
    monkeypatch.delitem(lowering.LOWERINGS, "relu")
    with pytest.raises(BackendFallbackWarning, match="no lowering for op 'relu'"):
        gc.compile(_relu_graph(), backend="llvm")


def test_fallback_stays_a_warning_for_users(monkeypatch):
    monkeypatch.delitem(lowering.LOWERINGS, "relu")
    with pytest.warns(BackendFallbackWarning, match="using the NumPy backend"):
        fn = gc.compile(_relu_graph(), backend="llvm")
    assert fn.backend == "numpy"
    np.testing.assert_array_equal(fn(x=np.array([[-1, 0, 2]], np.float32)), [[0, 0, 2]])


def test_numpy_backend_refuses_an_op_without_kernel_at_compile_time(monkeypatch):
    from backends.numpy import kernels
    monkeypatch.delattr(kernels, "relu")
    with pytest.raises(MissingKernelError, match="no kernel for op 'relu'"):
        gc.compile(_relu_graph(), backend="numpy")
