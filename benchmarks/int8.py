"""Batch inference throughput of examples/mnist_cnn.py in fp32 vs int8 (gc.quantize), both on the same
backend: rounds interleaved (the order alternating), medians of images/s, load average before and after
(the machine may be shared). The model is trained for `--train-images` images first (0: untrained; the
speed does not depend on the weights) and calibrated on 500 training images.

    python benchmarks/int8.py --batch 256 --images 4096 --rounds 7
    GRAPHCNN_THREADS=1 python benchmarks/int8.py --backend llvm

`graphcnn bench MODEL --int8` times the int8 model against ONNX Runtime's and TFLite's int8 as well.
"""
from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    import numpy as np

    import graphcnn as gc
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=4096, help="images per timed predict call")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", default="llvm", choices=("llvm", "numpy"))
    p.add_argument("--train-images", type=int, default=2000)
    a = p.parse_args(argv)
    (xt, yt), (xs, ys) = gc.datasets.mnist.load_data()
    xt, xs = xt.astype(np.float32) / 255, xs.astype(np.float32) / 255
    model = runpy.run_path(os.path.join(ROOT, "examples", "mnist_cnn.py"))["model"]
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", backend=a.backend)
    if a.train_images:
        model.fit(xt[:a.train_images], yt[:a.train_images], epochs=1, batch_size=32, seed=0, verbose=0)
    q = gc.quantize(model, xt[-500:], backend=a.backend)
    x = np.resize(xs, (a.images,) + xs.shape[1:])
    peers = {"fp32": lambda: model.predict(x, batch_size=a.batch), "int8": lambda: q.predict(x, batch_size=a.batch)}
    for run in peers.values():        # compile for this batch size, warm caches
        run()
    n = min(len(ys), a.images)          # x starts with the test split
    acc = {k: float((f()[:n].argmax(1) == ys[:n]).mean()) for k, f in peers.items()}
    load_before = os.getloadavg()
    times = {k: [] for k in peers}
    for r in range(a.rounds):
        for k in (list(peers) if r % 2 == 0 else list(peers)[::-1]):
            t0 = time.perf_counter()
            peers[k]()
            times[k].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    print(f"mnist_cnn predict, backend {a.backend} ({q.backend} for int8), batch {a.batch}, {a.images} images/call, "
          f"{a.rounds} interleaved rounds, threads={os.environ.get('GRAPHCNN_THREADS', 'default')}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k}: median {med * 1e3:8.1f} ms = {a.images / med:9.0f} images/s "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms); test accuracy {acc[k]:.4f}")
    ratio = statistics.median(times["fp32"]) / statistics.median(times["int8"])
    print(f"  int8 / fp32 throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
