"""Kernels compiled as modules of their own, in worker processes, cached one entry each
(backends/llvm/compile_pool.py): the code does not depend on where it was compiled, a new network
compiles only the kernels the cache lacks, and a failing worker costs only speed."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import graphcnn as gc  # noqa: E402
from backends.llvm import compile_pool, jit  # noqa: E402
from graphcnn import layers  # noqa: E402


def _cnn(filters_2):
    """Two small CNNs that share their first convolution (same shapes) and differ after it."""
    return gc.Sequential([
        layers.Input((11, 13, 2)),
        layers.Conv2D(4, 3, activation="relu"),
        layers.MaxPool2D(2),
        layers.Conv2D(filters_2, 3, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dense(3, activation="softmax"),
    ], name=f"pool_cnn_{filters_2}")


def _kernel_texts(model):
    """The kernel modules of the model's inference graph (compiled once, without the cache)."""
    fn = gc.compile(model.inference_graph(), "llvm", model.weights)
    return [t for p in fn._parts for t in p.jit.kernel_irs]


def test_worker_and_in_process_objects_are_identical(monkeypatch):
    monkeypatch.setenv("GRAPHCNN_CACHE", "0")
    texts = _kernel_texts(_cnn(5))
    assert len(texts) >= 3
    worker = compile_pool._Worker()
    try:
        for text in texts:
            assert worker.compile(text, 3, jit.host_target()) == jit.compile_object(text, 3)
    finally:
        worker.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_results_do_not_depend_on_the_workers(monkeypatch, workers):
    monkeypatch.setenv("GRAPHCNN_CACHE", "0")
    m = _cnn(5)
    g = m.inference_graph()
    x = np.random.default_rng(3).standard_normal((7, 11, 13, 2)).astype(np.float32)
    monkeypatch.setenv(compile_pool.WORKERS_ENV, "0")
    alone = gc.compile(g, "llvm", m.weights)
    monkeypatch.setenv(compile_pool.WORKERS_ENV, workers)
    pooled = gc.compile(g, "llvm", m.weights)
    assert [p.jit.kernel_irs for p in pooled._parts] == [p.jit.kernel_irs for p in alone._parts]
    np.testing.assert_array_equal(pooled(x=x), alone(x=x))
    np.testing.assert_allclose(alone(x=x), gc.compile(g, "numpy", m.weights)(x=x), rtol=1e-5, atol=1e-6)


def test_a_new_network_compiles_only_the_kernels_the_cache_lacks(tmp_path, monkeypatch):
    tmp_path.chmod(0o700)
    monkeypatch.setenv("GRAPHCNN_CACHE", str(tmp_path))
    a, b = _cnn(5), _cnn(6)
    fa = gc.compile(a.inference_graph(), "llvm", a.weights)
    assert [p.kernels_cached for p in fa._parts] == [0]
    fb = gc.compile(b.inference_graph(), "llvm", b.weights)
    (part,) = fb._parts
    shared = {t for t in part.jit.kernel_irs} & {t for p in fa._parts for t in p.jit.kernel_irs}
    assert shared and part.kernels_cached == len(shared) < len(part.jit.kernel_irs)
    x = np.random.default_rng(4).standard_normal((3, 11, 13, 2)).astype(np.float32)
    ref = gc.compile(b.inference_graph(), "numpy", b.weights)(x=x)
    np.testing.assert_allclose(fb(x=x), ref, rtol=1e-5, atol=1e-6)


def test_training_and_predict_share_kernels(tmp_path, monkeypatch):
    tmp_path.chmod(0o700)
    monkeypatch.setenv("GRAPHCNN_CACHE", str(tmp_path))
    m = _cnn(5)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", backend="llvm")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 11, 13, 2)).astype(np.float32)
    m.fit(x, rng.integers(0, 3, 16), epochs=1, batch_size=8, verbose=0)
    fn = gc.compile(m.inference_graph(), "llvm", m.weights)
    assert sum(p.kernels_cached for p in fn._parts) >= 2        # the forward kernels of the training step


def test_a_failing_worker_costs_only_speed(monkeypatch):
    monkeypatch.setenv("GRAPHCNN_CACHE", "0")
    monkeypatch.setenv(compile_pool.WORKERS_ENV, "1")
    started = []

    class DeadWorker(compile_pool._Worker):
        def __init__(self):                     # a process that exits at once: every compile fails
            self.proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            started.append(self)

    monkeypatch.setattr(compile_pool, "_Worker", DeadWorker)
    monkeypatch.setattr(compile_pool, "_pool", compile_pool._Pool())
    m = _cnn(5)
    x = np.random.default_rng(6).standard_normal((2, 11, 13, 2)).astype(np.float32)
    ref = gc.compile(m.inference_graph(), "numpy", m.weights)(x=x)
    np.testing.assert_allclose(m.predict(x), ref, rtol=1e-5, atol=1e-6)
    assert started and all(not w.alive for w in started)


def test_a_worker_reports_bad_ir():
    worker = compile_pool._Worker()
    try:
        assert worker.compile("this is not LLVM IR", 3, jit.host_target()) is None     # closed after it
        assert not worker.alive
    finally:
        worker.close()
    text = "define void @f(ptr %p) {\n  store float 1.0, ptr %p\n  ret void\n}\n"
    worker = compile_pool._Worker()
    try:
        assert worker.compile(text, 3, jit.host_target()) == jit.compile_object(text, 3)
        assert worker.compile(text, 3, jit.host_target()) == jit.compile_object(text, 3)      # one worker, many modules
    finally:
        worker.close()


def test_worker_count_setting(monkeypatch):
    monkeypatch.setenv(compile_pool.WORKERS_ENV, "3")
    assert compile_pool.worker_count() == 3
    monkeypatch.setenv(compile_pool.WORKERS_ENV, "100")
    assert compile_pool.worker_count() == compile_pool.MAX_WORKERS
    for bad in ("many", "-1", "1.5"):
        monkeypatch.setenv(compile_pool.WORKERS_ENV, bad)
        with pytest.raises(ValueError, match="GRAPHCNN_COMPILE_WORKERS must be a whole number"):
            compile_pool.worker_count()


def test_kernel_symbols_name_the_code():
    a = "define void @__graphcnn_kernel__() {\n  ret void\n}\n"
    assert compile_pool.kernel_symbol(a, "dense") == compile_pool.kernel_symbol(a, "dense")
    assert compile_pool.kernel_symbol(a, "dense").endswith("_dense")
    assert compile_pool.kernel_symbol(a, "dense") != compile_pool.kernel_symbol(a + " ", "dense")


def test_a_lowering_that_fails_half_way_stops_its_dispatchers(monkeypatch):
    import threading
    from backends.llvm import lowering
    from backends.llvm.codegen import LoweringError
    from backends.llvm.executable import NativeGraph
    from ir.passes import run_pipeline
    monkeypatch.setenv("GRAPHCNN_CACHE", "0")
    monkeypatch.setenv(compile_pool.WORKERS_ENV, "1")

    def refuse(cache, node, target):
        raise LoweringError("refused for the test")
    monkeypatch.setitem(lowering.LOWERINGS, "softmax", refuse)      # after the convs and the dense
    g = run_pipeline(_cnn(5).inference_graph()).graph
    with pytest.raises(LoweringError, match="refused for the test"):
        NativeGraph(g, jit.host_target())
    assert not [t for t in threading.enumerate() if t.name == compile_pool.DISPATCHER_NAME]


def test_idle_workers_stop_after_a_while(monkeypatch):
    import time
    monkeypatch.setenv("GRAPHCNN_CACHE", "0")
    monkeypatch.setenv(compile_pool.WORKERS_ENV, "1")
    monkeypatch.setattr(compile_pool, "IDLE_SECONDS", 0.2)
    monkeypatch.setattr(compile_pool, "_pool", compile_pool._Pool())
    m = _cnn(5)
    gc.compile(m.inference_graph(), "llvm", m.weights)
    pool = compile_pool._pool
    workers = list(pool.idle)
    assert workers and all(w.alive for w in workers)       # kept for the next compilation ...
    deadline = time.monotonic() + 10
    while pool.idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pool.idle and pool.started == 0             # ... and stopped once idle
    for w in workers:
        w.proc.wait(timeout=5)
        assert not w.alive
