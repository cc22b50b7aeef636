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
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=os.path.join(ROOT, "tests", "data", "onnx", "resnet_tiny.onnx"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--backends", default="llvm")
    a = p.parse_args(argv)
    from backends.llvm import compile_llvm  # noqa: F401  (fails early when LLVM is unavailable)
    from graphcnn.onnx.compare import compare
    compare(a.model, threads=a.threads, batches=[int(b) for b in a.batches.split(",")], rounds=a.rounds,
            repeats=a.repeats, backends=a.backends.split(","))


if __name__ == "__main__":
    main()
