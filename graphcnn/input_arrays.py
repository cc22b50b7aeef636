"""The one rule for turning what a user passes as model input into the array a compiled graph takes."""
from __future__ import annotations

import math

import numpy as np

from .errors import GraphcnnError


def conform_input(x, want, what, model_name):
    """x as a C-contiguous float32 (N, *want) array, or a GraphcnnError naming the expected and given shapes.

    Accepted forms (DESIGN.md, as Keras): exactly (N, *want); (N, H, W) for a (H, W, 1) model; (N, H*W*C)
    flattened for an image model; (N, H, W[, C]) images for a flat (H*W*C,) model. Nothing else is
    reshaped: an NCHW (N, 3, 28, 28) array for a (28, 28, 3) model has the right size but the wrong
    layout, and reshaping it would give wrong numbers silently. Values must be real and finite."""
    want = tuple(want)
    a = x
    if not (type(a) is np.ndarray and a.dtype == np.float32 and a.shape[1:] == want and a.ndim == len(want) + 1
            and a.shape[0] > 0 and a.flags.c_contiguous):     # else the checks and conversions below
        a = _conformed(x, want, what, model_name)
    if not all_finite(a):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise GraphcnnError(f"{what}: x contains {bad} NaN or infinite value{'s' if bad != 1 else ''}")
    return a


# inputs up to this many floats are checked with one BLAS dot (a batch-1 predict: np.isfinite(a).all()
# costs ~2 us there, the dot ~0.5 us); larger ones with isfinite (amortized, and no BLAS threads)
DOT_CHECK_MAX = 4096
_ONES: dict = {}


def all_finite(a: np.ndarray) -> bool:
    """np.isfinite(a).all() for a C-contiguous float32 array. Small arrays first try sum(a * 1) by a
    BLAS dot: it is finite only when every element is (NaN and inf propagate through x * 1 and the sum);
    a non-finite dot, which a finite sum that overflows also gives, falls back to the exact check."""
    if a.size <= DOT_CHECK_MAX:
        ones = _ONES.get(a.size)
        if ones is None:
            ones = _ONES.setdefault(a.size, np.ones(a.size, np.float32))
        if math.isfinite(a.reshape(-1).dot(ones)):
            return True
    return bool(np.isfinite(a).all())


def _conformed(x, want, what, model_name):
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise GraphcnnError(f"{what}: x must hold real numbers, got dtype {a.dtype}")
    if a.ndim == 0 or a.shape[0] == 0:
        raise GraphcnnError(f"{what}: x is empty (shape {a.shape})")
    size = int(np.prod(want))
    given = a.shape[1:]
    accepted = (given == want
                or (len(want) > 1 and want[-1] == 1 and given == want[:-1])
                or (len(want) > 1 and len(given) == 1 and given[0] == size)
                or (len(want) == 1 and len(given) in (2, 3) and int(np.prod(given)) == size))
    if not accepted:
        forms = [want] + ([want[:-1]] if len(want) > 1 and want[-1] == 1 else []) + \
            ([(size,)] if len(want) > 1 else [])
        listed = " or ".join("(N, " + ", ".join(map(str, f)) + ")" for f in forms)
        raise GraphcnnError(f"{what}: x has shape {a.shape}; model {model_name!r} expects {listed}"
                            + (" (channels last: NHWC, not NCHW)" if len(want) == 3 and given == want[-1:] + want[:-1] else ""))
    return np.ascontiguousarray(a.reshape((a.shape[0],) + want), np.float32)
