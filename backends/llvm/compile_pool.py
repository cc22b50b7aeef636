"""Kernel modules compiled to machine code in parallel, each cached on its own.

codegen lowers every kernel of a graph into its own LLVM module (KernelCache with a KernelCompiler),
named by a hash of its IR, so a kernel is one JIT cache entry: a new network that shares kernels with a
cached one compiles only what is new, and the training step, the evaluation graph and predict share the
kernels they have in common. llvmlite serializes every LLVM call of a process behind one lock, so the
parallelism comes from worker processes: this file run as a script is a worker (IR in, object code out,
on its pipes). A kernel goes to a free worker as soon as it is lowered, while the parent lowers the
next one; at finish() the parent compiles what is still queued itself. Every object comes from
jit.compile_object, so where a kernel was compiled never changes its code (tests check this).

GRAPHCNN_COMPILE_WORKERS sets the number of worker processes (default: CPUs - 1; 0 compiles in-process).
A worker that fails or dies costs only speed: its kernel is compiled in-process.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import struct
import subprocess
import sys
import threading

if __package__:
    from . import jit
else:       # started as a worker script: only jit.py beside this file (the package __init__ imports numpy ...)
    import jit

WORKERS_ENV = "GRAPHCNN_COMPILE_WORKERS"
MAX_WORKERS = 8
IDLE_SECONDS = 10.0         # idle workers stop this long after their last kernel
# the name a kernel is built under in its own module; submit() replaces it by the kernel's hashed symbol
PLACEHOLDER = "__graphcnn_kernel__"
DISPATCHER_NAME = "graphcnn-compile-dispatch"
_HEAD = struct.Struct("<IQ")        # frame: header length (JSON), payload length, then both


def _write_frame(stream, header: dict, payload: bytes) -> None:
    head = json.dumps(header).encode()
    stream.write(_HEAD.pack(len(head), len(payload)) + head + payload)
    stream.flush()


def _read_exact(stream, n: int) -> bytes | None:
    data = stream.read(n) if n else b""
    return data if len(data) == n else None


def _read_frame(stream):
    """(header dict, payload bytes), or None at end of stream or on a short frame."""
    fixed = _read_exact(stream, _HEAD.size)
    if fixed is None:
        return None
    head_len, payload_len = _HEAD.unpack(fixed)
    head, payload = _read_exact(stream, head_len), _read_exact(stream, payload_len)
    if head is None or payload is None:
        return None
    return json.loads(head), payload


def serve(stdin, stdout) -> None:
    """A worker's loop: a frame {cpu, features, opt} + IR in, a frame {ok} + object out, until EOF."""
    while True:
        frame = _read_frame(stdin)
        if frame is None:
            return
        header, payload = frame
        try:
            target = jit.make_target(header["cpu"], header["features"])
            obj = jit.compile_object(payload.decode(), int(header["opt"]), target)
            _write_frame(stdout, {"ok": True}, obj)
        except Exception as e:      # reported to the parent, which compiles the kernel itself
            _write_frame(stdout, {"ok": False, "error": f"{type(e).__name__}: {e}"}, b"")


def worker_count() -> int:
    """Worker processes a compilation may use: $GRAPHCNN_COMPILE_WORKERS, else one per CPU but the
    parent's own (at most MAX_WORKERS)."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            count = int(env)
        except ValueError:
            count = -1
        if count < 0:
            raise ValueError(f"${WORKERS_ENV} must be a whole number of worker processes (0: compile "
                             f"in-process; at most {MAX_WORKERS} are used), got {env!r}")
        return min(MAX_WORKERS, count)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_WORKERS, cpus - 1))


class _Worker:
    """One worker process and its pipes (used by one dispatcher thread at a time)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def compile(self, llvm_ir: str, opt: int, target) -> bytes | None:
        """The object of one module, or None when the worker failed (it is then closed)."""
        try:
            _write_frame(self.proc.stdin, {"cpu": target.cpu, "features": target.features, "opt": opt},
                         llvm_ir.encode())
            frame = _read_frame(self.proc.stdout)
        except OSError:
            frame = None
        if frame is None or not frame[0].get("ok"):
            self.close()
            return None
        return frame[1]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Pool:
    """The process's idle workers; new ones are started on demand up to worker_count(), and the idle ones
    stop IDLE_SECONDS after the last compilation (a worker holds ~150 MB: LLVM)."""

    def __init__(self):
        self.lock, self.idle, self.started, self.pid = threading.Lock(), [], 0, os.getpid()
        self.timer = None

    def borrow(self) -> _Worker | None:
        with self.lock:
            if self.pid != os.getpid():         # a forked child: the parent's pipes are not ours
                self.idle, self.started, self.pid, self.timer = [], 0, os.getpid(), None
            while self.idle:
                w = self.idle.pop()
                if w.alive:
                    return w
                self.started -= 1
            if self.started >= worker_count():
                return None
            self.started += 1
        try:
            return _Worker()
        except OSError:
            with self.lock:
                self.started -= 1
            return None

    def give_back(self, w: _Worker) -> None:
        with self.lock:
            if w.alive and self.pid == os.getpid():
                self.idle.append(w)
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = threading.Timer(IDLE_SECONDS, self.close)
                self.timer.daemon = True
                self.timer.start()
            else:
                self.started -= 1

    def close(self) -> None:
        """Stop the idle workers (borrowed ones stay with their compilation)."""
        with self.lock:
            idle, self.idle = self.idle, []
            self.started -= len(idle)
        for w in idle:
            w.close()


_pool = _Pool()
atexit.register(_pool.close)


def shutdown() -> None:
    """Stop this process's idle worker processes (they start again on demand): a cold-start measurement
    begins without them."""
    _pool.close()


def kernel_symbol(text: str, family: str) -> str:
    """The symbol of a kernel built under PLACEHOLDER: k<hash of its IR>_<family> (family: an op name)."""
    return f"k{hashlib.sha256(text.encode()).hexdigest()[:20]}_{family}"


class KernelCompiler:
    """The machine code of one graph's kernel modules: each looked up in the JIT cache when submitted,
    otherwise queued for the workers at once; finish() compiles the rest and returns the objects."""

    def __init__(self, opt: int = 3):
        self.opt, self.target = opt, jit.host_target()
        self.folder = jit.trusted_cache_dir()
        self.symbols, self.texts, self.objects = [], [], []     # per kernel, in submission order
        self.keys, self.cached = [], []
        # largest module first (its size stands for its compile time), so the last jobs are the short ones
        self.jobs, self.failed, self.threads = queue.PriorityQueue(), [], []

    def submit(self, text: str, family: str) -> str:
        """Add a kernel module built with the function name PLACEHOLDER; -> its symbol. A module whose
        IR equals one submitted before is not added again."""
        symbol = kernel_symbol(text, family)
        if symbol in self.symbols:
            return symbol
        text = text.replace(PLACEHOLDER, symbol)
        index = len(self.symbols)
        key = jit.cache_key(text, self.opt) if self.folder else None
        obj = jit.read_cache_entry(self.folder, key) if self.folder else None
        self.symbols.append(symbol)
        self.texts.append(text)
        self.keys.append(key)
        self.objects.append(obj)
        self.cached.append(obj is not None)
        if obj is None:
            self.jobs.put((-len(text), index))
            if not self.threads:
                self.threads = [threading.Thread(target=self._dispatch, name=DISPATCHER_NAME, daemon=True)
                                for _ in range(worker_count())]
                for t in self.threads:
                    t.start()
        return symbol

    def _dispatch(self) -> None:
        """A dispatcher thread: feed one borrowed worker until the queue's end marker."""
        worker = _pool.borrow()
        if worker is None:
            return
        try:
            while True:
                _, index = self.jobs.get()
                if index < 0:
                    return
                obj = worker.compile(self.texts[index], self.opt, self.target)
                if obj is None:
                    self.failed.append(index)
                    return
                self.objects[index] = obj
        finally:
            _pool.give_back(worker)

    def finish(self) -> list:
        """The objects of every submitted kernel, in submission order; newly compiled ones are written
        to the cache."""
        while True:
            try:
                _, index = self.jobs.get_nowait()
            except queue.Empty:
                break
            self.objects[index] = jit.compile_object(self.texts[index], self.opt, self.target)
        self.close()
        for index in self.failed:
            self.objects[index] = jit.compile_object(self.texts[index], self.opt, self.target)
        self.failed = []
        if self.folder:
            for key, obj, cached in zip(self.keys, self.objects, self.cached):
                if not cached:
                    jit.write_cache_entry(self.folder, key, obj)
        return list(self.objects)

    def close(self) -> None:
        """Stop the dispatcher threads (their workers go back to the pool), dropping queued kernels: after
        finish(), or when lowering failed half-way. Idempotent."""
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:
            self.jobs.put((0, -1))             # the end marker: after every real job (their keys are negative)
        for t in self.threads:
            t.join()
        self.threads = []


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
