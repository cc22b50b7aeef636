"""Compile a graph to a NumPy executable: generate the source, exec it once, call it per batch."""
from __future__ import annotations

import numpy as np

from ..executable import Executable
from . import kernels as K
from .codegen import generate_source


class NumpyExecutable(Executable):
    backend = "numpy"

    def __init__(self, graph, params=None, plan=None, compute_dtype=np.float32):
        super().__init__(graph, params, compute_dtype)
        self.source, self.fn_name, self.var = generate_source(graph)
        ns = {"np": np, "K": K}
        exec(compile(self.source, f"<graphcnn:{graph.name}>", "exec"), ns)
        self._fn = ns[self.fn_name]
        self.plan = plan

    def _buffers(self, batch):
        if self.plan is None or self.compute_dtype != np.float32:
            dt = self.compute_dtype
            return lambda key, shape: np.empty(shape, dt)
        return self.plan.numpy_allocator(batch)

    def run(self, arrays):
        batch = next((a.shape[0] for a, (_, t) in zip(arrays, self.inputs) if t.batched), 1)
        return self._fn(*arrays, self.state, self.consts, self._buffers(batch))


def compile_numpy(graph, params=None, plan=None, compute_dtype=np.float32) -> NumpyExecutable:
    """Compile an (optimized) graph with the NumPy backend (compute_dtype=float64: test reference mode)."""
    return NumpyExecutable(graph, params, plan, compute_dtype)
