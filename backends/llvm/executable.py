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
import functools
import itertools
import operator
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ir.passes.batch_coupling import coupling_nodes, training_split_blockers
from ir.types import IRError

from ..executable import ARENA_ALIGN, ArenaCache, Executable, _contiguous
from .codegen import lower_graph
from .compile_pool import KernelCompiler
from .export import add_runtime_api
from .jit import JitModule, host_target
from .layout import ALIGN
from . import thread_pool

ENTRY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


def default_threads() -> int:
    env = os.environ.get("GRAPHCNN_THREADS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


def _address(a: np.ndarray) -> int:
    """The data address of a C-contiguous array (through the buffer protocol when it is writable: a
    third of the cost of a.ctypes.data, which matters at batch 1)."""
    if a.flags.writeable:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    return a.ctypes.data


def _tuple_getter(names):
    """d -> (d[name] for name in names) as a tuple (operator.itemgetter, which returns a bare item for one
    name)."""
    if len(names) == 1:
        name = names[0]
        return lambda d: (d[name],)
    return operator.itemgetter(*names) if names else (lambda d: ())


class RuntimeApi:
    """A NativeGraph's one-call path (export.add_runtime_api): the .so's NAME_run_threads in the JIT module,
    its leaf table filled from the executable's arrays (re-filled when one is replaced; packed buffers
    from NativeGraph.packed) and its pool pointer set to the process claim pool. A call is one native
    call: per-sample batches in claimed chunks, batch 1 with the conv kernels claimed piecewise, outputs
    written straight into a fresh array; bit-identical to the single-threaded entry."""
    CALL = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_bool, ctypes.c_int32)

    def __init__(self, native, api, threads):
        shape, table, pool_ptr, symbol = api
        # the C API refuses more than MAX_THREADS (64) threads; more would not help its chunks anyway
        self.native, self.shape, self.threads = native, shape, min(int(threads), thread_pool.MAX_THREADS)
        self.fn = self.CALL(native.jit.address(symbol))
        self.order = table.order
        self.table = (ctypes.c_void_p * max(1, len(self.order))).from_address(native.jit.global_address(table.symbol))
        if pool_ptr is not None:
            ctypes.c_void_p.from_address(native.jit.global_address(pool_ptr.symbol)).value = \
                thread_pool.process_claim_pool()
        packed = native.layout.packed
        # the arrays whose identity decides whether the table is current: each leaf, or a packed one's sources
        self.watched = sorted({s for name in self.order for s in (packed[name].sources if name in packed else (name,))})
        self.held = self.retired = None
        self._getters = None        # _watched_arrays' lookups, made at the first call
        self.lock = threading.Lock()
        self.out_shape = tuple(shape.output_dims)
        self.workspaces = ArenaCache(lambda n: self.shape.workspace_size_threads(n, self.threads))

    def _watched_arrays(self, state, consts) -> tuple:
        """The watched arrays now, from the executable's params/state and constants (one C-level lookup
        each: this runs on every call)."""
        getters = self._getters
        if getters is None:
            in_state = [name for name in self.watched if name in state]
            getters = self._getters = (_tuple_getter(in_state),
                                       _tuple_getter([name for name in self.watched if name not in state]))
        return getters[0](state) + getters[1](consts)

    def _refresh(self, state, consts):
        arrays = self._watched_arrays(state, consts)
        held = self.held
        if held is not None and all(map(operator.is_, arrays, held)):
            return
        leaves = {**state, **consts}
        with self.lock:
            packed = self.native.layout.packed
            for i, name in enumerate(self.order):
                a = self.native.packed(name, leaves) if name in packed else leaves[name]
                self.table[i] = a.ctypes.data
            # keeps them alive while the table points at them; the previous ones too, for a call another
            # thread started before this refresh (replacing params during a predict is still a race)
            self.retired, self.held = self.held, arrays

    def __call__(self, state, consts, x, n: int) -> np.ndarray:
        self._refresh(state, consts)
        ws = self.workspaces.get(n)
        at = ws.views.get("address")
        if at is None:
            at = ws.views["address"] = (ws.buffer.ctypes.data, ws.buffer.nbytes)
        out = np.empty((n,) + self.out_shape, np.float32)
        try:
            rc = self.fn(_address(x), n, _address(out), at[0], at[1], True, self.threads)
        finally:
            self.workspaces.release(n)
        if rc != 0:     # the C API's checks (export.ERR_*); the runtime's own checks make these unreachable
            why = {2: f"batch {n} is outside 1..{self.shape.max_batch}",
                   3: f"the workspace for batch {n} is too small"}.get(rc, f"error code {rc}")
            raise RuntimeError(f"native call of graph {self.native.graph.name!r}: {why}")
        return out


class NativeGraph:
    """One graph compiled to one native function, with per-thread, per-batch-size arenas."""

    def __init__(self, graph, target, team_parts=1, prepack=False, api_threads=0):
        if getattr(graph, "memory_plan", None) is None:
            from ir.passes.plan_memory import plan_memory
            graph = plan_memory(graph)
        self.graph = graph
        t0 = time.perf_counter()
        # api_threads: an inference graph of the C API's shape also gets the .so's threaded call
        # (RuntimeApi), whose batch-1 team is the claim variant on the process claim pool
        api_threads = 0 if graph.updates else api_threads
        claim = api_threads > 1 and thread_pool.available()
        # every kernel a module of its own: cached apart and compiled by worker processes while the rest
        # of the graph is lowered (compile_pool)
        compiler = KernelCompiler()
        try:
            module, self.entry_name, self.layout = lower_graph(
                graph, target, team="claim" if claim else team_parts > 1, prepack=prepack, compiler=compiler)
            api = None
            if api_threads:
                try:
                    api = add_runtime_api(module, graph, self.layout, self.entry_name, pooled=api_threads > 1)
                except ValueError:      # not one batched f32 input and output: the BoundCall path only
                    api = None
            main_ir = str(module)
            objects = compiler.finish()
        finally:
            compiler.close()            # a lowering that failed half-way leaves kernels queued
        if claim:
            team_parts = 1              # the claim team runs only through the API
        self.jit = JitModule(main_ir, objects=objects, kernel_irs=compiler.texts)
        self.kernels_cached = sum(compiler.cached)      # of len(compiler.texts) kernel modules
        self.llvm_ir = "\n".join([main_ir] + compiler.texts)
        self.compile_seconds = time.perf_counter() - t0
        self.fn = ENTRY(self.jit.address(self.entry_name))
        # pre-packed weights (layout.packed): packed on a call that finds a source leaf it has not seen
        self._packers = {name: self.jit.address(p.kernel) for name, p in self.layout.packed.items()}
        self._packed = {}           # name -> (source arrays, packed bytes)
        self._pack_lock = threading.Lock()
        assert ARENA_ALIGN % ALIGN == 0
        self.arenas = ArenaCache(lambda n: -(-self.layout.arena_bytes(n) // 4) * 4 + 4)
        # intra-op parallelism (thread_pool): the team entry and arenas with one scratch region per worker
        self.team_parts = team_parts if self.layout.team_entry_name and not claim else 1
        if self.team_parts > 1:
            self.team_fn = self.jit.address(self.layout.team_entry_name)
            self.pool_run = thread_pool.process_pool()
            self.team_arenas = ArenaCache(
                lambda n: thread_pool.team_arena_bytes(self.layout, n, self.team_parts) + 4)
        self.api = RuntimeApi(self, api, api_threads) if api is not None else None

    def packed(self, name: str, leaves: dict) -> np.ndarray:
        """The packed buffer `name` for the source arrays in `leaves` (packed now unless the same arrays
        were packed before; the caller guarantees their values do not change: frozen params)."""
        info = self.layout.packed[name]
        sources = tuple(leaves[s] for s in info.sources)
        with self._pack_lock:
            have = self._packed.get(name)
            if have is not None and all(a is b for a, b in zip(have[0], sources)):
                return have[1]
            out = info.pack(self._packers[name], sources)
            self._packed[name] = (sources, out)
            return out

    def run_team(self, leaves: dict, n: int, first: int = 0) -> list:
        """__call__ with the GEMM kernels split across the process pool's workers (bit-identical to the
        single-threaded call). When the pool is busy with another call, this one runs single-threaded in
        its own (team) arena."""
        arena = self.team_arenas.get(n)
        bound = arena.views.get("bound")
        if bound is None:
            bound = arena.views["bound"] = BoundCall(self, arena, n)
        try:
            bound.run_team(self, leaves, n, first)
        finally:
            self.team_arenas.release(n)
        return bound.outputs(leaves, n)

    def __call__(self, leaves: dict, n: int, first: int = 0) -> list:
        """Run on `leaves` (name -> C-contiguous array). Outputs are views into this thread's arena, valid
        until this thread's next call; Executable.__call__ copies them once."""
        arena = self.arenas.get(n)
        bound = arena.views.get("bound")
        if bound is None:
            bound = arena.views["bound"] = BoundCall(self, arena, n)
        try:
            bound.run(self.fn, leaves, n, first)
        finally:
            self.arenas.release(n)
        return bound.outputs(leaves, n)


class BoundCall:
    """One NativeGraph call prepared for one arena (so one thread and one batch size): the argument
    pointer array, whose entries are refreshed only when a leaf array changes (params and constants keep
    theirs across calls), and the output views into the arena, built once. This is what brings a Python
    call close to a direct call of the native function."""

    def __init__(self, native: NativeGraph, arena, n: int):
        names = native.layout.arg_order
        inputs = {v.name for v in native.graph.inputs}
        packed = native.layout.packed
        # inputs change every call; params and constants are checked by identity and keep their pointer;
        # a packed buffer is re-fetched (native.packed) when one of its sources changes
        self.native = native
        self.input_slots = [(i, name) for i, name in enumerate(names) if name in inputs]
        self.fixed_slots = [(i, name) for i, name in enumerate(names) if name not in inputs and name not in packed]
        self.fixed_arrays = [None] * len(self.fixed_slots)
        self.packed_slots = [(i, name, packed[name].sources) for i, name in enumerate(names) if name in packed]
        self.packed_arrays = [()] * len(self.packed_slots)
        self.ptrs = (ctypes.c_void_p * max(1, len(names)))()
        self.arena_address = arena.buffer.ctypes.data
        raw = arena.buffer.view(np.uint8)
        self.views = []         # per output: a view into the arena, or (arg name, shape) for a leaf
        for v in native.graph.outputs:
            s = native.layout.resolve(v.name)
            shape = v.type.concrete(n)
            if s.kind == "arg":     # an output that is a leaf or a view of one (flatten(x)): its own shape
                self.views.append((names[s.index], shape))
            else:
                off = n * s.per_sample + s.fixed        # bytes; the value's own dtype (f32, u8, ...)
                self.views.append(raw[off:off + v.type.nbytes(n)].view(v.type.np_dtype).reshape(shape))

    def run(self, fn, leaves, n, first):
        ptrs, held = self.ptrs, self.fixed_arrays
        for i, name in self.input_slots:
            ptrs[i] = leaves[name].ctypes.data
        for k, (i, name) in enumerate(self.fixed_slots):
            a = leaves[name]
            if a is not held[k]:        # first call, or a param array replaced: take its address (the held
                held[k] = a             # reference keeps the old one from being freed and its id reused)
                ptrs[i] = a.ctypes.data
        for k, (i, name, sources) in enumerate(self.packed_slots):
            have = self.packed_arrays[k]
            if not have or any(leaves[s] is not a for s, a in zip(sources, have[0])):
                out = self.native.packed(name, leaves)
                self.packed_arrays[k] = (tuple(leaves[s] for s in sources), out)
                ptrs[i] = out.ctypes.data
        fn(ptrs, n, self.arena_address, first)

    def run_team(self, native, leaves, n, first):
        self.run(lambda *a: None, leaves, n, first)         # refresh the argument pointers
        if not native.pool_run(native.team_fn, ctypes.addressof(self.ptrs), n, self.arena_address, first,
                               native.team_parts):
            native.fn(self.ptrs, n, self.arena_address, first)

    def outputs(self, leaves, n) -> list:
        return [np.array(leaves[v[0]]).reshape(v[1]) if isinstance(v, tuple) else v for v in self.views]


class LlvmExecutable(Executable):
    backend = "llvm"

    def __init__(self, graph, params=None, threads=None, frozen_params=False):
        super().__init__(graph, params, frozen_params=frozen_params)
        self.target = host_target()
        self.threads = threads or default_threads()
        self._pool = None
        self._pool_lock = threading.Lock()
        self.training = bool(graph.updates)
        self._input_names = [name for name, _ in self.inputs]
        self._first_batched = bool(self.inputs) and self.inputs[0][1].batched
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
            self._compile_split()
        else:
            # intra-op parallelism (opt-in, GRAPHCNN_INTRA_OP=1): a batch smaller than the thread count
            # splits the GEMM kernels' output rows across native pool workers instead of running on one core
            intra = not self.training and self.threads > 1 and thread_pool.intra_op_enabled()
            self._main = NativeGraph(graph, self.target, team_parts=self.threads if intra else 1,
                                     prepack=frozen_params and not self.training,
                                     api_threads=0 if self.training or intra else self.threads)
            self._parts = [self._main]
        self.compile_seconds = time.perf_counter() - t0
        self.llvm_ir = "\n".join(p.llvm_ir for p in self._parts)
        self.splittable = not self.training and not self.split_blockers

    def _compile_split(self, whole_chunks=False):
        from ir.training import split_training_step
        gg, ug = split_training_step(self.graph, whole_chunks=whole_chunks)
        self._grads, self._update = NativeGraph(gg, self.target), NativeGraph(ug, self.target)
        self._parts = [self._grads, self._update]

    def enable_split(self, whole_chunks=False):
        """Compile the gradient/update split even for one thread (data-parallel training across processes
        runs it: graphcnn.distributed). A graph that couples the batch is refused (IRError naming the
        blockers) unless whole_chunks: the caller then runs one chunk per rank, with chunk-local batch
        statistics, and `chunk_local` is True (see ir.training.split_training_step)."""
        if not self.training:
            raise IRError(f"{self.name}: not a training graph (no state updates); nothing to split")
        if self.split_blockers and not whole_chunks:
            raise IRError(f"{self.name}: the training step cannot be split across batch chunks: "
                          + "; ".join(self.split_blockers))
        if not hasattr(self, "_grads"):
            self._compile_split(whole_chunks=bool(self.split_blockers))
            self.chunk_local = bool(self.split_blockers)
            self.llvm_ir = "\n".join(p.llvm_ir for p in self._parts)

    chunk_local = False     # True: the split's gradient function couples its chunk (enable_split)

    @property
    def chunk_state_names(self) -> list:
        """State the gradient function itself updates (chunk_local: BatchNormalization moving statistics)."""
        return list(self._grads.graph.updates)

    @property
    def gradient_names(self) -> list:
        """Names of the gradients the split's gradient function returns after the graph's outputs."""
        return [v.name for v in self._grads.graph.outputs[len(self.outputs):]]

    @property
    def asm(self) -> str:
        return "\n".join(p.jit.asm for p in self._parts)

    def _leaves(self, arrays):
        leaves = {**self.state, **self.consts}
        leaves.update(zip(self._input_names, arrays))
        return leaves

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads)
        return self._pool

    def _map_chunks(self, fn, chunks):
        if len(chunks) == 1:
            return [fn(*chunks[0])]
        return list(self._executor().map(lambda c: fn(*c), chunks))

    def _chunks(self, n):
        k = max(1, min(self.threads, n))
        bounds = np.linspace(0, n, k + 1).astype(int)
        return [(int(bounds[i]), int(bounds[i + 1])) for i in range(k)]

    def _batch(self, arrays) -> int:
        """The call's batch size: the first batched input's leading dimension (1 without one)."""
        return arrays[0].shape[0] if self._first_batched else \
            next((a.shape[0] for a, (_, t) in zip(arrays, self.inputs) if t.batched), 1)

    def run(self, arrays):
        n = self._batch(arrays)
        if self.split_training:
            return self._train_step(arrays, n)
        if n < self.threads and self._main.team_parts > 1:
            return self._main.run_team(self._leaves(arrays), n)
        if not self.splittable or self.threads == 1 or n < 2:
            return self._main(self._leaves(arrays), n)
        return self._run_chunks(arrays, n)

    def __call__(self, *args, **kwargs):
        # the one-call path (RuntimeApi) writes its output into a fresh array: nothing to copy, so it
        # bypasses Executable.__call__ (and run, which serves every other graph)
        api = None if self.split_training else self._main.api
        if api is None:
            return super().__call__(*args, **kwargs)
        arrays = self._ready_input(args, kwargs) or self.check_inputs(args, kwargs)
        return api(self.state, self.consts, arrays[0], arrays[0].shape[0])

    def _run_chunks(self, arrays, n):
        """A per-sample batch on `threads` threads, as the exported .so splits it: chunks of at most
        CHUNK_IMAGES images, claimed one at a time by the pool threads and this one, each run in its
        thread's (cache-sized) arena and copied into its rows of the results, so a descheduled thread
        holds up one chunk, not half the batch. Every image's arithmetic is the same in any chunk."""
        size = thread_pool.chunk_images(n, self.threads)
        count = -(-n // size)
        outs = [np.empty(t.concrete(n), t.np_dtype) for _, t in self.outputs]
        batched = [t.batched for _, t in self.inputs]
        claim = itertools.count()          # next() is atomic under the GIL

        def work():
            for c in iter(claim.__next__, None):
                if c >= count:
                    return
                a, b = c * size, min((c + 1) * size, n)
                # the chunk's outputs are views into this thread's arena, valid until its next call
                res = self._main(self._leaves([x[a:b] if bt else x for x, bt in zip(arrays, batched)]), b - a, a)
                for o, r in zip(outs, res):
                    o[a:b] = r

        pool = self._executor()
        helpers = [pool.submit(work) for _ in range(min(self.threads, count) - 1)]
        work()
        for f in helpers:
            f.result()
        return outs

    def _run_guarded(self, arrays, accept):
        # the split step sees its loss before the update graph runs: nothing to copy back, unless the
        # gradient function updates state itself
        if not self.split_training or self._grads.graph.updates:
            return super()._run_guarded(arrays, accept)
        return self._train_step(arrays, self._batch(arrays), accept)

    def _train_step(self, arrays, n, accept=None):
        """The split step on this process's threads: each chunk's batched outputs go straight into their
        rows of the results and its chunk means (losses, gradients) into one flat float32 row, so the
        weighted combination is two array operations — combine_chunk_means' arithmetic, element for
        element (same products, same left-to-right sums in float32), hence the same bits. With `accept`
        (train_step): -> (outputs, accepted), the update applied only when accept(outputs) is true."""
        chunks = self._chunks(n)
        layout = self._flat_layout
        outs = [np.empty(t.concrete(n), t.np_dtype) if t.batched else None for _, t in self.outputs]
        flats = np.empty((len(chunks), layout[-1][0] + layout[-1][1] if layout else 0), np.float32)
        k_out, means = len(self.outputs), self.mean_outputs
        batched = [k for k, (_, t) in enumerate(self.outputs) if t.batched]

        def grads(c, a, b):
            sl = [x[a:b] if t.batched else x for x, (_, t) in zip(arrays, self.inputs)]
            res = self._grads(self._leaves(sl), b - a, a)        # views into this thread's arena
            for k in batched:
                outs[k][a:b] = res[k]
            row = flats[c]
            for (off, size, _), r in zip(layout, [res[k] for k in means] + res[k_out:]):
                row[off:off + size] = r.reshape(-1)
        self._map_chunks(grads, [(c, a, b) for c, (a, b) in enumerate(chunks)])
        acc = flats[0] * np.float32((chunks[0][1] - chunks[0][0]) / n)
        for row, (a, b) in zip(flats[1:], chunks[1:]):
            acc += row * np.float32((b - a) / n)
        reduced = [acc[off:off + size].reshape(shape) for off, size, shape in layout]
        for k, v in zip(means, reduced):
            outs[k] = v
        if accept is not None and not accept(outs):
            return outs, False
        self.apply_update(reduced[len(means):], arrays)
        return outs if accept is None else (outs, True)

    @functools.cached_property
    def _flat_layout(self) -> list:
        """(offset, size, shape) of each chunk mean (chunk_mean_shapes order) in _train_step's flat row."""
        layout, off = [], 0
        for shape in self.chunk_mean_shapes:
            size = int(np.prod(shape, dtype=np.int64))
            layout.append((off, size, shape))
            off += size
        return layout

    @property
    def mean_outputs(self) -> list:
        """Indices of the unbatched outputs (the losses): chunk means, combined like the gradients."""
        return [k for k, (_, t) in enumerate(self.outputs) if not t.batched]

    @property
    def chunk_mean_shapes(self) -> list:
        """Shapes of chunk_means(part): the unbatched outputs, then the gradients."""
        outs = self._grads.graph.outputs
        return [tuple(outs[k].shape) for k in self.mean_outputs] + [tuple(v.shape) for v in outs[len(self.outputs):]]

    def chunk_gradients(self, arrays, chunks, offset=0) -> list:
        """Run the gradient function on each chunk (a, b) of the batch, one chunk per pool thread. `arrays`
        hold samples [offset, offset + len) of the batch; a and b index the whole batch (the dropout and
        augmentation draws hash that index). Per chunk: the graph's outputs, then the gradients (copies)."""
        def grads(a, b):
            sl = [x[a - offset:b - offset] if t.batched else x for x, (_, t) in zip(arrays, self.inputs)]
            return [o.copy() for o in self._grads(self._leaves(sl), b - a, a)]   # see run()
        return self._map_chunks(grads, chunks)

    def chunk_means(self, part) -> list:
        """The parts of one chunk's results that combine by weighted sum: unbatched outputs, then gradients."""
        k_out = len(self.outputs)
        return [part[k] for k in self.mean_outputs] + list(part[k_out:])

    def apply_update(self, grads, arrays):
        """One optimizer call with the combined gradients (in gradient_names order); unbatched inputs
        (the learning rate) feed the update as they are."""
        leaves = dict(self.state)
        leaves.update(self.consts)
        leaves.update(zip(self.gradient_names, grads))
        leaves.update((name, a) for (name, t), a in zip(self.inputs, arrays) if not t.batched)
        self._update(leaves, 1)


def combine_chunk_means(values, chunks, n) -> list:
    """sum_i (n_i / n) * values[i][j] for each quantity j, in chunk order, left to right in float32: the one
    fixed-order reduction of chunk means (threads here, ranks in graphcnn.distributed), so a step's result
    depends on the chunk bounds only, never on timing. values[i] = chunk i's list of arrays."""
    out = []
    for j in range(len(values[0])):
        acc = values[0][j] * np.float32((chunks[0][1] - chunks[0][0]) / n)
        for v, (a, b) in zip(values[1:], chunks[1:]):
            acc += v[j] * np.float32((b - a) / n)
        out.append(_contiguous(acc, np.float32))    # keeps 0-d values (the losses) 0-d
    return out


def compile_llvm(graph, params=None, threads=None, frozen_params=False, **_):
    """Compile an optimized graph to native code for this host (frozen_params: see Executable)."""
    return LlvmExecutable(graph, params, threads, frozen_params)
