"""LLVM executable: JIT the lowered graph once, then one native call per batch (ctypes releases the
GIL). Inference batches are split across threads (each with its own arena); a training step is one
call."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..executable import Executable
from .codegen import lower_graph
from .jit import JitModule, host_target
from .layout import ALIGN

ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)


def default_threads() -> int:
    env = os.environ.get("GRAPHCNN_THREADS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


class LlvmExecutable(Executable):
    backend = "llvm"

    def __init__(self, graph, params=None, threads=None):
        super().__init__(graph, params)
        self.target = host_target()
        t0 = time.perf_counter()
        module, self.entry_name, self.layout = lower_graph(graph, self.target)
        self.llvm_ir = str(module)
        self._jit = JitModule(self.llvm_ir)
        self.compile_seconds = time.perf_counter() - t0
        self._fn = ENTRY(self._jit.address(self.entry_name))
        self.threads = threads or default_threads()
        self._local = threading.local()
        self._pool = None
        # batch splitting is legal only when nothing couples samples: no state updates, no scalar outputs
        self.splittable = not graph.updates and all(t.batched for _, t in self.outputs) and \
            all(t.batched for _, t in self.inputs)

    @property
    def asm(self) -> str:
        return self._jit.asm

    def _arena(self, n):
        cache = getattr(self._local, "arenas", None)
        if cache is None:
            cache = self._local.arenas = {}
        a = cache.get(n)
        if a is None:
            nbytes = self.layout.arena_bytes(n) + ALIGN
            raw = np.empty(nbytes // 4 + 1, np.float32)
            off = (-raw.ctypes.data) % ALIGN // 4
            a = cache[n] = raw[off:off + self.layout.arena_bytes(n) // 4 + 1]
        return a

    def _call(self, arrays, n):
        leaves = {name: a for (name, _), a in zip(self.inputs, arrays)}
        leaves.update(self.state)
        leaves.update(self.consts)
        ptrs = (ctypes.c_void_p * max(1, len(self.layout.arg_order)))(
            *[leaves[name].ctypes.data for name in self.layout.arg_order])
        arena = self._arena(n)
        self._fn(ptrs, n, arena.ctypes.data)
        outs = []
        for v in self.graph.outputs:
            s = self.layout.resolve(v.name)
            if s.kind == "arg":
                outs.append(np.array(leaves[self.layout.arg_order[s.index]]))
            else:
                off = (n * s.per_sample + s.fixed) // 4
                shape = v.type.concrete(n)
                outs.append(arena[off:off + int(np.prod(shape))].reshape(shape).copy())
        return outs

    def run(self, arrays):
        n = next((a.shape[0] for a, (_, t) in zip(arrays, self.inputs) if t.batched), 1)
        chunks = min(self.threads, n) if self.splittable else 1
        if chunks <= 1:
            return self._call(arrays, n)
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        parts = list(self._pool.map(lambda i: self._call([a[bounds[i]:bounds[i + 1]] for a in arrays],
                                                         int(bounds[i + 1] - bounds[i])), range(chunks)))
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]


def compile_llvm(graph, params=None, threads=None, **_):
    """Compile an optimized graph to native code for this host."""
    return LlvmExecutable(graph, params, threads)
