"""LLVM executable: JIT the lowered graph once, then one native call per batch (ctypes releases the
GIL, so threads run native code in parallel).

- Inference: the batch is split across threads, each with its own arena, when the graph is per-sample
  (ir.passes.batch_coupling.is_per_sample: no op mixes samples); otherwise one call runs the whole batch.
- Training (a graph with state updates): with one thread, or when the forward part couples samples
  beyond the losses' batch means (training_split_blockers), one native call runs the whole step. With
  several threads and a per-sample forward part, the step is split (ir.training.split_training_step)
  into a gradient function, run on one batch chunk per thread, and an update function; chunk gradients
  and losses are combined in a fixed order with weights n_i / n, so results are bit-identical run to run
  for a given thread count."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ir.passes.batch_coupling import coupling_nodes, training_split_blockers

from ..executable import ARENA_ALIGN, ArenaCache, Executable
from .codegen import lower_graph
from .jit import JitModule, host_target
from .layout import ALIGN

ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


def default_threads() -> int:
    env = os.environ.get("GRAPHCNN_THREADS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


class NativeGraph:
    """One graph compiled to one native function, with per-thread, per-batch-size arenas."""

    def __init__(self, graph, target):
        if getattr(graph, "memory_plan", None) is None:
            from ir.passes.plan_memory import plan_memory
            graph = plan_memory(graph)
        self.graph = graph
        t0 = time.perf_counter()
        module, self.entry_name, self.layout = lower_graph(graph, target)
        self.llvm_ir = str(module)
        self.jit = JitModule(self.llvm_ir)
        self.compile_seconds = time.perf_counter() - t0
        self.fn = ENTRY(self.jit.address(self.entry_name))
        assert ARENA_ALIGN % ALIGN == 0
        self.arenas = ArenaCache(lambda n: -(-self.layout.arena_bytes(n) // 4) * 4 + 4)

    def __call__(self, leaves: dict, n: int, first: int = 0) -> list:
        """Run on `leaves` (name -> C-contiguous array). Outputs are views into this thread's arena, valid
        until this thread's next call; Executable.__call__ copies them once."""
        ptrs = (ctypes.c_void_p * max(1, len(self.layout.arg_order)))(
            *[leaves[name].ctypes.data for name in self.layout.arg_order])
        arena = self.arenas.get(n).buffer.view(np.uint8)
        try:
            self.fn(ptrs, n, arena.ctypes.data, first)
        finally:
            self.arenas.release(n)
        outs = []
        for v in self.graph.outputs:
            s = self.layout.resolve(v.name)
            if s.kind == "arg":     # an output that is a leaf or a view of one (flatten(x)): its own shape
                outs.append(np.array(leaves[self.layout.arg_order[s.index]]).reshape(v.type.concrete(n)))
            else:
                off = n * s.per_sample + s.fixed        # bytes; the value's own dtype (f32, u8, ...)
                shape = v.type.concrete(n)
                outs.append(arena[off:off + v.type.nbytes(n)].view(v.type.np_dtype).reshape(shape))
        return outs


class LlvmExecutable(Executable):
    backend = "llvm"

    def __init__(self, graph, params=None, threads=None):
        super().__init__(graph, params)
        self.target = host_target()
        self.threads = threads or default_threads()
        self._pool = None
        self._pool_lock = threading.Lock()
        self.training = bool(graph.updates)
        t0 = time.perf_counter()
        # the thread count must never change the result: split only what the coupling analysis proves
        # per-sample; `split_blockers` says why a graph runs unsplit
        if self.training:
            self.split_blockers = training_split_blockers(graph)
        else:
            self.split_blockers = [reason for _, reason in coupling_nodes(graph)]
            if not all(t.batched for _, t in self.outputs) or not any(t.batched for _, t in self.inputs):
                self.split_blockers.append("an output or every input lacks the batch axis")
        self.split_training = self.training and self.threads > 1 and not self.split_blockers
        if self.split_training:
            from ir.training import split_training_step
            gg, ug = split_training_step(graph)
            self._grads, self._update = NativeGraph(gg, self.target), NativeGraph(ug, self.target)
            self._parts = [self._grads, self._update]
        else:
            self._main = NativeGraph(graph, self.target)
            self._parts = [self._main]
        self.compile_seconds = time.perf_counter() - t0
        self.llvm_ir = "\n".join(p.llvm_ir for p in self._parts)
        self.splittable = not self.training and not self.split_blockers

    @property
    def asm(self) -> str:
        return "\n".join(p.jit.asm for p in self._parts)

    def _leaves(self, arrays):
        leaves = {name: a for (name, _), a in zip(self.inputs, arrays)}
        leaves.update(self.state)
        leaves.update(self.consts)
        return leaves

    def _map_chunks(self, fn, chunks):
        if len(chunks) == 1:
            return [fn(*chunks[0])]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads)
        return list(self._pool.map(lambda c: fn(*c), chunks))

    def _chunks(self, n):
        k = max(1, min(self.threads, n))
        bounds = np.linspace(0, n, k + 1).astype(int)
        return [(int(bounds[i]), int(bounds[i + 1])) for i in range(k)]

    def run(self, arrays):
        n = next((a.shape[0] for a, (_, t) in zip(arrays, self.inputs) if t.batched), 1)
        if self.split_training:
            return self._train_step(arrays, n)
        if not self.splittable or self.threads == 1 or n < 2:
            return self._main(self._leaves(arrays), n)
        # a pool thread may run two chunks, reusing its arena: copy each chunk's outputs out of it
        parts = self._map_chunks(
            lambda a, b: [o.copy() for o in self._main(self._leaves([x[a:b] if t.batched else x
                                                                     for x, (_, t) in zip(arrays, self.inputs)]),
                                                       b - a, a)],
            self._chunks(n))
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]

    def _train_step(self, arrays, n):
        chunks = self._chunks(n)

        def grads(a, b):
            sl = [x[a:b] if t.batched else x for x, (_, t) in zip(arrays, self.inputs)]
            return [o.copy() for o in self._grads(self._leaves(sl), b - a, a)]   # see run()
        parts = self._map_chunks(grads, chunks)
        k_out = len(self.outputs)
        outs = []
        for k, (_, t) in enumerate(self.outputs):
            if t.batched:
                outs.append(np.concatenate([p[k] for p in parts]))
            else:       # chunk means -> batch mean
                outs.append(sum(p[k] * np.float32((b - a) / n) for p, (a, b) in zip(parts, chunks)))
        gnames = [v.name for v in self._grads.graph.outputs[k_out:]]
        combined = {}
        for j, name in enumerate(gnames):
            acc = parts[0][k_out + j] * np.float32((chunks[0][1] - chunks[0][0]) / n)
            for p, (a, b) in zip(parts[1:], chunks[1:]):
                acc += p[k_out + j] * np.float32((b - a) / n)
            combined[name] = np.ascontiguousarray(acc, np.float32)
        leaves = dict(self.state)
        leaves.update(self.consts)
        leaves.update(combined)
        # unbatched inputs (the learning rate) feed the update as they are
        leaves.update((name, a) for (name, t), a in zip(self.inputs, arrays) if not t.batched)
        self._update(leaves, 1)
        return outs


def compile_llvm(graph, params=None, threads=None, **_):
    """Compile an optimized graph to native code for this host."""
    return LlvmExecutable(graph, params, threads)
