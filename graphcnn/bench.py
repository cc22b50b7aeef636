"""`graphcnn bench`: graphcnn against every installed peer in ONE run, interleaved round by round.

    graphcnn bench examples/mnist_cnn.py --vs torch,onnxruntime,tflite,keras --rounds 5
    python benchmarks/compare.py examples/lenet5.py --threads 2        (the same code, from a checkout)
    graphcnn bench examples/mnist_cnn.py --int8 --vs onnxruntime,tflite   (int8 inference: graphcnn/bench_int8.py)

Systems: graphcnn three ways - `gc.load(saved).predict` (graphcnn-runtime), `model.predict` and
`model.fit` (graphcnn-model), the compiled `.so` called through ctypes (graphcnn-so) - and each peer that
is installed (PyTorch eager, ONNX Runtime on graphcnn's own ONNX export, TFLite on the Keras twin
converted, Keras/TensorFlow). A peer that is not installed is listed as skipped with its pip command.

Measures: first (cold) training epoch - a fresh model built, compiled and trained one epoch, with an
empty JIT cache for graphcnn -, a warm epoch, batch-1 latency, batch-256 throughput (bundled MNIST 8k,
batch 128, Adam), and the peak RSS of each system measured in a child process of its own.

Round r runs every system's measurement once, the system order rotated by r, so a change in machine
load hits every system alike; the table shows medians over the rounds, ratios to the FASTEST peer, and
% of the FMA peak measured by a probe built with graphcnn's own LLVM JIT (fma_peak_gflops)."""
from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from .errors import GraphcnnError

PEERS = ("torch", "onnxruntime", "tflite", "keras")
GRAPHCNN_SYSTEMS = ("graphcnn-runtime", "graphcnn-model", "graphcnn-so")
# what each peer needs importable, and the command that installs it
PEER_MODULES = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx"),
                "tflite": ("tensorflow",), "keras": ("keras", "tensorflow")}
PEER_INSTALL = {"torch": "pip install torch==2.13.0   (the CPU wheel; plain `pip install torch` fetches CUDA)",
                "onnxruntime": "pip install onnx onnxruntime",
                "tflite": "pip install tensorflow-cpu ai-edge-litert",
                "keras": "pip install keras tensorflow-cpu"}
TRAIN_BATCH = 128
TRAIN_MEASURES = ("train_first_s", "train_epoch_s")
RSS_MEASURE = "peak_rss_mb"
SUPPORTED_LAYERS = "Input, Conv2D, MaxPool2D, AveragePool2D, Flatten, Dropout, Dense"
DEFAULT_CALIBRATION_IMAGES = 500


# -- options ------------------------------------------------------------------------------------------
def add_arguments(ap, default_model=None):
    """The bench options, shared by `graphcnn bench` and benchmarks/compare.py."""
    ap.add_argument("model", **({"nargs": "?", "default": default_model} if default_model else {}))
    ap.add_argument("--batch", default="1,256", help="comma list of inference batch sizes (default 1,256)")
    ap.add_argument("--vs", default=",".join(PEERS), help=f"comma list of peers ({', '.join(PEERS)}) or ''")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every system")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    ap.add_argument("--repeats", type=int, default=200,
                    help="timed calls per round at batch 1 (repeats // 20, at least 1, at larger batches)")
    ap.add_argument("--images", type=int, default=8000, help="training images per epoch (bundled MNIST)")
    ap.add_argument("--no-train", action="store_true", help="skip the training rows")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    ap.add_argument("--int8", action="store_true",
                    help="int8 inference: graphcnn's quantized model (.gcnn and .so) against ONNX Runtime's and "
                         "TFLite's static int8 quantization, with an agreement report")
    ap.add_argument("--calibration-images", type=int, default=None, metavar="N",
                    help=f"with --int8: calibrate every system on the first N bundled training images "
                         f"(default {DEFAULT_CALIBRATION_IMAGES})")


def _comma_list(text, allowed, flag):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise GraphcnnError(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if len(set(items)) != len(items):
        raise GraphcnnError(f"{flag} {text!r}: a name is listed twice")
    return items


def check_arguments(a):
    """-> (batches, peers), or a GraphcnnError naming the bad option (before anything runs)."""
    try:
        batches = [int(b) for b in a.batch.split(",") if b.strip()]
    except ValueError:
        raise GraphcnnError(f"--batch {a.batch!r}: expected a comma list of integers such as 1,256") from None
    if not batches or min(batches) < 1:
        raise GraphcnnError(f"--batch {a.batch!r}: batch sizes must be integers >= 1")
    if len(set(batches)) != len(batches):
        raise GraphcnnError(f"--batch {a.batch!r}: a batch size is listed twice")
    for flag, value in (("--threads", a.threads), ("--rounds", a.rounds), ("--repeats", a.repeats),
                        ("--images", a.images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GraphcnnError(f"{flag} must be an integer >= 1, got {value!r}")
    if a.images < TRAIN_BATCH and not a.no_train:
        raise GraphcnnError(f"--images must be >= the training batch {TRAIN_BATCH}, got {a.images}")
    n = getattr(a, "calibration_images", None)
    if n is not None and not getattr(a, "int8", False):
        raise GraphcnnError("--calibration-images N sets the int8 calibration: it needs --int8")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise GraphcnnError(f"--calibration-images must be an integer >= 1, got {n!r}")
    return batches, _comma_list(a.vs, PEERS, "--vs")


def installed_peers(peers):
    """-> (peers whose modules import here, {peer: pip command} for the others)."""
    have, skipped = [], {}
    for p in peers:
        if all(importlib.util.find_spec(m) is not None for m in PEER_MODULES[p]):
            have.append(p)
        else:
            skipped[p] = PEER_INSTALL[p]
    return have, skipped


# -- the FMA peak probe -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def fma_probe_function(target=None):
    """JIT-compile `void fma_peak(float *out, i64 iterations)`: independent vector FMA chains held in
    registers (acc = acc * m + a), their sum stored to out so nothing is dead. -> (ctypes function,
    flops per iteration, the JitModule that keeps the code alive)."""
    from llvmlite import ir
    from backends.llvm.jit import JitModule, host_target
    from backends.llvm.kernels.builder import KernelBuilder
    target = target or host_target()
    # enough chains to cover FMA latency x FMA ports (4 x 2 on current x86), few enough to stay in
    # registers: 32 zmm registers with AVX-512, 16 ymm/xmm otherwise (two hold the constants)
    chains = 16 if target.vector_bits == 512 else 12
    module = ir.Module(name="fma_peak")
    kb = KernelBuilder(module, "fma_peak", 1, target, arg_names=("out",))
    vec = kb.vec_type()
    m, a = kb.const(0.999999, like=vec), kb.const(1e-7, like=vec)
    with kb.for_range(kb.n, unroll=False, vectorize=False, name="fma") as loop:
        accs = [loop.carry(kb.const(1.0 + j / 64, like=vec), name=f"acc{j}") for j in range(chains)]
        for acc in accs:
            loop.next(acc, kb.fma(acc, m, a))
    total = loop.result(accs[0])
    for acc in accs[1:]:
        total = kb.b.fadd(total, loop.result(acc))
    kb.store_vec(total, kb.args[0])
    kb.finish()
    jit = JitModule(str(module))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(jit.address("fma_peak"))
    return fn, 2 * chains * target.vector_lanes, jit


def fma_peak_gflops(threads: int, seconds: float = 0.03, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s (a peak: other load only lowers it) of the FMA probe run on `threads` threads at once (ctypes releases the GIL
    during the call, so the threads run in parallel); each call lasts about `seconds`."""
    import numpy as np
    fn, flops_per_iter, _jit = fma_probe_function()
    outs = [np.zeros(64, np.float32) for _ in range(threads)]
    iters = 20000
    while True:                                   # calibrate the iteration count to ~`seconds` per call
        t0 = time.perf_counter()
        fn(outs[0].ctypes.data, iters)
        dt = time.perf_counter() - t0
        if dt > seconds / 4 or iters > 1 << 34:
            iters = max(1, int(iters * seconds / max(dt, 1e-9)))
            break
        iters *= 4
    rates = []
    for _ in range(repeats):
        barrier = threading.Barrier(threads)
        spans = [None] * threads

        def work(i):
            barrier.wait()
            t = time.perf_counter()
            fn(outs[i].ctypes.data, iters)
            spans[i] = (t, time.perf_counter())
        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = max(s[1] for s in spans) - min(s[0] for s in spans)
        rates.append(threads * iters * flops_per_iter / wall / 1e9)
    return max(rates)


# -- flops of a model, from the IR ops' cost model -------------------------------------------------------
def graph_flops(graph, batch: int) -> int:
    """Sum of the nodes' `flops` (ir/ops) for one call at this batch size."""
    return sum(node.opdef.flops(node, batch) for node in graph.nodes)


def model_flops(model_spec, input_shape, images: int, batches):
    """{measure: flops of one timed unit}: a training epoch of `images` (batch 128), one inference call
    per batch size."""
    from ir.passes import run_pipeline
    from .cli import load_model_source
    from .memory_report import training_graph
    m = load_model_source(model_spec)
    infer = run_pipeline(m.inference_graph(), "inference").graph
    out = {f"b{b}_s": graph_flops(infer, b) for b in batches}
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    step = training_graph(m)
    full, rest = divmod(images, TRAIN_BATCH)
    epoch = full * graph_flops(step, TRAIN_BATCH) + (graph_flops(step, rest) if rest else 0)
    out["train_first_s"] = out["train_epoch_s"] = epoch
    return out


# -- data ----------------------------------------------------------------------------------------------
def bench_data(input_shape, images=None, split="train", flag="--images"):
    """The first `images` (all when None) bundled MNIST images of `split` (train or test) as float32 in
    [0, 1], shaped for the model (N,) + input_shape (28x28x1 or 784), and their int64 labels."""
    import numpy as np
    from .datasets import mnist
    x, y = mnist.load_data()[0 if split == "train" else 1]
    images = len(x) if images is None else images
    if images > len(x):
        raise GraphcnnError(f"{flag} {images}: the bundled MNIST subset has {len(x)} "
                            f"{'training' if split == 'train' else 'test'} images")
    x = x[:images].astype(np.float32) / np.float32(255)
    shape = tuple(input_shape)
    if int(np.prod(shape)) != 28 * 28:
        raise GraphcnnError(f"bench: the model's input {shape} does not hold a 28x28 MNIST image; "
                            f"build it for (28, 28, 1), e.g. build_model(input_shape=(28, 28, 1))")
    return np.ascontiguousarray(x.reshape((images,) + shape)), y[:images].reshape(-1).astype(np.int64)


def nchw(x):
    """NHWC batch -> contiguous NCHW (other ranks unchanged)."""
    import numpy as np
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


# -- systems: each has name, trains (bool), threads, and infer(b) -> a zero-argument call; trainers also
#    first_epoch() -> seconds and epoch() --------------------------------------------------------------
class GraphcnnModel:
    """model.fit / model.predict of the model built from MODEL."""
    name, trains = "graphcnn-model", True

    def __init__(self, ctx):
        self.ctx = ctx
        self.model = self._fresh()
        self.model.fit(ctx.x[:2 * TRAIN_BATCH], ctx.y[:2 * TRAIN_BATCH], epochs=1, batch_size=TRAIN_BATCH,
                       verbose=0, seed=0)                                   # compile and warm up
        self.threads = int(os.environ.get("GRAPHCNN_THREADS", "1"))

    def _fresh(self):
        from .cli import load_model_source
        m = load_model_source(self.ctx.model_spec)
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], backend="llvm")
        return m

    def first_epoch(self):
        # cold: a new model, an empty JIT cache and no compile worker process running, so every kernel is
        # compiled (and the workers started) inside the timed span
        from backends.llvm import compile_pool
        compile_pool.shutdown()
        saved = os.environ.get("GRAPHCNN_CACHE")
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as cache:
            os.environ["GRAPHCNN_CACHE"] = cache
            try:
                t0 = time.perf_counter()
                m = self._fresh()
                m.fit(self.ctx.x, self.ctx.y, epochs=1, batch_size=TRAIN_BATCH, verbose=0, seed=0)
                return time.perf_counter() - t0
            finally:
                os.environ.pop("GRAPHCNN_CACHE") if saved is None else os.environ.__setitem__("GRAPHCNN_CACHE", saved)

    def epoch(self):
        self.model.fit(self.ctx.x, self.ctx.y, epochs=1, batch_size=TRAIN_BATCH, verbose=0)

    def infer(self, b):
        xb = self.ctx.x[:b]
        return lambda: self.model.predict(xb, batch_size=b)


class GraphcnnRuntime:
    """gc.load(saved .gcnn).predict."""
    name, trains, file = "graphcnn-runtime", False, "model.gcnn"

    def __init__(self, ctx):
        from .artifact import load
        self.ctx, self.runtime = ctx, load(ctx.path(self.file))
        self.threads = int(os.environ.get("GRAPHCNN_THREADS", "1"))

    def infer(self, b):
        xb = self.ctx.x[:b]
        return lambda: self.runtime.predict(xb, batch_size=b)


class GraphcnnSharedLibrary:
    """NAME_predict_threads of the .so that `graphcnn compile --emit so,h` builds, called through ctypes with
    the bench's thread count (at most NAME_MAX_THREADS, 64) and a workspace allocated once per batch size
    (NAME_workspace_size_threads). A library without the threaded API runs NAME_predict on one thread."""
    name, trains, info_file = "graphcnn-so", False, "so.json"

    def __init__(self, ctx):
        import numpy as np
        with open(ctx.path(self.info_file)) as f:
            info = json.load(f)
        self.ctx, self.np = ctx, np
        self.lib = ctypes.CDLL(ctx.path(info["file"]))
        sym = info["symbol"]
        self.out_shape = tuple(info["output_shape"])
        threaded = getattr(self.lib, f"{sym}_predict_threads", None)
        if threaded is not None:
            self.threads = max(1, min(int(ctx.threads), 64))
            size = getattr(self.lib, f"{sym}_workspace_size_threads")
            size.argtypes, size.restype = [ctypes.c_int64, ctypes.c_int], ctypes.c_size_t
            threaded.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            threaded.restype = ctypes.c_int
            self.size, self.predict, self.extra = (lambda b: size(b, self.threads)), threaded, (self.threads,)
            return
        self.threads, self.extra = 1, ()    # an older library: the single-threaded entry point only
        self.size = getattr(self.lib, f"{sym}_workspace_size")
        self.size.argtypes, self.size.restype = [ctypes.c_int64], ctypes.c_size_t
        self.predict = getattr(self.lib, f"{sym}_predict")
        self.predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        self.predict.restype = ctypes.c_int

    def run(self, xb):
        """Outputs for a contiguous float32 batch (a fresh array; used by the agreement check)."""
        call, out = self._call(xb)
        call()
        return out

    def _call(self, xb):
        np = self.np
        b = len(xb)
        ws = np.empty(self.size(b) + 64, np.uint8)
        out = np.empty((b,) + self.out_shape, np.float32)
        args = (xb.ctypes.data, b, out.ctypes.data, ws.ctypes.data) + self.extra
        predict = self.predict

        def call():
            code = predict(*args)
            if code != 0:
                raise GraphcnnError(f"{self.name}: {self.ctx.path(self.info_file)}: predict returned error {code}")
        call.keep = (xb, ws, out)          # the buffers live as long as the call
        return call, out

    def infer(self, b):
        return self._call(self.np.ascontiguousarray(self.ctx.x[:b]))[0]


def torch_model(model):
    """The same architecture in PyTorch (NCHW), built from a Sequential's layer list."""
    import torch.nn as nn
    from graphcnn import layers as L
    mods = []
    c = tuple(model.input_shape)[-1]
    for layer in model.layers:
        act = None
        if isinstance(layer, L.Input):
            continue
        if isinstance(layer, L.Conv2D):
            pad = 0 if layer.padding == "valid" else "same"
            mods.append(nn.Conv2d(c, layer.filters, layer.kernel_size, layer.strides, pad, layer.dilation_rate))
            c, act = layer.filters, layer.activation
        elif isinstance(layer, L.MaxPool2D):
            mods.append(nn.MaxPool2d(layer.pool_size, layer.strides))
        elif isinstance(layer, L.AveragePool2D):
            mods.append(nn.AvgPool2d(layer.pool_size, layer.strides))
        elif isinstance(layer, L.Flatten):
            # graphcnn flattens NHWC; the order differs from NCHW, which changes nothing in the timing
            mods.append(nn.Flatten())
        elif isinstance(layer, L.Dropout):
            mods.append(nn.Dropout(layer.rate))
        elif isinstance(layer, L.Dense):
            mods.append(nn.LazyLinear(layer.units))
            act = layer.activation
        else:
            raise GraphcnnError(f"bench: no PyTorch twin for layer {layer.name!r} ({type(layer).__name__}); "
                                f"Sequential models of {SUPPORTED_LAYERS} and benchmarks/torch_nets.py's "
                                f"networks have one")
        if act == "relu":
            mods.append(nn.ReLU())
        elif act in ("sigmoid", "tanh"):
            mods.append(nn.Sigmoid() if act == "sigmoid" else nn.Tanh())
        # softmax is folded into the loss (CrossEntropyLoss on logits), as graphcnn does
    return nn.Sequential(*mods)


def torch_twin(ctx):
    """The PyTorch twin of ctx's model: benchmarks/torch_nets.py for the real CNNs, else torch_model."""
    import torch
    if ctx.model.name in ("resnet8", "resnet20", "mobilenet_tiny"):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        try:
            from benchmarks.torch_nets import build
        except ImportError:
            raise GraphcnnError(f"bench: the PyTorch twin of {ctx.model.name} is benchmarks/torch_nets.py, "
                                f"which ships with a source checkout only") from None
        net = build(ctx.model.name, tuple(ctx.model.input_shape))
    else:
        net = torch_model(ctx.model)
    with torch.no_grad():
        net(torch.from_numpy(nchw(ctx.x[:2])))          # materialize lazy layers
    return net


class TorchEager:
    """PyTorch eager: Adam(1e-3, eps=1e-7), CrossEntropyLoss, batch 128; inference under inference_mode."""
    name, trains = "torch", True

    def __init__(self, ctx):
        import torch
        torch.set_num_threads(ctx.threads)
        self.ctx, self.torch = ctx, torch
        self.xt, self.yt = torch.from_numpy(nchw(ctx.x)), torch.from_numpy(ctx.y)
        self.net, self.opt = self._fresh()
        self._epoch(self.net, self.opt, 2 * TRAIN_BATCH)                 # warm up
        self.threads = torch.get_num_threads()

    def _fresh(self):
        net = torch_twin(self.ctx)
        return net, self.torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)

    def _epoch(self, net, opt, count):
        torch = self.torch
        lossf = torch.nn.CrossEntropyLoss()
        net.train()
        perm = torch.randperm(count)
        for s in range(0, count, TRAIN_BATCH):
            idx = perm[s:s + TRAIN_BATCH]
            opt.zero_grad(set_to_none=True)
            lossf(net(self.xt[idx]), self.yt[idx]).backward()
            opt.step()

    def first_epoch(self):
        t0 = time.perf_counter()
        net, opt = self._fresh()
        self._epoch(net, opt, len(self.xt))
        return time.perf_counter() - t0

    def epoch(self):
        self._epoch(self.net, self.opt, len(self.xt))

    def infer(self, b):
        torch, net, xb = self.torch, self.net, self.xt[:b]
        net.eval()

        def call():
            with torch.inference_mode():
                net(xb)
        return call


class OnnxRuntime:
    """ONNX Runtime (CPU provider) on graphcnn's own ONNX export of the trained model (NCHW input)."""
    name, trains, file = "onnxruntime", False, "model.onnx"

    def __init__(self, ctx):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = ctx.threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(ctx.path(self.file), so, providers=["CPUExecutionProvider"])
        self.input = self.sess.get_inputs()[0].name
        self.ctx, self.threads = ctx, ctx.threads

    def run(self, xb):
        return self.sess.run(None, {self.input: nchw(xb)})[0]

    def infer(self, b):
        feeds, sess = {self.input: nchw(self.ctx.x[:b])}, self.sess
        return lambda: sess.run(None, feeds)


def keras_twin(ctx):
    """The Keras twin: a Sequential's layer list mapped to keras.layers, or a module with
    build_model(input_shape, augment=...) re-run with its `layers`/`gc` names bound to Keras."""
    import types
    import keras
    from graphcnn import layers as L
    from .model import Sequential
    if not isinstance(ctx.model, Sequential):
        import runpy
        path = ctx.model_spec.partition(":")[0]
        mod = runpy.run_path(path)
        if "build_model" not in mod:
            raise GraphcnnError(f"bench: no Keras twin for {ctx.model_spec}: a functional model needs the "
                                f"module's build_model(input_shape, augment=...)")
        env = dict(mod, layers=keras.layers, gc=types.SimpleNamespace(Model=keras.Model))
        for k, v in list(env.items()):
            if isinstance(v, types.FunctionType) and v.__globals__ is not env:
                env[k] = types.FunctionType(v.__code__, env, v.__name__, v.__defaults__, v.__closure__)
        return env["build_model"](tuple(ctx.model.input_shape), augment=False)
    mods = [keras.Input(tuple(ctx.model.input_shape))]
    for layer in ctx.model.layers:
        if isinstance(layer, L.Input):
            continue
        if isinstance(layer, L.Conv2D):
            mods.append(keras.layers.Conv2D(layer.filters, layer.kernel_size, layer.strides, layer.padding
                                            if isinstance(layer.padding, str) else "valid",
                                            dilation_rate=layer.dilation_rate, activation=layer.activation))
        elif isinstance(layer, L.MaxPool2D):
            mods.append(keras.layers.MaxPooling2D(layer.pool_size, layer.strides))
        elif isinstance(layer, L.AveragePool2D):
            mods.append(keras.layers.AveragePooling2D(layer.pool_size, layer.strides))
        elif isinstance(layer, L.Flatten):
            mods.append(keras.layers.Flatten())
        elif isinstance(layer, L.Dropout):
            mods.append(keras.layers.Dropout(layer.rate))
        elif isinstance(layer, L.Dense):
            mods.append(keras.layers.Dense(layer.units, activation=layer.activation))
        else:
            raise GraphcnnError(f"bench: no Keras twin for layer {layer.name!r} ({type(layer).__name__}); "
                                f"Sequential models of {SUPPORTED_LAYERS} have one")
    return keras.Sequential(mods)


def _tensorflow(threads):
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass           # already initialized by an earlier system of this process: the setting stays
    return tf


class KerasTF:
    """Keras 3 on TensorFlow: fit (Adam(1e-3), batch 128) and a tf.function of the model for inference."""
    name, trains = "keras", True

    def __init__(self, ctx):
        self.tf, self.ctx = _tensorflow(ctx.threads), ctx
        self.model = self._fresh()
        self.model.fit(ctx.x[:2 * TRAIN_BATCH], ctx.y[:2 * TRAIN_BATCH], epochs=1, batch_size=TRAIN_BATCH, verbose=0)
        self.forward = self.tf.function(lambda x: self.model(x, training=False))
        self.threads = ctx.threads

    def _fresh(self):
        import keras
        m = keras_twin(self.ctx)
        m.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7), loss="sparse_categorical_crossentropy")
        return m

    def first_epoch(self):
        t0 = time.perf_counter()
        self._fresh().fit(self.ctx.x, self.ctx.y, epochs=1, batch_size=TRAIN_BATCH, verbose=0)
        return time.perf_counter() - t0

    def epoch(self):
        self.model.fit(self.ctx.x, self.ctx.y, epochs=1, batch_size=TRAIN_BATCH, verbose=0)

    def infer(self, b):
        xb, forward = self.tf.constant(self.ctx.x[:b]), self.forward
        return lambda: forward(xb).numpy()

    def tflite_bytes(self):
        """The model converted to a .tflite flatbuffer (float32, no quantization)."""
        tf = self.tf
        spec = tf.TensorSpec((None,) + tuple(self.ctx.x.shape[1:]), tf.float32)
        fn = tf.function(lambda x: self.model(x, training=False)).get_concrete_function(spec)
        return tf.lite.TFLiteConverter.from_concrete_functions([fn], self.model).convert()


class TFLite:
    """The TFLite interpreter (ai_edge_litert when installed, else tf.lite) on the converted Keras twin,
    one interpreter per batch size (resizing in between would be timed otherwise)."""
    name, trains, file = "tflite", False, "model.tflite"

    def __init__(self, ctx):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            Interpreter = _tensorflow(ctx.threads).lite.Interpreter
        self.make, self.ctx, self.threads = Interpreter, ctx, ctx.threads
        with open(ctx.path(self.file), "rb") as f:
            self.content = f.read()

    def _interpreter(self, b):
        it = self.make(model_content=self.content, num_threads=self.ctx.threads)
        inp = it.get_input_details()[0]["index"]
        it.resize_tensor_input(inp, (b,) + tuple(self.ctx.x.shape[1:]))
        it.allocate_tensors()
        return it, inp, it.get_output_details()[0]["index"]

    def infer(self, b):
        it, inp, out = self._interpreter(b)
        xb = self.ctx.x[:b]

        def call():
            it.set_tensor(inp, xb)
            it.invoke()
            it.get_tensor(out)
        return call


SYSTEMS = {"graphcnn-runtime": GraphcnnRuntime, "graphcnn-model": GraphcnnModel, "graphcnn-so": GraphcnnSharedLibrary,
           "torch": TorchEager, "onnxruntime": OnnxRuntime, "tflite": TFLite, "keras": KerasTF}


class Context:
    """What every system is built from: the MODEL spec and its graphcnn model, the data, the thread
    count, and the folder holding the files made once for all (model.gcnn, the .so, model.onnx, ...)."""

    def __init__(self, model_spec, images, threads, folder):
        from .cli import load_model_source
        self.model_spec, self.threads, self.folder = model_spec, threads, folder
        self.model = load_model_source(model_spec)
        self.x, self.y = bench_data(self.model.input_shape, images)

    def path(self, name):
        return os.path.join(self.folder, name)


def write_shared_files(ctx, systems, model):
    """Save the trained graphcnn model (.gcnn), build its .so, export it to ONNX: the files the
    inference systems (and their RSS children) load."""
    model.save(ctx.path("model.gcnn"))
    if "graphcnn-so" in systems:
        write_shared_library(ctx, model.inference_graph(), model.weights, "so.json")
    if "onnxruntime" in systems:
        from .onnx import export
        export(model, ctx.path("model.onnx"))


def write_shared_library(ctx, graph, weights, info_file, subfolder=""):
    """The .so + .h of `graph` (optimized here) in ctx.folder/subfolder, and info_file (json: the library's
    path relative to ctx.folder, its symbol prefix, the output shape) that GraphcnnSharedLibrary reads."""
    from ir.passes import run_pipeline
    from .export import write_native_library
    g = run_pipeline(graph, "inference").graph
    folder = ctx.path(subfolder)
    os.makedirs(folder, exist_ok=True)
    so = next(p for p in write_native_library(g, weights, folder, ["so", "h"]) if p.endswith(".so"))
    info = {"file": os.path.relpath(so, ctx.folder), "symbol": os.path.splitext(os.path.basename(so))[0],
            "output_shape": list(g.outputs[0].type.shape[1:])}
    with open(ctx.path(info_file), "w") as f:
        json.dump(info, f)


def check_agreement(ctx, built, reference):
    """graphcnn's three ways and ONNX Runtime on graphcnn's export run the same weights: their outputs
    must agree, or the benchmark would time the wrong thing."""
    import numpy as np
    xb = ctx.x[:4]
    want = reference.model.predict(xb)
    for name in ("graphcnn-runtime", "graphcnn-so", "onnxruntime"):
        s = built.get(name)
        if s is None:
            continue
        got = s.runtime.predict(xb) if name == "graphcnn-runtime" else s.run(np.ascontiguousarray(xb))
        if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise GraphcnnError(f"bench: {name} disagrees with model.predict by up to "
                                f"{float(np.max(np.abs(got - want))):.3g}: not timing it")


# -- timing --------------------------------------------------------------------------------------------
def rotated(items, r):
    """items rotated left by r (round r's order)."""
    k = r % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def calls_at(batch, repeats):
    """Timed calls per round at this batch size."""
    return repeats if batch == 1 else max(1, repeats // 20)


def time_call(call, count):
    """Median seconds of `count` calls of `call` after one untimed call."""
    call()
    ts = []
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_rounds(built, batches, rounds, repeats, train, probes=None, progress=None):
    """Interleaved rounds: in round r each measure runs once on every system, systems in the order
    rotated by r, and each probe ({label: () -> GFLOP/s}) once. -> {measure: {system: [one sample per
    round]}}, the probes under "fma_gflops"."""
    samples = {}
    names = list(built)
    calls = {(n, b): built[n].infer(b) for n in names for b in batches}
    for r in range(rounds):
        order = rotated(names, r)
        for label, probe in (probes or {}).items():
            samples.setdefault("fma_gflops", {}).setdefault(label, []).append(probe())
        if train:
            for n in order:
                if built[n].trains:
                    samples.setdefault("train_first_s", {}).setdefault(n, []).append(built[n].first_epoch())
            for n in order:
                if built[n].trains:
                    t0 = time.perf_counter()
                    built[n].epoch()
                    samples.setdefault("train_epoch_s", {}).setdefault(n, []).append(time.perf_counter() - t0)
        for b in batches:
            for n in order:
                samples.setdefault(f"b{b}_s", {}).setdefault(n, []).append(time_call(calls[n, b], calls_at(b, repeats)))
        if progress:
            progress(f"round {r + 1}/{rounds} done")
    return samples


def medians(samples):
    """{measure: {system: [samples]}} -> {measure: {system: median}}."""
    return {m: {n: statistics.median(v) for n, v in per.items()} for m, per in samples.items()}


# -- the table -----------------------------------------------------------------------------------------
def measure_label(measure):
    if measure == "train_first_s":
        return "first epoch, s"
    if measure == "train_epoch_s":
        return "warm epoch, s"
    if measure == RSS_MEASURE:
        return "peak RSS, MB"
    b = int(measure[1:-2])
    return "batch-1 latency, us" if b == 1 else f"batch-{b}, images/s"


def display_value(measure, value, batch_images=None):
    """What the table shows for a median: seconds, microseconds, images/s or MB."""
    if measure.startswith("b"):
        b = int(measure[1:-2])
        return value * 1e6 if b == 1 else b / value
    return value


def ratio(measure, system_value, best_value):
    """system / fastest peer in the table's unit: < 1 is better for times and RSS, > 1 for images/s."""
    if measure.startswith("b") and measure != "b1_s":
        return best_value / system_value          # throughput = b / seconds
    return system_value / best_value


def fastest_peer(measure, per_system, peers):
    """(name, median) of the best peer for this measure (least seconds or MB), or None."""
    have = [(per_system[p], p) for p in peers if p in per_system]
    if not have:
        return None
    value, name = min(have)
    return name, value


def percent_of_peak(measure, seconds, flops, peak_gflops):
    """% of the FMA peak a timed unit of `flops` reached in `seconds`."""
    if not flops or not peak_gflops or not seconds:
        return None
    return 100.0 * flops / seconds / 1e9 / peak_gflops


def format_table(table, systems, peers, flops=None, peak_by_system=None):
    """The text table: one row per measure, one column per system, then the fastest peer and the ratio
    of each graphcnn system to it; then % of the FMA peak for the thread count each system used
    (peak_by_system: {system: GFLOP/s})."""
    ours = [s for s in systems if s not in peers]
    cols = ["measure"] + list(systems) + ["fastest peer"] + [f"{s} / peer" for s in ours]
    rows = []
    for measure, per in table.items():
        row = [measure_label(measure)]
        for s in systems:
            v = per.get(s)
            row.append("-" if v is None else _fmt(display_value(measure, v)))
        best = fastest_peer(measure, per, peers)
        row.append("-" if best is None else best[0])
        for s in ours:
            row.append("-" if best is None or s not in per else f"{ratio(measure, per[s], best[1]):.2f}")
        rows.append(row)
    lines = [_row(cols, rows)] + [_row(r, rows, cols) for r in rows]
    if flops and peak_by_system:
        parts = []
        for measure, per in table.items():
            if measure not in flops:
                continue
            pcts = [f"{s} {p:.1f}%" for s in systems
                    if (p := percent_of_peak(measure, per.get(s), flops[measure], peak_by_system.get(s))) is not None]
            if pcts:
                parts.append(f"  {measure_label(measure).split(',')[0]}: " + ", ".join(pcts))
        if parts:
            lines += ["% of the FMA peak at each system's thread count (flops from the IR cost model):"] + parts
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _row(cells, rows, header=None):
    header = header or cells
    widths = [max(len(str(x)) for x in [header[i]] + [r[i] for r in rows]) for i in range(len(header))]
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


# -- machine -------------------------------------------------------------------------------------------
FLAG_SUMMARY = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile")


def machine_info():
    """CPU model, the summary of its SIMD flags, cores, the LLVM target, versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name":
                    model = val.strip()
                elif key.strip() == "flags":
                    flags = set(val.split())
                    break
    except OSError:
        pass
    from backends.llvm.jit import host_target
    return {"cpu": model, "flags": [f for f in FLAG_SUMMARY if f in flags], "cores": os.cpu_count(),
            "llvm_target": f"cpu {host_target().cpu}, {host_target().vector_bits}-bit vectors", "python": platform.python_version()}


# -- peak RSS in a child process per system ---------------------------------------------------------------
def child_rss_mb(name, a, folder):
    """Peak RSS (VmHWM) of a fresh process that builds system `name` from the shared files and runs it
    once: a training epoch where it trains, one call per batch size."""
    cmd = [sys.executable, "-m", "graphcnn.bench", "--rss-child", name, "--folder", folder, a.model,
           "--batch", a.batch, "--threads", str(a.threads), "--images", str(a.images)]
    if a.no_train:
        cmd.append("--no-train")
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise GraphcnnError(f"bench: the peak-RSS child for {name} failed: {tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])["vmhwm_kb"] / 1024


def rss_child_main(name, a, folder):
    """Body of the RSS child (python -m graphcnn.bench --rss-child NAME ...): prints {"vmhwm_kb": N}."""
    batches, _ = check_arguments(a)
    ctx = Context(a.model, a.images, a.threads, folder)
    from .bench_int8 import INT8_CLASSES
    s = {**SYSTEMS, **INT8_CLASSES}[name](ctx)
    if s.trains and not a.no_train:
        s.epoch()
    for b in batches:
        s.infer(b)()
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"vmhwm_kb": kb}))


# -- main ----------------------------------------------------------------------------------------------
def main(argv=None, default_model=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, default_model)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_child:
        _set_thread_env(a.threads)
        return rss_child_main(a.rss_child, a, a.folder)
    try:
        run(a)
    except GraphcnnError as e:
        print(f"graphcnn bench: {e}", file=sys.stderr)
        return 2
    return 0


def _set_thread_env(threads):
    # before torch / TensorFlow / OpenMP read them
    for var in ("OMP_NUM_THREADS", "GRAPHCNN_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_systems(ctx, peers, skipped):
    """The fp32 systems: graphcnn three ways and the installed peers, in the table's order; a peer that
    cannot express the model is added to `skipped` with the reason."""
    built = {"graphcnn-model": GraphcnnModel(ctx)}
    write_shared_files(ctx, list(GRAPHCNN_SYSTEMS) + peers, built["graphcnn-model"].model)
    built["graphcnn-runtime"] = GraphcnnRuntime(ctx)
    built["graphcnn-so"] = GraphcnnSharedLibrary(ctx)
    for p in [p for p in PEERS if p in peers]:
        if p == "tflite":
            continue                     # built from the Keras twin below
        try:
            built[p] = SYSTEMS[p](ctx)
        except GraphcnnError as e:       # a peer that cannot express this model: listed, not fatal
            skipped[p] = str(e)
    if "tflite" in peers:
        try:
            keras_sys = built.get("keras") or KerasTF(ctx)
            with open(ctx.path("model.tflite"), "wb") as f:
                f.write(keras_sys.tflite_bytes())
            built["tflite"] = TFLite(ctx)
        except GraphcnnError as e:
            skipped["tflite"] = str(e)
    check_agreement(ctx, built, built["graphcnn-model"])
    return {s: built[s] for s in list(GRAPHCNN_SYSTEMS) + list(PEERS) if s in built}


def run(a, out=None):
    """Run the benchmark for parsed arguments `a` (see add_arguments); prints the report and returns the
    results dict (also written to a.json when given)."""
    out = out or sys.stdout
    batches, wanted = check_arguments(a)
    peers, skipped = installed_peers(wanted)
    int8 = getattr(a, "int8", False)
    _set_thread_env(a.threads)

    def say(text):
        if not getattr(a, "quiet", False):
            print(text, file=out, flush=True)

    load_before = os.getloadavg()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="graphcnn-bench-") as folder:
        ctx = Context(a.model, a.images, a.threads, folder)
        flops = model_flops(a.model, ctx.model.input_shape, a.images, batches)
        if int8:
            from . import bench_int8
            built, int8_report = bench_int8.build_systems(ctx, a, peers, skipped, say)
            present = [s for s in built if s in bench_int8.INT8_PEERS.values()]
        else:
            built = build_systems(ctx, peers, skipped)
            present = [p for p in PEERS if p in built]
        order = list(built)
        probes = {"1": lambda: fma_peak_gflops(1), str(a.threads): lambda: fma_peak_gflops(a.threads)}
        samples = run_rounds(built, batches, a.rounds, a.repeats, not a.no_train and not int8, probes,
                             progress=say)
        # the peak is the best probe of any round (load only lowers it); the rest are medians
        peaks = samples.pop("fma_gflops")
        peak1, peak_all = max(peaks["1"]), max(peaks[str(a.threads)])
        table = medians(samples)
        if not a.no_rss:
            table[RSS_MEASURE] = {s: child_rss_mb(s, a, folder) for s in order}
    load_after = os.getloadavg()
    threads = {s: built[s].threads for s in order}
    if int8:
        say(f"\n{ctx.model.name} ({a.model}) int8 inference: {a.rounds} interleaved rounds, medians; "
            f"{int8_report['trained']}; calibrated on {int8_report['calibration_images']} training images")
    else:
        say(f"\n{ctx.model.name} ({a.model}): {a.rounds} interleaved rounds, medians; {a.images} training images, "
            f"batch {TRAIN_BATCH}, Adam")
    say(f"machine: {info['cpu']}, {info['cores']} cores; flags {' '.join(info['flags'])}; LLVM {info['llvm_target']}")
    say(f"threads: " + ", ".join(f"{s} {t}" for s, t in threads.items()))
    say(f"load average (1, 5, 15 min): before {' '.join(f'{v:.2f}' for v in load_before)}, "
        f"after {' '.join(f'{v:.2f}' for v in load_after)}")
    say(f"FMA peak (LLVM probe, best of the rounds): 1 thread {peak1:.1f} GFLOP/s, {a.threads} threads "
        f"{peak_all:.1f} GFLOP/s")
    for p, why in skipped.items():
        say(f"skipped {p}: {why}")
    say("")
    # the probe is an fp32 FMA peak: int8 rows (VNNI, 4x the MACs per instruction) are not set against it
    peak_by_system = {s: peak1 if t == 1 else peak_all for s, t in threads.items()
                      if not int8 or s == "graphcnn-runtime"}
    say(format_table(table, order, present, flops, peak_by_system))
    say("ratios: graphcnn / fastest peer in the row's unit (times and MB: < 1 is better; images/s: > 1 is better)")
    results = {"model": ctx.model.name, "spec": a.model, "rounds": a.rounds, "machine": info, "threads": threads,
               "load_before": load_before, "load_after": load_after, "fma_peak_gflops": peaks,
               "flops": flops, "medians": table, "samples": samples, "skipped": skipped}
    if int8:
        say(bench_int8.format_agreement(int8_report))
        results["int8"] = int8_report
    if a.json:
        from .atomic_file import write_file_atomically
        write_file_atomically(a.json, json.dumps(results, indent=1).encode())
    return results


if __name__ == "__main__":
    sys.exit(main())
