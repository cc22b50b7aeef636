"""ir.Graph (or a model) -> ONNX file. One rule per graphcnn op in RULES.

graphcnn computes NHWC, ONNX's Conv/pools NCHW. Each exported value may exist in two forms, its
graphcnn order ("nhwc") and, for 4-D values, NCHW; a rule asks for the form it needs and the exporter
materializes it once with a Transpose (`Exporter.get`). Convs, pools and batch norm produce NCHW, and
elementwise ops keep the form their input has, so a conv stack needs no transposes between layers.
With layout="nchw" (the default) 4-D graph inputs and outputs are NCHW, as ONNX users expect;
layout="nhwc" keeps graphcnn's order at the boundary.
"""
from __future__ import annotations

import numpy as np

from ir.graph import Graph
from ir.passes.quantize import PASS_THROUGH_OPS

from ..atomic_file import write_file_atomically
from ..errors import GraphcnnError

NHWC, NCHW = "nhwc", "nchw"
FLAT_NCHW = "flat_nchw"     # a 2-D flatten of an NCHW value: the NCHW element order (see flatten)
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 25


class OnnxExportError(GraphcnnError):
    """The graph cannot be written as ONNX (an op without an export rule, a missing weight, a bad opset)."""


class Exporter:
    def __init__(self, graph: Graph, weights: dict, opset: int, layout: str):
        import onnx
        self.onnx = onnx
        self.g, self.weights, self.opset, self.layout = graph, weights, opset, layout
        self.nodes, self.inits = [], []
        self.forms: dict[str, dict[str, str]] = {}    # graphcnn value name -> {form: onnx name}
        self.arrays: dict[str, np.ndarray] = {}       # graphcnn leaf name -> array (params, consts)
        self.flat_src: dict[str, object] = {}         # FLAT_NCHW value name -> the 4-D value it flattens
        self._names: set = set()
        self.node = None

    def fail(self, msg):
        where = f"node %{self.node.name} (op {self.node.op})" if self.node is not None else f"graph {self.g.name!r}"
        raise OnnxExportError(f"ONNX export of {where}: {msg}")

    # -- names, nodes, initializers -------------------------------------------------------------------
    def fresh(self, hint):
        name, k = hint, 0
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def add(self, op, inputs, hint="t", n_out=1, out=None, **attrs):
        outs = [out] if out is not None else [self.fresh(f"{hint}") for _ in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, array, hint):
        from onnx import numpy_helper
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def int64s(self, values, hint="shape"):
        return self.init(np.asarray(values, np.int64), hint)

    # -- forms ------------------------------------------------------------------------------------------
    def const_of(self, v):
        """The array of a param or constant (None for computed values)."""
        return self.arrays.get(v.name)

    def get(self, v, form=NHWC):
        """The ONNX name holding value v in `form` (NCHW only for 4-D values); transposes once if needed."""
        if len(v.shape) != 4:
            form = NHWC
        have = self.forms.get(v.name)
        if have is None:
            arr = self.const_of(v)
            if arr is None:
                self.fail(f"value %{v.name} is used before it is defined")
            self.forms[v.name] = have = {NHWC: self.init(arr, v.name)}
        if form == NHWC and form not in have and FLAT_NCHW in have:
            # a flatten kept in NCHW order for a dense: graphcnn's order needs the NHWC flatten after all
            have[NHWC] = self.add("Flatten", [self.get(self.flat_src[v.name], NHWC)], hint=v.name, axis=1)
        if form not in have:
            src_form, src = next((f, n) for f, n in have.items() if f != FLAT_NCHW)
            have[form] = self.add("Transpose", [src], hint=f"{v.name}_{form}",
                                  perm=list(TO_NCHW if form == NCHW else TO_NHWC))
        return have[form]

    def preferred(self, v):
        """NCHW when v already has that form (so elementwise chains after a conv stay NCHW)."""
        return NCHW if NCHW in self.forms.get(v.name, {}) else NHWC

    def put(self, v, name, form=NHWC):
        self.forms.setdefault(v.name, {})[form] = name

    def const_in(self, arr, form, rank, hint):
        """A constant operand broadcast against a rank-`rank` value in `form`."""
        a = np.asarray(arr, np.float32)
        if form == NCHW and rank == 4:
            a = a.reshape((1,) * (4 - a.ndim) + a.shape).transpose(TO_NCHW)
        return self.init(a, hint)

    # -- the whole graph ---------------------------------------------------------------------------------
    def run(self):
        onnx, helper = self.onnx, self.onnx.helper
        g = self.g
        for v in g.params:
            if v.name not in self.weights:
                self.fail(f"no value for param %{v.name} (pass the weights)")
            a = np.asarray(self.weights[v.name])
            if tuple(a.shape) != tuple(v.shape):
                self.fail(f"param %{v.name} has shape {v.shape}, its weight {a.shape}")
            self.arrays[v.name] = a.astype(np.float32) if v.dtype == "f32" else a
        for v in g.const_values:
            self.arrays[v.name] = g.consts[v.name]
        inputs = []
        for v in g.inputs:
            if v.dtype != "f32":
                self.fail(f"input %{v.name} has dtype {v.dtype}; only float32 inputs are exported")
            self._names.add(v.name)
            shape = list(v.shape)
            form = NCHW if self.layout == NCHW and len(shape) == 4 else NHWC
            if form == NCHW:
                shape = [shape[i] for i in TO_NCHW]
            dims = ["N" if d is None else int(d) for d in shape]
            inputs.append(helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, dims))
            self.put(v, v.name, form)
        for v in g.outputs:
            self._names.add(v.name)
        for node in g.nodes:
            self.node = node
            rule = RULES.get(node.op)
            if rule is None:
                self.fail(f"op {node.op!r} has no ONNX export rule (exportable: {', '.join(sorted(RULES))})")
            rule(self, node)
        self.node = None
        outputs = []
        for v in g.outputs:
            form = NCHW if self.layout == NCHW and len(v.shape) == 4 else NHWC
            self.add("Identity", [self.get(v, form)], out=v.name)
            shape = [v.shape[i] for i in TO_NCHW] if form == NCHW else list(v.shape)
            outputs.append(helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT,
                                                         ["N" if d is None else int(d) for d in shape]))
        graph = helper.make_graph(self.nodes, g.name, inputs, outputs, self.inits)
        from .. import __version__
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="graphcnn", producer_version=__version__)
        model.ir_version = min(model.ir_version, 8 if self.opset <= 17 else model.ir_version)
        onnx.checker.check_model(model, full_check=True)
        return model


# -- rules ------------------------------------------------------------------------------------------------

def _activation(ex, node, name, form):
    """The fused activation of a conv/dense (any entry of the activation table) applied to `name`."""
    act = node.attrs.get("activation", "linear")
    if act == "linear":
        return name
    return _table_activation(ex, act, dict(node.attrs.get("activation_params") or ()), name, node.name)


def _table_activation(ex, act, params, name, hint):
    """One activation-table entry as ONNX: Relu, Sigmoid, Tanh, LeakyRelu(alpha), Clip(min, max) with
    its bounds as float scalar inputs (a None bound is an omitted input)."""
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
    if act in simple:
        return ex.add(simple[act], [name], hint=hint)
    if act == "leaky_relu":
        return ex.add("LeakyRelu", [name], hint=hint, alpha=float(params["alpha"]))
    if act == "clip":
        bounds = ["" if params.get(k) is None else ex.init(np.asarray(params[k], np.float32), k)
                  for k in ("min_value", "max_value")]
        while bounds and bounds[-1] == "":
            bounds.pop()
        return ex.add("Clip", [name] + bounds, hint=hint)
    ex.fail(f"activation {act!r} has no ONNX export rule")


def _pads(p):
    (t, b), (l, r) = p
    return [int(t), int(l), int(b), int(r)]


def conv2d(ex, node):
    x, w = node.inputs[:2]
    W = ex.const_of(w)
    if W is None:
        ex.fail("the kernel must be a param or constant")
    ins = [ex.get(x, NCHW), ex.init(np.ascontiguousarray(W.transpose(3, 2, 0, 1)), f"{w.name}_oihw")]
    if len(node.inputs) > 2:
        ins.append(ex.get(node.inputs[2]))
    a = node.attrs
    y = ex.add("Conv", ins, hint=node.name, kernel_shape=list(W.shape[:2]), strides=list(a["stride"]),
               dilations=list(a["dilation"]), pads=_pads(a["padding"]), group=int(a.get("groups", 1)))
    if len(node.inputs) > 3:          # a fused residual: Conv -> Add(skip) before the activation
        y = ex.add("Add", [y, ex.get(node.inputs[3], NCHW)], hint=node.name)
    ex.put(node.outputs[0], _activation(ex, node, y, NCHW), NCHW)


def depthwise_conv2d(ex, node):
    x, w = node.inputs[:2]
    W = ex.const_of(w)
    if W is None:
        ex.fail("the kernel must be a param or constant")
    kh, kw, c, m = W.shape          # output channel c*m + j  ->  ONNX group conv weight (C*M, 1, kh, kw)
    ins = [ex.get(x, NCHW), ex.init(np.ascontiguousarray(W.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw)),
                                    f"{w.name}_oihw")]
    if len(node.inputs) > 2:
        ins.append(ex.get(node.inputs[2]))
    a = node.attrs
    y = ex.add("Conv", ins, hint=node.name, kernel_shape=[kh, kw], strides=list(a["stride"]),
               dilations=list(a["dilation"]), pads=_pads(a["padding"]), group=int(c))
    ex.put(node.outputs[0], _activation(ex, node, y, NCHW), NCHW)


def _pool(op):
    def rule(ex, node):
        a = node.attrs
        kw = dict(kernel_shape=list(a["pool"]), strides=list(a["stride"]), pads=_pads(a["padding"]))
        if op == "AveragePool":
            kw["count_include_pad"] = int(a["count_include_pad"])
        ex.put(node.outputs[0], ex.add(op, [ex.get(node.inputs[0], NCHW)], hint=node.name, **kw), NCHW)
    return rule


def _global_pool(op):
    def rule(ex, node):
        x = node.inputs[0]
        if x.type.dtype == "f32":
            y = ex.add(op, [ex.get(x, NCHW)], hint=node.name)
        else:
            # the mean of u8/i8 values (ir/ops/nn.py GlobalAvgPool2D) in QDQ form, which ONNX Runtime
            # fuses into its integer pool: DequantizeLinear -> GlobalAveragePool -> QuantizeLinear, both
            # with the scale and zero point of x (the pool keeps them)
            scale, zero_point = _quant_params_of(ex, x)
            f = _dequantized(ex, ex.get(x, NCHW), scale, zero_point, x.type.dtype, node.name)
            y = ex.add("QuantizeLinear", [ex.add(op, [f], hint=node.name), _scale(ex, scale, f"{node.name}_scale"),
                                          _zero_point(ex, zero_point, x.type.dtype, f"{node.name}_zero_point")],
                       hint=node.name)
        ex.put(node.outputs[0], ex.add("Flatten", [y], hint=node.name, axis=1))
    return rule


def batch_norm(ex, node):
    x = node.inputs[0]
    form = NCHW if len(x.shape) == 4 else NHWC
    if len(x.shape) not in (2, 4):
        ex.fail(f"batch_norm of a rank-{len(x.shape)} value has no ONNX form here (rank 2 or 4)")
    ins = [ex.get(x, form)] + [ex.get(v) for v in node.inputs[1:]]
    ex.put(node.outputs[0], ex.add("BatchNormalization", ins, hint=node.name,
                                   epsilon=float(node.attrs["epsilon"])), form)


def _unary(op):
    def rule(ex, node):
        x = node.inputs[0]
        form = ex.preferred(x)
        ex.put(node.outputs[0], ex.add(op, [ex.get(x, form)], hint=node.name), form)
    return rule


def table_activation(ex, node):
    """A standalone activation-table op (leaky_relu, clip): same form in as out."""
    x = node.inputs[0]
    form = ex.preferred(x)
    ex.put(node.outputs[0], _table_activation(ex, node.op, dict(node.attrs), ex.get(x, form), node.name), form)


def conv2d_grad_input(ex, node):
    """The transposed convolution (what the importer makes of ConvTranspose): W HWIO (kh, kw, C_out,
    C_in) -> ONNX (C_in, C_out, kh, kw); output_padding gives the end rows the forward conv's floor drops."""
    x, w = node.inputs
    W = ex.const_of(w)
    if W is None:
        ex.fail("the kernel must be a param or constant")
    a = node.attrs
    (t, b), (l, r) = a["padding"]
    s, d = a["stride"], a["dilation"]
    kh, kw = W.shape[:2]
    oh, ow = a["input_shape"][:2]
    ih, iw = x.shape[1:3]
    outpad = [oh - (s[0] * (ih - 1) + (kh - 1) * d[0] + 1 - t - b), ow - (s[1] * (iw - 1) + (kw - 1) * d[1] + 1 - l - r)]
    ins = [ex.get(x, NCHW), ex.init(np.ascontiguousarray(W.transpose(3, 2, 0, 1)), f"{w.name}_iokk")]
    ex.put(node.outputs[0], ex.add("ConvTranspose", ins, hint=node.name, kernel_shape=[kh, kw], strides=list(s),
                                   dilations=list(d), pads=_pads(a["padding"]), output_padding=outpad), NCHW)


def rsqrt(ex, node):
    x = node.inputs[0]
    form = ex.preferred(x)
    ex.put(node.outputs[0], ex.add("Reciprocal", [ex.add("Sqrt", [ex.get(x, form)], hint=node.name)],
                                   hint=node.name), form)


def _binary(op):
    def rule(ex, node):
        a, b = node.inputs
        out = node.outputs[0]
        rank = len(out.shape)
        form = NCHW if rank == 4 and NCHW in [ex.preferred(v) for v in (a, b) if ex.const_of(v) is None] else NHWC
        ins = []
        for v in (a, b):
            c = ex.const_of(v)
            if c is not None and form == NCHW:
                ins.append(ex.const_in(c, form, rank, v.name))
            elif len(v.shape) == 4 or form == NHWC:
                ins.append(ex.get(v, form))
            else:
                ex.fail(f"broadcasting a computed rank-{len(v.shape)} operand against NCHW is not exported")
        ex.put(out, ex.add(op, ins, hint=node.name), form)
    return rule


def bias_add(ex, node):
    x, b = node.inputs
    form = ex.preferred(x)
    bias = ex.const_of(b)
    if form == NCHW:
        bname = ex.init(np.asarray(bias, np.float32).reshape(-1, 1, 1), f"{b.name}_c11") if bias is not None \
            else ex.add("Reshape", [ex.get(b), ex.int64s([-1, 1, 1])], hint=b.name)
    else:
        bname = ex.get(b)
    ex.put(node.outputs[0], ex.add("Add", [ex.get(x, form), bname], hint=node.name), form)


def _dense_operands(ex, x, w):
    """(ONNX name of dense input x, the kernel array to use with it or None when it is not a constant,
    whether its rows were permuted): when x flattens an NCHW value, W's rows are permuted to NCHW order
    instead of transposing the activations."""
    W = ex.const_of(w)
    have = ex.forms.get(x.name, {})
    if W is not None and FLAT_NCHW in have and NHWC not in have:
        h, wd, c = ex.flat_src[x.name].shape[1:]
        rows = np.arange(h * wd * c).reshape(h, wd, c).transpose(2, 0, 1).ravel()
        return have[FLAT_NCHW], np.ascontiguousarray(W[rows]), True
    return ex.get(x), W, False


def dense(ex, node):
    x, w = node.inputs[:2]
    xname, W, permuted = _dense_operands(ex, x, w)
    ins = [xname, ex.init(W, f"{w.name}_nchw_rows") if permuted else ex.get(w)]
    ins += [ex.get(v) for v in node.inputs[2:]]
    y = ex.add("Gemm", ins, hint=node.name)
    ex.put(node.outputs[0], _activation(ex, node, y, NHWC))


# -- int8 (ir/ops/quant.py) as QDQ: QuantizeLinear / DequantizeLinear around float Conv / Gemm, the form
# ONNX Runtime fuses into its integer kernels (QLinearConv, QGemm). u8 values between layers stay u8:
# MaxPool, Flatten and Reshape run on them directly; GlobalAveragePool between DQ and Q (_global_pool).
ONNX_QUANT_NP = {"u8": np.uint8, "i8": np.int8}


def _zero_point(ex, value, dtype, hint):
    return ex.init(np.asarray(value, ONNX_QUANT_NP[dtype]), hint)


def _scale(ex, value, hint):
    return ex.init(np.asarray(value, np.float32), hint)


def quantize(ex, node):
    x = node.inputs[0]
    a = node.attrs
    form = ex.preferred(x)
    q = ex.add("QuantizeLinear", [ex.get(x, form), _scale(ex, a["scale"], f"{node.name}_scale"),
                                  _zero_point(ex, a["zero_point"], a["dtype"], f"{node.name}_zero_point")],
               hint=node.name)
    ex.put(node.outputs[0], q, form)


def _quant_params_of(ex, v):
    """(scale, zero point) of a u8/i8 value: those its producer quantized it with, through the ops
    that keep them (ir/passes/quantize.py PASS_THROUGH_OPS)."""
    n = v.producer
    while n is not None and n.op in PASS_THROUGH_OPS:
        n = n.inputs[0].producer
    if n is not None and n.op == "quantize":
        return n.attrs["scale"], n.attrs["zero_point"]
    if n is not None and n.op in ("conv2d_q", "dense_q"):
        return n.attrs["y_scale"], n.attrs["y_zero_point"]
    ex.fail(f"the scale of the {v.type.dtype} value %{v.name} is unknown (it is a graph input or comes from "
            f"{n.op if n else 'no node'})")


def _dequantized(ex, name, scale, zero_point, dtype, hint):
    return ex.add("DequantizeLinear", [name, _scale(ex, scale, f"{hint}_scale"),
                                       _zero_point(ex, zero_point, dtype, f"{hint}_zero_point")], hint=hint)


def dequantize(ex, node):
    x = node.inputs[0]
    form = ex.preferred(x)
    a = node.attrs
    ex.put(node.outputs[0], _dequantized(ex, ex.get(x, form), a["scale"], a["zero_point"], x.type.dtype,
                                         node.name), form)


def _weight_and_bias_dq(ex, node, W, axis):
    """DequantizeLinear of the i8 kernel W (per-channel scales on `axis`) and of the i32 bias (scale
    x_scale * w_scale[c], as ONNX Runtime's QDQ fusion expects)."""
    a = node.attrs
    w_scale = np.asarray(a["w_scale"], np.float32)
    w = ex.add("DequantizeLinear", [ex.init(W, f"{node.name}_w_q"), ex.init(w_scale, f"{node.name}_w_scale"),
                                    ex.init(np.zeros(len(w_scale), np.int8), f"{node.name}_w_zero_point")],
               hint=f"{node.name}_w", axis=axis)
    ins = [w]
    if len(node.inputs) > 2:
        B = ex.const_of(node.inputs[2])
        if B is None:
            ex.fail("the bias must be a param or constant")
        b_scale = (np.float64(a["x_scale"]) * w_scale.astype(np.float64)).astype(np.float32)
        ins.append(ex.add("DequantizeLinear", [ex.init(np.asarray(B, np.int32), f"{node.name}_b_q"),
                                               ex.init(b_scale, f"{node.name}_b_scale"),
                                               ex.init(np.zeros(len(w_scale), np.int32), f"{node.name}_b_zero_point")],
                          hint=f"{node.name}_b", axis=0))
    return ins


def _requantized(ex, node, y):
    """QuantizeLinear of the float conv/gemm result; a clamp tighter than the dtype's range (a relu whose
    zero point is not the range's low end, a clip) becomes a float Clip at the dequantized bounds first."""
    from ir.ops.quant import QUANT_RANGES
    a = node.attrs
    lo, hi = QUANT_RANGES[a["dtype"]]
    if (a["y_min"], a["y_max"]) != (lo, hi):
        bounds = [np.float32(a["y_scale"]) * np.float32(b - a["y_zero_point"]) for b in (a["y_min"], a["y_max"])]
        y = ex.add("Clip", [y] + [ex.init(np.asarray(b, np.float32), f"{node.name}_clip") for b in bounds],
                   hint=node.name)
    return ex.add("QuantizeLinear", [y, _scale(ex, a["y_scale"], f"{node.name}_y_scale"),
                                     _zero_point(ex, a["y_zero_point"], a["dtype"], f"{node.name}_y_zero_point")],
                  hint=node.name)


def conv2d_q(ex, node):
    x, w = node.inputs[:2]
    W = ex.const_of(w)
    if W is None:
        ex.fail("the kernel must be a param or constant")
    a = node.attrs
    xf = _dequantized(ex, ex.get(x, NCHW), a["x_scale"], a["x_zero_point"], x.type.dtype, f"{node.name}_x")
    ins = [xf] + _weight_and_bias_dq(ex, node, np.ascontiguousarray(np.asarray(W).transpose(3, 2, 0, 1)), axis=0)
    y = ex.add("Conv", ins, hint=node.name, kernel_shape=list(W.shape[:2]), strides=list(a["stride"]),
               dilations=list(a["dilation"]), pads=_pads(a["padding"]), group=1)
    if len(node.inputs) > 3:        # the fused residual: Add of its dequantized values before requantizing
        r = node.inputs[3]
        rf = _dequantized(ex, ex.get(r, NCHW), a["r_scale"], a["r_zero_point"], r.type.dtype, f"{node.name}_r")
        y = ex.add("Add", [y, rf], hint=f"{node.name}_residual")
    ex.put(node.outputs[0], _requantized(ex, node, y), NCHW)


def dense_q(ex, node):
    x, w = node.inputs[:2]
    xname, W, _ = _dense_operands(ex, x, w)
    if W is None:
        ex.fail("the kernel must be a param or constant")
    a = node.attrs
    xf = _dequantized(ex, xname, a["x_scale"], a["x_zero_point"], x.type.dtype, f"{node.name}_x")
    y = ex.add("Gemm", [xf] + _weight_and_bias_dq(ex, node, np.ascontiguousarray(W), axis=1), hint=node.name)
    ex.put(node.outputs[0], _requantized(ex, node, y))


def matmul(ex, node):
    a, b = node.inputs
    ta, tb = node.attrs["transpose_a"], node.attrs["transpose_b"]
    ex.put(node.outputs[0], ex.add("Gemm", [ex.get(a), ex.get(b)], hint=node.name, transA=int(ta), transB=int(tb)))


def flatten(ex, node):
    x = node.inputs[0]
    if len(x.shape) == 4 and ex.preferred(x) == NCHW and NHWC not in ex.forms[x.name]:
        # keep NCHW order; a dense reading it permutes its weight rows, anything else gets the NHWC flatten
        ex.put(node.outputs[0], ex.add("Flatten", [ex.get(x, NCHW)], hint=node.name, axis=1), FLAT_NCHW)
        ex.flat_src[node.outputs[0].name] = x
        return
    ex.put(node.outputs[0], ex.add("Flatten", [ex.get(x)], hint=node.name, axis=1))


def reshape(ex, node):
    shape = [0 if d is None else int(d) for d in node.attrs["shape"]]
    ex.put(node.outputs[0], ex.add("Reshape", [ex.get(node.inputs[0]), ex.int64s(shape)], hint=node.name))


def transpose(ex, node):
    ex.put(node.outputs[0], ex.add("Transpose", [ex.get(node.inputs[0])], hint=node.name,
                                   perm=list(node.attrs["perm"])))


def _softmax(op):
    def rule(ex, node):
        x = node.inputs[0]
        axis = int(node.attrs["axis"])
        ex.put(node.outputs[0], ex.add(op, [ex.get(x)], hint=node.name, axis=axis))
    return rule


def concat(ex, node):
    rank = len(node.outputs[0].shape)
    axis = int(node.attrs["axis"])
    if rank == 4:
        ins = [ex.get(v, NCHW) for v in node.inputs]
        ex.put(node.outputs[0], ex.add("Concat", ins, hint=node.name, axis=TO_NCHW.index(axis)), NCHW)
    else:
        ex.put(node.outputs[0], ex.add("Concat", [ex.get(v) for v in node.inputs], hint=node.name, axis=axis))


def pad(ex, node):
    (t, b), (l, r) = node.attrs["padding"]
    pads = ex.int64s([0, 0, t, l, 0, 0, b, r], "pads")
    value = ex.init(np.asarray(node.attrs["value"], np.float32), "pad_value")
    ex.put(node.outputs[0], ex.add("Pad", [ex.get(node.inputs[0], NCHW), pads, value], hint=node.name), NCHW)


def _reduce(op):
    def rule(ex, node):
        v = node.inputs[0]
        rank = len(v.shape)
        axes = sorted(a + rank if a < 0 else a for a in node.attrs["axis"])
        keep = int(node.attrs["keepdims"])
        # a 4-D value already NCHW is reduced in that form; the result is NCHW when kept 4-D, and in
        # graphcnn's order when the remaining axes come out in the same order either way (e.g. over H, W)
        in_form = NCHW if rank == 4 and ex.preferred(v) == NCHW else NHWC
        out_form = NHWC
        if in_form == NCHW:
            kept_nhwc = [a for a in range(4) if a not in axes]
            kept_nchw = [a for a in TO_NCHW if a not in axes]
            if keep:
                out_form = NCHW
            elif kept_nhwc != kept_nchw:
                in_form = NHWC
            if in_form == NCHW:
                axes = sorted(TO_NCHW.index(a) for a in axes)
        x = ex.get(v, in_form)
        if op == "ReduceSum" or ex.opset >= 18:
            y = ex.add(op, [x, ex.int64s(axes, "axes")], hint=node.name, keepdims=keep)
        else:
            y = ex.add(op, [x], hint=node.name, axes=axes, keepdims=keep)
        ex.put(node.outputs[0], y, out_form)
    return rule


def scale(ex, node):
    x = node.inputs[0]
    form = ex.preferred(x)
    f = ex.init(np.asarray(node.attrs["factor"], np.float32), "factor")
    ex.put(node.outputs[0], ex.add("Mul", [ex.get(x, form), f], hint=node.name), form)


def slice_(ex, node):
    a = node.attrs
    x = node.inputs[0]
    rank = len(x.shape)
    axis = a["axis"] + rank if a["axis"] < 0 else a["axis"]
    form = ex.preferred(x)            # a 4-D NCHW value is sliced in place (channel slices stay NCHW)
    if form == NCHW:
        axis = TO_NCHW.index(axis)
    ins = [ex.get(x, form), ex.int64s([a["start"]], "starts"), ex.int64s([a["stop"]], "ends"),
           ex.int64s([axis], "axes")]
    ex.put(node.outputs[0], ex.add("Slice", ins, hint=node.name), form)


def identity(ex, node):
    x = node.inputs[0]
    form = ex.preferred(x)
    ex.put(node.outputs[0], ex.get(x, form), form)


RULES = {
    "conv2d": conv2d, "depthwise_conv2d": depthwise_conv2d,
    "max_pool2d": _pool("MaxPool"), "avg_pool2d": _pool("AveragePool"),
    "global_avg_pool2d": _global_pool("GlobalAveragePool"), "global_max_pool2d": _global_pool("GlobalMaxPool"),
    "batch_norm": batch_norm,
    "relu": _unary("Relu"), "sigmoid": _unary("Sigmoid"), "tanh": _unary("Tanh"), "neg": _unary("Neg"),
    "add": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"), "div": _binary("Div"),
    "bias_add": bias_add, "dense": dense, "matmul": matmul, "flatten": flatten, "reshape": reshape,
    "transpose": transpose, "softmax": _softmax("Softmax"), "log_softmax": _softmax("LogSoftmax"),
    "concat": concat, "pad": pad, "reduce_mean": _reduce("ReduceMean"), "reduce_sum": _reduce("ReduceSum"),
    "scale": scale, "slice": slice_, "dropout": identity,
    "leaky_relu": table_activation, "clip": table_activation, "conv2d_grad_input": conv2d_grad_input,
    "rsqrt": rsqrt,
    "quantize": quantize, "dequantize": dequantize, "conv2d_q": conv2d_q, "dense_q": dense_q,
}


def to_model_proto(model_or_graph, weights=None, opset=DEFAULT_OPSET, layout=NCHW):
    """The ONNX ModelProto of a graphcnn model (Sequential/Model: its inference graph and weights) or of
    an ir.Graph with `weights` for its params."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"opset must be an int in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    if layout not in (NCHW, NHWC):
        raise OnnxExportError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    if isinstance(model_or_graph, Graph):
        graph, w = model_or_graph, dict(weights or {})
    elif hasattr(model_or_graph, "inference_graph"):
        graph = model_or_graph.inference_graph()
        w = dict(model_or_graph.weights)
        w.update(weights or {})
    else:
        raise OnnxExportError(f"export: expected a graphcnn model or Graph, got {type(model_or_graph).__name__}")
    if getattr(graph, "boundary_layout", None) == NCHW:
        layout = NHWC        # an imported ONNX graph: its boundary already is NCHW, keep it as it is
    from ir.passes import run_pipeline
    # inference form: no dropout, bias and activation folded into conv/dense (Conv's B input, one Relu)
    graph = run_pipeline(graph, ["verify", "drop_dropout", "fuse_bias_activation", "dce"]).graph
    return Exporter(graph, w, opset, layout).run()


def export(model_or_graph, path, opset=DEFAULT_OPSET, layout=NCHW, weights=None):
    """Write `model_or_graph` as an ONNX file at `path` (atomically). NCHW at the boundary by default
    (layout='nhwc' keeps graphcnn's order); the file passes onnx.checker and ONNX Runtime gives the
    same outputs as graphcnn. weights: {param name: array} for a bare Graph's params."""
    model = to_model_proto(model_or_graph, weights=weights, opset=opset, layout=layout)
    write_file_atomically(path, model.SerializeToString())
    return path
