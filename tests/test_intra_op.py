"""Intra-op parallelism (GRAPHCNN_INTRA_OP=1, backends/llvm/thread_pool.py): a batch smaller than the
thread count splits conv2d's output row tiles across native pool workers. Each output element keeps its
reduction order, so results must be bit-identical to the single-threaded call — on the reference CNNs,
every small batch and thread count, and with many concurrent callers (the pool serves one call; the
others run single-threaded in their own arenas)."""
from __future__ import annotations

import runpy
import threading
from pathlib import Path

import numpy as np
import pytest

import graphcnn as gc
from backends.llvm import thread_pool

pytestmark = pytest.mark.skipif(not thread_pool.available(), reason="the native pool needs Linux x86-64")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _model(name):
    m = runpy.run_path(str(EXAMPLES / f"{name}.py"))["model"]
    m.build()
    return m


def _compile(m, threads, intra, monkeypatch):
    monkeypatch.setenv("GRAPHCNN_INTRA_OP", "1" if intra else "0")
    return gc.compile(m.inference_graph(), backend="llvm", params=m.weights, passes="inference", threads=threads)


@pytest.fixture(scope="module", params=["mnist_cnn", "lenet5", "resnet8"])
def model(request):
    return _model(request.param)


def _inputs(m, n, seed=0):
    shape = tuple(m.inference_graph().inputs[0].shape[1:])
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


@pytest.mark.parametrize("threads", [2, 3])
def test_split_is_bit_identical_to_one_thread(model, threads, monkeypatch):
    one = _compile(model, 1, False, monkeypatch)
    many = _compile(model, threads, True, monkeypatch)
    assert many._main.team_parts == threads, "the team entry was not built: nothing was split"
    assert "_rows" in many.llvm_ir        # the row-split conv kernels are in the module
    for n in (1, 2, 3):
        x = _inputs(model, n, seed=n)
        want = one(x)
        got = many(x)
        assert np.array_equal(got, want), (n, threads, float(np.abs(got - want).max()))
        assert np.isfinite(want).all()


def test_one_thread_builds_no_team_and_without_the_flag_the_claim_team_runs(monkeypatch):
    """One thread: no team at all. Two threads without the flag: no static team (barriers); the runtime's
    one-call path (RuntimeApi, the .so's threaded call) splits batch 1 with the claim team, bit-identical."""
    m = _model("mnist_cnn")
    assert _compile(m, 1, True, monkeypatch)._main.team_parts == 1
    one = _compile(m, 1, False, monkeypatch)
    assert "_team" not in one.llvm_ir
    off = _compile(m, 2, False, monkeypatch)
    assert off._main.team_parts == 1 and off._main.api is not None and off._main.api.shape.team
    for n in (1, 2, 3):
        x = _inputs(m, n, seed=n)
        assert np.array_equal(off(x), one(x)), n


def test_concurrent_callers_get_their_own_results(monkeypatch):
    m = _model("mnist_cnn")
    one = _compile(m, 1, False, monkeypatch)
    many = _compile(m, 2, True, monkeypatch)
    xs = [_inputs(m, 1, seed=100 + i) for i in range(8)]
    want = [one(x) for x in xs]
    errors = []

    def caller(k):
        try:
            for r in range(40):
                i = (k + r) % len(xs)
                if not np.array_equal(many(xs[i]), want[i]):
                    errors.append((k, r, i))
        except Exception as e:          # surfaced below, never swallowed
            errors.append(repr(e))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung (deadlock)"
    assert not errors, errors[:5]


def test_idle_pool_workers_sleep(monkeypatch):
    """After a call the workers spin only briefly, then sleep in futex(WAIT): an idle pool burns no core."""
    import os
    import time
    m = _model("mnist_cnn")
    many = _compile(m, 2, True, monkeypatch)
    many(_inputs(m, 1))
    time.sleep(0.5)
    before = os.times()
    time.sleep(1.0)
    after = os.times()
    busy = (after.user - before.user) + (after.system - before.system)
    assert busy < 0.5, f"the process used {busy:.2f} s of CPU in 1 s of idling: a pool worker is spinning"
