"""Artifacts other programs embed: a standalone NumPy module (+ weights) and, with the LLVM backend,
a native shared library with a C header."""
from __future__ import annotations

import io
import json
import os

import numpy as np

from .artifact import atomic_write_bytes

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
P = {{n: _W["p%d" % i] for i, n in enumerate({params!r})}}
C = {{n: _W["c%d" % i] for i, n in enumerate({consts!r})}}
INPUT_SHAPE = {in_shape!r}


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


def write_numpy_module(g, weights, folder, meta=None):
    """Write NAME.py (kernels + generated code, NumPy only) and NAME.npz next to it."""
    from backends.numpy import kernels as K
    from backends.numpy.codegen import generate_source
    from . import __version__
    if len(g.inputs) != 1:
        raise ValueError("--emit py: the standalone module supports graphs with one input")
    source, fn, _ = generate_source(g)
    with open(K.__file__) as f:
        ksrc = f.read()
    params = [p.name for p in g.params]
    consts = [v.name for v in g.const_values]
    text = STANDALONE_TEMPLATE.format(name=g.name, version=__version__, kernels=ksrc, source=source, fn=fn,
                                      params=params, consts=consts, in_shape=tuple(g.inputs[0].shape))
    buf = io.BytesIO()
    np.savez(buf, **{f"p{i}": np.asarray(weights[n], np.float32) for i, n in enumerate(params)},
             **{f"c{i}": g.consts[n] for i, n in enumerate(consts)})
    py, npz = os.path.join(folder, f"{g.name}.py"), os.path.join(folder, f"{g.name}.npz")
    atomic_write_bytes(npz, buf.getvalue())
    atomic_write_bytes(py, text.encode())
    _ = json
    return [py, npz]


def write_native_library(g, weights, folder, emit):
    """NAME.so / NAME.h / NAME.o / NAME.ll / NAME.s through the LLVM backend."""
    try:
        from backends.llvm.export import write_native
    except ImportError as e:
        from .cli import UsageError
        raise UsageError(f"--target llvm: native export is not available in this build ({e})") from None
    return write_native(g, weights, folder, emit)
