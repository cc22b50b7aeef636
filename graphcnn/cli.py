"""graphcnn command line: compile, train, run, eval, show, bench.

Exit codes: 0 ok, 1 runtime failure, 2 usage or bad input (one-line reason on stderr)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input: exit code 2."""


# -- model loading ----------------------------------------------------------------------------------
def load_model_source(spec: str):
    """'path/model.py[:name]' (attribute or zero-argument function) or 'file.gcnn' -> Sequential."""
    from .artifact import model_from_artifact
    from .model import Sequential
    if spec.endswith(".gcnn"):
        return model_from_artifact(spec)
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
    if not hasattr(mod, name):
        raise UsageError(f"{path} defines no {name!r} (give MODEL as {path}:NAME)")
    obj = getattr(mod, name)
    if callable(obj) and not isinstance(obj, Sequential):
        obj = obj()
    if not isinstance(obj, Sequential):
        raise UsageError(f"{spec}: {name!r} is a {type(obj).__name__}, not a graphcnn Sequential model")
    obj.train_config = dict(getattr(mod, "TRAIN", {}) or {})
    return obj


def load_graph_for(spec):
    """A graph (and weights) for show/compile: from a model file or a .gcnn artifact."""
    if spec.endswith(".gcnn"):
        from .artifact import read_artifact
        g, w, meta = read_artifact(spec)
        return g, w, meta
    model = load_model_source(spec)
    return model.inference_graph(), model.weights, {"model": model.config()}


# -- data -------------------------------------------------------------------------------------------
def load_data(data):
    from .datasets import mnist
    if data in (None, "", "bundled"):
        return mnist.load_data()
    if data == "mnist":
        return mnist.load_data("mnist")
    if not os.path.isdir(data):
        raise UsageError(f"--data {data!r}: not a folder of MNIST IDX files (or 'mnist')")
    return mnist.load_data(data)


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
        if a.ndim == 2:
            a = a[None]
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
def cmd_train(a):
    from .model import Sequential
    model = load_model_source(a.model)
    cfg = getattr(model, "train_config", {})
    epochs = a.epochs if a.epochs is not None else cfg.get("epochs", 3)
    batch = a.batch_size if a.batch_size is not None else cfg.get("batch_size", 128)
    (xtr, ytr), (xte, yte) = load_data(a.data)
    model.preprocess = {"scale": 1 / 255}
    xtr, xte = preprocess(xtr, model), preprocess(xte, model)
    if model.compiled is None or a.backend:
        prev = model.compiled or {}
        model.compile(optimizer=dict(prev.get("optimizer_config", {}), name=prev.get("optimizer", "adam")),
                      loss=prev.get("loss", "sparse_categorical_crossentropy"),
                      metrics=prev.get("metrics") or ["accuracy"], backend=a.backend or prev.get("backend"),
                      learning_rate=a.lr)
    assert isinstance(model, Sequential)
    if not a.quiet:
        print(f"graphcnn train: model {model.name!r} ({model.count_params()} params), backend "
              f"{model.compiled['backend']}, {len(xtr)} train / {len(xte)} test images, {epochs} epochs, "
              f"batch {batch}", file=sys.stderr)
    t0 = time.perf_counter()
    hist = model.fit(xtr, ytr, epochs=epochs, batch_size=batch, validation_data=(xte, yte), seed=a.seed,
                     verbose=0 if a.quiet else 1)
    dt = time.perf_counter() - t0
    res = model.evaluate(xte, yte)
    loss, acc = (res if isinstance(res, list) else (res, float("nan")))
    out = a.out or f"{model.name}.gcnn"
    model.save(out)
    print(f"test accuracy {acc:.4f}  test loss {loss:.4f}  ({epochs} epochs in {dt:.1f} s); saved {out}")
    if a.history:
        with open(a.history, "w") as f:
            json.dump(hist.history, f, indent=1)
    return EXIT_OK


def cmd_run(a):
    from .artifact import load
    rt = load(a.artifact, backend=a.backend)
    x = preprocess(read_inputs(a.inputs), rt.meta)
    probs = rt.predict(x)
    for c in probs.argmax(-1):
        print(int(c))
    return EXIT_OK


def cmd_eval(a):
    from .artifact import load
    rt = load(a.artifact, backend=a.backend)
    _, (x, y) = load_data(a.data)
    p = rt.predict(preprocess(x, rt.meta))
    acc = float((p.argmax(-1) == y).mean())
    q = np.clip(p, 1e-7, 1 - 1e-7)
    loss = float(np.mean(-np.log(q[np.arange(len(y)), y] / q.sum(-1))))
    print(f"accuracy {acc:.4f}  loss {loss:.4f}  on {len(y)} test images")
    return EXIT_OK


def to_dot(g) -> str:
    lines = [f'digraph "{g.name}" {{', "  rankdir=TB; node [fontname=Helvetica fontsize=10];"]
    for v in g.leaves:
        shape = "box" if v.kind == "input" else "note"
        lines.append(f'  "{v.name}" [shape={shape} label="{v.name}\\n{v.type}"];')
    for n in g.nodes:
        act = n.attrs.get("activation")
        label = n.op + (f"+{act}" if act and act != "linear" else "")
        lines.append(f'  "node:{n.name}" [shape=ellipse style=filled fillcolor="#dde8ff" label="{label}"];')
        for v in n.inputs:
            src = f"node:{v.producer.name}" if v.producer is not None else v.name
            lines.append(f'  "{src}" -> "node:{n.name}" [label="{v.type}" fontsize=8];')
    for v in g.outputs:
        lines.append(f'  "out:{v.name}" [shape=box label="output\\n{v.type}"];')
        src = f"node:{v.producer.name}" if v.producer is not None else v.name
        lines.append(f'  "{src}" -> "out:{v.name}";')
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
    else:
        import shutil
        import subprocess
        if not shutil.which("dot"):
            raise UsageError("--format svg needs Graphviz's 'dot' program (apt-get install graphviz); "
                             "use --format dot and render it elsewhere")
        svg = subprocess.run(["dot", "-Tsvg"], input=to_dot(g).encode(), capture_output=True, check=True).stdout
        sys.stdout.write(svg.decode())
    return EXIT_OK


def cmd_compile(a):
    from ir.passes import run_pipeline
    from .artifact import atomic_write_bytes
    from .export import write_numpy_module, write_native_library
    g, weights, meta = load_graph_for(a.model)
    emit = [e.strip() for e in a.emit.split(",") if e.strip()] if a.emit else \
        (["py"] if a.target == "numpy" else ["so", "h"])
    allowed = {"numpy": {"ir", "py"}, "llvm": {"ir", "llvm", "asm", "obj", "so", "h"}}[a.target]
    bad = [e for e in emit if e not in allowed]
    if bad:
        raise UsageError(f"--emit {','.join(bad)} is not available for --target {a.target} "
                         f"(choose from {', '.join(sorted(allowed))})")
    os.makedirs(a.output, exist_ok=True)
    res = run_pipeline(g, "inference", print_ir_after_all=a.print_ir_after_all)
    opt = res.graph
    written = []
    if "ir" in emit:
        p = os.path.join(a.output, f"{g.name}.ir")
        atomic_write_bytes(p, str(opt).encode())
        written.append(p)
    if a.target == "numpy" and "py" in emit:
        written += write_numpy_module(opt, weights, a.output, meta)
    if a.target == "llvm":
        written += write_native_library(opt, weights, a.output, [e for e in emit if e != "ir"])
    for p in written:
        print(p)
    return EXIT_OK


def cmd_bench(a):
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "compare.py")
    if not os.path.isfile(bench):
        raise UsageError("graphcnn bench needs the benchmarks/ folder of a source checkout")
    import runpy
    sys.argv = [bench, a.model, "--batch", a.batch, "--vs", a.vs]
    runpy.run_path(bench, run_name="__main__")
    return EXIT_OK


def build_parser():
    p = argparse.ArgumentParser(prog="graphcnn", description="Compile, train and run CNNs.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a model to artifacts")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True, help="output folder")
    c.add_argument("--target", choices=["llvm", "numpy"], default="llvm")
    c.add_argument("--emit", default=None, help="comma list of ir,llvm,asm,obj,so,h (llvm) or ir,py (numpy)")
    c.add_argument("--print-ir-after-all", action="store_true")
    c.set_defaults(fn=cmd_compile)
    t = sub.add_parser("train", help="train a model on MNIST-format data")
    t.add_argument("model")
    t.add_argument("--data", default=None, help="folder of MNIST IDX files, or 'mnist' (default: bundled subset)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--backend", choices=["llvm", "numpy"], default=None)
    t.add_argument("--lr", type=float, default=None, help="learning rate")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="where to save the trained .gcnn (default NAME.gcnn)")
    t.add_argument("--history", default=None, help="write per-epoch metrics as JSON here")
    t.add_argument("--quiet", action="store_true")
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
    b.add_argument("model")
    b.add_argument("--batch", default="1,256")
    b.add_argument("--vs", default="torch")
    b.set_defaults(fn=cmd_bench)
    for sp in (c, r, e, s, b):
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
    try:
        return args.fn(args)
    except (UsageError, GraphcnnError, IRError, FileNotFoundError, IsADirectoryError) as e:
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
