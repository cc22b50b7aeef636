"""graphcnn vs ONNX Runtime on the same imported ONNX file, same thread count, same run.

    python benchmarks/onnx_compare.py                                  # tests/data/onnx/resnet_tiny.onnx
    python benchmarks/onnx_compare.py model.onnx --threads 2 --rounds 7

Batch-1 latency and batch-64 throughput. Peers run interleaved round by round (a load spike hits both),
each round's time is the median of --repeats calls, and the report gives the median over rounds plus
the load average before and after (a busy machine shows there, not as a silent slowdown).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=os.path.join(ROOT, "tests", "data", "onnx", "resnet_tiny.onnx"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", default="1,64")
    a = p.parse_args(argv)

    import onnxruntime as ort
    import graphcnn as gc
    from backends.llvm import compile_llvm  # noqa: F401  (fails early when LLVM is unavailable)

    print(f"load average before: {os.getloadavg()}")
    g = gc.onnx.import_graph(a.model)
    name = g.inputs[0].name
    fn = gc.compile(g, backend="llvm", threads=a.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    shape = g.inputs[0].shape[1:]
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in a.batches.split(",")]:
        x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
        want = sess.run(None, {name: x})[0]
        got = fn(**{name: x})
        err = float(np.max(np.abs(got - want)) / max(1e-30, float(np.max(np.abs(want)))))
        runs = {"graphcnn-llvm": lambda: fn(**{name: x}), "onnxruntime": lambda: sess.run(None, {name: x})}
        for f in runs.values():          # warm-up
            f()
            f()
        times = {k: [] for k in runs}
        for _ in range(a.rounds):
            for k, f in runs.items():
                times[k].append(timed(f, a.repeats))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {batch} (max rel. difference {err:.1e}, {a.threads} threads, {a.rounds} rounds x "
              f"{a.repeats} calls):")
        for k, t in med.items():
            rate = f"{batch / t:,.0f} images/s" if batch > 1 else f"{t * 1e6:,.1f} µs"
            print(f"  {k:14s} {rate}   (median {t * 1e3:.3f} ms per call)")
        print(f"  graphcnn / onnxruntime time: {med['graphcnn-llvm'] / med['onnxruntime']:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
