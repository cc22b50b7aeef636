"""One training epoch of the reference CNNs (examples/resnet8.py, resnet20.py, mobilenet_tiny.py) in
graphcnn, PyTorch eager (benchmarks/torch_nets.py) and Keras when installed: same network, same data,
same batch size, same thread count, Adam(1e-3), peers interleaved round by round (the order rotating),
medians, the ratio to the fastest, and the load average before and after (the machine may be shared).

    python benchmarks/cnn_epochs.py --nets resnet8 --data mnist --threads 2 --rounds 5
    python benchmarks/cnn_epochs.py --nets all --data cifar10 --images 10000

Augmentation layers are off (augment=False) on every side: this times the networks. Keras runs the very
example definition (its functions re-bound to keras.layers / keras.Model), so it is the same network.
"""
from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NETS = ("resnet8", "resnet20", "mobilenet_tiny")
PEERS = ("graphcnn", "torch", "keras")


def load_images(data: str, count: int):
    """float32 NHWC images in [0, 1] and int labels (N,), the first `count` training images."""
    import numpy as np
    from graphcnn import datasets
    if data == "synthetic":
        rng = np.random.default_rng(0)
        return rng.random((count, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, count)
    loader = {"mnist": lambda: datasets.mnist.load_data(), "mnist-full": lambda: datasets.mnist.load_data("mnist"),
              "fashion-mnist": datasets.fashion_mnist.load_data, "cifar10": datasets.cifar10.load_data}[data]
    (x, y), _ = loader()
    x, y = x[:count], y[:count].reshape(-1).astype(np.int64)
    x = x.astype(np.float32) / np.float32(255)
    return (x[..., None] if x.ndim == 3 else x), y


def example_module(net: str) -> dict:
    return runpy.run_path(os.path.join(ROOT, "examples", f"{net}.py"))


class GraphcnnRunner:
    def __init__(self, net, x, y, batch, backend):
        self.m = example_module(net)["build_model"](x.shape[1:], augment=False)
        self.m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", backend=backend)
        self.x, self.y, self.batch = x, y, batch
        self.m.fit(x[:2 * batch], y[:2 * batch], epochs=1, batch_size=batch, verbose=0, seed=0)  # compile, warm up

    def epoch(self):
        self.m.fit(self.x, self.y, epochs=1, batch_size=self.batch, verbose=0)


class TorchRunner:
    def __init__(self, net, x, y, batch, threads):
        import torch
        from benchmarks.torch_nets import build
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.net = build(net, x.shape[1:])
        self.x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        self.y = torch.from_numpy(y)
        self.batch = batch
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, eps=1e-7)   # Keras's epsilon
        self.loss = torch.nn.CrossEntropyLoss()
        self._steps(torch.arange(min(2 * batch, len(self.x))))                  # warm up

    def _steps(self, order):
        self.net.train()
        for s in range(0, len(order), self.batch):
            idx = order[s:s + self.batch]
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.net(self.x[idx]), self.y[idx]).backward()
            self.opt.step()

    def epoch(self):
        self._steps(self.torch.randperm(len(self.x)))


class KerasRunner:
    def __init__(self, net, x, y, batch, threads):
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        keras = tf.keras
        mod = example_module(net)
        # the example's own functions, re-bound to Keras: the same definition builds the Keras model
        env = dict(mod, layers=keras.layers, gc=types.SimpleNamespace(Model=keras.Model))
        for k, v in list(env.items()):
            if isinstance(v, types.FunctionType) and v.__globals__ is not env:
                env[k] = types.FunctionType(v.__code__, env, v.__name__, v.__defaults__, v.__closure__)
        self.m = env["build_model"](x.shape[1:], augment=False)
        self.m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        self.x, self.y, self.batch = x, y, batch
        self.m.fit(x[:2 * batch], y[:2 * batch], epochs=1, batch_size=batch, verbose=0)

    def epoch(self):
        self.m.fit(self.x, self.y, epochs=1, batch_size=self.batch, verbose=0, shuffle=True)


def make_runner(peer, net, x, y, a):
    if peer == "graphcnn":
        return GraphcnnRunner(net, x, y, a.batch_size, a.backend)
    if peer == "torch":
        return TorchRunner(net, x, y, a.batch_size, a.threads)
    return KerasRunner(net, x, y, a.batch_size, a.threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="resnet8", help=f"comma list of {', '.join(NETS)} or 'all'")
    ap.add_argument("--data", default="mnist", choices=["mnist", "mnist-full", "fashion-mnist", "cifar10", "synthetic"])
    ap.add_argument("--images", type=int, default=8000, help="training images per epoch (the first N)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per peer, interleaved")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--backend", default="llvm", choices=["llvm", "numpy"])
    a = ap.parse_args(argv)
    nets = NETS if a.nets == "all" else tuple(a.nets.split(","))
    unknown = [n for n in nets if n not in NETS] + [p for p in a.peers.split(",") if p not in PEERS]
    if unknown:
        ap.error(f"unknown network/peer {unknown}")
    # every library sees the same thread count, set before any of them starts its pool
    os.environ["GRAPHCNN_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    x, y = load_images(a.data, a.images)
    load_before = os.getloadavg()
    print(f"data {a.data}: {len(x)} images {x.shape[1:]}, batch {a.batch_size}, threads {a.threads}, "
          f"{a.rounds} rounds; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    table = []
    for net in nets:
        runners = {}
        for peer in a.peers.split(","):
            try:
                runners[peer] = make_runner(peer, net, x, y, a)
            except ImportError as e:
                print(f"  ({net}: {peer} not installed: {e.name or e}; skipped)")
            except Exception as e:     # a peer that cannot build the net is reported, not fatal
                print(f"  ({net}: {peer} failed to build/compile: {type(e).__name__}: {e})")
        times = {p: [] for p in runners}
        order = list(runners)
        for r in range(a.rounds):
            shift = r % len(order) if order else 0
            for peer in order[shift:] + order[:shift]:
                t0 = time.perf_counter()
                runners[peer].epoch()
                times[peer].append(time.perf_counter() - t0)
        med = {p: statistics.median(ts) for p, ts in times.items() if ts}
        fastest = min(med.values()) if med else float("nan")
        for p, m in med.items():
            table.append((net, p, m, m / fastest, min(times[p]), max(times[p])))
    load_after = os.getloadavg()
    print(f"\n{'network':<16}{'peer':<10}{'median s/epoch':>16}{'x fastest':>11}{'min':>9}{'max':>9}")
    for net, p, m, ratio, lo, hi in table:
        print(f"{net:<16}{p:<10}{m:>16.3f}{ratio:>11.2f}{lo:>9.3f}{hi:>9.3f}")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} "
          f"(before: {load_before[0]:.2f}); {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
