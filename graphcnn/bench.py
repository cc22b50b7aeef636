"""`graphcnn bench`: time graphcnn (llvm, numpy) against PyTorch eager (and ONNX Runtime when installed) in
ONE run: same network, same data, same thread count. Prints medians and ratios.

    graphcnn bench examples/mnist_cnn.py --vs torch
    python benchmarks/compare.py examples/mnist_cnn.py --threads 2      (the same, from a source checkout)

It lives in the package (not in benchmarks/) so that `graphcnn bench` works after `pip install .`.

Measures: training seconds per epoch on the bundled subset (8,000 images, batch 128, Adam), inference
latency at batch 1, throughput at batch 256."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from .errors import GraphcnnError

PEERS = ("torch", "onnxruntime")
BACKENDS = ("llvm", "numpy")


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def torch_model(model):
    """The same architecture in PyTorch (NCHW), built from the graphcnn layer list."""
    import torch.nn as nn
    from graphcnn import layers as L
    mods, shape = [], tuple(model.input_shape)
    c = shape[-1]
    for layer in model.layers:
        if isinstance(layer, L.Input):
            continue
        if isinstance(layer, L.Conv2D):
            pad = 0 if layer.padding == "valid" else "same"
            mods.append(nn.Conv2d(c, layer.filters, layer.kernel_size, layer.strides, pad, layer.dilation_rate))
            c = layer.filters
            act = layer.activation
        elif isinstance(layer, L.MaxPool2D):
            mods.append(nn.MaxPool2d(layer.pool_size, layer.strides))
            act = None
        elif isinstance(layer, L.Flatten):
            mods.append(nn.Flatten())
            act = None
        elif isinstance(layer, L.Dropout):
            mods.append(nn.Dropout(layer.rate))
            act = None
        elif isinstance(layer, L.Dense):
            mods.append(nn.LazyLinear(layer.units))
            act = layer.activation
        else:
            raise GraphcnnError(f"bench: no PyTorch equivalent for layer {layer.name!r} ({type(layer).__name__})")
        if act == "relu":
            mods.append(nn.ReLU())
        elif act in ("sigmoid", "tanh"):
            mods.append(nn.Sigmoid() if act == "sigmoid" else nn.Tanh())
        # softmax is folded into the loss (CrossEntropyLoss on logits), as graphcnn does
    return nn.Sequential(*mods)


def bench_torch(model, x, y, batches, repeats, epochs):
    import numpy as np
    import torch
    net = torch_model(model)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))
    net(xt[:2])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    lossf = torch.nn.CrossEntropyLoss()

    def epoch():
        net.train()
        perm = torch.randperm(len(xt))
        for s in range(0, len(xt), 128):
            idx = perm[s:s + 128]
            opt.zero_grad(set_to_none=True)
            loss = lossf(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    res = {"train_epoch_s": median_time(epoch, epochs, warmup=1)}
    net.eval()
    with torch.inference_mode():
        for b in batches:
            xb = xt[:b]
            res[f"infer_b{b}_s"] = median_time(lambda: net(xb), repeats if b == 1 else max(5, repeats // 20))
    return res, net, xt


def bench_onnxruntime(net, xt, batches, repeats, threads):
    import io
    import onnxruntime as ort
    import torch
    buf = io.BytesIO()
    torch.onnx.export(net, xt[:1], buf, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    res = {}
    for b in batches:
        xb = xt[:b].numpy()
        res[f"infer_b{b}_s"] = median_time(lambda: sess.run(None, {"x": xb}), repeats if b == 1 else max(5, repeats // 20))
    return res


def bench_graphcnn(model_spec, backend, x, y, batches, repeats, epochs):
    from graphcnn.cli import load_model_source
    m = load_model_source(model_spec)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], backend=backend)
    m.fit(x[:256], y[:256], epochs=1, batch_size=128, verbose=0, seed=0)          # compile + warm up
    res = {"train_epoch_s": median_time(lambda: m.fit(x, y, epochs=1, batch_size=128, verbose=0), epochs, warmup=0)}
    exe = m._executable("predict")
    for b in batches:
        xb = x[:b]
        res[f"infer_b{b}_s"] = median_time(lambda: exe(x=xb), repeats if b == 1 else max(5, repeats // 20))
    return res


def add_arguments(ap, default_model=None):
    """The bench options, shared by `graphcnn bench` and benchmarks/compare.py."""
    ap.add_argument("model", **({"nargs": "?", "default": default_model} if default_model else {}))
    ap.add_argument("--batch", default="1,256", help="comma list of inference batch sizes")
    ap.add_argument("--vs", default="torch,onnxruntime", help=f"comma list of peers ({', '.join(PEERS)}) or ''")
    ap.add_argument("--backends", default="llvm,numpy", help="comma list of graphcnn backends")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=200, help="calls timed at batch 1 (fewer at big batches)")
    ap.add_argument("--epochs", type=int, default=3, help="timed training epochs (median)")


def _comma_list(text, allowed, flag):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise GraphcnnError(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def check_arguments(a):
    """-> (batches, peers, backends), or a GraphcnnError naming the bad option (before anything runs)."""
    try:
        batches = [int(b) for b in a.batch.split(",") if b.strip()]
    except ValueError:
        raise GraphcnnError(f"--batch {a.batch!r}: expected a comma list of integers such as 1,256") from None
    if not batches or min(batches) < 1:
        raise GraphcnnError(f"--batch {a.batch!r}: batch sizes must be integers >= 1")
    for flag, value in (("--threads", a.threads), ("--repeats", a.repeats), ("--epochs", a.epochs)):
        if value < 1:
            raise GraphcnnError(f"{flag} must be >= 1, got {value}")
    backends = _comma_list(a.backends, BACKENDS, "--backends")
    if not backends:
        raise GraphcnnError("--backends: name at least one graphcnn backend")
    return batches, _comma_list(a.vs, PEERS, "--vs"), backends


def main(argv=None, default_model=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, default_model)
    return run(ap.parse_args(argv))


def run(a):
    """Run the comparison for parsed arguments `a` (see add_arguments); returns the results dict."""
    batches, peers, backends = check_arguments(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ["GRAPHCNN_THREADS"] = str(a.threads)
    import numpy as np
    from graphcnn.datasets import mnist
    (x, y), _ = mnist.load_data()
    x = (x.astype(np.float32) / 255)[..., None]
    results = {}
    for be in backends:
        results[f"graphcnn-{be}"] = bench_graphcnn(a.model, be, x, y, batches, a.repeats,
                                                   a.epochs if be == "llvm" else 1)
    if "torch" in peers or "onnxruntime" in peers:
        try:
            import torch
            torch.set_num_threads(a.threads)
            from graphcnn.cli import load_model_source
            res, net, xt = bench_torch(load_model_source(a.model), x, y, batches, a.repeats, a.epochs)
            results["torch-eager"] = res
            if "onnxruntime" in peers:
                try:
                    results["onnxruntime"] = bench_onnxruntime(net, xt, batches, a.repeats, a.threads)
                except ImportError:
                    print("(onnxruntime not installed: skipped)")
        except ImportError:
            print("(torch not installed: pip install torch==2.13.0 for the CPU build; skipped peers)")
    import platform
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={a.threads}; "
          f"python {platform.python_version()}, numpy {np.__version__}"
          + (f", torch {sys.modules['torch'].__version__}" if "torch" in sys.modules else ""))
    cols = ["train_epoch_s"] + [f"infer_b{b}_s" for b in batches]
    print(f"{'system':<18}" + "".join(f"{c:>18}" for c in ["train s/epoch"] + [
        "b1 latency us" if b == 1 else f"b{b} images/s" for b in batches]))
    for name, r in results.items():
        row = [f"{r.get('train_epoch_s', float('nan')):.3f}" if 'train_epoch_s' in r else "-"]
        for b in batches:
            t = r.get(f"infer_b{b}_s")
            row.append("-" if t is None else (f"{t * 1e6:.0f}" if b == 1 else f"{b / t:.0f}"))
        print(f"{name:<18}" + "".join(f"{v:>18}" for v in row))
    ref = results.get("torch-eager")
    if ref:
        print("\nratios vs torch-eager (time ratio: < 1 is faster; throughput ratio: > 1 is faster)")
        for name, r in results.items():
            if name == "torch-eager":
                continue
            parts = []
            for c in cols:
                if c in r and c in ref:
                    if c.startswith("infer_b") and c != "infer_b1_s":
                        parts.append(f"{c[6:-2]} throughput x{ref[c] / r[c]:.2f}")
                    else:
                        parts.append(f"{c[:-2]} time x{r[c] / ref[c]:.2f}")
            print(f"  {name:<16} " + ", ".join(parts))
    return results

