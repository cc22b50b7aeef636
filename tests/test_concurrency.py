"""Thread safety of loaded runtimes: one `gc.load(path)` runtime shared by 8 threads (200 predict calls
each, batch sizes 1..64, random inputs) must give every call the answer it gives alone; and a model
training at the same time must end with exactly the weights it gets when trained alone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers as L

THREADS = 8
CALLS = 200
TOL = 1e-6


def _tiny_conv(seed=3):
    return gc.Sequential([L.Input((8, 8, 2)), L.Conv2D(4, (3, 3), activation="relu"), L.MaxPool2D((2, 2)),
                          L.Flatten(), L.Dense(5, activation="softmax")], name="tinyconv", seed=seed)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("conc") / "tinyconv.gcnn")
    _tiny_conv().save(path)
    return path


def _jobs(seed):
    """Per thread, CALLS inputs with batch sizes in 1..64 (fixed seed)."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((int(rng.integers(1, 65)), 8, 8, 2)).astype(np.float32) for _ in range(CALLS)]
            for _ in range(THREADS)]


def _run_threads(target, args_per_thread):
    """Start all threads behind a barrier (maximum overlap); re-raise the first error of any thread."""
    barrier = threading.Barrier(len(args_per_thread))
    errors = []

    def body(*args):
        try:
            barrier.wait()
            target(*args)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=a) for a in args_per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a predict thread hung"
    if errors:
        raise errors[0]


def _naive_reference(model_weights, x):
    """Independent float64 forward pass of _tiny_conv (valid 3x3 conv + relu, 2x2 max pool, dense, softmax)."""
    k, b = model_weights["conv2d/kernel"].astype(np.float64), model_weights["conv2d/bias"].astype(np.float64)
    n, h, w, _ = x.shape
    conv = np.zeros((n, h - 2, w - 2, k.shape[3]))
    for i in range(h - 2):
        for j in range(w - 2):
            conv[:, i, j, :] = np.einsum("nhwc,hwco->no", x[:, i:i + 3, j:j + 3, :].astype(np.float64), k)
    conv = np.maximum(conv + b, 0)
    pooled = conv.reshape(n, 3, 2, 3, 2, -1).max(axis=(2, 4))
    z = pooled.reshape(n, -1) @ model_weights["dense/kernel"].astype(np.float64) + model_weights["dense/bias"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_shared_runtime_many_threads(artifact, backend):
    rt = gc.load(artifact, backend=backend)
    assert rt.backend == backend
    jobs = _jobs(seed=7)
    # the sequential answers first; also pin them to an independent reference for one batch
    expected = [[rt.predict(x) for x in calls] for calls in jobs]
    from graphcnn.artifact import read_artifact
    _, weights, _ = read_artifact(artifact)
    np.testing.assert_allclose(expected[0][0], _naive_reference(weights, jobs[0][0]), rtol=1e-4, atol=1e-6)

    results = [[None] * CALLS for _ in range(THREADS)]

    def worker(t):
        for i, x in enumerate(jobs[t]):
            results[t][i] = rt.predict(x)

    _run_threads(worker, [(t,) for t in range(THREADS)])
    worst, exact = 0.0, 0
    for t in range(THREADS):
        for i in range(CALLS):
            got, want = results[t][i], expected[t][i]
            assert got.shape == want.shape, (t, i, got.shape, want.shape)
            worst = max(worst, float(np.max(np.abs(got - want))))
            exact += bool(np.array_equal(got, want))
    print(f"\n{backend}: {THREADS}x{CALLS} concurrent predicts, {exact} bit-identical, max |diff| {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_training_not_disturbed_by_concurrent_predict(artifact, backend):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((256, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 5, 256)

    def trained(with_noise):
        model = _tiny_conv(seed=21)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", backend=backend)
        if not with_noise:
            model.fit(x, y, epochs=2, batch_size=32, seed=5, verbose=0)
            return model.get_weights(), None
        rt = gc.load(artifact, backend=backend)
        probe = rng.standard_normal((17, 8, 8, 2)).astype(np.float32)
        want = rt.predict(probe)
        stop = threading.Event()
        bad = []

        def hammer():
            while not stop.is_set():
                got = rt.predict(probe)
                if not np.max(np.abs(got - want)) <= TOL:
                    bad.append(float(np.max(np.abs(got - want))))

        threads = [threading.Thread(target=hammer) for _ in range(THREADS)]
        for t in threads:
            t.start()
        try:
            model.fit(x, y, epochs=2, batch_size=32, seed=5, verbose=0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        return model.get_weights(), bad

    alone, _ = trained(False)
    together, bad = trained(True)
    assert not bad, f"predict answers changed while training ran: {bad[:5]}"
    assert alone.keys() == together.keys()
    for k in alone:
        np.testing.assert_array_equal(together[k], alone[k], err_msg=f"weight {k} differs")
    # the training really moved the weights (the comparison above is not vacuous)
    fresh = _tiny_conv(seed=21)
    fresh.build()
    assert any(not np.array_equal(fresh.get_weights()[k], alone[k]) for k in alone)
