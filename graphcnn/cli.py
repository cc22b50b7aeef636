"""graphcnn command line: compile, train, run, eval, show, bench, export.

Exit codes: 0 ok, 1 runtime failure, 2 usage or bad input (one-line reason on stderr)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input: exit code 2."""


# -- model loading ----------------------------------------------------------------------------------
def load_model_source(spec: str, input_shape=None):
    """'path/model.py[:name]' (attribute or zero-argument function) or 'file.gcnn' -> a Model.
    input_shape (H, W, C): build the model with the module's `build_model(input_shape=...)` instead."""
    from .model import Model, load_model
    if spec.endswith(".gcnn"):
        return load_model(spec)
    if spec.lower().endswith(".onnx"):
        if input_shape is not None:
            raise UsageError(f"{spec}: an ONNX model's input shape is fixed by the file; it cannot be rebuilt "
                             f"for {'x'.join(map(str, input_shape))} images")
        return load_onnx_model(spec)
    path, _, name = spec.partition(":")
    name = name or "model"
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} not found")
    if not path.endswith(".py"):
        raise UsageError(f"MODEL must be a .py file (optionally :name) or a .gcnn file, got {spec!r}")
    mod_name = "graphcnn_user_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    sp = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(sp)
    try:
        sp.loader.exec_module(mod)
    except Exception as e:
        raise UsageError(f"{path}: error while importing the model file: {type(e).__name__}: {e}") from None
    if input_shape is not None:
        if not callable(getattr(mod, "build_model", None)):
            raise UsageError(f"{path}: its model is built for one input shape; an input shape of {input_shape} "
                             f"needs a module function build_model(input_shape) (see examples/resnet8.py)")
        obj = mod.build_model(input_shape=tuple(input_shape))
    elif not hasattr(mod, name):
        raise UsageError(f"{path} defines no {name!r} (give MODEL as {path}:NAME)")
    else:
        obj = getattr(mod, name)
    if callable(obj) and not isinstance(obj, Model):
        obj = obj()
    if not isinstance(obj, Model):
        raise UsageError(f"{spec}: {name!r} is a {type(obj).__name__}, not a graphcnn model (gc.Model or gc.Sequential)")
    obj.train_config = dict(getattr(mod, "TRAIN", {}) or {})
    return obj


def load_onnx_model(path):
    """An .onnx MODEL as a trainable gc.Model taking images channels last (NHWC, what the image readers
    give), compiled with sparse cross-entropy on logits unless the graph ends in a softmax."""
    from ir.ops import view_ops
    from .onnx import import_model
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} not found")
    model = import_model(path, layout="nhwc")
    out = model.inference_graph().outputs[0]
    while out.producer is not None and out.producer.op in view_ops():
        out = out.producer.inputs[0]
    probabilities = out.producer is not None and out.producer.op == "softmax"
    model.compile(loss={"name": "sparse_categorical_crossentropy", "from_logits": not probabilities},
                  metrics=["accuracy"])
    return model


def load_graph_for(spec):
    """A graph (and weights) for show/compile/export: from a model file, a .gcnn artifact or an .onnx file."""
    if spec.endswith(".gcnn"):
        from .artifact import read_artifact
        g, w, meta = read_artifact(spec)
        return g, w, meta
    if spec.lower().endswith(".onnx"):
        from .onnx import import_graph
        return import_graph(spec), {}, {}
    model = load_model_source(spec)
    return model.inference_graph(), model.weights, {"model": model.config()}


# -- data -------------------------------------------------------------------------------------------
DATASETS = ("mnist", "fashion-mnist", "cifar10")


def load_data(data):
    """--data -> ((x_train, y_train), (x_test, y_test)), labels flattened to (N,): None/'bundled' (the
    MNIST subset), 'mnist', 'fashion-mnist', 'cifar10', or a folder of MNIST-format IDX files or of
    CIFAR-10 binary batches."""
    from .datasets import cifar10, fashion_mnist, mnist
    if data in (None, "", "bundled"):
        splits = mnist.load_data()
    elif data == "mnist":
        splits = mnist.load_data("mnist")
    elif data in ("fashion-mnist", "fashion_mnist"):
        splits = fashion_mnist.load_data()
    elif data in ("cifar10", "cifar-10"):
        splits = cifar10.load_data()
    elif not os.path.isdir(data):
        raise UsageError(f"--data {data!r}: not a folder (MNIST IDX files or CIFAR-10 binary batches) nor one "
                         f"of {', '.join(DATASETS)}")
    elif any(f.startswith("train-images") for f in os.listdir(data)):
        splits = mnist.load_data(data)
    else:
        splits = cifar10.load_data(data)
    (xtr, ytr), (xte, yte) = splits
    return (xtr, ytr.reshape(-1)), (xte, yte.reshape(-1))


def parse_input_shape(text):
    """'32,32,3' -> (32, 32, 3) (H, W, C), positive ints."""
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r}: expected H,W,C as three positive integers, e.g. 32,32,3")
    return shape


def image_shape(x):
    """The (H, W, C) a model needs for images x (N, H, W) or (N, H, W, C)."""
    return tuple(x.shape[1:]) + ((1,) if x.ndim == 3 else ())


def load_test_data(data):
    """(x_test, y_test) for `eval`: from the bundled subset, full MNIST, or a folder that needs to hold only
    the two t10k files (train files are not read)."""
    from .datasets import mnist, read_idx
    if data in (None, "", "bundled", "mnist") or not os.path.isdir(data):
        return load_data(data)[1]
    names = mnist.FILE_NAMES[2:]
    paths = [mnist._find_file(data, name) for name in names]
    missing = [n for n, p in zip(names, paths) if p is None]
    if missing:
        raise UsageError(f"--data {data!r}: missing the test split {', '.join(n + '[.gz]' for n in missing)}")
    x, y = (read_idx(p) for p in paths)
    mnist._check_pair(x, y, paths[0], paths[1])
    return x, y


def read_inputs(paths):
    """IDX, .npy or PNG files -> uint8/float array (N, H, W)."""
    from .datasets import read_idx
    from .datasets.png import read_png_gray
    arrays = []
    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"input {p!r} not found")
        low = p.lower()
        if low.endswith(".npy"):
            try:
                a = np.load(p, allow_pickle=False)
            except ValueError as e:
                raise UsageError(f"{p}: not a readable .npy array: {e}") from None
        elif low.endswith(".png"):
            a = read_png_gray(p)[None]
        else:
            a = read_idx(p)
        if a.dtype.kind not in "uifb":
            raise UsageError(f"input {p}: holds {a.dtype} values; expected real numbers (images as uint8 or float)")
        if a.ndim == 2:
            a = a[None]
        if a.ndim not in (3, 4) or 0 in a.shape:
            raise UsageError(f"input {p}: expected images of shape (H, W), (N, H, W) or (N, H, W, C), "
                             f"got shape {a.shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UsageError(f"input {p}: contains {int(np.count_nonzero(~np.isfinite(a)))} NaN or "
                             f"infinite values")
        arrays.append(a)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise UsageError(f"inputs have different image shapes: {sorted(shapes)}")
    return np.concatenate(arrays)


def preprocess(x, meta_or_model):
    scale = None
    pre = getattr(meta_or_model, "preprocess", None) if not isinstance(meta_or_model, dict) else \
        (meta_or_model.get("model") or {}).get("preprocess")
    if pre:
        scale = pre.get("scale")
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(scale if scale is not None else 1 / 255)
    return x.astype(np.float32)


# -- commands ---------------------------------------------------------------------------------------
def _count(value, what):
    """A training count (--epochs / --batch-size, or the model file's TRAIN) as an int >= 1. --epochs 0 is
    refused rather than given Keras's meaning (no training): `train` would then save the model as if
    trained."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        why = " (train saves the model it trains; with 0 epochs there is nothing to save)" \
            if "epochs" in what and value == 0 else ""
        raise UsageError(f"{what} must be an integer >= 1, got {value!r}{why}")
    return value


def cmd_train(a):
    """`graphcnn train`; data parallel under mpiexec (or --workers N, which starts mpiexec itself)."""
    from . import distributed
    if a.workers is not None:
        _count(a.workers, "--workers")
        if not distributed.launched_by_mpi() and a.workers > 1:
            distributed.relaunch(a.workers, ["-m", "graphcnn.cli"] + a.argv)     # does not return
    if not distributed.launched_by_mpi():
        return _train(a, root=True)
    comm = distributed.init()
    try:
        if a.workers is not None and a.workers != comm.Get_size():
            raise UsageError(f"--workers {a.workers} under an MPI job of {comm.Get_size()} ranks")
        return _train(a, root=distributed.is_root())
    except Exception as e:   # on one rank only (its files, its host): end every rank, not just this one
        distributed.abort(e, print_traceback=bool(os.environ.get("GRAPHCNN_DEBUG")))
        raise


def _train(a, root):
    from .atomic_file import check_replaceable
    # every setting is checked before the model is built, data is read or anything is printed
    for value, flag in ((a.epochs, "--epochs"), (a.batch_size, "--batch-size")):
        if value is not None:
            _count(value, flag)
    if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {a.lr}")
    model = load_model_source(a.model)
    cfg = getattr(model, "train_config", {})
    epochs = a.epochs if a.epochs is not None else _count(cfg.get("epochs", 3), f"{a.model}: TRAIN['epochs']")
    batch = a.batch_size if a.batch_size is not None else \
        _count(cfg.get("batch_size", 128), f"{a.model}: TRAIN['batch_size']")
    (xtr, ytr), (xte, yte) = load_data(a.data if a.data is not None else cfg.get("data"))
    # --input-shape, else the data's image shape when the model was built for another one
    shape = parse_input_shape(a.input_shape) if a.input_shape else image_shape(xtr)
    model_shape = tuple(getattr(model, "input_shape", None) or ())
    if not a.model.endswith(".gcnn") and (a.input_shape or (len(model_shape) == 3 and model_shape != shape)):
        if shape != image_shape(xtr):
            raise UsageError(f"--input-shape {','.join(map(str, shape))} does not match the data's "
                             f"{'x'.join(map(str, image_shape(xtr)))} images")
        model = load_model_source(a.model, input_shape=shape)
    out = a.out or f"{model.name}.gcnn"
    if root:
        check_replaceable(out)      # a symlink/device/folder at --out is refused now, not after training
    model.preprocess = {"scale": 1 / 255}
    xtr, xte = preprocess(xtr, model), preprocess(xte, model)
    if model.compiled is None or a.backend or a.lr is not None:
        prev = model.compiled or {}
        # the model's own optimizer (a .gcnn, or a module that compiled it), else the module's TRAIN
        # recipe, else Adam
        model.compile(optimizer=model.optimizer or cfg.get("optimizer") or "adam", loss=dict(prev.get("loss_config") or {},
                                                                     name=prev.get("loss", "sparse_categorical_crossentropy")),
                      metrics=prev.get("metrics") or ["accuracy"], backend=a.backend or prev.get("backend"),
                      learning_rate=a.lr)
    start = model.epochs_done           # a .gcnn saved by fit resumes after its completed epochs
    if root and not a.quiet:
        print(f"graphcnn train: model {model.name!r} ({model.count_params()} params), backend "
              f"{model.compiled['backend']}, {len(xtr)} train / {len(xte)} test images, {epochs} epochs, "
              f"batch {batch}", file=sys.stderr)
    t0 = time.perf_counter()
    hist = model.fit(xtr, ytr, epochs=start + epochs, initial_epoch=start, batch_size=batch,
                     validation_data=(xte, yte), seed=a.seed, verbose=0 if a.quiet else 1)
    dt = time.perf_counter() - t0
    if not root:
        return EXIT_OK      # rank 0 evaluates, prints and writes the files
    res = model.evaluate(xte, yte)
    loss, acc = (res if isinstance(res, list) else (res, float("nan")))
    model.save(out)
    print(f"test accuracy {acc:.4f}  test loss {loss:.4f}  ({epochs} epochs in {dt:.1f} s); saved {out}")
    if a.history:
        with open(a.history, "w") as f:
            json.dump(hist.history, f, indent=1)
    return EXIT_OK


def cmd_run(a):
    from .artifact import Runtime, load
    if a.artifact.lower().endswith(".onnx"):       # images in channels last, like a .gcnn of the same net
        m = load_onnx_model(a.artifact)
        rt = Runtime(m.inference_graph(), m.weights, {}, backend=a.backend)
    else:
        rt = load(a.artifact, backend=a.backend)
    x = preprocess(read_inputs(a.inputs), rt.meta)
    probs = rt.predict(x)
    for c in probs.argmax(-1):
        print(int(c))
    return EXIT_OK


def cmd_eval(a):
    from .artifact import load
    rt = load(a.artifact, backend=a.backend)
    x, y = load_test_data(a.data)
    p = rt.predict(preprocess(x, rt.meta))
    acc = float((p.argmax(-1) == y).mean())
    q = np.clip(p, 1e-7, 1 - 1e-7)
    loss = float(np.mean(-np.log(q[np.arange(len(y)), y] / q.sum(-1))))
    print(f"accuracy {acc:.4f}  loss {loss:.4f}  on {len(y)} test images")
    return EXIT_OK


def dot_quote(*lines: str) -> str:
    """`lines` as one DOT quoted string, joined by DOT's \\n line break: '"' and '\\' escaped, so a name
    can neither end the string (and add attributes such as URL=) nor form a label escape like \\N.
    Names hold no raw line breaks (ir.types.check_name)."""
    return '"' + "\\n".join(str(t).replace("\\", "\\\\").replace('"', '\\"') for t in lines) + '"'


def to_dot(g) -> str:
    q = dot_quote
    lines = [f"digraph {q(g.name)} {{", "  rankdir=TB; node [fontname=Helvetica fontsize=10];"]
    for v in g.leaves:
        shape = "box" if v.kind == "input" else "note"
        lines.append(f'  {q(v.name)} [shape={shape} label={q(v.name, v.type)}];')
    for n in g.nodes:
        act = n.attrs.get("activation")
        label = n.op + (f"+{act}" if act and act != "linear" else "")
        lines.append(f'  {q("node:" + n.name)} [shape=ellipse style=filled fillcolor="#dde8ff" label={q(label)}];')
        for v in n.inputs:
            src = f"node:{v.producer.name}" if v.producer is not None else v.name
            lines.append(f'  {q(src)} -> {q("node:" + n.name)} [label="{v.type}" fontsize=8];')
    for v in g.outputs:
        lines.append(f'  {q("out:" + v.name)} [shape=box label={q("output", v.type)}];')
        src = f"node:{v.producer.name}" if v.producer is not None else v.name
        lines.append(f'  {q(src)} -> {q("out:" + v.name)};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def cmd_show(a):
    from ir.passes import run_pipeline
    g, weights, meta = load_graph_for(a.model)
    if a.memory:
        from .memory_report import show_memory
        return show_memory(g, a)
    if a.passes:
        run_pipeline(g, "inference", print_ir_after_all=True)
        return EXIT_OK
    if a.format == "text":
        sys.stdout.write(str(g))
    elif a.format == "dot":
        sys.stdout.write(to_dot(g))
    elif a.format == "json":
        from ir.serialize import graph_to_json
        sys.stdout.write(json.dumps(graph_to_json(g), indent=1) + "\n")
    else:
        import shutil
        import subprocess
        if not shutil.which("dot"):
            raise UsageError("--format svg needs Graphviz's 'dot' program (apt-get install graphviz); "
                             "use --format dot and render it elsewhere")
        svg = subprocess.run(["dot", "-Tsvg"], input=to_dot(g).encode(), capture_output=True, check=True).stdout
        sys.stdout.write(svg.decode())
    return EXIT_OK


CALIBRATION_SETS = ("mnist", "bundled")     # the bundled MNIST training images


def read_calibration_images(data):
    """--calibrate DATA -> uint8/float images (N, H, W[, C]): 'mnist' (or 'bundled') = the bundled MNIST
    training images, else an IDX or .npy file of images."""
    from .datasets import mnist
    if data in CALIBRATION_SETS:
        return mnist.load_data()[0][0]
    if not os.path.isfile(data):
        raise UsageError(f"--calibrate {data!r}: not a file (IDX or .npy images) nor one of "
                         f"{', '.join(CALIBRATION_SETS)}")
    return read_inputs([data])


def quantize_for_compile(a):
    """compile --quantize int8: the calibrated int8 QuantizedRuntime of MODEL (graphcnn/quantize.py)."""
    from .quantize import quantize
    if a.calibrate is None:
        raise UsageError("--quantize int8 needs --calibrate DATA (mnist, or an IDX/.npy file of images)")
    if a.calibration_images is not None and a.calibration_images < 1:
        raise UsageError(f"--calibration-images must be an integer >= 1, got {a.calibration_images}")
    model = load_model_source(a.model)
    # the images get the scale training used (uint8 -> the model's preprocess, as `graphcnn train` does)
    x = preprocess(read_calibration_images(a.calibrate), model)
    # the runtime is only a carrier of graph + weights here: NumPy compiles it without a JIT
    return quantize(model, x, method=a.calibration, calibration_images=a.calibration_images, backend="numpy")


def cmd_compile(a):
    from ir.passes import run_pipeline
    from .artifact import atomic_write_bytes
    from .export import output_path, write_numpy_module, write_native_library
    emit = [e.strip() for e in a.emit.split(",") if e.strip()] if a.emit else \
        (["py"] if a.target == "numpy" else ["so", "h"])
    allowed = {"numpy": {"ir", "py", "gcnn"}, "llvm": {"ir", "llvm", "asm", "obj", "so", "h", "gcnn"}}[a.target]
    bad = [e for e in emit if e not in allowed]
    if bad:
        raise UsageError(f"--emit {','.join(bad)} is not available for --target {a.target} "
                         f"(choose from {', '.join(sorted(allowed))})")
    if a.quantize is None and (a.calibrate is not None or a.calibration_images is not None
                               or a.calibration is not None):
        raise UsageError("--calibrate/--calibration-images/--calibration need --quantize int8")
    if a.quantize is None and "gcnn" in emit:
        raise UsageError("--emit gcnn writes the quantized model: it needs --quantize int8 "
                         "(`graphcnn train` writes float .gcnn files)")
    if a.quantize is not None:
        a.calibration = a.calibration or "percentile"
        quantized = quantize_for_compile(a)
        g, weights, meta = quantized.graph, quantized.weights, quantized.meta
    else:
        g, weights, meta = load_graph_for(a.model)
    target = None
    if a.target != "llvm" and (a.cpu is not None or a.features is not None):
        raise UsageError("--cpu/--features choose the CPU of native code: they need --target llvm")
    if a.target == "llvm":
        from backends.llvm.jit import TargetError, export_target
        try:
            target = export_target(a.cpu, a.features)
        except TargetError as e:
            raise UsageError(f"--cpu/--features: {e}") from None
    if os.path.lexists(a.output) and not os.path.isdir(a.output):
        raise UsageError(f"-o {a.output}: exists and is not a folder (compile writes its files into a folder)")
    os.makedirs(a.output, exist_ok=True)
    res = run_pipeline(g, "inference", print_ir_after_all=a.print_ir_after_all)
    opt = res.graph
    written = []
    if "gcnn" in emit:
        p = output_path(a.output, g.name, "gcnn")
        quantized.save(p)
        written.append(p)
    if "ir" in emit:
        p = output_path(a.output, g.name, "ir")
        atomic_write_bytes(p, str(opt).encode())
        written.append(p)
    if a.target == "numpy" and "py" in emit:
        written += write_numpy_module(opt, weights, a.output, meta)
    if a.target == "llvm":
        native = [e for e in emit if e not in ("ir", "gcnn")]
        if native:
            written += write_native_library(opt, weights, a.output, native, target=target)
    for p in written:
        print(p)
    return EXIT_OK


def cmd_export(a):
    from .onnx import export
    g, w, _ = load_graph_for(a.model)
    export(g, a.output, opset=a.opset, layout=a.layout, weights=w)
    if not a.quiet:
        print(f"wrote {a.output} (ONNX opset {a.opset}, {a.layout.upper()} at the boundary)")
    return EXIT_OK


def cmd_bench(a):
    if a.model.lower().endswith(".onnx"):        # the peer is ONNX Runtime on the same file
        if a.int8:
            raise UsageError("--int8 quantizes a graphcnn model (a .py or .gcnn MODEL); an .onnx MODEL is "
                             "timed in fp32 only")
        from .onnx.compare import run_cli
        run_cli(a)
        return EXIT_OK
    from .bench import run
    run(a)            # bad options are a GraphcnnError (exit 2) before any model is built
    return EXIT_OK


def build_parser():
    p = argparse.ArgumentParser(prog="graphcnn", description="Compile, train and run CNNs.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a model to artifacts")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True, help="output folder")
    c.add_argument("--target", choices=["llvm", "numpy"], default="llvm")
    c.add_argument("--emit", default=None, help="comma list of ir,llvm,asm,obj,so,h (llvm) or ir,py (numpy); "
                   "gcnn (with --quantize) the quantized model")
    c.add_argument("--cpu", default=None, metavar="NAME|host",
                   help="CPU to generate native code for: an LLVM CPU name such as x86-64-v3 (a portable "
                        "AVX2 baseline), haswell or znver4; default host")
    c.add_argument("--features", default=None, metavar="STR",
                   help="extra CPU features for native code, e.g. '-avx512f' or '+avx2,+fma'")
    c.add_argument("--print-ir-after-all", action="store_true")
    c.add_argument("--quantize", choices=["int8"], default=None,
                   help="post-training int8 quantization (needs --calibrate); --emit gcnn writes the int8 .gcnn")
    c.add_argument("--calibrate", default=None, metavar="DATA",
                   help="calibration images: mnist (the bundled training images) or an IDX/.npy file")
    c.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="calibrate on the first N images (default all)")
    c.add_argument("--calibration", choices=["percentile", "minmax"], default=None,
                   help="activation ranges: percentile (99.99th, ignores outliers; default) or minmax")
    c.set_defaults(fn=cmd_compile)
    t = sub.add_parser("train", help="train a model on MNIST-format data")
    t.add_argument("model")
    t.add_argument("--data", default=None, help="mnist, fashion-mnist, cifar10, or a folder of MNIST IDX files or "
                   "CIFAR-10 binary batches (default: the module's TRAIN['data'], else the bundled MNIST subset)")
    t.add_argument("--input-shape", default=None, help="H,W,C: build the model for this input (a module with "
                   "build_model(input_shape)); default: the data's image shape when the model's differs")
    t.add_argument("--epochs", type=int, default=None,
                   help="epochs to train, >= 1 (0 is refused: train saves the model it trained)")
    t.add_argument("--batch-size", type=int, default=None, help=">= 1")
    t.add_argument("--backend", choices=["llvm", "numpy"], default=None)
    t.add_argument("--lr", type=float, default=None, help="learning rate")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="where to save the trained .gcnn (default NAME.gcnn)")
    t.add_argument("--history", default=None, help="write per-epoch metrics as JSON here")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--workers", type=int, default=None, metavar="N",
                   help="train data-parallel on N processes (starts mpiexec -n N; needs pip install 'graphcnn[mpi]')")
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("run", help="predict classes for images (IDX, .npy or PNG)")
    r.add_argument("artifact")
    r.add_argument("inputs", nargs="+")
    r.add_argument("--backend", choices=["llvm", "numpy"], default=None)
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("eval", help="accuracy of a .gcnn on the test split")
    e.add_argument("artifact")
    e.add_argument("--data", default=None)
    e.add_argument("--backend", choices=["llvm", "numpy"], default=None)
    e.set_defaults(fn=cmd_eval)
    s = sub.add_parser("show", help="print a model's IR, graph, passes or memory plan")
    s.add_argument("model")
    s.add_argument("--format", choices=["text", "dot", "svg", "json"], default="text")
    s.add_argument("--passes", "--print-ir-after-all", dest="passes", action="store_true",
                   help="print the IR after each pass of the inference pipeline")
    s.add_argument("--memory", action="store_true", help="print the memory plan")
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--training", action="store_true", help="(with --memory) plan the training graph")
    s.set_defaults(fn=cmd_show)
    b = sub.add_parser("bench", help="time graphcnn against peers")
    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(b)
    b.set_defaults(fn=cmd_bench)
    x = sub.add_parser("export", help="write a model as ONNX")
    x.add_argument("model")
    x.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (13..25, default 17)")
    x.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw",
                   help="layout of 4-D inputs and outputs (default nchw, what ONNX users expect)")
    x.set_defaults(fn=cmd_export)
    for sp in (c, r, e, s, b, x):
        sp.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS) if sp is not t else None
    return p


def _version():
    from . import __version__
    return f"graphcnn {__version__}"


def main(argv=None) -> int:
    from .errors import GraphcnnError, TrainingError
    from ir.types import IRError
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # train --workers re-runs itself with them
    try:
        code = args.fn(args)
        sys.stdout.flush()      # inside the try: a closed pipe is reported here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`graphcnn run ... | head -1`): not an error of ours; stop quietly, and point
        # stdout at /dev/null so Python's final flush does not complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (UsageError, GraphcnnError, IRError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            FileExistsError, PermissionError) as e:
        print(f"graphcnn {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as e:
        print(f"graphcnn {args.cmd}: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"graphcnn {args.cmd}: interrupted", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as e:  # a bug or an environment failure: one line, exit 1 (GRAPHCNN_DEBUG=1 for the trace)
        if os.environ.get("GRAPHCNN_DEBUG"):
            raise
        print(f"graphcnn {args.cmd}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
