"""Throughput of the LLVM backend's GEMM-family kernels on the mnist_cnn layers, against this machine's
float32 matmul peak (NumPy/OpenBLAS sgemm).

    python benchmarks/kernels.py [--batch 128] [--runs 30] [--asm]

(a) peak: median GFLOP/s of a 2048^3 sgemm with 1 and 2 BLAS threads, each measured in a fresh
    subprocess with OPENBLAS_NUM_THREADS set before NumPy is imported. OPENBLAS_CORETYPE /
    OPENBLAS_L2_SIZE, when set on this machine (they slow a current OpenBLAS), are removed for that
    subprocess only.
(b) each kernel single-threaded, median of --runs timed calls after a warm-up, as GFLOP/s (useful
    flops: 2*MACs of the mathematical op, not counting padding lanes) and as % of the 1-thread peak.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402

from backends.llvm.jit import JitModule, host_target  # noqa: E402
from backends.llvm.kernels.builder import scratch_need  # noqa: E402
from backends.llvm.kernels.conv import (build_conv2d, build_conv2d_grad_filter,  # noqa: E402
                                        build_conv2d_grad_input, conv_geometry)
from backends.llvm.kernels.matmul import build_dense, build_matmul  # noqa: E402

PEAK_SNIPPET = """
import json, time, numpy as np
n = {n}
a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
a @ b
ts = []
for _ in range({runs}):
    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
print(json.dumps(2 * n ** 3 / float(np.median(ts)) / 1e9))
"""


def sgemm_peak(threads: int, n: int = 2048, runs: int = 9) -> float:
    """Median float32 GFLOP/s of an n^3 NumPy matmul with `threads` BLAS threads (fresh process)."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    res = subprocess.run([sys.executable, "-c", PEAK_SNIPPET.format(n=n, runs=runs)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


CONV_LAYERS = {
    # name: (in_hwc, kernel, filters)   -- examples/mnist_cnn.py: valid 3x3 convs, relu
    "conv1": ((28, 28, 1), (3, 3), 32),
    "conv2": ((13, 13, 32), (3, 3), 64),
}


def median_seconds(fn, runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def build_cases(batch: int):
    """-> (module, list of (label, kernel name, flops, ctypes args builder))."""
    target = host_target()
    module = ir.Module(name="bench")
    rng = np.random.default_rng(0)
    cases = []
    P = ctypes.c_void_p
    for layer, (hwc, k, f) in CONV_LAYERS.items():
        g = conv_geometry(hwc, k, f, (1, 1), ((0, 0), (0, 0)), (1, 1))
        attrs = dict(in_hwc=hwc, kernel_hw=k, filters=f, target=target)
        x = rng.standard_normal((batch,) + hwc).astype(np.float32)
        w = rng.standard_normal(k + (hwc[2], f)).astype(np.float32)
        b = rng.standard_normal(f).astype(np.float32)
        y = np.empty((batch, g.oh, g.ow, f), np.float32)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = np.empty_like(x)
        dw = np.empty_like(w)
        flops = 2.0 * batch * g.pixels * g.taps * f
        build_conv2d(module, f"{layer}_fwd", has_bias=True, activation="relu", **attrs)
        build_conv2d_grad_input(module, f"{layer}_gi", **attrs)
        build_conv2d_grad_filter(module, f"{layer}_gf", **attrs)
        cases.append((f"{layer} forward (+bias, relu)", f"{layer}_fwd", flops, (x, w, b, None, y), 5))
        cases.append((f"{layer} grad_input", f"{layer}_gi", flops, (dy, w, dx), 3))
        cases.append((f"{layer} grad_filter", f"{layer}_gf", flops, (x, dy, dw), 3))
    x = rng.standard_normal((batch, 1600)).astype(np.float32)
    w = rng.standard_normal((1600, 10)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    out = np.empty((batch, 10), np.float32)
    dy = rng.standard_normal((batch, 10)).astype(np.float32)
    dx = np.empty_like(x)
    dw = np.empty_like(w)
    build_dense(module, "dense_fwd", in_features=1600, units=10, has_bias=True, activation="linear",
                target=target)
    build_matmul(module, "dense_dx", a_shape=(None, 10), b_shape=(1600, 10), transpose_b=True, target=target)
    build_matmul(module, "dense_dw", a_shape=(None, 1600), b_shape=(None, 10), transpose_a=True,
                 target=target)
    flops = 2.0 * batch * 1600 * 10
    cases.append(("dense 1600->10 forward (+bias)", "dense_fwd", flops, (x, w, b, out), 4))
    cases.append(("dense dx = dy @ w^T", "dense_dx", flops, (dy, w, dx), 3))
    cases.append(("dense dw = x^T @ dy", "dense_dw", flops, (x, dy, dw), 3))
    return module, cases, P


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--asm", action="store_true", help="report vector register use in the generated asm")
    ap.add_argument("--no-peak", action="store_true", help="skip the NumPy sgemm peak measurement")
    args = ap.parse_args(argv)
    if args.runs < 20:
        ap.error("--runs must be >= 20")

    target = host_target()
    print(f"target: {target.cpu}, {target.vector_bits}-bit vectors ({target.vector_lanes} float lanes)")
    peak1 = peak2 = None
    if not args.no_peak:
        peak1, peak2 = sgemm_peak(1), sgemm_peak(2)
        print(f"numpy sgemm 2048^3 peak: 1 thread {peak1:.1f} GFLOP/s, 2 threads {peak2:.1f} GFLOP/s")

    module, cases, P = build_cases(args.batch)
    t0 = time.perf_counter()
    jit = JitModule(str(module))
    print(f"compiled {len(cases)} kernels in {time.perf_counter() - t0:.2f} s")
    if args.asm:
        asm = jit.asm
        zmm, ymm = asm.count("%zmm"), asm.count("%ymm")
        print(f"asm: {ymm} ymm and {zmm} zmm register operands, "
              f"{asm.count('vfmadd')} vfmadd instructions")

    print(f"\nbatch {args.batch}, single thread, median of {args.runs} runs")
    print(f"{'kernel':34s} {'ms':>8s} {'GFLOP/s':>9s} {'% peak':>7s}")
    for label, name, flops, arrays, nptr in cases:
        # every GEMM-family kernel takes a scratch pointer after its operands (sized by scratch_need)
        fn = ctypes.CFUNCTYPE(None, *([P] * (nptr + 1)), ctypes.c_int64)(jit.address(name))
        scratch = np.empty(scratch_need(module.get_global(name)).bytes(args.batch) // 4 + 16, np.float32)
        ptrs = [None if a is None else a.ctypes.data for a in arrays] + [scratch.ctypes.data + (-scratch.ctypes.data) % 64]
        sec = median_seconds(lambda: fn(*ptrs, args.batch), args.runs)
        gf = flops / sec / 1e9
        pct = f"{100 * gf / peak1:6.1f}%" if peak1 else "    n/a"
        print(f"{label:34s} {sec * 1e3:8.3f} {gf:9.1f} {pct:>7s}")


if __name__ == "__main__":
    main()
