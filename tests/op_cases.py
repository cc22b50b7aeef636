"""Random op configurations for the differential tests: one Family per op (or op group), each drawing a
configuration with hypothesis, emitting the op into a graph and computing the float64 reference
(tests/reference_ops.py) of its output and of the gradient of sum(dy * output) w.r.t. its inputs.

Shapes are drawn from small sets that include 1 and primes; window ops draw kernel = input size,
stride > kernel, dilation and asymmetric explicit padding. A configuration is a plain dict, so a failing
case prints as something one can paste into a regression test."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import reference_ops as R
from ir.ops import emit

DIMS = (1, 2, 3, 5, 7)              # spatial sizes, channels, features: 1 and primes
WIDE = (1, 2, 3, 5, 7, 8, 16, 17)   # elementwise lengths around vector widths (masked tails)
ACTS = ("linear", "relu", "sigmoid", "tanh")
# the activation table's parameterized entries: slopes stay <= 1 (the linear-family bound assumes it);
# clip bounds include min = max and one-sided bounds
LEAKY_ALPHAS = (0.0, 0.01, 0.3, 1.0)
CLIP_BOUNDS = ((0.0, 6.0), (-1.0, 1.0), (None, 0.5), (-0.5, None), (None, None), (0.25, 0.25))


def _table_activation(draw):
    """(name, params dict) drawn from the whole activation table (ir/ops/activations.py)."""
    name = draw(st.sampled_from(("linear", "relu", "sigmoid", "tanh", "leaky_relu", "clip")))
    if name == "leaky_relu":
        return name, {"alpha": draw(st.sampled_from(LEAKY_ALPHAS))}
    if name == "clip":
        lo, hi = draw(st.sampled_from(CLIP_BOUNDS))
        return name, {"min_value": lo, "max_value": hi}
    return name, {}


class Family:
    """One op (or a group sharing a reference). Subclasses set `ops` (every registered op the forward
    and backward graphs of this family use) and implement draw / inputs / emit / ref / vjp."""
    name = ""
    ops: tuple = ()
    linear = False          # ref/vjp on |inputs| bound the rounding error (sums of products)
    differentiable = True

    def draw(self, draw) -> dict:
        raise NotImplementedError

    def inputs(self, cfg) -> dict:
        """key -> (shape with None for the batch, kind): kind 'f' (normal), 'logits', 'prob', 'label',
        'positive' (in [0.1, 4]), 'nonzero' (|v| in [0.5, 2]); see make_array."""
        raise NotImplementedError

    def emit(self, cfg, v: dict):
        raise NotImplementedError

    def ref(self, cfg, a: dict):
        raise NotImplementedError

    def vjp(self, cfg, a: dict, y, dy) -> dict:
        raise NotImplementedError

    def length(self, cfg) -> int:
        """The longest sum behind one output element (sets the rounding tolerance)."""
        return 1

    def magnitudes(self, cfg, a, y, dy, grads):
        """Scales of the rounding error of the output and of each gradient. For sums of products
        (`linear`) the same computation on |inputs| and |dy| (activations dropped: their slopes are
        at most 1); otherwise the result's own size, plus |dy| for gradients."""
        if not self.linear:
            return np.abs(y), {k: np.abs(v) + np.max(np.abs(dy)) for k, v in grads.items()}
        absa = {k: np.abs(v) for k, v in a.items()}
        kw = {"activation": "linear"} if "activation" in cfg else {}
        y_mag = np.abs(self.ref(cfg, absa, **kw))
        return y_mag, {k: np.abs(v) for k, v in self.vjp(cfg, absa, y_mag, np.abs(dy), **kw).items()}

    def wrt(self, cfg) -> list:
        return [k for k, (_, kind) in self.inputs(cfg).items() if kind != "label"]


def _padding(draw, allow_same=True):
    kind = draw(st.sampled_from(("valid", "same", "explicit") if allow_same else ("valid", "explicit")))
    if kind == "explicit":
        return tuple(tuple(draw(st.integers(0, 3)) for _ in range(2)) for _ in range(2))
    return kind


def resolve_padding(padding, hw, extent, stride):
    """The same resolution rule as TensorFlow: SAME puts the odd extra pad at the bottom/right."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        pads = []
        for size, ext, s in zip(hw, extent, stride):
            total = max((-(-size // s) - 1) * s + ext - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return padding


class Conv2D(Family):
    name = "conv2d"
    ops = ("conv2d", "bias_add", "relu", "sigmoid", "tanh", "conv2d_grad_input", "conv2d_grad_filter",
           "bias_add_grad", "relu_grad", "sigmoid_grad", "tanh_grad")
    linear = True

    def draw(self, draw):
        h, w = draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))
        stride = (draw(st.sampled_from((1, 1, 2, 3, 4))), draw(st.sampled_from((1, 1, 2, 3, 4))))
        dil = (draw(st.sampled_from((1, 1, 2, 3))), draw(st.sampled_from((1, 1, 2, 3))))
        padding = _padding(draw)
        pads = padding if isinstance(padding, tuple) else ((0, 0), (0, 0))
        k = []
        for size, p, d in zip((h, w), pads, dil):
            room = size + p[0] + p[1] if padding != "same" else 4 * d
            k.append(draw(st.integers(1, max(1, min(4, (room - 1) // d + 1)))))
        if isinstance(padding, tuple):    # a pad is at most the dilated kernel extent (conv2d refuses more);
            # clamping keeps the padded size >= the extent: a clamped side alone already covers it
            padding = tuple(tuple(min(p, (kk - 1) * d + 1) for p in side) for side, kk, d in zip(padding, k, dil))
            # and the output at most an undilated kernel's full size: pads total <= extent + k (the bottom /
            # right side gives way; the total stays >= extent, so the window still fits)
            padding = tuple((p0, min(p1, (kk - 1) * d + 1 + kk - p0))
                            for (p0, p1), kk, d in zip(padding, k, dil))
        return dict(h=h, w=w, c=draw(st.sampled_from(DIMS)), f=draw(st.sampled_from(DIMS + (8,))), k=tuple(k),
                    stride=stride, dil=dil, padding=padding, bias=draw(st.booleans()),
                    activation=draw(st.sampled_from(ACTS)))

    def _pads(self, cfg):
        ext = tuple((k - 1) * d + 1 for k, d in zip(cfg["k"], cfg["dil"]))
        return resolve_padding(cfg["padding"], (cfg["h"], cfg["w"]), ext, cfg["stride"])

    def inputs(self, cfg):
        ins = {"x": ((None, cfg["h"], cfg["w"], cfg["c"]), "f"), "w": (cfg["k"] + (cfg["c"], cfg["f"]), "f")}
        if cfg["bias"]:
            ins["b"] = ((cfg["f"],), "f")
        return ins

    def emit(self, cfg, v):
        y = emit("conv2d", v["x"], v["w"], stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dil"])
        if cfg["bias"]:
            y = emit("bias_add", y, v["b"])
        return y if cfg["activation"] == "linear" else emit(cfg["activation"], y)

    def ref(self, cfg, a, activation=None):
        z = R.conv2d(a["x"], a["w"], a.get("b"), cfg["stride"], self._pads(cfg), cfg["dil"])
        return R.activation(activation or cfg["activation"], z)

    def vjp(self, cfg, a, y, dy, activation=None):
        dz = R.activation_vjp(activation or cfg["activation"], y, dy)
        dx, dw, db = R.vjp_conv2d(a["x"], a["w"], dz, cfg["stride"], self._pads(cfg), cfg["dil"])
        return dict(x=dx, w=dw, **({"b": db} if cfg["bias"] else {}))

    def length(self, cfg):      # forward: taps x channels; weight gradient: batch x output pixels
        return cfg["k"][0] * cfg["k"][1] * max(cfg["c"], cfg["f"]) + 8 * cfg["h"] * cfg["w"]


class Dense(Family):
    name = "dense"
    ops = ("dense", "bias_add", "relu", "sigmoid", "tanh", "matmul", "bias_add_grad", "relu_grad",
           "sigmoid_grad", "tanh_grad")
    linear = True

    def draw(self, draw):
        return dict(k=draw(st.sampled_from(DIMS + (16, 17))), m=draw(st.sampled_from(DIMS + (10,))),
                    bias=draw(st.booleans()), activation=draw(st.sampled_from(ACTS)))

    def inputs(self, cfg):
        ins = {"x": ((None, cfg["k"]), "f"), "w": ((cfg["k"], cfg["m"]), "f")}
        if cfg["bias"]:
            ins["b"] = ((cfg["m"],), "f")
        return ins

    def emit(self, cfg, v):
        y = emit("dense", v["x"], v["w"])
        if cfg["bias"]:
            y = emit("bias_add", y, v["b"])
        return y if cfg["activation"] == "linear" else emit(cfg["activation"], y)

    def ref(self, cfg, a, activation=None):
        z = R.matmul(a["x"], a["w"], False, False)
        return R.activation(activation or cfg["activation"], z + a["b"] if cfg["bias"] else z)

    def vjp(self, cfg, a, y, dy, activation=None):
        dz = R.activation_vjp(activation or cfg["activation"], y, dy)
        dx, dw = R.vjp_matmul(a["x"], a["w"], dz, False, False)
        return dict(x=dx, w=dw, **({"b": dz.sum(axis=0)} if cfg["bias"] else {}))

    def length(self, cfg):      # forward: k; input gradient: m; weight gradient: the batch
        return max(cfg["k"], cfg["m"]) + 8


class MatMul(Family):
    """Three forms: rows = the batch (x @ W), inner = the batch (xᵀ y, as in dense's weight gradient),
    static (no batch)."""
    name = "matmul"
    ops = ("matmul",)
    linear = True

    def draw(self, draw):
        form = draw(st.sampled_from(("rows", "inner", "static")))
        return dict(form=form, m=draw(st.sampled_from(DIMS)), k=draw(st.sampled_from(DIMS)),
                    n=draw(st.sampled_from(DIMS)), ta=form == "inner" or (form == "static" and draw(st.booleans())),
                    tb=form != "inner" and draw(st.booleans()))

    def inputs(self, cfg):
        m, k, n, ta, tb = cfg["m"], cfg["k"], cfg["n"], cfg["ta"], cfg["tb"]
        if cfg["form"] == "inner":
            return {"a": ((None, m), "f"), "b": ((None, n), "f")}
        rows = None if cfg["form"] == "rows" else m
        return {"a": ((k, rows) if ta else (rows, k), "f"), "b": ((n, k) if tb else (k, n), "f")}

    def emit(self, cfg, v):
        return emit("matmul", v["a"], v["b"], transpose_a=cfg["ta"], transpose_b=cfg["tb"])

    def ref(self, cfg, a):
        return R.matmul(a["a"], a["b"], cfg["ta"], cfg["tb"])

    def vjp(self, cfg, a, y, dy):
        da, db = R.vjp_matmul(a["a"], a["b"], dy, cfg["ta"], cfg["tb"])
        return {"a": da, "b": db}

    def length(self, cfg):
        return 16          # k, m or n (at most 7) or the batch (below 8 in these tests)


class Pool(Family):
    linear = True

    def draw(self, draw):
        h, w = draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))
        pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        stride = draw(st.sampled_from((None, 1, 2, 3, (1, 2), (3, 1))))
        padding = _padding(draw)
        if isinstance(padding, tuple):
            padding = tuple(tuple(min(p, k - 1) for p in side) for side, k in zip(padding, pool))
        if padding != "same":
            pads = padding if isinstance(padding, tuple) else ((0, 0), (0, 0))
            pool = tuple(min(k, size + p[0] + p[1]) for k, size, p in zip(pool, (h, w), pads))
            if isinstance(padding, tuple):
                padding = tuple(tuple(min(p, k - 1) for p in side) for side, k in zip(padding, pool))
        return dict(h=h, w=w, c=draw(st.sampled_from(DIMS)), pool=pool, stride=stride, padding=padding,
                    include_pad=draw(st.booleans()))

    def geometry(self, cfg):
        s = cfg["stride"] if cfg["stride"] is not None else cfg["pool"]
        s = (s, s) if isinstance(s, int) else s
        return cfg["pool"], s, resolve_padding(cfg["padding"], (cfg["h"], cfg["w"]), cfg["pool"], s)

    def inputs(self, cfg):
        return {"x": ((None, cfg["h"], cfg["w"], cfg["c"]), "f")}

    def length(self, cfg):
        return cfg["pool"][0] * cfg["pool"][1]


class MaxPool(Pool):
    name = "max_pool2d"
    ops = ("max_pool2d", "max_pool2d_grad")
    linear = False

    def emit(self, cfg, v):
        return emit("max_pool2d", v["x"], pool=cfg["pool"], stride=cfg["stride"], padding=cfg["padding"])

    def ref(self, cfg, a):
        return R.max_pool2d(a["x"], *self.geometry(cfg))

    def vjp(self, cfg, a, y, dy):
        return {"x": R.vjp_max_pool2d(a["x"], dy, *self.geometry(cfg))}


class AvgPool(Pool):
    name = "avg_pool2d"
    ops = ("avg_pool2d", "avg_pool2d_grad")

    def emit(self, cfg, v):
        return emit("avg_pool2d", v["x"], pool=cfg["pool"], stride=cfg["stride"], padding=cfg["padding"],
                    count_include_pad=cfg["include_pad"])

    def ref(self, cfg, a):
        return R.avg_pool2d(a["x"], *self.geometry(cfg), cfg["include_pad"])

    def vjp(self, cfg, a, y, dy):
        return {"x": R.vjp_avg_pool2d(a["x"], dy, *self.geometry(cfg), cfg["include_pad"])}


class GlobalAvgPool(Family):
    name = "global_avg_pool2d"
    ops = ("global_avg_pool2d", "global_avg_pool2d_grad")
    linear = True

    def draw(self, draw):
        return dict(h=draw(st.sampled_from(DIMS)), w=draw(st.sampled_from(DIMS)), c=draw(st.sampled_from(WIDE)))

    def inputs(self, cfg):
        return {"x": ((None, cfg["h"], cfg["w"], cfg["c"]), "f")}

    def emit(self, cfg, v):
        return emit("global_avg_pool2d", v["x"])

    def ref(self, cfg, a):
        return a["x"].sum(axis=(1, 2)) / (cfg["h"] * cfg["w"])

    def vjp(self, cfg, a, y, dy):
        return {"x": np.broadcast_to(dy[:, None, None, :] / (cfg["h"] * cfg["w"]), a["x"].shape).copy()}

    def length(self, cfg):
        return cfg["h"] * cfg["w"]


def _batched_shape(draw, rank_min=2, rank_max=4, dims=WIDE):
    return (None,) + tuple(draw(st.sampled_from(dims)) for _ in range(draw(st.integers(rank_min, rank_max)) - 1))


class Unary(Family):
    """Elementwise ops: the activation table (with its parameters), neg, scale, rsqrt (of positive x)."""
    name = "unary"
    ops = ("relu", "sigmoid", "tanh", "leaky_relu", "clip", "neg", "scale", "rsqrt", "relu_grad", "sigmoid_grad",
           "tanh_grad", "leaky_relu_grad", "clip_grad")

    def draw(self, draw):
        op = draw(st.sampled_from(("relu", "sigmoid", "tanh", "leaky_relu", "clip", "neg", "scale", "rsqrt")))
        params = {}
        if op == "leaky_relu":
            params = {"alpha": draw(st.sampled_from(LEAKY_ALPHAS))}
        elif op == "clip":
            lo, hi = draw(st.sampled_from(CLIP_BOUNDS))
            params = {"min_value": lo, "max_value": hi}
        return dict(op=op, shape=_batched_shape(draw, 1, 4), params=params,
                    factor=draw(st.sampled_from((0.0, -1.5, 0.5, 3.0))) if op == "scale" else None)

    def inputs(self, cfg):
        return {"x": (cfg["shape"], "positive" if cfg["op"] == "rsqrt" else "logits")}

    def emit(self, cfg, v):
        if cfg["op"] == "scale":
            return emit("scale", v["x"], factor=cfg["factor"])
        return emit(cfg["op"], v["x"], **cfg.get("params", {}))

    def ref(self, cfg, a):
        if cfg["op"] == "neg":
            return -a["x"]
        if cfg["op"] == "scale":
            return a["x"] * cfg["factor"]
        if cfg["op"] == "rsqrt":
            with np.errstate(invalid="ignore", divide="ignore"):
                return 1.0 / np.sqrt(a["x"])
        return R.activation(cfg["op"], a["x"], **cfg.get("params", {}))

    def vjp(self, cfg, a, y, dy):
        if cfg["op"] == "neg":
            return {"x": -dy}
        if cfg["op"] == "scale":
            return {"x": dy * cfg["factor"]}
        if cfg["op"] == "rsqrt":                 # d/dx x^-1/2 = -1/2 x^-3/2 = -y^3 / 2
            return {"x": -0.5 * dy * y ** 3}
        return {"x": R.activation_vjp(cfg["op"], y, dy, **cfg.get("params", {}))}


class Softmax(Family):
    name = "softmax"
    ops = ("softmax", "log_softmax", "softmax_grad", "log_softmax_grad")

    def draw(self, draw):
        shape = _batched_shape(draw, 2, 4)
        axis = draw(st.integers(1, len(shape) - 1))
        return dict(op=draw(st.sampled_from(("softmax", "log_softmax"))), shape=shape,
                    axis=axis if draw(st.booleans()) else axis - len(shape))

    def inputs(self, cfg):
        return {"x": (cfg["shape"], "logits")}

    def emit(self, cfg, v):
        return emit(cfg["op"], v["x"], axis=cfg["axis"])

    def ref(self, cfg, a):
        return getattr(R, cfg["op"])(a["x"], cfg["axis"])

    def vjp(self, cfg, a, y, dy):
        return {"x": getattr(R, "vjp_" + cfg["op"])(y, dy, cfg["axis"])}

    def length(self, cfg):
        return cfg["shape"][cfg["axis"]] + 4


class Binary(Family):
    name = "binary"
    ops = ("add", "sub", "mul", "div", "sum_to", "neg")
    linear = True

    def draw(self, draw):
        out = _batched_shape(draw, 1, 4, DIMS)
        a = tuple(d if d is None or draw(st.booleans()) else 1 for d in out)
        rank_b = draw(st.integers(0, len(out)))
        b = tuple(d if draw(st.booleans()) else 1 for d in out[len(out) - rank_b:])
        if rank_b == len(out) and draw(st.booleans()):
            b = (None,) + b[1:]
        return dict(op=draw(st.sampled_from(("add", "sub", "mul", "div"))), a=a, b=b, swap=draw(st.booleans()))

    def inputs(self, cfg):
        # div: the divisor (the second operand after the swap) is kept away from 0
        divisor = ("a" if cfg["swap"] else "b") if cfg["op"] == "div" else None
        return {k: (cfg[k], "nonzero" if k == divisor else "f") for k in ("a", "b")}

    def _order(self, cfg, p, q):
        return (q, p) if cfg["swap"] else (p, q)

    def emit(self, cfg, v):
        return emit(cfg["op"], *self._order(cfg, v["a"], v["b"]))

    def ref(self, cfg, a):
        p, q = self._order(cfg, a["a"], a["b"])
        return {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[cfg["op"]](p, q)

    def vjp(self, cfg, a, y, dy):
        p, q = self._order(cfg, "a", "b")
        if cfg["op"] == "mul":
            dp, dq = dy * a[q], dy * a[p]
        elif cfg["op"] == "div":                 # d(p/q) = dp / q - p dq / q^2
            dp, dq = dy / a[q], -dy * a[p] / (a[q] * a[q])
        else:
            dp, dq = dy, (dy if cfg["op"] == "add" else -dy)
        return {p: R.unbroadcast(dp, a[p].shape), q: R.unbroadcast(dq, a[q].shape)}

    def length(self, cfg):
        return 8 * 7 * 7       # sum_to may sum a whole broadcast axis product

    def magnitudes(self, cfg, a, y, dy, grads):
        # a - b rounds relative to |a| + |b|: measure sub as add
        return super().magnitudes(dict(cfg, op="add" if cfg["op"] == "sub" else cfg["op"]), a, y, dy, grads)


class BiasAdd(Family):
    name = "bias_add"
    ops = ("bias_add", "bias_add_grad")
    linear = True

    def draw(self, draw):
        return dict(shape=_batched_shape(draw, 2, 4))

    def inputs(self, cfg):
        return {"x": (cfg["shape"], "f"), "b": ((cfg["shape"][-1],), "f")}

    def emit(self, cfg, v):
        return emit("bias_add", v["x"], v["b"])

    def ref(self, cfg, a):
        return a["x"] + a["b"]

    def vjp(self, cfg, a, y, dy):
        return {"x": dy, "b": dy.reshape(-1, dy.shape[-1]).sum(axis=0)}

    def length(self, cfg):
        return 8 * int(np.prod(cfg["shape"][1:-1], dtype=np.int64))


class Shape(Family):
    name = "shape"
    ops = ("transpose", "reshape", "flatten")
    linear = True

    def draw(self, draw):
        shape = _batched_shape(draw, 2, 4, DIMS)
        op = draw(st.sampled_from(("transpose", "reshape", "flatten")))
        perm = (0,) + tuple(draw(st.permutations(range(1, len(shape))))) if op == "transpose" else None
        return dict(op=op, shape=shape, perm=perm)

    def inputs(self, cfg):
        return {"x": (cfg["shape"], "f")}

    def emit(self, cfg, v):
        if cfg["op"] == "transpose":
            return emit("transpose", v["x"], perm=cfg["perm"])
        if cfg["op"] == "flatten":
            return emit("flatten", v["x"])
        return emit("reshape", v["x"], shape=(None,) + tuple(reversed(cfg["shape"][1:])))

    def ref(self, cfg, a):
        x = a["x"]
        if cfg["op"] == "transpose":
            return x.transpose(cfg["perm"])
        if cfg["op"] == "flatten":
            return x.reshape(x.shape[0], -1)
        return x.reshape((x.shape[0],) + tuple(reversed(cfg["shape"][1:])))

    def vjp(self, cfg, a, y, dy):
        if cfg["op"] == "transpose":
            return {"x": dy.transpose(np.argsort(cfg["perm"]))}
        return {"x": dy.reshape(a["x"].shape)}


class Loss(Family):
    name = "loss"
    ops = ("sparse_categorical_crossentropy", "sparse_categorical_crossentropy_grad",
           "categorical_crossentropy", "categorical_crossentropy_grad", "binary_crossentropy",
           "binary_crossentropy_grad", "mse", "mse_grad")

    def draw(self, draw):
        return dict(op=draw(st.sampled_from(("sparse_categorical_crossentropy", "categorical_crossentropy",
                                             "binary_crossentropy", "mse"))),
                    classes=draw(st.sampled_from(WIDE + (10,))), from_logits=draw(st.booleans()))

    def inputs(self, cfg):
        c = cfg["classes"]
        kind = "logits" if cfg["from_logits"] or cfg["op"] == "mse" else "prob"
        target = ((None,), "label") if cfg["op"].startswith("sparse") else ((None, c), "prob" if cfg["op"] != "mse"
                                                                             else "f")
        return {"p": ((None, c), kind), "t": target}

    def wrt(self, cfg):
        return ["p"]

    def emit(self, cfg, v):
        if cfg["op"] == "mse":
            return emit("mse", v["p"], v["t"])
        return emit(cfg["op"], v["p"], v["t"], from_logits=cfg["from_logits"])

    def ref(self, cfg, a):
        if cfg["op"] == "mse":
            return np.float64(R.mse(a["p"], a["t"]))
        if cfg["op"] == "binary_crossentropy":
            return np.float64(R.binary_crossentropy(a["p"], a["t"], cfg["from_logits"]))
        return np.float64(R.crossentropy(a["p"], a["t"], cfg["from_logits"], cfg["op"].startswith("sparse")))

    def vjp(self, cfg, a, y, dy):
        if cfg["op"] == "mse":
            return {"p": dy * R.vjp_mse(a["p"], a["t"])}
        if cfg["op"] == "binary_crossentropy":
            return {"p": dy * R.vjp_binary_crossentropy(a["p"], a["t"], cfg["from_logits"])}
        return {"p": dy * R.vjp_crossentropy(a["p"], a["t"], cfg["from_logits"], cfg["op"].startswith("sparse"))}

    def length(self, cfg):
        return 8 * (cfg["classes"] + 4)


class DepthwiseConv(Family):
    """depthwise_conv2d with stride, dilation, asymmetric explicit padding (each pad at most the dilated
    kernel extent), depth multipliers 1..3, a bias and any activation of the table, fused into the op's
    attribute or emitted as separate ops (which the fusion pass fuses)."""
    name = "depthwise_conv2d"
    ops = ("depthwise_conv2d", "depthwise_conv2d_grad_input", "depthwise_conv2d_grad_filter", "bias_add",
           "bias_add_grad", "leaky_relu", "clip", "leaky_relu_grad", "clip_grad")
    linear = True

    def draw(self, draw):
        cfg = Conv2D().draw(draw)        # the same geometry rules (and clamped explicit pads) as conv2d
        act, params = _table_activation(draw)
        return dict(h=cfg["h"], w=cfg["w"], c=cfg["c"], mult=draw(st.integers(1, 3)), k=cfg["k"],
                    stride=cfg["stride"], dil=cfg["dil"], padding=cfg["padding"], bias=cfg["bias"],
                    activation=act, params=params, in_attr=draw(st.booleans()))

    def _pads(self, cfg):
        ext = tuple((k - 1) * d + 1 for k, d in zip(cfg["k"], cfg["dil"]))
        return resolve_padding(cfg["padding"], (cfg["h"], cfg["w"]), ext, cfg["stride"])

    def inputs(self, cfg):
        ins = {"x": ((None, cfg["h"], cfg["w"], cfg["c"]), "f"), "w": (cfg["k"] + (cfg["c"], cfg["mult"]), "f")}
        if cfg["bias"]:
            ins["b"] = ((cfg["c"] * cfg["mult"],), "f")
        return ins

    def emit(self, cfg, v):
        geom = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dil"])
        if cfg["in_attr"]:
            return emit("depthwise_conv2d", v["x"], v["w"], *([v["b"]] if cfg["bias"] else []), **geom,
                        activation=cfg["activation"], activation_params=cfg["params"])
        y = emit("depthwise_conv2d", v["x"], v["w"], **geom)
        if cfg["bias"]:
            y = emit("bias_add", y, v["b"])
        return y if cfg["activation"] == "linear" else emit(cfg["activation"], y, **cfg["params"])

    def ref(self, cfg, a, activation=None):
        z = R.depthwise_conv2d(a["x"], a["w"], a.get("b"), cfg["stride"], self._pads(cfg), cfg["dil"])
        return R.activation(activation or cfg["activation"], z, **({} if activation else cfg["params"]))

    def vjp(self, cfg, a, y, dy, activation=None):
        dz = R.activation_vjp(activation or cfg["activation"], y, dy, **({} if activation else cfg["params"]))
        dx, dw, db = R.vjp_depthwise_conv2d(a["x"], a["w"], dz, cfg["stride"], self._pads(cfg), cfg["dil"])
        return dict(x=dx, w=dw, **({"b": db} if cfg["bias"] else {}))

    def length(self, cfg):      # forward: taps; weight gradient: batch x output pixels
        return cfg["k"][0] * cfg["k"][1] + 8 * cfg["h"] * cfg["w"]


class BatchNorm(Family):
    """batch_norm (given statistics), batch_norm_train (y, batch mean / variance, and the Keras moving
    average momentum * moving + (1 - momentum) * batch, as layers.BatchNormalization emits it), and the
    inference fold of dense + batch_norm (batch_norm_scale: forward only, the fold needs dense's output to
    have no other reader)."""
    name = "batch_norm"
    ops = ("batch_norm", "batch_norm_train", "batch_norm_train_grad", "batch_norm_scale", "rsqrt", "sum_to",
           "dense")

    def draw(self, draw):
        mode = draw(st.sampled_from(("inference", "train", "fold")))
        cfg = dict(mode=mode, eps=draw(st.sampled_from((1e-3, 1e-5, 0.5))))
        if mode == "fold":
            cfg.update(shape=(None, draw(st.sampled_from(DIMS + (16,)))), c=draw(st.sampled_from(DIMS)),
                       bias=draw(st.booleans()))
        else:
            cfg["shape"] = _batched_shape(draw, 2, 4, DIMS)
            cfg["c"] = cfg["shape"][-1]
        if mode == "train":
            cfg["output"] = draw(st.sampled_from(("y", "y", "mean", "var", "moving_mean", "moving_var")))
            cfg["momentum"] = draw(st.sampled_from((0.0, 0.9, 0.99)))
        return cfg

    def inputs(self, cfg):
        c = (cfg["c"],)
        ins = {"x": (cfg["shape"], "f"), "gamma": (c, "f"), "beta": (c, "f")}
        if cfg["mode"] == "fold":
            ins["w"] = ((cfg["shape"][1], cfg["c"]), "f")
            if cfg["bias"]:
                ins["b"] = (c, "f")
        if cfg["mode"] != "train":
            ins.update(mean=(c, "f"), var=(c, "positive"))
        elif cfg["output"].startswith("moving"):
            ins["moving"] = (c, "positive" if cfg["output"] == "moving_var" else "f")
        return ins

    def wrt(self, cfg):
        if cfg["mode"] == "fold" or (cfg["mode"] == "train" and cfg["output"] != "y"):
            return []            # the fold is forward-only; batch statistics are not differentiated (Keras)
        return super().wrt(cfg)

    def emit(self, cfg, v):
        if cfg["mode"] == "train":
            y, mean, var = emit("batch_norm_train", v["x"], v["gamma"], v["beta"], epsilon=cfg["eps"])
            out = cfg["output"]
            if out.startswith("moving"):
                batch = mean if out == "moving_mean" else var
                return emit("add", emit("scale", v["moving"], factor=cfg["momentum"]),
                            emit("scale", batch, factor=1.0 - cfg["momentum"]))
            return {"y": y, "mean": mean, "var": var}[out]
        x = v["x"]
        if cfg["mode"] == "fold":
            x = emit("dense", x, v["w"])
            if cfg["bias"]:
                x = emit("bias_add", x, v["b"])
        return emit("batch_norm", x, v["gamma"], v["beta"], v["mean"], v["var"], epsilon=cfg["eps"])

    def _pre(self, cfg, a):
        if cfg["mode"] != "fold":
            return a["x"]
        z = R.matmul(a["x"], a["w"], False, False)
        return z + a["b"] if cfg["bias"] else z

    def ref(self, cfg, a):
        x = self._pre(cfg, a)
        if cfg["mode"] != "train":
            return R.batch_norm(x, a["gamma"], a["beta"], a["mean"], a["var"], cfg["eps"])
        mean, var = R.batch_statistics(x)
        out = cfg["output"]
        if out.startswith("moving"):
            m = cfg["momentum"]
            return m * a["moving"] + (1 - m) * (mean if out == "moving_mean" else var)
        if out == "y":
            return R.batch_norm(x, a["gamma"], a["beta"], mean, var, cfg["eps"])
        return mean if out == "mean" else var

    def vjp(self, cfg, a, y, dy):
        if not self.wrt(cfg):
            return {}
        if cfg["mode"] == "train":
            return R.vjp_batch_norm_train(a["x"], a["gamma"], cfg["eps"], dy)
        return R.vjp_batch_norm(a["x"], a["gamma"], a["mean"], a["var"], cfg["eps"], dy)

    def length(self, cfg):
        # the statistics and the gamma / beta / mean / var gradients sum over every element of a channel
        # (batch counted as 8); the fold adds dense's k
        return 8 * int(np.prod(cfg["shape"][1:-1], dtype=np.int64)) + cfg["shape"][1] + 4

    def magnitudes(self, cfg, a, y, dy, grads):
        """x - mean rounds relative to |x| + |mean| (not the small |x - mean|), and each gradient sums
        products of those sizes: the bounds are the same expressions on absolute values."""
        x = np.abs(self._pre(cfg, {k: np.abs(v) for k, v in a.items()}))
        axes = tuple(range(x.ndim - 1))
        if cfg["mode"] == "train":
            mean, var = R.batch_statistics(self._pre(cfg, a))
        else:
            mean, var = a["mean"], a["var"]
        inv = 1.0 / np.sqrt(var + cfg["eps"])
        spread = (x + np.abs(mean)) * inv
        gamma = np.abs(a["gamma"])
        y_mag = spread * gamma + np.abs(a["beta"])
        if cfg["mode"] == "train" and cfg["output"] != "y":       # the statistics: sums of |x|, (|x| + |mean|)^2
            stat = x.mean(axis=axes) if cfg["output"].endswith("mean") else ((x + np.abs(mean)) ** 2).mean(axis=axes)
            m = cfg["momentum"]
            y_mag = m * np.abs(a["moving"]) + (1 - m) * stat if "moving" in a else stat
        if not grads:
            return y_mag, {}
        ady = np.abs(np.broadcast_to(dy, x.shape))
        dot = (ady * spread).sum(axis=axes)
        g_mag = {"gamma": dot, "beta": ady.sum(axis=axes)}
        if cfg["mode"] == "train":
            g_mag["x"] = gamma * inv * (ady + ady.mean(axis=axes) + spread * (ady * spread).mean(axis=axes))
        else:
            g_mag.update(x=ady * gamma * inv, mean=(ady * gamma * inv).sum(axis=axes), var=0.5 * gamma * dot * inv ** 2)
        return y_mag, g_mag


def _axis_sets(rank):
    return [tuple(i for i in range(rank) if mask >> i & 1) for mask in range(1 << rank)]


class Reduce(Family):
    """reduce_sum / reduce_mean over every axis set (the batch included, None = all, negative axes) with
    and without keepdims; reduce_grad broadcasts the gradient back."""
    name = "reduce"
    ops = ("reduce_sum", "reduce_mean", "reduce_grad")
    linear = True

    def draw(self, draw):
        shape = _batched_shape(draw, 1, 4, DIMS)
        axes = draw(st.sampled_from(_axis_sets(len(shape))))
        form = draw(st.sampled_from(("tuple", "negative", "none" if len(axes) == len(shape) else "tuple")))
        if form == "none":
            axis = None
        elif form == "negative":
            axis = tuple(a - len(shape) for a in axes)
        else:
            axis = axes
        if isinstance(axis, tuple) and len(axis) == 1 and draw(st.booleans()):
            axis = axis[0]                      # a plain int
        return dict(op=draw(st.sampled_from(("reduce_sum", "reduce_mean"))), shape=shape, axis=axis, axes=axes,
                    keepdims=draw(st.booleans()))

    def inputs(self, cfg):
        return {"x": (cfg["shape"], "f")}

    def emit(self, cfg, v):
        return emit(cfg["op"], v["x"], axis=cfg["axis"], keepdims=cfg["keepdims"])

    def _count(self, cfg, x):
        return int(np.prod([x.shape[i] for i in cfg["axes"]], dtype=np.int64))

    def ref(self, cfg, a):
        x = a["x"]
        y = x.sum(axis=cfg["axes"], keepdims=cfg["keepdims"])
        return y / max(1, self._count(cfg, x)) if cfg["op"] == "reduce_mean" else y

    def vjp(self, cfg, a, y, dy):
        x = a["x"]
        dy = np.reshape(dy, tuple(1 if i in cfg["axes"] else d for i, d in enumerate(x.shape)))
        g = np.broadcast_to(dy, x.shape).copy()
        return {"x": g / max(1, self._count(cfg, x)) if cfg["op"] == "reduce_mean" else g}

    def length(self, cfg):
        return int(np.prod([8 if cfg["shape"][i] is None else cfg["shape"][i] for i in cfg["axes"]],
                           dtype=np.int64)) + 4


class Layout(Family):
    """concat (1..3 values) and slice along any non-batch axis; pad of the NHWC spatial axes with a
    constant; their gradients (slices, slice_grad, pad_grad)."""
    name = "layout"
    ops = ("concat", "slice", "slice_grad", "pad", "pad_grad")
    linear = True

    def draw(self, draw):
        op = draw(st.sampled_from(("concat", "slice", "pad")))
        shape = _batched_shape(draw, 4 if op == "pad" else 2, 4, DIMS)
        cfg = dict(op=op, shape=shape)
        if op == "pad":
            pads = tuple(tuple(draw(st.integers(0, 3)) for _ in range(2)) for _ in range(2))
            cfg.update(padding=pads, value=draw(st.sampled_from((0.0, -1.5, 2.0))))
            return cfg
        axis = draw(st.integers(1, len(shape) - 1))
        cfg["axis"] = axis if draw(st.booleans()) else axis - len(shape)
        if op == "concat":
            cfg["sizes"] = tuple(draw(st.sampled_from(DIMS)) for _ in range(draw(st.integers(1, 3))))
        else:
            size = shape[axis]
            start = draw(st.integers(0, size - 1))
            cfg.update(start=start, stop=draw(st.integers(start + 1, size)))
        return cfg

    def _part_shape(self, cfg, size):
        shape = list(cfg["shape"])
        shape[cfg["axis"]] = size
        return tuple(shape)

    def inputs(self, cfg):
        if cfg["op"] == "concat":
            return {f"v{i}": (self._part_shape(cfg, s), "f") for i, s in enumerate(cfg["sizes"])}
        return {"x": (cfg["shape"], "f")}

    def emit(self, cfg, v):
        if cfg["op"] == "concat":
            return emit("concat", *[v[f"v{i}"] for i in range(len(cfg["sizes"]))], axis=cfg["axis"])
        if cfg["op"] == "slice":
            return emit("slice", v["x"], axis=cfg["axis"], start=cfg["start"], stop=cfg["stop"])
        return emit("pad", v["x"], padding=cfg["padding"], value=cfg["value"])

    def ref(self, cfg, a):
        if cfg["op"] == "concat":
            return np.concatenate([a[f"v{i}"] for i in range(len(cfg["sizes"]))], axis=cfg["axis"])
        x = a["x"]
        if cfg["op"] == "slice":
            index = [slice(None)] * x.ndim
            index[cfg["axis"]] = slice(cfg["start"], cfg["stop"])
            return x[tuple(index)]
        (t, b), (l, r) = cfg["padding"]
        y = np.full((x.shape[0], x.shape[1] + t + b, x.shape[2] + l + r, x.shape[3]), cfg["value"])
        y[:, t:t + x.shape[1], l:l + x.shape[2], :] = x
        return y

    def vjp(self, cfg, a, y, dy):
        if cfg["op"] == "concat":
            bounds = np.cumsum((0,) + cfg["sizes"])
            ax = cfg["axis"] % dy.ndim
            return {f"v{i}": dy[(slice(None),) * ax + (slice(bounds[i], bounds[i + 1]),)]
                    for i in range(len(cfg["sizes"]))}
        x = a["x"]
        if cfg["op"] == "slice":
            g = np.zeros(x.shape)
            ax = cfg["axis"] % x.ndim
            g[(slice(None),) * ax + (slice(cfg["start"], cfg["stop"]),)] = dy
            return {"x": g}
        (t, _), (l, _) = cfg["padding"]
        return {"x": dy[:, t:t + x.shape[1], l:l + x.shape[2], :].copy()}


class GlobalMaxPool(Family):
    name = "global_max_pool2d"
    ops = ("global_max_pool2d", "global_max_pool2d_grad")

    def draw(self, draw):
        return dict(h=draw(st.sampled_from(DIMS)), w=draw(st.sampled_from(DIMS)), c=draw(st.sampled_from(WIDE)))

    def inputs(self, cfg):
        return {"x": ((None, cfg["h"], cfg["w"], cfg["c"]), "f")}

    def emit(self, cfg, v):
        return emit("global_max_pool2d", v["x"])

    def ref(self, cfg, a):
        return R.global_max_pool2d(a["x"])

    def vjp(self, cfg, a, y, dy):
        return {"x": R.vjp_global_max_pool2d(a["x"], dy)}


FAMILIES = {f.name: f for f in (Conv2D(), Dense(), MatMul(), MaxPool(), AvgPool(), GlobalAvgPool(), Unary(),
                                Softmax(), Binary(), BiasAdd(), Shape(), Loss(), DepthwiseConv(), BatchNorm(),
                                Reduce(), Layout(), GlobalMaxPool())}


@st.composite
def op_case(draw, families=tuple(FAMILIES)):
    """(family name, configuration)."""
    name = draw(st.sampled_from(families))
    return name, FAMILIES[name].draw(draw)


def make_array(rng, shape, kind, classes=None):
    """float32 test data of one input kind (values exactly representable in float32)."""
    if kind == "label":
        return rng.integers(0, classes, shape).astype(np.float32)
    if kind == "prob":                      # inside Keras' 1e-7 clip, rows not normalized
        return rng.uniform(0.05, 0.95, shape).astype(np.float32)
    if kind == "logits":
        return (rng.standard_normal(shape) * 3).astype(np.float32)
    if kind == "positive":                  # variances, rsqrt operands
        return rng.uniform(0.1, 4.0, shape).astype(np.float32)
    if kind == "nonzero":                   # divisors: |b| in [0.5, 2]
        return (rng.choice(np.array([-1.0, 1.0]), shape) * rng.uniform(0.5, 2.0, shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


# -- many cases in one graph -------------------------------------------------------------------------
# LLVM compilation is the cost of a case, so a group of independent cases is compiled as ONE graph:
# each case has its own inputs, its output is an output of the graph, and its scalar `case loss`
# (the op's own value for losses, else mse(flatten(y), t) against a random target) is summed into
# the loss that gc.grad differentiates. d loss / d input of a case is then exactly that case's VJP
# with dy = d mse / dy, which the reference computes in float64.

class Packed:
    """A group of cases built into one forward graph; `grad_graph` adds every case's gradients."""

    def __init__(self, cases, name="cases"):
        import graphcnn as gc
        self.cases = cases
        self.g = gc.Graph(name)
        self.inputs, self.outputs, self.targets, self.wrt = [], [], [], []
        losses = []
        for i, (fam_name, cfg) in enumerate(cases):
            fam = FAMILIES[fam_name]
            specs = fam.inputs(cfg)
            vals = {k: self.g.input(f"c{i}_{k}", shape) for k, (shape, _) in specs.items()}
            y = fam.emit(cfg, vals)
            self.inputs.append({k: v.name for k, v in vals.items()})
            self.outputs.append(y)
            if y.shape == ():
                self.targets.append(None)
                losses.append(y)
            else:
                flat = y if y.type.rank == 2 else (emit("flatten", y) if y.type.rank > 2 else
                                                    emit("reshape", y, shape=(-1, 1) if not y.type.batched
                                                         else (None, 1)))
                t = self.g.input(f"c{i}_target", flat.shape)
                self.targets.append(t.name)
                losses.append(emit("mse", flat, t))
            self.wrt += [vals[k] for k in fam.wrt(cfg)] if fam.differentiable else []
        total = losses[0]
        for v in losses[1:]:
            total = emit("add", total, v)
        self.g.output(*self.outputs, total)

    def grad_graph(self):
        import graphcnn as gc
        return gc.grad(self.g, self.wrt, loss=self.g.outputs[-1])

    def feeds(self, rng, n, corrupt=None):
        """float32 inputs for batch size n; corrupt(array, kind) -> array may plant NaN / inf."""
        feeds = {}
        for (fam_name, cfg), names in zip(self.cases, self.inputs):
            fam = FAMILIES[fam_name]
            specs = fam.inputs(cfg)
            for k, (shape, kind) in specs.items():
                concrete = tuple(n if d is None else d for d in shape)
                a = make_array(rng, concrete, kind, cfg.get("classes"))
                feeds[names[k]] = corrupt(a, kind) if corrupt is not None and kind != "label" else a
        for v, t in zip(self.outputs, self.targets):
            if t is not None:
                shape = self.g.value(t).type.concrete(n)
                feeds[t] = make_array(rng, shape, "f")
        return feeds

    def reference(self, feeds):
        """Per case: (y, {input key: gradient}) in float64, and the tolerance data (length, forward
        scale, {key: gradient scale})."""
        out = []
        for (fam_name, cfg), names, t in zip(self.cases, self.inputs, self.targets):
            fam = FAMILIES[fam_name]
            a = {k: feeds[name].astype(np.float64) for k, name in names.items()}
            with np.errstate(all="ignore"):
                y = np.asarray(fam.ref(cfg, a), np.float64)
                if t is None:
                    dy = np.float64(1.0)
                else:
                    dy = (2.0 * (y - feeds[t].astype(np.float64).reshape(y.shape)) / y.size)
                grads = fam.vjp(cfg, a, y, dy) if fam.differentiable else {}
                y_mag, g_mag = fam.magnitudes(cfg, a, y, dy, grads)
            out.append((y, grads, fam.length(cfg), y_mag, g_mag))
        return out
