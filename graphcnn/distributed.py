"""Data-parallel training over MPI (mpi4py): one model, the same result, on any number of processes.

    mpiexec -n 4 graphcnn train examples/mnist_cnn.py      # or: graphcnn train ... --workers 4
    gc.distributed.init(); model.fit(...)                  # in a script started by mpiexec

A training step is the split of ir.training.split_training_step: a gradient function run on chunks of
the batch, a fixed-order reduction of the chunk means and one optimizer call. One process runs its
chunks on threads; data parallel spreads the *global* chunks of each global batch over the ranks: rank
r computes the gradients of its contiguous run of chunks (on its threads); then a fixed-order
all-reduce: Alltoall gives rank q segment q of every chunk's flat gradient vector, rank q sums its
segment over the chunks left to right in global chunk order exactly as one process sums whole vectors
(backends.llvm.executable.combine_chunk_means; the sum is element-wise, so segmenting changes no bit),
and Allgather shares the summed segments. So N ranks x T threads is bit-identical to one process with
N*T threads (same seed, same global batch), and every rank holds the same weights.

MPI's own Allreduce is not used: its summation order depends on the MPI library, the algorithm it picks
and the rank count. Alltoall + Allgather moves the bytes of a ring all-reduce, 2(p-1)/p of the gradient
vector per rank (times the threads per rank for the first half). Buffers are contiguous float32 NumPy
arrays through the buffer protocol (uppercase calls): no pickling in the step. See docs/distributed.md for the limits (BatchNormalization, no overlap of reduction and
backward) and the scaling model."""
from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback

import numpy as np

from .errors import GraphcnnError

THREADS_ENV = "GRAPHCNN_THREADS"            # threads per process (backends/llvm/executable.py)
CHECK_ENV = "GRAPHCNN_DISTRIBUTED_CHECK"     # compare a digest of every rank's weights every K steps
BATCH_NORM_ENV = "GRAPHCNN_DISTRIBUTED_BATCH_NORM"   # "per_rank": BatchNormalization statistics per rank
BATCH_NORM_MODES = ("per_rank",)
# set by the MPI launchers (MPICH/Hydra and Intel MPI: PMI_SIZE; Open MPI; PMIx; Slurm's srun)
LAUNCHER_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")

_comm = None
_batch_norm = None          # None: a graph that couples the batch is refused; "per_rank"


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise GraphcnnError(f"graphcnn.distributed needs mpi4py and an MPI library ({e}); install them with "
                            f"pip install 'graphcnn[mpi]' (mpi4py and the mpich wheel, which ships mpiexec)") from None
    return MPI


def launched_by_mpi() -> bool:
    """True when this process was started by an MPI launcher (mpiexec/srun) with more than one rank."""
    for name in LAUNCHER_SIZE_ENV:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def init(comm=None, batch_norm=None):
    """Join the MPI job (COMM_WORLD, or `comm`); afterwards model.fit is data-parallel over its ranks.
    Installs an exception hook: an uncaught error on any rank prints that rank's message and aborts the
    whole job (MPI Abort), so no rank waits forever for one that died. Without GRAPHCNN_THREADS, each
    rank's executables use cores / (ranks on this host) threads, so the ranks do not oversubscribe the
    cores. batch_norm="per_rank" (or GRAPHCNN_DISTRIBUTED_BATCH_NORM=per_rank) trains models with
    BatchNormalization: batch statistics over each rank's shard, moving statistics averaged over the ranks
    (docs/distributed.md); without it such a model is refused. Returns the communicator."""
    global _comm, _batch_norm
    mode = batch_norm if batch_norm is not None else (os.environ.get(BATCH_NORM_ENV) or None)
    if mode is not None and mode not in BATCH_NORM_MODES:
        what = "init(batch_norm=...)" if batch_norm is not None else BATCH_NORM_ENV
        raise GraphcnnError(f"graphcnn.distributed: {what} must be one of {BATCH_NORM_MODES}, got {mode!r} "
                            f"(synchronized statistics are not implemented)")
    _batch_norm = mode if mode is not None else _batch_norm
    if _comm is not None and comm is None:
        return _comm
    MPI = _mpi()
    _comm = comm if comm is not None else MPI.COMM_WORLD
    if not os.environ.get(THREADS_ENV):
        local = _comm.Split_type(MPI.COMM_TYPE_SHARED)
        os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // local.Get_size()))
        local.Free()
    if _comm.Get_size() > 1:
        previous = sys.excepthook

        def abort_on_uncaught(kind, value, tb):
            previous(kind, value, tb)
            abort(value, print_traceback=False)
        sys.excepthook = abort_on_uncaught
    return _comm


def is_initialized() -> bool:
    return _comm is not None


def rank() -> int:
    """This process's rank (0 without init())."""
    return _comm.Get_rank() if _comm is not None else 0


def world_size() -> int:
    """Number of ranks (1 without init())."""
    return _comm.Get_size() if _comm is not None else 1


def is_root() -> bool:
    """True on the rank that prints and writes files (rank 0; also every single-process run)."""
    return rank() == 0


def abort(error, print_traceback=True):
    """Print `error` naming this rank and end every rank of the job (MPI Abort): used when a rank fails
    on its own, since the others would otherwise wait in the next collective call forever."""
    if print_traceback and isinstance(error, BaseException):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"graphcnn.distributed: rank {rank()} of {world_size()} failed: {type(error).__name__}: {error}; "
          f"aborting the job", file=sys.stderr, flush=True)
    if _comm is not None and _comm.Get_size() > 1:
        _comm.Abort(1)


def relaunch(n, args):
    """Replace this process by `mpiexec -n n python ARGS` (graphcnn train --workers n). mpiexec is the
    one next to this Python (the mpich wheel's) or on PATH."""
    import shutil
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        raise GraphcnnError(f"--workers {n}: no mpiexec next to {sys.executable} or on PATH; install one with "
                            f"pip install 'graphcnn[mpi]' (the mpich wheel ships mpiexec)")
    _mpi()          # refuse now, not on every rank, when mpi4py is missing
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(mpiexec, [mpiexec, "-n", str(int(n)), sys.executable] + list(args))


def data_parallel(requested) -> bool:
    """fit(distributed=...): None = data parallel when init() joined a job of more than one rank; True =
    init() now (refused when mpi4py is missing); False = this process trains alone."""
    if requested is None:
        return _comm is not None and _comm.Get_size() > 1
    if not isinstance(requested, bool):
        raise GraphcnnError(f"fit: distributed must be True, False or None, got {requested!r}")
    if requested:
        init()
    return requested


class ReplicaMismatch(GraphcnnError):
    """The ranks' weights differ (the GRAPHCNN_DISTRIBUTED_CHECK digest); raised on every rank alike."""


class DataParallelStep:
    """One training executable's step across the ranks of the job: shard(n) says which samples of a
    global batch of n this rank reads; calling it runs the step and returns this rank's batched outputs
    (its predictions) and the global losses. `compute_seconds`, `reduce_seconds`, `update_seconds`
    accumulate where the time goes."""

    def __init__(self, exe, comm=None):
        self.exe, self.comm = exe, comm if comm is not None else init()
        if not hasattr(exe, "enable_split"):
            raise GraphcnnError(f"distributed training runs on the LLVM backend; model compiled for backend "
                                f"{getattr(exe, 'backend', '?')!r} (compile(backend='llvm'))")
        try:
            exe.enable_split(whole_chunks=_batch_norm == "per_rank")
        except Exception as e:
            raise GraphcnnError(f"distributed training: {e}. BatchNormalization (batch statistics) couples "
                                f"the samples of a batch: gc.distributed.init(batch_norm='per_rank') or "
                                f"{BATCH_NORM_ENV}=per_rank computes them per rank (docs/distributed.md)") from None
        MPI = _mpi()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        threads = np.zeros(self.size, np.int64)
        self.comm.Allgather(np.array([exe.threads], np.int64), threads)
        # per-rank batch statistics: one chunk per rank, its whole shard (threads cannot split it)
        self.threads = [1] * self.size if exe.chunk_local else [int(t) for t in threads]
        self.first_slot = sum(self.threads[:self.rank])        # this rank's first global chunk
        self.slots = max(self.threads)                          # chunk slots per rank in the exchanged buffers
        # per chunk: losses, gradients, then the state the gradient function updated (moving statistics)
        self.chunk_state = exe.chunk_state_names
        self.shapes = exe.chunk_mean_shapes + [exe.state[name].shape for name in self.chunk_state]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.width = sum(self.sizes)                            # floats per chunk
        self.segment = -(-self.width // self.size)              # floats of the flat vector each rank sums
        self._send = np.zeros((self.size, self.slots, self.segment), np.float32)   # [to rank, slot, float]
        self._recv = np.zeros((self.size, self.slots, self.segment), np.float32)   # [from rank, slot, float]
        self._reduced = np.zeros((self.size, self.segment), np.float32)
        self._sum = MPI.SUM
        self.steps = 0
        self.check_every = _check_every()
        self.compute_seconds = self.reduce_seconds = self.update_seconds = 0.0

    def chunks(self, n) -> list:
        """The global chunk bounds of a batch of n: linspace over sum(threads) chunks, as one process with
        that many threads cuts it (empty chunks, when n is smaller, are no chunks), by chunk slot."""
        bounds = np.linspace(0, n, sum(self.threads) + 1).astype(int)
        return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(bounds) - 1)]

    def shard(self, n) -> tuple:
        """[lo, hi): the samples of a global batch of n this rank reads."""
        chunks = self.chunks(n)
        mine = chunks[self.first_slot:self.first_slot + self.threads[self.rank]]
        return mine[0][0], mine[-1][1]

    def __call__(self, batch, n) -> list:
        """One step on this rank's shard: `batch` holds the inputs by name, batched ones with the samples
        shard(n) of the global batch of n."""
        exe = self.exe
        t0 = time.perf_counter()
        chunks = self.chunks(n)
        mine = chunks[self.first_slot:self.first_slot + self.threads[self.rank]]
        work = [c for c in mine if c[1] > c[0]]
        lo = mine[0][0]
        # a rank with no samples (a batch smaller than the rank count) still joins the collective calls
        arrays = exe.check_inputs((), batch) if work else [np.asarray(batch[name]) for name, _ in exe.inputs]
        parts = exe.chunk_gradients(arrays, work, offset=lo) if work else []
        self._send[...] = 0.0
        flat = np.zeros(self.size * self.segment, np.float32)
        for slot, part in zip((i for i, c in enumerate(mine) if c[1] > c[0]), parts):
            values = exe.chunk_means(part) + [exe.state[name] for name in self.chunk_state]
            flat[:self.width] = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values])
            self._send[:, slot, :] = flat.reshape(self.size, self.segment)
        t1 = time.perf_counter()
        reduced = self._split(self._reduce(chunks, n))
        t2 = time.perf_counter()
        k_means, k_state = len(exe.mean_outputs), len(self.chunk_state)
        for name, value in zip(self.chunk_state, reduced[len(reduced) - k_state:]):
            exe.state[name][...] = value        # the ranks' moving statistics, weighted by shard size
        exe.apply_update(reduced[k_means:len(reduced) - k_state], arrays)
        outs = []
        means = iter(reduced[:k_means])
        for k, (_, t) in enumerate(exe.outputs):
            if t.batched:
                outs.append(np.concatenate([p[k] for p in parts]) if parts else
                            np.zeros((0,) + tuple(t.shape[1:]), np.float32))
            else:
                outs.append(next(means))
        t3 = time.perf_counter()
        self.compute_seconds += t1 - t0
        self.reduce_seconds += t2 - t1
        self.update_seconds += t3 - t2
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            check_replicas(exe.state, self.comm, f"after step {self.steps}")
        return outs

    def _reduce(self, chunks, n) -> np.ndarray:
        """The fixed-order sum of every global chunk's flat vector, bandwidth-optimal like a ring
        all-reduce: Alltoall hands rank q segment q of every chunk (a reduce-scatter's traffic), rank q
        sums its segment over the chunks in global order with combine_chunk_means (element-wise, so the
        bits are those of the whole-vector sum one process computes), and Allgather shares the sums."""
        from backends.llvm.executable import combine_chunk_means
        self.comm.Alltoall(self._send, self._recv)
        values, used = [], []
        for r in range(self.size):
            first = sum(self.threads[:r])
            for s in range(self.threads[r]):
                a, b = chunks[first + s]
                if b > a:
                    values.append([self._recv[r, s]])
                    used.append((a, b))
        mine = combine_chunk_means(values, used, n)[0]
        self.comm.Allgather(mine, self._reduced)
        return self._reduced.reshape(-1)[:self.width]

    def _split(self, flat) -> list:
        out, at = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(flat[at:at + size].reshape(shape).copy())     # the buffers are reused next step
            at += size
        return out

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over the ranks (float64; used for metric hit counts, which are whole numbers)."""
        send = np.ascontiguousarray(values, np.float64)
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, self._sum)
        return recv


def _check_every() -> int:
    value = os.environ.get(CHECK_ENV, "")
    if not value:
        return 0
    if not value.isdigit() or int(value) < 1:
        raise GraphcnnError(f"{CHECK_ENV} must be a whole number of steps >= 1, got {value!r}")
    return int(value)


def weights_digest(state) -> bytes:
    """SHA-256 of every state array (weights, optimizer slots, step) by name: equal on every rank."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    return h.digest()


def check_replicas(state, comm=None, when=""):
    """Raise GraphcnnError (on every rank alike) naming the ranks whose weights differ from rank 0's."""
    comm = comm if comm is not None else init()
    mine = np.frombuffer(weights_digest(state), np.uint8).copy()
    every = np.zeros((comm.Get_size(), mine.size), np.uint8)
    comm.Allgather(mine, every)
    bad = [r for r in range(1, comm.Get_size()) if not np.array_equal(every[r], every[0])]
    if bad:
        raise ReplicaMismatch(f"distributed training: the weights of rank(s) {bad} differ from rank 0's {when} "
                            f"({CHECK_ENV} check); the replicas diverged")


__all__ = ["init", "rank", "world_size", "is_root", "is_initialized", "launched_by_mpi", "abort", "relaunch",
           "DataParallelStep", "ReplicaMismatch", "check_replicas", "weights_digest"]
