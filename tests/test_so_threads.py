"""Both cores in the exported .so: NAME_predict_threads(_checked) and NAME_workspace_size_threads.

The reference is NAME_predict (one thread) of the same library: every threaded call must give the same
bits, for batches below, at and above the thread count. Nothing here depends on the host's core count or
ISA (64 threads on a 2-core machine is just slow), and nothing is timed."""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from conftest import ROOT

OK, ERR_NULL_ARG, ERR_BAD_BATCH, ERR_WORKSPACE_TOO_SMALL, ERR_BAD_THREADS = 0, 1, 2, 3, 4
BATCHES = (1, 2, 3, 7, 64, 100)
THREADS = (1, 2, 3, 64)


def c_compiler():
    return next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
                None)


class Lib:
    """ctypes bindings of one exported model's C API."""

    def __init__(self, folder, name, n_in, n_out):
        self.path, self.name, self.n_in, self.n_out = os.path.join(folder, f"{name}.so"), name, n_in, n_out
        self.header_path = os.path.join(folder, f"{name}.h")
        lib = self.lib = ctypes.CDLL(self.path)
        P, I64, SZ, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int

        def fn(suffix, restype, argtypes):
            f = getattr(lib, f"{name}_{suffix}")
            f.restype, f.argtypes = restype, argtypes
            return f

        self.workspace_size = fn("workspace_size", SZ, [I64])
        self.workspace_size_threads = fn("workspace_size_threads", SZ, [I64, INT])
        self.predict = fn("predict", INT, [P, I64, P, P])
        self.predict_threads = fn("predict_threads", INT, [P, I64, P, P, INT])
        self.predict_threads_checked = fn("predict_threads_checked", INT, [P, I64, P, P, SZ, INT])
        with open(self.header_path) as f:
            self.header = f.read()
        self.macros = {k: int(v) for k, v in re.findall(rf"#define {name}_(\w+) (-?\d+)", self.header)}

    def images(self, batch, seed=0):
        return np.random.default_rng(seed).random((batch, self.n_in), np.float32)

    def reference(self, x):
        out = np.full((x.shape[0], self.n_out), np.nan, np.float32)
        ws = np.empty(self.workspace_size(x.shape[0]), np.uint8)
        assert self.predict(x.ctypes.data, x.shape[0], out.ctypes.data, ws.ctypes.data) == OK
        return out

    def threaded(self, x, threads, checked=False, ws=None):
        n = x.shape[0]
        out = np.full((n, self.n_out), np.nan, np.float32)
        size = self.workspace_size_threads(n, threads)
        assert size > 0
        if ws is None:
            ws = np.empty(size, np.uint8)
        if checked:
            rc = self.predict_threads_checked(x.ctypes.data, n, out.ctypes.data, ws.ctypes.data, size, threads)
        else:
            rc = self.predict_threads(x.ctypes.data, n, out.ctypes.data, ws.ctypes.data, threads)
        assert rc == OK
        return out


def same_bits(a, b):
    """Bit-identical float32 arrays (NaNs included, payload and sign too)."""
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def export(tmp, example):
    res = subprocess.run([sys.executable, "-m", "graphcnn.cli", "compile", os.path.join(ROOT, "examples", f"{example}.py"),
                          "-o", str(tmp), "--target", "llvm", "--emit", "so,h"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


def exported_lib(tmp_path_factory, example):
    """examples/EXAMPLE.py (initial weights) compiled to a .so in a fresh folder, bound (skipped without a C
    compiler); the library's name is whatever the export chose."""
    if c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the shared library cannot be linked")
    tmp = tmp_path_factory.mktemp(f"so_threads_{example}")
    export(tmp, example)
    name = next(f[:-3] for f in os.listdir(tmp) if f.endswith(".so"))
    return Lib(str(tmp), name, 784, 10)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """examples/mnist_cnn.py as mnist_cnn.so: convs, so batch 1 splits inside the kernels."""
    lib = exported_lib(tmp_path_factory, "mnist_cnn")
    assert lib.name == "mnist_cnn"
    return lib


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """examples/seed_dense.py: no kernel worth splitting, so batch 1 stays on the calling thread."""
    return exported_lib(tmp_path_factory, "seed_dense")


def test_header_declares_the_threaded_api(cnn):
    m, h = cnn.macros, cnn.header
    assert (m["ERR_BAD_THREADS"], m["MAX_THREADS"]) == (ERR_BAD_THREADS, 64)
    assert "size_t mnist_cnn_workspace_size_threads(int64_t batch, int threads);" in h
    assert "int mnist_cnn_predict_threads(const float *input, int64_t batch, float *output, void *workspace, " \
           "int threads);" in h
    assert re.search(r"int mnist_cnn_predict_threads_checked\(const float \*input, int64_t batch, float \*output, "
                     r"void \*workspace,\s+size_t workspace_bytes, int threads\);", h)


@pytest.mark.parametrize("batch", BATCHES)
def test_threaded_outputs_are_bit_identical(cnn, batch):
    x = cnn.images(batch, seed=batch)
    ref = cnn.reference(x)
    assert np.isfinite(ref).all()
    for threads in THREADS:
        assert same_bits(cnn.threaded(x, threads), ref), (batch, threads)
        assert same_bits(cnn.threaded(x, threads, checked=True), ref), (batch, threads)


@pytest.mark.parametrize("batch", (1, 2, 7))
def test_model_without_split_kernels(dense, batch):
    x = dense.images(batch, seed=batch)
    ref = dense.reference(x)
    for threads in THREADS:
        assert same_bits(dense.threaded(x, threads), ref), (batch, threads)
    # no team entry: batch 1 needs no more than predict()
    assert dense.workspace_size_threads(1, 64) == dense.workspace_size(1)


def test_bad_thread_counts_and_argument_order(cnn):
    x = cnn.images(4)
    out = np.full((4, 10), np.nan, np.float32)
    ws = np.empty(cnn.workspace_size_threads(4, 64), np.uint8)
    xp, op, wp, size = x.ctypes.data, out.ctypes.data, ws.ctypes.data, ws.nbytes
    for threads in (0, -1, 65, 1000, -2 ** 31):
        assert cnn.workspace_size_threads(4, threads) == 0
        assert cnn.predict_threads(xp, 4, op, wp, threads) == ERR_BAD_THREADS
        assert cnn.predict_threads_checked(xp, 4, op, wp, size, threads) == ERR_BAD_THREADS
        assert cnn.predict_threads_checked(xp, 4, op, wp, 0, threads) == ERR_BAD_THREADS   # before the size
        assert cnn.predict_threads(None, 4, op, wp, threads) == ERR_NULL_ARG               # after NULLs
        assert cnn.predict_threads(xp, 0, op, wp, threads) == ERR_BAD_BATCH                # and the batch
    max_batch = cnn.macros["MAX_BATCH"]
    for batch in (0, -1, max_batch + 1):
        assert cnn.workspace_size_threads(batch, 2) == 0
        assert cnn.predict_threads(xp, batch, op, wp, 2) == ERR_BAD_BATCH
    assert cnn.predict_threads(xp, 4, None, wp, 2) == ERR_NULL_ARG
    assert cnn.predict_threads(xp, 4, op, None, 2) == ERR_NULL_ARG
    assert np.isnan(out).all()              # on an error nothing is written
    assert cnn.predict_threads_checked(xp, 4, op, wp, size, 64) == OK


def test_workspace_size_threads_is_exact(cnn):
    """_checked refuses one byte less; the exact size works at any alignment and nothing outside it (or
    outside the output rows) is written."""
    for batch in BATCHES:
        x = cnn.images(batch, seed=100 + batch)
        ref = cnn.reference(x)
        for threads in THREADS:
            need = cnn.workspace_size_threads(batch, threads)
            for offset in (0, 1, 17, 63):
                raw = np.full(offset + need + 256, 0xA5, np.uint8)
                out = np.full((batch + 1, 10), -7.0, np.float32)
                wp, op = raw.ctypes.data + offset, out.ctypes.data
                assert cnn.predict_threads_checked(x.ctypes.data, batch, op, wp, need - 1, threads) == \
                    ERR_WORKSPACE_TOO_SMALL
                assert (out == -7.0).all()
                assert cnn.predict_threads_checked(x.ctypes.data, batch, op, wp, need, threads) == OK
                assert same_bits(out[:batch], ref), (batch, threads, offset)
                assert (out[batch:] == -7.0).all()
                assert (raw[:offset] == 0xA5).all() and (raw[offset + need:] == 0xA5).all(), (batch, threads)


def test_workspace_size_threads_rule(cnn):
    for threads in THREADS:
        sizes = [cnn.workspace_size_threads(b, threads) for b in range(1, 1200)]
        assert sizes == sorted(sizes)          # never decreasing: a workspace for (B, T) serves every b <= B
        if threads > 1:     # chunked calls hold `threads` chunk arenas of at most 16 images, not the batch
            assert sizes[-1] == sizes[16 * threads - 1] < cnn.workspace_size(len(sizes))
    assert all(cnn.workspace_size_threads(b, 1) == cnn.workspace_size(b) for b in (1, 2, 5, 1000))
    # a workspace sized for a larger batch serves smaller ones
    x = cnn.images(5, seed=5)
    ws = np.empty(cnn.workspace_size_threads(64, 3), np.uint8)
    assert same_bits(cnn.threaded(x, 3, ws=ws), cnn.reference(x))


def test_concurrent_callers_with_separate_workspaces(cnn):
    """Several Python threads (ctypes releases the GIL) call predict_threads at once: one holds the pool,
    the others run on their own threads; every answer is the reference."""
    cases = [(cnn.images(b, seed=200 + i), t) for i, (b, t) in enumerate([(1, 2), (5, 2), (9, 3), (1, 64), (2, 2),
                                                                          (64, 2)])]
    refs = [cnn.reference(x) for x, _ in cases]
    failures, barrier = [], threading.Barrier(len(cases))

    def work(i):
        x, threads = cases[i]
        ws = np.empty(cnn.workspace_size_threads(x.shape[0], threads), np.uint8)
        barrier.wait()
        for _ in range(15):
            out = cnn.threaded(x, threads, ws=ws)
            if not same_bits(out, refs[i]):
                failures.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


def test_nan_inputs_propagate_like_one_thread(cnn):
    x = cnn.images(7, seed=7)
    x[0, 5] = np.nan
    x[3, :] = np.nan
    x[6, 100] = np.inf
    ref = cnn.reference(x)
    assert np.isnan(ref[0]).all() and np.isnan(ref[3]).all()
    assert np.isfinite(ref[[1, 2, 4, 5]]).all()
    for threads in THREADS:
        assert same_bits(cnn.threaded(x, threads), ref), threads
    x1 = x[3:4].copy()
    for threads in THREADS:
        assert same_bits(cnn.threaded(x1, threads), cnn.reference(x1)), threads


def test_fork_after_the_pool_started_and_exit_joins_the_workers(cnn):
    """A forked child has none of the parent's workers: the atfork handler resets the pool, so the child's
    threaded calls work; exiting (the library's destructor joins the workers) does not hang."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_so_threads import Lib, same_bits
        lib = Lib({os.path.dirname(cnn.path)!r}, "mnist_cnn", 784, 10)
        x1, x5 = lib.images(1, 1), lib.images(5, 5)
        r1, r5 = lib.reference(x1), lib.reference(x5)
        assert same_bits(lib.threaded(x1, 2), r1) and same_bits(lib.threaded(x5, 3), r5)
        pid = os.fork()
        if pid == 0:
            ok = same_bits(lib.threaded(x1, 2), r1) and same_bits(lib.threaded(x5, 3), r5)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert same_bits(lib.threaded(x5, 2), r5)
        print("done")
    """)
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr


def test_c_program_calls_the_threaded_api(cnn, tmp_path):
    """The header compiles as C and the library links without extra flags from the user."""
    src = tmp_path / "main.c"
    src.write_text(textwrap.dedent("""
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        #include "mnist_cnn.h"
        int main(void) {
            enum { B = 5 };
            float *x = calloc(B * mnist_cnn_INPUT_SIZE, sizeof(float)), y1[B * 10], y2[B * 10];
            for (int i = 0; i < B * mnist_cnn_INPUT_SIZE; i++) x[i] = (float)(i % 97) / 97.0f;
            void *w1 = malloc(mnist_cnn_workspace_size(B));
            size_t need = mnist_cnn_workspace_size_threads(B, 2);
            void *w2 = malloc(need);
            if (mnist_cnn_predict(x, B, y1, w1) != mnist_cnn_OK) return 1;
            if (mnist_cnn_predict_threads_checked(x, B, y2, w2, need, 2) != mnist_cnn_OK) return 2;
            if (memcmp(y1, y2, sizeof y1) != 0) return 3;
            if (mnist_cnn_predict_threads(x, B, y2, w2, mnist_cnn_MAX_THREADS + 1) != mnist_cnn_ERR_BAD_THREADS)
                return 4;
            puts("ok");
            return 0;
        }
    """))
    folder = os.path.dirname(cnn.path)
    exe = tmp_path / "main"
    res = subprocess.run([c_compiler(), "-std=c99", "-Wall", "-Werror", "-I", folder, str(src), "-o", str(exe),
                          cnn.path, f"-Wl,-rpath,{folder}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr)


def test_python_size_rule_matches_the_library(cnn):
    """backends.llvm.export.ApiShape.workspace_size_threads is the rule the library computes."""
    from backends.llvm.export import build_module
    from conftest import load_example
    from ir.passes import run_pipeline
    model = load_example("mnist_cnn")
    g = run_pipeline(model.inference_graph(), "inference").graph
    _, name, shape = build_module(g, model.weights)
    assert name == "mnist_cnn" and shape.splittable and shape.team
    for batch in (-1, 0, 1, 2, 3, 7, 64, 1000, shape.max_batch, shape.max_batch + 1):
        for threads in (-1, 0, 1, 2, 3, 64, 65):
            assert shape.workspace_size_threads(batch, threads) == cnn.workspace_size_threads(batch, threads), \
                (batch, threads)


def test_dlclose_joins_the_pool(cnn, tmp_path):
    """dlopen, threaded calls (workers created), dlclose, again: the destructor stops and joins the workers
    before the code is unmapped (a live worker would crash the process). Linux (/proc) only."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("counts threads through /proc/self/status")
    src = tmp_path / "reload.c"
    src.write_text(textwrap.dedent("""
        #include <dlfcn.h>
        #include <stdint.h>
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        typedef size_t (*size_fn)(int64_t, int);
        static int threads_now(void) {          /* this process's thread count, from /proc */
            char line[256]; int n = -1;
            FILE *f = fopen("/proc/self/status", "r");
            if (!f) return -1;
            while (fgets(line, sizeof line, f)) if (!strncmp(line, "Threads:", 8)) n = atoi(line + 8);
            fclose(f);
            return n;
        }
        typedef int (*predict_fn)(const float *, int64_t, float *, void *, int);
        int main(int argc, char **argv) {
            static float x[3 * 784], y[3 * 10];
            for (int round = 0; round < 8; round++) {
                void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
                if (!h) { fprintf(stderr, "%s\\n", dlerror()); return 1; }
                size_fn size = (size_fn)dlsym(h, "mnist_cnn_workspace_size_threads");
                predict_fn predict = (predict_fn)dlsym(h, "mnist_cnn_predict_threads");
                if (!size || !predict) return 2;
                for (int batch = 1; batch <= 3; batch++) {
                    void *ws = malloc(size(batch, 3));
                    if (predict(x, batch, y, ws, 3) != 0) return 3;
                    free(ws);
                }
                if (threads_now() != 3) return 5;          /* the caller and 2 workers */
                if (dlclose(h) != 0) return 4;
                if (threads_now() != 1) return 6;          /* the destructor joined them */
            }
            puts("ok");
            return 0;
        }
    """))
    exe = tmp_path / "reload"
    res = subprocess.run([c_compiler(), "-std=c99", "-Wall", str(src), "-o", str(exe), "-ldl"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(exe), cnn.path], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr)


def test_no_room_for_workers_runs_on_the_caller(cnn):
    """Under RLIMIT_AS with no room for a thread stack, pthread_create fails: the pool stays empty and the
    threaded call runs on the calling thread, with the same result (no crash, no error code)."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np
        from test_so_threads import Lib, same_bits
        lib = Lib({os.path.dirname(cnn.path)!r}, "mnist_cnn", 784, 10)
        xs = [lib.images(1, 1), lib.images(5, 5)]
        refs = [lib.reference(x) for x in xs]
        wss = [np.zeros(lib.workspace_size_threads(x.shape[0], 2), np.uint8) for x in xs]
        outs = [np.zeros((x.shape[0], 10), np.float32) for x in xs]
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
        limit = pages * resource.getpagesize() + (1 << 20)       # 1 MiB to grow: no 8 MiB thread stack
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for x, ref, ws, out in zip(xs, refs, wss, outs):
            rc = lib.predict_threads(x.ctypes.data, x.shape[0], out.ctypes.data, ws.ctypes.data, 2)
            assert rc == 0 and same_bits(out, ref), rc
        print("ok")
    """)
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


@pytest.fixture(scope="module")
def coupled(tmp_path_factory):
    """A graph whose output mixes the images of a batch (y - mean over the batch of y, y = relu(conv(x))):
    never cut into chunks; every batch splits inside the convolution instead."""
    if c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the shared library cannot be linked")
    import graphcnn as gc
    from backends.llvm.export import build_module, write_native
    from ir.passes import run_pipeline
    g = gc.Graph("coupled")
    x = g.input("x", (None, 28, 28, 8))
    w = g.param("w", (3, 3, 8, 32))             # 1.6M multiply-adds per image: worth splitting
    y = gc.ops.relu(gc.ops.conv2d(x, w, stride=1, padding="valid"))
    g.output(gc.ops.sub(y, gc.ops.reduce_mean(y, axis=0)))
    opt = run_pipeline(g, "inference").graph
    weights = {"w": np.random.default_rng(0).standard_normal((3, 3, 8, 32)).astype(np.float32)}
    tmp = tmp_path_factory.mktemp("so_threads_coupled")
    write_native(opt, weights, str(tmp), ["so", "h"])
    lib = Lib(str(tmp), "coupled", 28 * 28 * 8, 26 * 26 * 32)
    lib.shape = build_module(opt, weights)[2]
    return lib


def test_graph_coupling_the_batch_splits_inside_the_kernels(coupled):
    assert not coupled.shape.splittable and coupled.shape.team
    assert "the batch is not cut" in coupled.header
    for batch in (1, 3, 8):
        x = coupled.images(batch, seed=batch)
        ref = coupled.reference(x)
        for threads in THREADS:
            assert coupled.workspace_size_threads(batch, threads) == coupled.shape.workspace_size_threads(batch, threads)
            assert same_bits(coupled.threaded(x, threads), ref), (batch, threads)
            assert same_bits(coupled.threaded(x, threads, checked=True), ref), (batch, threads)
