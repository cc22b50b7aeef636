"""graphcnn vs ONNX Runtime on the same ONNX file, same thread count, same run (`graphcnn bench
model.onnx` and benchmarks/onnx_compare.py).

Peers run interleaved round by round (a load spike hits both), each round's time is the median of
`repeats` calls, and the report gives the median over rounds plus the load average before and after (a
busy machine shows there, not as a silent slowdown). Outputs are compared before timing.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from ..errors import GraphcnnError


def timed(fn, repeats):
    """Median wall time of `repeats` calls of fn()."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compare(path, threads=2, batches=(1, 64), rounds=5, repeats=20, backends=("llvm",), print_fn=print):
    """Time the imported file on each graphcnn backend and in ONNX Runtime; returns
    {batch: {"max_rel_diff": float, peer: median seconds per call}}."""
    import onnxruntime as ort
    from .. import compile as compile_graph
    from .importer import import_graph
    print_fn(f"load average before: {os.getloadavg()}")
    g = import_graph(path)
    if len(g.inputs) != 1:
        raise GraphcnnError(f"{path}: the comparison feeds one input; this model has {len(g.inputs)}")
    name = g.inputs[0].name
    fns = {f"graphcnn-{be}": compile_graph(g, backend=be, threads=threads) for be in backends}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    shape = tuple(g.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    results = {}
    for batch in batches:
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        want = sess.run(None, {name: x})[0]
        scale = max(1e-30, float(np.max(np.abs(want))))
        err = max(float(np.max(np.abs(_first(f(**{name: x})) - want))) / scale for f in fns.values())
        runs = {k: (lambda f=f: f(**{name: x})) for k, f in fns.items()}
        runs["onnxruntime"] = lambda: sess.run(None, {name: x})
        for f in runs.values():          # warm-up
            f()
            f()
        times = {k: [] for k in runs}
        for _ in range(rounds):
            for k, f in runs.items():
                times[k].append(timed(f, repeats))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[batch] = {"max_rel_diff": err, **med}
        print_fn(f"batch {batch} (max rel. difference {err:.1e}, {threads} threads, {rounds} rounds x "
                 f"{repeats} calls):")
        for k, t in med.items():
            rate = f"{batch / t:,.0f} images/s" if batch > 1 else f"{t * 1e6:,.1f} µs"
            print_fn(f"  {k:14s} {rate}   (median {t * 1e3:.3f} ms per call)")
        for k in fns:
            print_fn(f"  {k} / onnxruntime time: {med[k] / med['onnxruntime']:.2f}")
    print_fn(f"load average after: {os.getloadavg()}")
    return results


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_cli(a):
    """`graphcnn bench model.onnx`: the bench options (--batch, --threads, --rounds, --repeats) applied to
    the ONNX comparison on graphcnn's native backend; the peer is always ONNX Runtime on the same file."""
    from ..bench import check_arguments
    batches, peers = check_arguments(a)
    other = [p for p in peers if p != "onnxruntime"]
    if other:        # the network exists only as the file: ONNX Runtime is the peer that runs it
        print(f"({', '.join(other)}: not available for an .onnx MODEL; comparing with onnxruntime)")
    if not os.path.isfile(a.model):
        raise GraphcnnError(f"model file {a.model!r} not found")
    return compare(a.model, threads=a.threads, batches=batches, rounds=a.rounds, repeats=max(1, a.repeats // 3 or 1),
                   backends=("llvm",))
