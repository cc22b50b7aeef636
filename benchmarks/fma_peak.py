"""This machine's fp32 FMA peak as graphcnn's LLVM JIT reaches it: independent vector FMA chains in
registers (graphcnn/bench.py fma_probe_function), on 1 thread and on all threads; best of --repeats.

    python benchmarks/fma_peak.py [--threads 2] [--repeats 5]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graphcnn.bench import fma_peak_gflops  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if a.threads < 1 or a.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    for t in sorted({1, a.threads}):
        print(f"{t} thread(s): {fma_peak_gflops(t, repeats=a.repeats):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
