"""Data-parallel training: measured step parts on this machine, then a model of step time vs ranks.

    python benchmarks/distributed_scaling.py                 # measures (starts mpiexec -n 2 itself), prints
    python benchmarks/distributed_scaling.py --ranks 2 --steps 30 --batch 128

1. Measured: the training step of examples/mnist_cnn.py and examples/resnet8.py (CIFAR-10 shape, 32x32x3)
   in one process, 1 thread, batch 128 on generated images: compute seconds per sample.
2. Measured: under `mpiexec -n R` (1 thread per rank), mnist_cnn's data-parallel step
   (graphcnn.distributed.DataParallelStep) split into compute / all-reduce / update, and the all-reduce
   of each model's gradient bytes alone (the fixed-order Alltoall + Allgather the step uses).
3. Model (printed table): ring all-reduce cost 2(p-1)/p * bytes / bandwidth + 2(p-1) * latency for the
   gradient bytes at p = 1, 2, 4 ... 512 on 10 and 100 Gb/s links; weak scaling (batch 128 per rank,
   efficiency = compute / (compute + all-reduce), no overlap: graphcnn's gradient function is one native
   call, so the reduction starts after the whole backward) and strong scaling (global batch 4096, compute
   assumed linear in the per-rank batch, optimistic for small batches).
Latencies per message are assumptions (10 GbE over TCP: 25 us, 100 Gb InfiniBand/RoCE: 2 us); change them
with --latency-us. The machine may be shared: the load average is printed with the measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LINKS = {"10 Gb/s": 10e9 / 8, "100 Gb/s": 100e9 / 8}      # bytes per second
RANKS = [2 ** k for k in range(10)]                        # 1 .. 512
WEAK_BATCH, STRONG_BATCH = 128, 4096


def build(name):
    """A fresh compiled model of examples/<name>.py (resnet8 for 32x32x3) and its input shape."""
    import graphcnn as gc
    ns = runpy.run_path(os.path.join(ROOT, "examples", f"{name}.py"))
    model = ns["build_model"]((32, 32, 3), augment=False) if "build_model" in ns else ns["model"]
    model.compile("adam", metrics=["accuracy"], backend="llvm", threads=1)
    assert isinstance(model, gc.Model)
    return model, tuple(model.input_shape)


def images(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n,) + shape, dtype=np.float32), rng.integers(0, 10, n)


def feeds(exe, model, x, y) -> dict:
    """The training step's inputs by name: the images (the first input), labels, the learning rate."""
    out = {exe.inputs[0][0]: x, "y": y.astype(np.float32)}
    out.update((name, np.float32(model.learning_rate)) for name, t in exe.inputs if not t.batched)
    return out


def gradient_bytes(model) -> int:
    return 4 * sum(int(np.prod(model.weights[k].shape)) for k in model._trainable)


def compute_per_sample(name, batch, steps):
    """Median seconds per sample of one whole training step (one process, 1 thread)."""
    model, shape = build(name)
    x, y = images(shape, batch * (steps + 1))
    model.fit(x[:batch], y[:batch], epochs=1, batch_size=batch, verbose=0)    # compile + warm up
    exe = model._executable("train", None)
    times = []
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        exe(**feeds(exe, model, x[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch, gradient_bytes(model)


def measure_ranks(batch, steps, grad_bytes):
    """Under mpiexec: mnist_cnn's data-parallel step parts, and the fixed-order all-reduce alone."""
    import graphcnn as gc
    from graphcnn.distributed import DataParallelStep
    comm = gc.distributed.init()
    model, shape = build("mnist_cnn")
    x, y = images(shape, batch * (steps + 1))
    exe = model._executable("train", None)
    step = DataParallelStep(exe, comm)
    def run(s):
        lo, hi = step.shard(batch)
        rows = slice(s * batch + lo, s * batch + hi)
        step(feeds(exe, model, x[rows], y[rows]), batch)
    run(0)
    step.compute_seconds = step.reduce_seconds = step.update_seconds = 0.0
    for s in range(1, steps + 1):
        run(s)
    parts = {k: getattr(step, k + "_seconds") / steps for k in ("compute", "reduce", "update")}
    alone = {}
    for name, nbytes in grad_bytes.items():     # the same exchange on a buffer of that many bytes
        floats = nbytes // 4
        seg = -(-floats // comm.Get_size())
        send = np.ones((comm.Get_size(), 1, seg), np.float32)
        recv, out = np.empty_like(send), np.empty((comm.Get_size(), seg), np.float32)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            comm.Alltoall(send, recv)
            comm.Allgather(recv[0, 0], out)
        alone[name] = (time.perf_counter() - t0) / steps
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "step": parts, "allreduce_alone": alone}))


def ring_allreduce(p, nbytes, bandwidth, latency):
    return 0.0 if p == 1 else 2 * (p - 1) / p * nbytes / bandwidth + 2 * (p - 1) * latency


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--latency-us", type=float, nargs=2, default=(25.0, 2.0), metavar=("L10", "L100"))
    ap.add_argument("--measure-ranks", default=None, help=argparse.SUPPRESS)   # set for the mpiexec child
    a = ap.parse_args()
    if a.measure_ranks:
        measure_ranks(a.batch, a.steps, json.loads(a.measure_ranks))
        return
    os.environ.setdefault("GRAPHCNN_THREADS", "1")
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    per_sample, grad = {}, {}
    for name in ("mnist_cnn", "resnet8"):
        per_sample[name], grad[name] = compute_per_sample(name, a.batch, a.steps)
        print(f"{name}: {grad[name] / 4:.0f} trainable floats = {grad[name] / 1e6:.3f} MB of gradients; "
              f"step {per_sample[name] * a.batch * 1e3:.1f} ms at batch {a.batch} "
              f"({per_sample[name] * 1e6:.0f} us/sample, 1 process x 1 thread)")
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec:
        out = subprocess.run([mpiexec, "-n", str(a.ranks), sys.executable, os.path.abspath(__file__),
                              "--steps", str(a.steps), "--batch", str(a.batch), "--measure-ranks", json.dumps(grad)],
                             capture_output=True, text=True, env=dict(os.environ, GRAPHCNN_THREADS="1"), timeout=600)
        if out.returncode:
            sys.exit(f"mpiexec run failed:\n{out.stderr}")
        m = json.loads(out.stdout.strip().splitlines()[-1])
        s = m["step"]
        total = sum(s.values())
        print(f"mnist_cnn data-parallel step, {m['ranks']} ranks x 1 thread, global batch {a.batch} (this host, "
              f"shared memory): compute {s['compute'] * 1e3:.1f} ms, all-reduce (with the wait for the slower rank) "
              f"{s['reduce'] * 1e3:.2f} ms, "
              f"update {s['update'] * 1e3:.2f} ms = all-reduce {100 * s['reduce'] / total:.1f}% of the step")
        for name, t in m["allreduce_alone"].items():
            print(f"  fixed-order all-reduce of {name}'s {grad[name] / 1e6:.3f} MB alone: {t * 1e3:.3f} ms "
                  f"({m['ranks']} ranks, shared memory)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for name in ("mnist_cnn", "resnet8"):
        nbytes = grad[name]
        weak = per_sample[name] * WEAK_BATCH
        print(f"\n{name}: {nbytes / 1e6:.3f} MB gradients; compute {weak * 1e3:.1f} ms per step at batch "
              f"{WEAK_BATCH}/rank (weak), {per_sample[name] * STRONG_BATCH * 1e3:.0f} ms at global batch "
              f"{STRONG_BATCH} on one rank (strong)")
        print("| ranks | all-reduce 10 Gb/s | all-reduce 100 Gb/s | weak eff. 10 | weak eff. 100 "
              "| strong speedup 10 | strong speedup 100 |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for p in RANKS:
            ar = [ring_allreduce(p, nbytes, bw, lat * 1e-6) for bw, lat in zip(LINKS.values(), a.latency_us)]
            strong_1 = per_sample[name] * STRONG_BATCH
            strong = [strong_1 / (per_sample[name] * STRONG_BATCH / p + t) for t in ar]
            print(f"| {p} | {ar[0] * 1e3:.3f} ms | {ar[1] * 1e3:.3f} ms | {weak / (weak + ar[0]):.1%} | "
                  f"{weak / (weak + ar[1]):.1%} | {strong[0]:.1f}x | {strong[1]:.1f}x |")


if __name__ == "__main__":
    main()
