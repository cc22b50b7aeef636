"""Artifacts other programs embed: a standalone NumPy module (+ weights) and, with the LLVM backend,
a native shared library with a C header.

File names come from output_path: the stem is ir.types.ascii_identifier(model name), so a name such as
'../escaped' can neither leave the output folder nor clash with another model's files."""
from __future__ import annotations

import io
import os

import numpy as np

from ir.types import ascii_identifier

from .artifact import atomic_write_bytes

# {name} is an ASCII identifier (the module's file stem); the graph's own name enters only through
# {graph_name_literal}, a Python string literal made by py_literal
STANDALONE_TEMPLATE = '''"""{name}: inference compiled by graphcnn {version} (NumPy target). Needs only NumPy.

    import {name}
    probs = {name}.predict(x)      # x: float32 {in_shape}
"""
import os as _os

import numpy as np

# ---- kernels (backends/numpy/kernels.py) ----
{kernels}


class K:  # the generated code calls kernels as K.<op>
    pass


for _n, _v in list(globals().items()):
    if callable(_v) and not _n.startswith("_") and _n not in ("K", "predict"):
        setattr(K, _n, staticmethod(_v))

# ---- generated from the optimized graph ----
{source}

_W = np.load(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "{name}.npz"), allow_pickle=False)
P = {{n: _W["p%d" % i] for i, n in enumerate({params})}}
C = {{n: _W["c%d" % i] for i, n in enumerate({consts})}}
INPUT_SHAPE = {in_shape!r}
GRAPH_NAME = {graph_name_literal}


def _buf(key, shape):
    return np.empty(shape, np.float32)


def predict(x):
    """Model outputs for a float32 batch shaped (N,) + INPUT_SHAPE[1:]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != len(INPUT_SHAPE) or tuple(x.shape[1:]) != tuple(INPUT_SHAPE[1:]):
        raise ValueError("{name}.predict: expected shape (N, %s), got %s" %
                         (", ".join(map(str, INPUT_SHAPE[1:])), x.shape))
    out = {fn}(x, P, C, _buf)
    return np.array(out[0] if len(out) == 1 else out, copy=True)
'''


def output_path(folder, model_name: str, ext: str) -> str:
    """folder/STEM.ext for a model: STEM = ascii_identifier(model_name), so the path stays in `folder`."""
    stem = ascii_identifier(model_name)
    path = os.path.join(folder, f"{stem}.{ext}")
    # the stem has no separator and no dot, so this holds by construction; kept as the proof obligation
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise ValueError(f"output path {path!r} for model {model_name!r} is outside {folder!r}")
    return path


def write_numpy_module(g, weights, folder, meta=None):
    """Write NAME.py (kernels + generated code, NumPy only) and NAME.npz next to it (NAME: output_path)."""
    from backends.numpy.codegen import generate_source, py_literal, standalone_kernel_source
    from . import __version__
    if len(g.inputs) != 1:
        raise ValueError("--emit py: the standalone module supports graphs with one input")
    source, fn, _ = generate_source(g)
    ksrc = standalone_kernel_source()
    params = [p.name for p in g.params]
    consts = [v.name for v in g.const_values]
    py, npz = output_path(folder, g.name, "py"), output_path(folder, g.name, "npz")
    stem = os.path.basename(py)[:-3]
    text = STANDALONE_TEMPLATE.format(name=stem, version=__version__, kernels=ksrc, source=source, fn=fn,
                                      params=py_literal(params), consts=py_literal(consts),
                                      in_shape=tuple(g.inputs[0].shape), graph_name_literal=py_literal(g.name))
    buf = io.BytesIO()
    np.savez(buf, **{f"p{i}": np.asarray(weights[n], np.float32) for i, n in enumerate(params)},
             **{f"c{i}": g.consts[n] for i, n in enumerate(consts)})
    atomic_write_bytes(npz, buf.getvalue())
    atomic_write_bytes(py, text.encode())
    return [py, npz]


def write_native_library(g, weights, folder, emit, target=None):
    """NAME.so / NAME.h / NAME.o / NAME.ll / NAME.s through the LLVM backend, for `target` (a
    backends.llvm.jit.HostTarget, e.g. from export_target(cpu, features); default the host)."""
    try:
        from backends.llvm.export import write_native
    except ImportError as e:
        from .cli import UsageError
        raise UsageError(f"--target llvm: native export is not available in this build ({e})") from None
    return write_native(g, weights, folder, emit, target=target)
