"""The fast call path (backends/llvm/executable.py BoundCall, Executable._ready_input, conform_input):
the same numbers as the checked path, fresh result arrays, params replaced between calls honored, and
threads never sharing a prepared call."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers as L


@pytest.fixture(scope="module")
def model():
    m = gc.Sequential([L.Input((9, 7, 2)), L.Conv2D(5, 3, activation="relu"), L.MaxPool2D(2),
                       L.Flatten(), L.Dense(4, activation="softmax")], name="fast_path", seed=3)
    m.build()
    return m


def _exe(model, backend="llvm", threads=2):
    return gc.compile(model.inference_graph(), backend=backend, params=model.weights, passes="inference",
                      threads=threads)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_ready_and_checked_inputs_give_the_same_numbers(model, backend):
    exe = _exe(model, backend)
    x = np.random.default_rng(0).standard_normal((7, 9, 7, 2)).astype(np.float32)
    fast = exe(x)
    assert np.array_equal(exe(x=x), fast)
    assert np.array_equal(exe(x.astype(np.float64)), fast)               # converted by the checked path
    strided = np.asfortranarray(x)
    assert not strided.flags.c_contiguous
    assert np.array_equal(exe(strided), fast)
    assert np.array_equal(exe(x.tolist()), fast)
    with pytest.raises(ValueError, match="expected shape"):
        exe(x[:, :8])
    with pytest.raises(TypeError, match="missing inputs"):
        exe(y=x)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_results_are_fresh_arrays(model, backend):
    exe = _exe(model, backend)
    x = np.random.default_rng(1).standard_normal((3, 9, 7, 2)).astype(np.float32)
    a = exe(x)
    keep = a.copy()
    a[...] = -1                                     # the caller owns its result ...
    b = exe(x)
    assert np.array_equal(b, keep) and not np.shares_memory(a, b)          # ... and the next call is its own


def test_batch_sizes_and_threads_agree_with_one_sample_at_a_time(model):
    x = np.random.default_rng(2).standard_normal((256, 9, 7, 2)).astype(np.float32)
    single = _exe(model, threads=1)
    each = np.concatenate([single(x[i:i + 1]) for i in range(len(x))])
    for threads in (1, 2, 3):
        exe = _exe(model, threads=threads)
        for n in (1, 2, 7, 256):
            np.testing.assert_array_equal(exe(x[:n]), each[:n], err_msg=f"threads={threads} batch={n}")


def test_a_param_replaced_between_calls_is_used(model):
    exe = _exe(model)
    x = np.random.default_rng(3).standard_normal((2, 9, 7, 2)).astype(np.float32)
    before = exe(x)
    name = next(k for k in exe.state if exe.state[k].ndim == 1)           # a bias
    exe.state[name] = exe.state[name] + np.float32(1.0)                 # a new array, a new address
    after = exe(x)
    ref = gc.compile(model.inference_graph(), backend="numpy", passes="inference",
                     params={**model.weights, **{name: exe.state[name]}})(x)
    np.testing.assert_allclose(after, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after, before)


def test_concurrent_calls_with_mixed_batch_sizes(model):
    exe = _exe(model)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((n, 9, 7, 2)).astype(np.float32) for n in (1, 5, 1, 64, 2)]
    want = [exe(x) for x in xs]
    errors = []

    def worker(k):
        for r in range(40):
            j = (k + r) % len(xs)
            if not np.array_equal(exe(xs[j]), want[j]):
                errors.append((k, r, j))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_runtime_and_model_predict_take_the_same_path(model, tmp_path):
    x = np.random.default_rng(5).standard_normal((300, 9, 7, 2)).astype(np.float32)
    want = _exe(model)(x)
    model.save(tmp_path / "m.gcnn")
    rt = gc.load(tmp_path / "m.gcnn")
    np.testing.assert_array_equal(rt.predict(x), want)
    np.testing.assert_array_equal(rt.predict(x, batch_size=7), want)
    np.testing.assert_array_equal(rt.predict(x[:1]), want[:1])
    np.testing.assert_array_equal(model.predict(x[:1]), want[:1])
    bad = x[:2].copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(gc.GraphcnnError, match="1 NaN or infinite value"):
        rt.predict(bad)
    with pytest.raises(gc.GraphcnnError, match="1 NaN or infinite value"):
        model.predict(bad)


def test_finiteness_check_catches_every_position_and_survives_overflowing_sums():
    """input_arrays.all_finite: the BLAS-dot shortcut of small inputs is never trusted when it says
    "not finite" (a finite sum may overflow), and a NaN or inf anywhere is always caught."""
    from graphcnn.input_arrays import DOT_CHECK_MAX, all_finite
    rng = np.random.default_rng(0)
    for size in (1, 7, 784, DOT_CHECK_MAX, DOT_CHECK_MAX + 1):
        a = rng.standard_normal(size).astype(np.float32)
        assert all_finite(a)
        for pos in {0, size // 2, size - 1}:
            for bad in (np.nan, np.inf, -np.inf):
                b = a.copy()
                b[pos] = bad
                assert not all_finite(b), (size, pos, bad)
        big = np.full(size, 3e38, np.float32)           # finite, but its sum overflows to inf
        assert all_finite(big)
        big[size // 2] = -3e38
        assert all_finite(big)
    both = np.array([np.inf, -np.inf], np.float32)      # sums to NaN
    assert not all_finite(both)


def test_split_training_step_equals_the_chunk_api_step(monkeypatch):
    """The threaded training step (one flat row of chunk means per chunk, combined in two array ops) gives
    the bits of the chunk API that graphcnn.distributed uses: chunk_gradients, combine_chunk_means,
    apply_update."""
    from backends.llvm import executable as llvm_exe
    from graphcnn import layers

    def chunk_api_step(self, arrays, n, accept=None):
        chunks = self._chunks(n)
        parts = self.chunk_gradients(arrays, chunks)
        outs = [np.concatenate([p[k] for p in parts]) if t.batched else None
                for k, (_, t) in enumerate(self.outputs)]
        reduced = llvm_exe.combine_chunk_means([self.chunk_means(p) for p in parts], chunks, n)
        for k, v in zip(self.mean_outputs, reduced):
            outs[k] = v
        if accept is not None and not accept(outs):
            return outs, False
        self.apply_update(reduced[len(self.mean_outputs):], arrays)
        return outs if accept is None else (outs, True)

    rng = np.random.default_rng(8)
    x = rng.standard_normal((45, 9, 9, 2)).astype(np.float32)
    y = rng.integers(0, 4, 45)
    results = []
    for step in (None, chunk_api_step):
        if step is not None:
            monkeypatch.setattr(llvm_exe.LlvmExecutable, "_train_step", step)
        m = gc.Sequential([layers.Input((9, 9, 2)), layers.Conv2D(3, 3, activation="relu"), layers.MaxPool2D(2),
                           layers.Flatten(), layers.Dense(4, activation="softmax")], name="split_step")
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], backend="llvm",
                  threads=2)
        history = m.fit(x, y, epochs=2, batch_size=16, verbose=0, seed=1, shuffle=False)   # chunks 8+8, last 7 = 4+3
        assert m._executable("train").split_training
        results.append((m.get_weights(), history.history["loss"]))
    (w_flat, loss_flat), (w_api, loss_api) = results
    assert loss_flat == loss_api
    assert sorted(w_flat) == sorted(w_api) and len(w_flat) == 4
    for name in w_flat:
        assert w_flat[name].tobytes() == w_api[name].tobytes(), name
