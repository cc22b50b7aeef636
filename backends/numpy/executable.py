"""Compile a graph to a NumPy executable: generate the source, exec it once, call it per batch."""
from __future__ import annotations

import numpy as np

from ..executable import ArenaCache, Executable
from . import kernels as K
from .codegen import generate_source


class NumpyExecutable(Executable):
    backend = "numpy"

    def __init__(self, graph, params=None, plan=None, compute_dtype=np.float32, frozen_params=False):
        super().__init__(graph, params, compute_dtype, frozen_params)
        self.source, self.fn_name, self.var = generate_source(graph)
        ns = {"np": np, "K": K}
        exec(compile(self.source, f"<graphcnn:{self.fn_name}>", "exec"), ns)
        self._fn = ns[self.fn_name]
        self.plan = plan
        self._int_dtypes = {v.name: v.type.np_dtype for n in graph.nodes for v in n.outputs
                            if v.type.dtype != "f32"}
        self.arenas = ArenaCache(plan.arena_bytes) if plan is not None else None

    def run(self, arrays):
        batch = next((a.shape[0] for a, (_, t) in zip(arrays, self.inputs) if t.batched), 1)
        if self.arenas is None or self.compute_dtype != np.float32:
            # f32 values in the compute dtype; integer values (quantized tensors) keep their own
            dt, int_dtypes = self.compute_dtype, self._int_dtypes
            return self._fn(*arrays, self.state, self.consts,
                            lambda key, shape: np.empty(shape, int_dtypes.get(key, dt)))
        arena = self.arenas.get(batch)
        try:
            return self._fn(*arrays, self.state, self.consts,
                            self.plan.numpy_allocator(batch, arena.buffer, arena.views))
        finally:
            self.arenas.release(batch)


def compile_numpy(graph, params=None, plan=None, compute_dtype=np.float32, frozen_params=False) -> NumpyExecutable:
    """Compile an (optimized) graph with the NumPy backend (compute_dtype=float64: test reference mode;
    frozen_params: see Executable)."""
    return NumpyExecutable(graph, params, plan, compute_dtype, frozen_params)
