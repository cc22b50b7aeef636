"""gc.compile: pass pipeline + backend. The one place that picks a backend and falls back."""
from __future__ import annotations

import os
import warnings

from ir.graph import Graph
from ir.passes import run_pipeline
from ir.types import IRError

BACKENDS = ("llvm", "numpy")


class BackendFallbackWarning(RuntimeWarning):
    """The LLVM backend could not compile a graph (unavailable on this host, or an op without a
    lowering) and the NumPy backend runs it instead. A warning for users; the test suite turns it into
    an error (tests/conftest.py) so that a missing lowering can never hide behind the fallback."""


def default_backend() -> str:
    return os.environ.get("GRAPHCNN_BACKEND", "llvm")


def compile(graph: Graph, backend: str | None = None, params: dict | None = None, passes="inference",
            print_ir_after_all: bool = False, frozen_params: bool = False, **options):
    """Compile any graph to a callable: fn(**inputs) -> array or tuple of arrays.

    backend: 'llvm' (native, default) or 'numpy'. params: initial values for the graph's params.
    passes: a pipeline name ('inference', 'training', 'none') or a list of pass names.
    frozen_params: the params keep their values (the executable holds read-only copies; the LLVM backend
    then packs GEMM weights once instead of on every call)."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise IRError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(graph, Graph):
        raise TypeError(f"compile: expected a graphcnn Graph, got {type(graph).__name__}")
    if not graph.outputs:
        raise IRError(f"compile: graph {graph.name!r} has no outputs; call g.output(...)")
    result = run_pipeline(graph, passes, print_ir_after_all=print_ir_after_all)
    g = result.graph
    if backend == "llvm":
        try:
            from backends.llvm import compile_llvm
            from backends.llvm.codegen import LoweringError
            from backends.llvm.jit import host_target
            host_target()
        except (ImportError, RuntimeError) as e:
            warnings.warn(f"graphcnn: LLVM backend unavailable on this host ({e}); using the NumPy backend",
                          BackendFallbackWarning, stacklevel=2)
        else:
            try:
                exe = compile_llvm(g, params, frozen_params=frozen_params, **options)
            except LoweringError as e:
                warnings.warn(f"graphcnn: {e}; using the NumPy backend for graph {g.name!r}",
                              BackendFallbackWarning, stacklevel=2)
            else:
                exe.pipeline = result
                return exe
    from backends.numpy import compile_numpy
    exe = compile_numpy(g, params, plan=getattr(g, "memory_plan", None), frozen_params=frozen_params)
    exe.pipeline = result
    return exe


def grad(g: Graph, wrt, loss=None) -> Graph:
    """Gradient graph of a scalar output: outputs are g's outputs followed by d loss / d w for w in wrt."""
    from ir.autodiff import grad as _grad
    return _grad(g, wrt, loss)
