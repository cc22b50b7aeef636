"""Batch-1 latency with and without intra-op parallelism (GRAPHCNN_INTRA_OP, backends/llvm/thread_pool.py),
JIT runtime: interleaved rounds, medians, load average printed.

    python benchmarks/intra_op.py [--models mnist_cnn,lenet5,resnet8] [--rounds 15] [--calls 300]
"""
from __future__ import annotations

import argparse
import os
import runpy
import time
from pathlib import Path

import numpy as np

import graphcnn as gc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def compile_variant(m, threads, intra):
    os.environ["GRAPHCNN_INTRA_OP"] = "1" if intra else "0"
    return gc.compile(m.inference_graph(), backend="llvm", params=m.weights, passes="inference", threads=threads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_cnn,lenet5,resnet8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    for name in a.models.split(","):
        m = runpy.run_path(str(EXAMPLES / f"{name}.py"))["model"]
        m.build()
        variants = {"1 thread": compile_variant(m, 1, False), "2 threads intra-op": compile_variant(m, 2, True)}
        x = np.random.default_rng(0).standard_normal((1,) + tuple(m.inference_graph().inputs[0].shape[1:])) \
            .astype(np.float32)
        ref = variants["1 thread"](x)
        for f in variants.values():
            assert np.array_equal(f(x), ref)
            for _ in range(50):
                f(x)
        times = {k: [] for k in variants}
        for r in range(a.rounds):
            order = list(variants)[r % 2:] + list(variants)[:r % 2]     # rotate who goes first
            for k in order:
                f = variants[k]
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    f(x)
                times[k].append((time.perf_counter() - t0) / a.calls)
        base = np.median(times["1 thread"])
        for k, ts in times.items():
            med = np.median(ts)
            print(f"{name:10s} {k:20s} batch 1: {med * 1e6:8.1f} us  ({med / base:.2f}x of 1 thread)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
