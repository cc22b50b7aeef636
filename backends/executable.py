"""The backend-independent face of a compiled graph: input checking, state (params) and outputs."""
from __future__ import annotations

import threading

import numpy as np

from ir.graph import Graph
from ir.types import IRError


def _contiguous(a, dtype=None):
    """C-contiguous array of `dtype`, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.asarray(np.require(a, dtype=dtype, requirements="C"))


ARENA_ALIGN = 64                  # bytes; the LLVM kernels' vector loads assume it
ARENAS_PER_THREAD = 4             # arenas kept per thread, one per recent batch size
RETAIN_ARENA_BYTES = 64 << 20     # per thread; a bigger arena is freed after its call


class Arena:
    """One planned arena: `buffer` (uint8, ARENA_ALIGN-aligned) and `views`, a dict a backend may use to
    keep views into it (they stay valid as long as the arena is cached)."""

    def __init__(self, nbytes: int):
        raw = np.empty(nbytes + ARENA_ALIGN, np.uint8)
        start = (-raw.ctypes.data) % ARENA_ALIGN
        self.buffer = raw[start:start + nbytes]
        self.views = {}


class ArenaCache:
    """Per-thread arenas by batch size, for one compiled graph (concurrent calls never share one).

    Arenas are kept for reuse while a thread's cached arenas stay within RETAIN_ARENA_BYTES; an arena
    for a larger batch is used for its one call and then dropped (`release`), so one large predict does
    not leave gigabytes resident. Outputs that are views into a dropped arena keep it alive only until
    they are copied out (Executable.__call__)."""

    def __init__(self, arena_bytes):
        self._arena_bytes = arena_bytes       # batch -> bytes
        self._local = threading.local()

    def _cache(self) -> dict:
        cache = getattr(self._local, "arenas", None)
        if cache is None:
            cache = self._local.arenas = {}
            self._local.total = 0           # bytes in `cache`, kept so release() costs nothing per call
        return cache

    def get(self, batch: int) -> Arena:
        cache = self._cache()
        arena = cache.get(batch)
        if arena is None:
            arena = cache[batch] = Arena(max(int(self._arena_bytes(batch)), 1))
            self._local.total += arena.buffer.nbytes
            while len(cache) > ARENAS_PER_THREAD:
                self._local.total -= cache.pop(next(iter(cache))).buffer.nbytes
        return arena

    def release(self, batch: int) -> None:
        """After a call at `batch`: drop this thread's arenas beyond RETAIN_ARENA_BYTES, largest first."""
        cache = self._cache()
        if self._local.total <= RETAIN_ARENA_BYTES:
            return
        while cache and self._local.total > RETAIN_ARENA_BYTES:
            self._local.total -= cache.pop(max(cache, key=lambda k: cache[k].buffer.nbytes)).buffer.nbytes

    def resident_bytes(self) -> int:
        """Bytes of arenas this thread keeps between calls."""
        return sum(a.buffer.nbytes for a in self._cache().values())


def run_keeping_state(state: dict, run, accept):
    """(run(), accepted): the arrays of `state` (updated in place by run) are copied first and put back
    when accept(outputs) is false."""
    backup = {k: v.copy() for k, v in state.items()}
    outputs = run()
    if accept(outputs):
        return outputs, True
    for k, v in backup.items():
        state[k][...] = v
    return outputs, False


class ExecutionError(RuntimeError):
    """A compiled function failed at run time."""


class Executable:
    """A compiled graph. Call with arrays by input name (or positionally in input order); returns one
    array or a tuple. Params live in `state` (name -> float32 array) and are updated in place by the
    graph's `updates` (a training step)."""

    backend = "?"

    def __init__(self, graph: Graph, params: dict | None = None, compute_dtype=np.float32, frozen_params=False):
        """frozen_params: the caller never changes a param's values after this (gc.load's Runtime). The
        executable then holds read-only copies of the params and constants (an in-place write raises
        instead of going unseen) and a backend may prepare them once (the LLVM backend pre-packs GEMM
        weights); assigning a new array to `state[name]` still works."""
        if not isinstance(frozen_params, bool):
            raise TypeError(f"compile: frozen_params must be a bool, got {frozen_params!r}")
        if frozen_params and graph.updates:
            raise IRError(f"compile: graph {graph.name!r} updates its params (a training step); "
                          f"frozen_params=True is for graphs that only read them")
        self.frozen_params = frozen_params
        self.graph = graph
        # float64 is a reference mode for tests (finite differences); artifacts always use float32
        self.compute_dtype = np.dtype(compute_dtype)
        self.name = graph.name
        self.inputs = [(v.name, v.type) for v in graph.inputs]
        self.outputs = [(v.name, v.type) for v in graph.outputs]
        self._output_dtypes = [self.compute_dtype if t.dtype == "f32" else np.dtype(t.np_dtype)
                               for _, t in self.outputs]
        self.consts = {k: _contiguous(v) for k, v in graph.consts.items()}
        self.state = {}
        params = params or {}
        unknown = set(params) - {p.name for p in graph.params}
        if unknown:
            raise IRError(f"compile: values given for unknown params {sorted(unknown)}")
        for p in graph.params:
            if p.name in params:
                self.state[p.name] = self._coerce(p.name, params[p.name], p.type, "param", dtype=self.compute_dtype)
            else:
                self.state[p.name] = np.zeros(p.shape, self.compute_dtype)
        if self.compute_dtype != np.float32:
            self.consts = {k: v.astype(self.compute_dtype) if v.dtype.kind == "f" else v
                           for k, v in self.consts.items()}
        if frozen_params:
            for leaves in (self.state, self.consts):
                for k, v in leaves.items():
                    leaves[k] = v = np.array(v, copy=True)
                    v.flags.writeable = False

    @staticmethod
    def _coerce(name, arr, t, what, batch=None, dtype=np.float32):
        a = np.asarray(arr)
        if a.dtype.kind not in "fiub":
            raise ValueError(f"{what} {name!r}: expected numbers, got dtype {a.dtype}")
        want = dtype if t.dtype == "f32" else t.np_dtype
        if a.ndim != t.rank or any(d is not None and d != s for d, s in zip(t.shape, a.shape)):
            raise ValueError(f"{what} {name!r}: expected shape {t.shape} (None = any batch), got {a.shape}")
        if batch is not None and t.batched and a.shape[0] != batch:
            raise ValueError(f"{what} {name!r}: batch size {a.shape[0]} differs from the other inputs' {batch}")
        return _contiguous(a, want)

    def check_inputs(self, args, kwargs) -> list:
        """Validate and convert inputs (names, shapes, dtypes, one batch size) before any native call."""
        names = [n for n, _ in self.inputs]
        if len(args) > len(names):
            raise TypeError(f"{self.name}: takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in given:
                raise TypeError(f"{self.name}: input {k!r} given twice")
            given[k] = v
        missing = [n for n in names if n not in given]
        extra = [k for k in given if k not in names]
        if missing or extra:
            raise TypeError(f"{self.name}: missing inputs {missing} / unknown inputs {extra}; "
                            f"expected {', '.join(names)}")
        out, batch = [], None
        for n, t in self.inputs:
            a = self._coerce(n, given[n], t, "input", batch, self.compute_dtype)
            if t.batched:
                if a.shape[0] < 1:
                    raise ValueError(f"input {n!r}: batch size must be >= 1")
                batch = a.shape[0]
            out.append(a)
        return out

    def _ready_input(self, args, kwargs):
        """The single input array when it needs no checking beyond what is looked at here (an ndarray of
        the compute dtype, C-contiguous, the declared shape, batch >= 1), else None. This keeps the
        generic checks off the path of the common call exe(x)."""
        if len(self.inputs) != 1 or len(args) + len(kwargs) != 1:
            return None
        name, t = self.inputs[0]
        a = args[0] if args else kwargs.get(name)
        if (type(a) is np.ndarray and a.dtype == self.compute_dtype and a.flags.c_contiguous
                and a.ndim == t.rank and a.shape[1:] == t.shape[1:] and t.batched and a.shape[0] >= 1):
            return [a]
        return None

    def __call__(self, *args, **kwargs):
        arrays = self._ready_input(args, kwargs) or self.check_inputs(args, kwargs)
        # float outputs in the compute dtype; int8 / int32 outputs keep their own (a fresh array either way:
        # the backend's results are views into its arena)
        outs = [o.copy() if o.dtype == want else o.astype(want)
                for o, want in zip(self.run(arrays), self._output_dtypes)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def train_step(self, accept, *args, **kwargs):
        """One call of a training graph whose state updates are kept only when accept(outputs) is true
        (fit refuses a NaN or diverging loss and keeps the weights from before that step): -> (outputs as
        __call__ returns them, accepted). accept sees the raw outputs (valid during the call)."""
        arrays = self._ready_input(args, kwargs) or self.check_inputs(args, kwargs)
        raw, accepted = self._run_guarded(arrays, accept)
        outs = [o.copy() if o.dtype == want else o.astype(want) for o, want in zip(raw, self._output_dtypes)]
        return (outs[0] if len(outs) == 1 else tuple(outs)), accepted

    def _run_guarded(self, arrays, accept):
        """run() with the state put back when accept(outputs) is false (run_keeping_state; backends that
        see the outputs before they update the state skip the copy)."""
        return run_keeping_state(self.state, lambda: self.run(arrays), accept)

    def run(self, arrays: list) -> tuple:
        raise NotImplementedError
