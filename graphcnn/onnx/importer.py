"""ONNX -> ir.Graph. One conversion rule per ONNX op in RULES; the `onnx` package parses, checks and
infers shapes (no hand-written protobuf reading).

Layout: ONNX tensors are NCHW, graphcnn's activations NHWC. Every imported tensor remembers how the
graphcnn value holding it is laid out (`Tensor.layout`): PLAIN (the ONNX order) or CHANNELS_LAST (the
channel axis moved to the end). Convolutions and pools produce channels-last values, elementwise ops keep
whatever layout their inputs have, and a value is converted only where a rule needs the other order
(`Importer.value`), with conversions cached, so a conv net gets one transpose per graph input and
output and none inside. Weights are transposed at import (OIHW -> HWIO); a Flatten of a channels-last
tensor feeding a Gemm/MatMul permutes that weight's rows instead of transposing the activations.

Shapes computed in the graph (Shape -> Gather -> Concat -> Reshape) fold at import: constants are known
arrays, and the dynamic batch inside a shape is the marker BATCH, which only moves (gather, concat,
slice, unsqueeze) and becomes graphcnn's None batch in Reshape; arithmetic on it is refused.
"""
from __future__ import annotations

import numpy as np

from ir.graph import Graph, Node
from ir.ops import REGISTRY, emit
from ir.types import IRError

from ..errors import GraphcnnError

PLAIN, CHANNELS_LAST = "plain", "channels_last"
MIN_OPSET, MAX_OPSET = 7, 25


class OnnxImportError(GraphcnnError):
    """The ONNX file cannot be imported as written: unsupported op or attribute, a shape-deciding input
    that is not constant, or a malformed file. The message names the node, op and opset."""


class _Batch:
    """The dynamic batch size inside a folded shape tensor."""

    def __repr__(self):
        return "N"

    def __index__(self):
        raise TypeError("the dynamic batch size is not known at import time")

    def __int__(self):
        raise TypeError("the dynamic batch size is not known at import time")


BATCH = _Batch()


def cl_perm(rank: int) -> tuple:
    """Channels-last order of an NC... tensor: (0, 2, ..., rank - 1, 1)."""
    return (0,) + tuple(range(2, rank)) + (1,)


def inverse(perm) -> tuple:
    return tuple(int(i) for i in np.argsort(perm))


class Tensor:
    """What the importer knows about one ONNX value: its graphcnn value and layout, or its constant
    array (`const`, known at import), and its ONNX (logical) shape. `init`: the initializer's name when
    the importer turns initializers into weights (import_model) and this tensor is one."""
    __slots__ = ("value", "layout", "const", "flat_of", "init")

    def __init__(self, value=None, layout=PLAIN, const=None, flat_of=None, init=None):
        self.value, self.layout, self.const, self.flat_of, self.init = value, layout, const, flat_of, init

    @property
    def shape(self) -> tuple:
        """The ONNX shape (None = the dynamic batch)."""
        if self.const is not None:
            return tuple(self.const.shape)
        s = self.value.shape
        return tuple(s[i] for i in inverse(cl_perm(len(s)))) if self.layout == CHANNELS_LAST else tuple(s)

    @property
    def rank(self) -> int:
        return len(self.shape)


def _perm_is_reshape(shape, perm) -> bool:
    """True when transposing `shape` by `perm` only moves size-1 axes (the data order is unchanged)."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


class Importer:
    """Converts one ONNX model; `convert()` returns the ir.Graph."""

    def __init__(self, model, static_inputs, source, weights=False, input_layout=PLAIN):
        self.model, self.source = model, source
        self.input_layout = input_layout  # CHANNELS_LAST: 3-D+ graph inputs arrive NHWC (import_model layout="nhwc")
        self.weights = weights            # float initializers become params (import_model), else constants
        self.param_arrays: dict[str, np.ndarray] = {}   # param name -> its array (in graphcnn's layout)
        self.frozen: set = set()          # params that are statistics, not trained (batch-norm mean/var)
        self._params: dict = {}           # initializer name -> (layout key, param value)
        self.labels: dict[str, str] = {}  # integer graph inputs (loss targets) -> ONNX element type name
        self.static = {k: np.asarray(v) for k, v in (static_inputs or {}).items()}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self.env: dict[str, Tensor] = {}
        self.node = None
        self._layouts: dict = {}

    # -- errors -----------------------------------------------------------------------------------
    def fail(self, msg):
        n = self.node
        where = f"node {n.name or '(unnamed)'!r} (op {n.op_type}, opset {self.opset})" if n is not None else \
            f"opset {self.opset}"
        raise OnnxImportError(f"{self.source}: {where}: {msg}")

    # -- graph building helpers ----------------------------------------------------------------------
    def const_value(self, arr):
        a = np.asarray(arr)
        if a.dtype.kind not in "f":
            self.fail(f"a constant of dtype {a.dtype} is used as data; graphcnn computes in float32")
        if self.weights:       # import_model: every array is a weight of the model (frozen: not trained)
            v = self.g.param(self.g.fresh_name("c"), a.shape)
            self.param_arrays[v.name] = np.ascontiguousarray(a, np.float32)
            self.frozen.add(v.name)
            return v
        return self.g.const(None, a.astype(np.float32))

    def weight(self, t: Tensor, arrange):
        """The value of initializer-or-constant `t` rearranged for graphcnn (`arrange(array)`, e.g. OIHW ->
        HWIO): a constant, or with weights=True and `t` an initializer, a param holding the rearranged
        array. One param per initializer: a second use must rearrange it the same way (same element
        order and scale, checked on an index array), else it is refused rather than silently untied."""
        if t.init is None:
            return self.const_value(arrange(t.const))
        index = np.arange(t.const.size, dtype=np.float32).reshape(t.const.shape)
        order = np.asarray(arrange(index), np.float32)
        key = (order.shape, order.tobytes())
        have = self._params.get(t.init)
        if have is not None:
            if have[0] != key:
                self.fail(f"initializer {t.init!r} is used in two layouts (as {list(have[1].shape)} and as "
                          f"{list(order.shape)} rearranged differently); import_model keeps one trainable "
                          f"weight per initializer (use import_graph for inference)")
            return have[1]
        a = np.ascontiguousarray(arrange(t.const), np.float32)
        name = t.init if t.init not in self.g._values else self.g.fresh_name("w")
        v = self.g.param(name, a.shape)
        self.param_arrays[name] = a
        self._params[t.init] = (key, v)
        return v

    def freeze(self, t: Tensor | None):
        """Mark initializer `t` (once it is a param) as a statistic that training leaves alone."""
        if t is not None and t.init is not None and t.init in self._params:
            self.frozen.add(self._params[t.init][1].name)

    def transpose(self, v, perm):
        """transpose(v, perm), as a reshape when only size-1 axes move, composed with a producing
        transpose (so two never follow each other), nothing for the identity."""
        perm = tuple(int(p) for p in perm)
        if perm == tuple(range(len(perm))):
            return v
        prod = v.producer
        if prod is not None and prod.op == "transpose":
            inner = prod.attrs["perm"]
            return self.transpose(prod.inputs[0], tuple(inner[p] for p in perm))
        out_shape = tuple(v.shape[p] for p in perm)
        if _perm_is_reshape(v.shape, perm):
            return self.reshape(v, out_shape)
        if v.shape and v.shape[0] is None and perm[0] != 0:
            self.fail(f"moves the dynamic batch axis (transpose {perm} of {v.type})")
        return emit("transpose", v, perm=perm)

    def reshape(self, v, shape):
        shape = tuple(shape)
        if tuple(v.shape) == shape:
            return v
        while v.producer is not None and v.producer.op == "reshape":
            v = v.producer.inputs[0]
        if tuple(v.shape) == shape:
            return v
        return emit("reshape", v, shape=shape)

    def value(self, t: Tensor, layout=PLAIN, rank=None):
        """The graphcnn value of `t` in `layout` (cached), first broadcast to `rank` by leading 1s."""
        if t.const is not None:
            def arrange(a):
                if rank is not None and a.ndim < rank:
                    a = a.reshape((1,) * (rank - a.ndim) + a.shape)
                return a.transpose(cl_perm(a.ndim)) if layout == CHANNELS_LAST and a.ndim >= 3 else a
            return self.weight(t, arrange)
        key = (id(t), layout, rank)
        if key in self._layouts:
            return self._layouts[key][1]
        v, cur = t.value, t.layout
        if t.flat_of is not None:    # t.value is the channels-last flatten: rebuild in ONNX element order
            src = self.value(t.flat_of, PLAIN)
            v, cur = (emit("flatten", src) if src.shape[0] is None else self.reshape(src, (src.shape[0], -1))), PLAIN
        r = len(v.shape)
        if rank is not None and r < rank:
            if cur == CHANNELS_LAST and r >= 3:
                v = self.transpose(v, inverse(cl_perm(r)))
            v = self.reshape(v, (1,) * (rank - r) + tuple(v.shape))
            r, cur = rank, PLAIN
        if cur != layout and r >= 3:
            v = self.transpose(v, cl_perm(r) if layout == CHANNELS_LAST else inverse(cl_perm(r)))
        self._layouts[key] = (t, v)      # t kept alive so id(t) stays unique
        return v

    def known(self, t: Tensor | None, what: str):
        """The constant array of a shape-deciding input (initializer, Constant, folded, or static_inputs)."""
        if t is None:
            return None
        if t.const is None:
            self.fail(f"input {what} decides a shape or a bound, so it must be known at import, but it is "
                      f"computed at run time; freeze it with import_graph(..., static_inputs={{name: array}})")
        return t.const

    def ints(self, t, what):
        a = self.known(t, what)
        return None if a is None else [x if x is BATCH else int(x) for x in np.asarray(a).ravel()]

    # -- conversion ---------------------------------------------------------------------------------
    def convert(self) -> Graph:
        import onnx
        from onnx import numpy_helper
        m = self.model
        if self.opset is None:
            self.fail("the model imports no ai.onnx opset")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            self.fail(f"opset {self.opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
        gp = m.graph
        try:
            self.g = Graph(gp.name or "onnx_model")
        except IRError:
            self.g = Graph("onnx_model")
        inits = {i.name: numpy_helper.to_array(i) for i in gp.initializer}
        for name, arr in inits.items():
            arr = np.asarray(arr)
            self.env[name] = Tensor(const=arr, init=name if self.weights and arr.dtype.kind == "f" else None)
        for name, arr in self.static.items():
            self.env[name] = Tensor(const=arr)
        for vi in gp.input:
            if vi.name in self.env:
                continue
            tt = vi.type.tensor_type
            if tt.elem_type in LABEL_TYPES:     # class labels of a loss op: fed as numbers, exact in float32
                self.labels[vi.name] = onnx.TensorProto.DataType.Name(tt.elem_type)
            elif tt.elem_type != onnx.TensorProto.FLOAT:
                self.fail(f"graph input {vi.name!r} has element type "
                          f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; graphcnn inputs are float32 "
                          f"(freeze integer inputs with static_inputs)")
            if not tt.HasField("shape"):
                self.fail(f"graph input {vi.name!r} has no shape")
            dims = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value <= 0:
                    self.fail(f"graph input {vi.name!r}: dimension {i} has size {d.dim_value}; empty tensors "
                              f"are not supported")
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif i == 0:
                    dims.append(None)         # dim_param / unknown first axis: graphcnn's dynamic batch
                else:
                    self.fail(f"graph input {vi.name!r}: dimension {i} is not fixed ({d.dim_param or '?'}); "
                              f"only the first (batch) axis may be dynamic")
            layout = self.input_layout if len(dims) >= 3 else PLAIN
            if layout == CHANNELS_LAST:
                dims = [dims[p] for p in cl_perm(len(dims))]
            try:
                v = self.g.input(vi.name, tuple(dims))
            except IRError as e:
                self.fail(f"graph input name: {e}")
            self.env[vi.name] = Tensor(v, layout)
        self.fused: dict = {}    # ONNX output name -> Tensor, for nodes a quantized pattern already covered
        self.dequantized: dict = {}  # id(Tensor) -> (Tensor, integer source, scale, zero point) of a DequantizeLinear
        for node in gp.node:
            self.node = node
            if node.output and all(o in self.fused for o in node.output if o):
                for o in node.output:
                    if o and self.fused[o] is not None:
                        self.env[o] = self.fused[o]
                continue
            if node.domain not in ("", "ai.onnx"):
                self.fail(f"operator domain {node.domain!r} is not supported (only the default ai.onnx domain)")
            rule = RULES.get(node.op_type)
            if rule is None:
                self.fail(f"op {node.op_type} is not supported by graphcnn's ONNX importer "
                          f"(supported: {', '.join(sorted(RULES))})")
            fn, known_attrs = rule
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            extra = sorted(set(attrs) - set(known_attrs))
            if extra:
                self.fail(f"attribute(s) {', '.join(extra)} not supported (supported: "
                          f"{', '.join(sorted(known_attrs)) or 'none'})")
            ins = []
            for k, name in enumerate(node.input):
                if name in self.labels and (node.op_type, k) not in LABEL_USES:
                    self.fail(f"graph input {name!r} has element type {self.labels[name]}; graphcnn inputs are "
                              f"float32, and an integer input may only be the target of a loss op "
                              f"(freeze it with static_inputs)")
                if name == "":
                    ins.append(None)
                elif name not in self.env:
                    self.fail(f"input {name!r} is not defined before this node")
                else:
                    ins.append(self.env[name])
            try:
                outs = self._fold(node, ins, attrs) if _all_const(ins) and node.op_type not in NEVER_FOLD \
                    else fn(self, ins, attrs)
            except OnnxImportError:
                raise
            except IRError as e:
                self.fail(str(e))
            except (TypeError, ValueError, IndexError, KeyError, ArithmeticError) as e:
                # a rule met a malformed attribute or operand the checker let through (a wrong-length
                # list, a non-integer shape): the file is bad, and this names the node
                self.fail(f"malformed attribute or input ({type(e).__name__}: {e})")
            outs = list(outs)
            for i, name in enumerate(node.output):
                if name == "":
                    continue
                if i >= len(outs) or outs[i] is None:
                    self.fail(f"output {i} ({name!r}) is not supported")
                self.env[name] = outs[i]
        self.node = None
        results = []
        for vo in gp.output:
            t = self.env[vo.name]
            if t.const is not None and t.const.dtype.kind != "f":
                self.fail(f"graph output {vo.name!r} is a constant of dtype {t.const.dtype}; graphcnn "
                          f"outputs are float32")
            results.append((vo.name, self.value(t, PLAIN)))   # a constant output becomes its own node
        return self._with_output_names(results)

    def _fold(self, node, ins, attrs):
        """Evaluate a node whose inputs are all known at import: the shape rules by hand (they carry the
        BATCH marker), everything else with the onnx package's reference evaluator."""
        if node.op_type in SHAPE_FOLD:
            return SHAPE_FOLD[node.op_type](self, ins, attrs)
        if any(np.asarray(t.const).dtype == object for t in ins if t is not None):
            self.fail("computes with the dynamic batch size, which is not known at import time")
        from onnx.reference import ReferenceEvaluator
        import onnx
        g = onnx.helper.make_graph([node], "fold", [
            onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(t.const.dtype), t.const.shape)
            for n, t in zip(node.input, ins) if t is not None and n], [
            onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
        mm = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        feeds = {n: t.const for n, t in zip(node.input, ins) if t is not None and n}
        outs = ReferenceEvaluator(mm).run(None, feeds)
        return [Tensor(const=np.asarray(o)) for o in outs]

    def _with_output_names(self, results) -> Graph:
        """The graph with each output value renamed to the ONNX output's name (an internal value that
        happens to carry one of those names gets a fresh name)."""
        g = self.g
        rename, outs = {}, []
        for name, v in results:
            if v.kind != "node" or v.name in rename:
                v = emit("reshape", v, shape=v.shape)   # an output that is an input or repeats: its own value
            rename[v.name] = name
            outs.append(v)
        taken = set(rename.values())
        for n in g.nodes:
            for o in n.outputs:
                if o.name not in rename and o.name in taken:
                    fresh = g.fresh_name("t")
                    while fresh in taken:
                        fresh = g.fresh_name("t")
                    rename[o.name] = fresh
        new = Graph(g.name)
        for v in g.inputs:
            new.input(v.name, v.shape, v.dtype)
        for v in g.params:
            new.param(v.name, v.shape, v.dtype)
        for v in g.const_values:
            new.const(v.name, g.consts[v.name])
        for n in g.nodes:
            node = Node(n.op, [new.value(rename.get(i.name, i.name)) for i in n.inputs], n.attrs, [])
            node.outputs = [new._new_value(rename.get(o.name, o.name), o.type, "node", node, k)
                            for k, o in enumerate(n.outputs)]
            new.nodes.append(node)
        new.output(*[new.value(rename[v.name]) for v in outs])
        from ir.passes import run_pipeline
        out = run_pipeline(new, ["dce"]).graph
        out.boundary_layout = "nchw"     # its inputs/outputs are already in ONNX order (export keeps them)
        return out


def _all_const(ins):
    return any(t is not None for t in ins) and all(t is None or t.const is not None for t in ins)


# -- conversion rules ------------------------------------------------------------------------------------

def _spatial_pads(imp, attrs, in_hw, kernel, strides, dilations):
    """ONNX pads / auto_pad -> ((top, bottom), (left, right)) for a 2-D window."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, e, s in zip(in_hw, ext, strides):
            total = max((-(-size // s) - 1) * s + e - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return tuple(pads)
    if auto == "VALID":
        return ((0, 0), (0, 0))
    if auto != "NOTSET":
        imp.fail(f"auto_pad {auto!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    p = list(attrs.get("pads", [0] * (2 * len(in_hw))))
    if len(p) != 2 * len(in_hw):
        imp.fail(f"pads {p} must have {2 * len(in_hw)} values")
    if min(p) < 0:
        imp.fail(f"negative pads {p} are not supported")
    n = len(in_hw)
    return tuple((int(p[i]), int(p[i + n])) for i in range(n))


def _window(imp, x, attrs, kernel):
    """Lift a 1-D window op to 2-D; returns (x value NHWC, kernel, strides, dilations, pads, lifted)."""
    rank = x.rank
    if rank not in (3, 4):
        imp.fail(f"input of rank {rank}: only 1-D and 2-D windows (rank 3 or 4 NC... tensors) are supported")
    nsp = rank - 2
    kernel = list(kernel)
    strides = list(attrs.get("strides", [1] * nsp))
    dil = list(attrs.get("dilations", [1] * nsp))
    in_sp = list(x.shape[2:])
    pads = _spatial_pads(imp, attrs, in_sp, kernel, strides, dil)
    v = imp.value(x, CHANNELS_LAST)
    if nsp == 1:     # (N, L, C) -> (N, 1, L, C)
        v = imp.reshape(v, (v.shape[0], 1) + tuple(v.shape[1:]))
        kernel, strides, dil, pads = [1] + kernel, [1] + strides, [1] + dil, ((0, 0),) + pads
    return v, tuple(kernel), tuple(strides), tuple(dil), tuple(pads), nsp == 1


def _window_out(imp, y, lifted):
    if lifted:
        y = imp.reshape(y, (y.shape[0],) + tuple(y.shape[2:]))
    return Tensor(y, CHANNELS_LAST)


def conv(imp, ins, attrs):
    x, w, b = (ins + [None, None])[:3]
    quantized = _qdq_conv(imp, x, w, b, attrs)
    if quantized is not None:
        return quantized
    wshape = w.shape
    if len(wshape) != x.rank or None in wshape:
        imp.fail(f"weight W of shape {list(wshape)} does not match the rank-{x.rank} input")
    groups = int(attrs.get("group", 1))
    kernel = attrs.get("kernel_shape", wshape[2:])
    if tuple(kernel) != tuple(wshape[2:]):
        imp.fail(f"kernel_shape {list(kernel)} does not match the weight shape {list(wshape)}")
    v, kernel, strides, dil, pads, lifted = _window(imp, x, attrs, kernel)
    if w.const is not None:      # OIHW -> HWIO (kh, kw, C/groups, F) once, at import
        def hwio(W):
            W = W.astype(np.float32)
            return np.ascontiguousarray((W[:, :, None, :] if W.ndim == 3 else W).transpose(2, 3, 1, 0))
        wv = imp.weight(w, hwio)
    else:                        # a weight fed at run time: transposed in the graph
        wv = imp.value(w, PLAIN)
        if len(wshape) == 3:
            wv = imp.reshape(wv, (wshape[0], wshape[1], 1, wshape[2]))
        wv = emit("transpose", wv, perm=(2, 3, 1, 0))
    bias = None if b is None else imp.value(b, PLAIN)
    y = emit("conv2d", v, wv, stride=strides, padding=pads, dilation=dil, groups=groups)
    if bias is not None:
        y = emit("bias_add", y, bias)
    return [_window_out(imp, y, lifted)]


def _pool(op):
    def rule(imp, ins, attrs):
        x = ins[0]
        kernel = attrs["kernel_shape"]
        if int(attrs.get("storage_order", 0)) != 0:
            imp.fail("storage_order=1 is not supported")
        v, kernel, strides, dil, pads, lifted = _window(imp, x, attrs, kernel)
        include = bool(int(attrs.get("count_include_pad", 0))) if op == "avg_pool2d" else False
        ceil_pads = _ceil_pads(v.shape[1:3], kernel, strides, dil, pads) if int(attrs.get("ceil_mode", 0)) else pads
        partial = ceil_pads != pads and include     # a ceil window past the explicit pads: its own divisor
        if any(d != 1 for d in dil) or partial:
            return [_window_out(imp, _pool_by_taps(imp, op, v, kernel, strides, dil, pads, ceil_pads, include),
                                lifted)]
        kw = dict(pool=kernel, stride=strides, padding=ceil_pads)
        if op == "avg_pool2d":
            kw["count_include_pad"] = include
        return [_window_out(imp, emit(op, v, **kw), lifted)]
    return rule


def _ceil_pads(in_hw, kernel, strides, dil, pads):
    """ceil_mode=1 as extra end padding: the output gains a last, partial window when one starts inside
    the input or its begin/end padding (ONNX drops a window that would start in the extra part only)."""
    out = []
    for size, k, s, d, (p0, p1) in zip(in_hw, kernel, strides, dil, pads):
        e = (k - 1) * d + 1
        n = -(-(size + p0 + p1 - e) // s) + 1
        if (n - 1) * s >= size + p0:
            n -= 1
        extra = max((n - 1) * s + e - (size + p0 + p1), 0)
        out.append((p0, p1 + extra))
    return tuple(out)


def _pool_by_taps(imp, op, v, kernel, strides, dil, pads, ceil_pads, include):
    """A dilated pool (or an average with count_include_pad whose ceil_mode window passes the explicit
    pads) from registry ops: the input padded (-inf for max, 0 for average), one strided view per
    kernel tap (slice, then a 1x1 max pool with the stride to subsample), the taps side by side as
    (N, oh*ow, taps, C), then a (1, taps) max pool, or a sum divided by each window's count of
    counted taps (inside the input, or with count_include_pad inside input + explicit pads), computed
    at import as ONNX Runtime counts them."""
    n, h, w, c = v.shape
    (t0, t1), (l0, l1) = ceil_pads
    fill = float("-inf") if op == "max_pool2d" else 0.0
    xp = emit("pad", v, padding=ceil_pads, value=fill) if (t0, t1, l0, l1) != (0, 0, 0, 0) else v
    hp, wp = h + t0 + t1, w + l0 + l1
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    oh, ow = (hp - ext[0]) // strides[0] + 1, (wp - ext[1]) // strides[1] + 1
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            y = xp
            for ax, start, size, out, s in ((1, i * dil[0], hp, oh, strides[0]), (2, j * dil[1], wp, ow, strides[1])):
                stop = start + (out - 1) * s + 1
                if (start, stop) != (0, size):
                    y = emit("slice", y, axis=ax, start=start, stop=stop)
            if strides != (1, 1):
                y = emit("max_pool2d", y, pool=(1, 1), stride=strides, padding=((0, 0), (0, 0)))
            taps.append(imp.reshape(y, (n, oh * ow, 1, c)))
    kk = len(taps)
    stacked = taps[0] if kk == 1 else emit("concat", *taps, axis=2)
    if op == "max_pool2d":
        y = emit("max_pool2d", stacked, pool=(1, kk), stride=(1, kk), padding=((0, 0), (0, 0)))
        return imp.reshape(y, (n, oh, ow, c))
    total = imp.reshape(emit("reduce_sum", stacked, axis=(2,), keepdims=False), (n, oh, ow, c))
    # counted taps per output position: rows/cols inside [lo, hi) of the padded input
    lo = (0, 0) if include else (t0, l0)
    hi = (t0 + h + pads[0][1], l0 + w + pads[1][1]) if include else (t0 + h, l0 + w)
    counts = []
    for ax in range(2):
        pos = np.arange(oh if ax == 0 else ow)[:, None] * strides[ax] + np.arange(kernel[ax])[None, :] * dil[ax]
        counts.append(((pos >= lo[ax]) & (pos < hi[ax])).sum(axis=1))
    count = (counts[0][:, None] * counts[1][None, :]).astype(np.float32)
    return emit("div", total, imp.const_value(count.reshape(1, oh, ow, 1)))


def conv_transpose(imp, ins, attrs):
    """ConvTranspose as the registry's conv2d_grad_input (the transposed convolution): W (C_in, C_out/g,
    kh, kw) -> HWIO (kh, kw, C_out/g, C_in). Groups: one conv2d_grad_input per group on its slice of
    the input channels and of the kernel, concatenated along the channels. output_shape and SAME
    auto_pad become pads as the ONNX spec computes them. 1-D is lifted to 2-D (a height-1 image), as Conv."""
    x, w, b = (ins + [None, None])[:3]
    if x.rank == 3 and w.rank == 3:
        lift = {k: [1] + list(attrs[k]) for k in ("kernel_shape", "strides", "dilations", "output_padding",
                                                  "output_shape") if k in attrs}
        if "pads" in attrs:
            p = list(attrs["pads"])
            lift["pads"] = [0] + p[:1] + [0] + p[1:]
        x4 = Tensor(imp.reshape(imp.value(x, PLAIN), (x.shape[0], x.shape[1], 1, x.shape[2])))
        w4 = Tensor(const=w.const[:, :, None, :], init=w.init) if w.const is not None else \
            Tensor(imp.reshape(imp.value(w, PLAIN), tuple(w.shape[:2]) + (1, w.shape[2])))
        y = conv_transpose(imp, [x4, w4, b], {**attrs, **lift})[0]
        v = y.value                                        # (N, 1, L, C) channels last -> (N, L, C)
        return [Tensor(imp.reshape(v, (v.shape[0],) + tuple(v.shape[2:])), CHANNELS_LAST)]
    groups = int(attrs.get("group", 1))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        imp.fail(f"auto_pad {auto!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    if x.rank != 4:
        imp.fail(f"only 2-D ConvTranspose (rank-4 input) is supported, got rank {x.rank}")
    wshape = tuple(w.shape)
    if len(wshape) != 4 or None in wshape:
        imp.fail(f"weight W of shape {list(wshape)} must be 4-D (C_in, C_out/group, kh, kw)")
    c_in = x.shape[1]
    if groups < 1 or c_in % groups or wshape[0] != c_in:
        imp.fail(f"group {groups} does not divide the {c_in} input channels of W {list(wshape)}")
    kernel = wshape[2:]
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != tuple(kernel):
        imp.fail(f"kernel_shape {list(attrs['kernel_shape'])} does not match the weight shape {list(wshape)}")
    strides = tuple(attrs.get("strides", [1, 1]))
    dil = tuple(attrs.get("dilations", [1, 1]))
    p = list(attrs.get("pads", [0, 0, 0, 0]))
    outpad = list(attrs.get("output_padding", [0, 0]))
    h, wd = x.shape[2:]
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    want = list(attrs["output_shape"])[-2:] if "output_shape" in attrs else \
        ([h * strides[0], wd * strides[1]] if auto.startswith("SAME") else None)
    if want is not None:              # the spec's total padding, split as auto_pad says
        p = [0, 0, 0, 0]
        for i, (size, s, e, o) in enumerate(zip((h, wd), strides, ext, want)):
            total = s * (size - 1) + outpad[i] + e - int(o)
            if total < 0:             # a larger output: extra end rows (as output_padding), as ONNX Runtime does
                outpad[i] -= total
                total = 0
            small, big = total // 2, total - total // 2
            p[i], p[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        p = [0, 0, 0, 0]
    if any(o >= s for o, s in zip(outpad, strides)) or min(p + outpad) < 0:
        imp.fail(f"output_padding {outpad} must be >= 0 and smaller than the strides {list(strides)}; pads >= 0")
    oh = strides[0] * (h - 1) + outpad[0] + ext[0] - p[0] - p[2]
    ow = strides[1] * (wd - 1) + outpad[1] + ext[1] - p[1] - p[3]
    if w.const is not None:
        wv = imp.weight(w, lambda W: np.ascontiguousarray(W.astype(np.float32).transpose(2, 3, 1, 0)))
    else:
        wv = emit("transpose", imp.value(w, PLAIN), perm=(2, 3, 1, 0))
    xv = imp.value(x, CHANNELS_LAST)
    cg = c_in // groups
    outs = []
    for gi in range(groups):
        xg = xv if groups == 1 else emit("slice", xv, axis=3, start=gi * cg, stop=(gi + 1) * cg)
        wg = wv if groups == 1 else emit("slice", wv, axis=3, start=gi * cg, stop=(gi + 1) * cg)
        # the gradient of a conv from (oh, ow) with these pads: output_padding < stride only adds rows the
        # forward conv's floor drops, exactly ONNX's extra end rows
        outs.append(emit("conv2d_grad_input", xg, wg, stride=strides, dilation=dil,
                         padding=((p[0], p[2]), (p[1], p[3])), input_shape=(oh, ow, wshape[1])))
    y = outs[0] if groups == 1 else emit("concat", *outs, axis=3)
    if b is not None:
        y = emit("bias_add", y, imp.value(b, PLAIN))
    return [Tensor(y, CHANNELS_LAST)]


def _global_pool(op):
    def rule(imp, ins, attrs):
        x = ins[0]
        if x.rank != 4:
            imp.fail(f"only 4-D (N, C, H, W) inputs are supported, got rank {x.rank}")
        y = emit(op, imp.value(x, CHANNELS_LAST))           # (N, C)
        return [Tensor(imp.reshape(y, (y.shape[0], 1, 1, y.shape[1])), CHANNELS_LAST)]
    return rule


def batch_normalization(imp, ins, attrs):
    """Inference: the registry's batch_norm with the given statistics. training_mode=1: batch_norm_train
    (the batch's statistics, biased variance, as ONNX) and the running statistics' update
    input * momentum + batch * (1 - momentum) as outputs 1 and 2."""
    x, scale, bias, mean, var = ins[:5]
    if int(attrs.get("training_mode", 0)):
        if len(imp.node.output) != 3:
            imp.fail(f"training_mode=1 needs the 3 outputs Y, running_mean, running_var (as the spec and ONNX "
                     f"Runtime require), this node has {len(imp.node.output)}")
        if x.rank < 2:
            imp.fail(f"input of rank {x.rank}: needs (N, C, ...)")
        layout = CHANNELS_LAST if x.rank >= 3 else PLAIN
        eps, mom = float(attrs.get("epsilon", 1e-5)), float(attrs.get("momentum", 0.9))
        y, bm, bv = emit("batch_norm_train", imp.value(x, layout), imp.value(scale, PLAIN), imp.value(bias, PLAIN),
                         epsilon=eps)
        run = [emit("add", emit("scale", imp.value(t, PLAIN), factor=mom), emit("scale", b, factor=1.0 - mom))
               for t, b in ((mean, bm), (var, bv))]
        return [Tensor(y, layout), Tensor(run[0]), Tensor(run[1])]
    if not int(attrs.get("spatial", 1)):
        imp.fail("spatial=0 (per-element statistics, opsets before 9) is not supported")
    if x.rank < 2:
        imp.fail(f"input of rank {x.rank}: needs (N, C, ...)")
    layout = CHANNELS_LAST if x.rank >= 3 else PLAIN
    vals = [imp.value(t, PLAIN) for t in (scale, bias, mean, var)]
    imp.freeze(mean)
    imp.freeze(var)
    y = emit("batch_norm", imp.value(x, layout), *vals, epsilon=float(attrs.get("epsilon", 1e-5)))
    return [Tensor(y, layout)]


def _unary(op):
    def rule(imp, ins, attrs):
        return [Tensor(emit(op, imp.value(ins[0], ins[0].layout)), ins[0].layout)]
    return rule


def _layout_of(ts):
    """Channels-last when any non-constant operand is channels-last, else plain."""
    return CHANNELS_LAST if any(t.const is None and t.layout == CHANNELS_LAST for t in ts) else PLAIN


def _binary(op):
    def rule(imp, ins, attrs):
        a, b = ins
        rank = max(a.rank, b.rank)
        layout = _layout_of([a, b]) if rank >= 3 else PLAIN
        if op == "add":
            # a constant vector along the last (channel) axis is a bias: the kernels fuse bias_add
            for x, c in ((a, b), (b, a)):
                if op == "add" and c.const is not None and c.const.dtype.kind == "f" and x.rank == rank:
                    def arrange(a):
                        a = a.reshape((1,) * (rank - a.ndim) + a.shape)
                        return a.transpose(cl_perm(rank)) if layout == CHANNELS_LAST else a
                    cv = arrange(c.const)
                    xv = imp.value(x, layout)
                    if all(d == 1 for d in cv.shape[:-1]) and cv.shape[-1] == xv.shape[-1]:
                        bias = imp.weight(c, lambda a: arrange(a).reshape(-1))
                        return [Tensor(emit("bias_add", xv, bias), layout)]
        av, bv = imp.value(a, layout, rank), imp.value(b, layout, rank)
        return [Tensor(emit(op, av, bv), layout)]
    return rule


def _needs(imp, op):
    if op not in REGISTRY:
        imp.fail(f"needs graphcnn op {op!r}, which this build's op registry does not have")


def leaky_relu(imp, ins, attrs):
    alpha = float(attrs.get("alpha", 0.01))
    x = ins[0]
    if "leaky_relu" in REGISTRY:
        return [Tensor(emit("leaky_relu", imp.value(x, x.layout), alpha=alpha), x.layout)]
    return _prelu_of(imp, x, Tensor(const=np.float32(alpha)))


def prelu(imp, ins, attrs):
    return _prelu_of(imp, ins[0], ins[1])


def _prelu_of(imp, x, slope):
    """x if x > 0 else slope * x, as relu(x) - slope * relu(-x): exact in float arithmetic (each side
    is 0 where the other is taken, and negation is exact)."""
    layout = x.layout if x.rank >= 3 else PLAIN
    xv = imp.value(x, layout)
    sv = imp.value(slope, layout, x.rank)
    pos = emit("relu", xv)
    neg = emit("relu", emit("neg", xv))
    return [Tensor(emit("sub", pos, emit("mul", sv, neg)), layout)]


def clip(imp, ins, attrs):
    x = ins[0]
    lo = attrs.get("min") if imp.opset < 11 else (None if len(ins) < 2 or ins[1] is None else
                                                 float(np.asarray(imp.known(ins[1], "min")).item()))
    hi = attrs.get("max") if imp.opset < 11 else (None if len(ins) < 3 or ins[2] is None else
                                                 float(np.asarray(imp.known(ins[2], "max")).item()))
    if lo is not None and hi is not None and lo > hi:
        lo = hi                    # the ONNX spec (and ORT): min > max sets every element to max
    v = imp.value(x, x.layout)
    if lo == 0.0 and hi is None:
        return [Tensor(emit("relu", v), x.layout)]
    _needs(imp, "clip")
    return [Tensor(emit("clip", v, min_value=lo, max_value=hi), x.layout)]


def hard_sigmoid(imp, ins, attrs):
    x = ins[0]
    _needs(imp, "clip")
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    v = imp.value(x, x.layout)
    z = emit("add", emit("scale", v, factor=alpha), imp.const_value(np.float32(beta)))
    return [Tensor(emit("clip", z, min_value=0.0, max_value=1.0), x.layout)]


def hard_swish(imp, ins, attrs):
    hs = hard_sigmoid(imp, ins, {"alpha": 1 / 6, "beta": 0.5})[0]
    return [Tensor(emit("mul", imp.value(ins[0], ins[0].layout), hs.value), ins[0].layout)]


def _softmax(op):
    def rule(imp, ins, attrs):
        x = ins[0]
        r = x.rank
        axis = int(attrs.get("axis", -1 if imp.opset >= 13 else 1))
        axis = axis + r if axis < 0 else axis
        if not 0 <= axis < r:
            imp.fail(f"axis {attrs.get('axis')} is out of range for rank {r}")
        if imp.opset >= 13 or axis == r - 1:
            layout = x.layout if r >= 3 else PLAIN
            ax = cl_perm(r).index(axis) if layout == CHANNELS_LAST else axis
            return [Tensor(emit(op, imp.value(x, layout), axis=ax), layout)]
        # opset < 13: softmax over the flattened axes [axis:]
        v = imp.value(x, PLAIN)
        if axis == 0:
            imp.fail("axis=0 before opset 13 would normalize across the batch")
        flat = imp.reshape(v, tuple(v.shape[:axis]) + (int(np.prod(v.shape[axis:])),))
        return [Tensor(imp.reshape(emit(op, flat, axis=-1), v.shape))]
    return rule


def gemm(imp, ins, attrs):
    a, b, c = (ins + [None])[:3]
    if not any(int(attrs.get(k, 0)) for k in ("transA", "transB")) and \
            float(attrs.get("alpha", 1.0)) == 1.0 and float(attrs.get("beta", 1.0)) == 1.0:
        quantized = _qdq_dense(imp, a, b, c)
        if quantized is not None:
            return quantized
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    return _matmul2d(imp, a, b, c, alpha, beta, ta, tb)


def matmul(imp, ins, attrs):
    a, b = ins
    if a.rank == 2 and b.rank == 2:
        quantized = _qdq_dense(imp, a, b, None)
        if quantized is not None:
            return quantized
    if a.rank == 2 and b.rank == 2:
        return _matmul2d(imp, a, b, None, 1.0, 1.0, 0, 0)
    return _matmul_nd(imp, a, b)


def _matmul_nd(imp, a, b):
    """MatMul of 1-D or N-D operands with NumPy's rules (a 1-D A is a row, a 1-D B a column, both removed
    from the result; the axes before the last two broadcast) as A (..., M, K, 1) * B (..., 1, K, N)
    summed over K: exact products, the sum in a different order than a GEMM. (Not a dense on A
    reshaped to 2-D: that needs A's leading axes fixed. Memory-bound; a batched GEMM kernel would be
    the fast form.)"""
    av, bv = imp.value(a, PLAIN), imp.value(b, PLAIN)
    drop = []
    if a.rank == 1:
        av, drop = imp.reshape(av, (1,) + tuple(av.shape)), drop + [-2]
    if b.rank == 1:
        bv, drop = imp.reshape(bv, tuple(bv.shape) + (1,)), drop + [-1]
    sa, sb = tuple(av.shape), tuple(bv.shape)
    k, n = sa[-1], sb[-1]
    if sb[-2] != k:
        imp.fail(f"inner dimensions differ: {list(a.shape)} @ {list(b.shape)}")
    r = max(len(sa), len(sb))
    for s in (sa, sb):
        if len(s) < r and s[0] is None:
            imp.fail(f"the batched operand {list(s)} has fewer axes than the other; broadcasting would move "
                     f"the dynamic batch")
    av = imp.reshape(av, (1,) * (r - len(sa)) + sa + (1,))
    bv = imp.reshape(bv, (1,) * (r - len(sb)) + sb[:-2] + (1, k, n))
    y = emit("reduce_sum", emit("mul", av, bv), axis=(r - 1,), keepdims=False)
    if drop:
        shape = list(y.shape)
        for ax in sorted((len(shape) + d for d in drop), reverse=True):
            del shape[ax]
        y = imp.reshape(y, tuple(shape))
    return [Tensor(y)]


def _matmul2d(imp, a, b, c, alpha, beta, ta, tb):
    if a.const is not None and ta:
        a, ta = Tensor(const=a.const.T), 0
    if b.const is not None:
        k = a.shape[0] if ta else a.shape[1]
        if b.const.ndim != 2 or (b.const.T if tb else b.const).shape[0] != k:
            imp.fail(f"B of shape {list(b.const.shape)} (transB={tb}) does not match A of shape "
                     f"{list(a.shape)} (transA={ta})")
        order = None
        if a.flat_of is not None and not ta:      # a flattened channels-last tensor: permute B's rows
            src = a.flat_of.shape[1:]                 # (C, H, W): row j of the NHWC flatten is NCHW row order[j]
            order = np.arange(int(np.prod(src))).reshape(src).transpose(tuple(p - 1 for p in cl_perm(len(src) + 1)[1:]))
            order = order.ravel()
            av = a.value
        else:
            av = imp.value(a, PLAIN)
            if ta:
                av = imp.transpose(av, (1, 0))

        def dense_kernel(B):      # (in, out), alpha folded in, rows in the activations' order
            B = B.astype(np.float32)
            B = B.T if tb else B
            if alpha != 1.0:
                B = (B * np.float32(alpha)).astype(np.float32)
            return np.ascontiguousarray(B if order is None else B[order])
        y = emit("dense", av, imp.weight(b, dense_kernel))
    else:
        av = imp.value(a, PLAIN)
        bv = imp.value(b, PLAIN)
        y = emit("matmul", av, bv, transpose_a=bool(ta), transpose_b=bool(tb))
        if alpha != 1.0:
            y = emit("scale", y, factor=alpha)
    if c is not None:
        if c.const is not None:
            def scaled(C):
                return (C.astype(np.float32) * np.float32(beta)).astype(np.float32)
            C = c.const
            if C.size == y.shape[-1] and C.ndim <= 2 and (C.ndim < 2 or C.shape[0] == 1):
                y = emit("bias_add", y, imp.weight(c, lambda C: scaled(C).reshape(-1)))
            else:
                y = emit("add", y, imp.weight(c, scaled))
        else:
            cv = imp.value(c, PLAIN)
            y = emit("add", y, cv if beta == 1.0 else emit("scale", cv, factor=beta))
    return [Tensor(y)]


def flatten(imp, ins, attrs):
    x = ins[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.rank if axis < 0 else axis
    return [_flatten_at(imp, x, axis)]


def _flatten_at(imp, x, axis):
    if axis == 1 and x.layout == CHANNELS_LAST and x.rank >= 3 and x.const is None and x.flat_of is None:
        v = x.value
        if _perm_is_reshape(x.shape, cl_perm(x.rank)):     # only size-1 axes move: same element order
            return Tensor(emit("flatten", v) if v.shape[0] is None else imp.reshape(v, (v.shape[0], -1)))
        return Tensor(emit("flatten", v) if v.shape[0] is None else imp.reshape(v, (v.shape[0], -1)), flat_of=x)
    v = imp.value(x, PLAIN)
    s = v.shape
    if axis == 0:
        if s and s[0] is None:
            imp.fail("Flatten with axis=0 would merge the dynamic batch")
        return Tensor(imp.reshape(v, (1, int(np.prod(s)))))
    head = s[0] if axis == 1 else (None if s[0] is None else int(np.prod(s[:axis])))
    if s[0] is None and axis > 1:
        imp.fail(f"Flatten with axis={axis} would merge the dynamic batch with other axes")
    return Tensor(imp.reshape(v, (head, int(np.prod(s[axis:], dtype=np.int64)))))


def reshape(imp, ins, attrs):
    x = ins[0]
    target = imp.ints(ins[1], "shape") if len(ins) > 1 else list(attrs["shape"])
    allowzero = int(attrs.get("allowzero", 0))
    shape = list(x.shape)
    out = []
    for i, d in enumerate(target):
        if d is BATCH:
            out.append(None)
        elif d == 0 and not allowzero:
            out.append(shape[i])
        else:
            out.append(d)
    if out.count(-1) > 1:
        imp.fail(f"shape {target} has more than one -1")
    batched = shape and shape[0] is None
    if batched:
        if out[0] not in (None, -1):
            imp.fail(f"reshape to {target} does not keep the dynamic batch as its first axis")
        if out[0] == -1:
            if any(d == -1 for d in out[1:]):
                imp.fail(f"reshape to {target} leaves the batch and another axis unknown")
            per = int(np.prod(shape[1:]))
            if int(np.prod(out[1:])) != per:
                imp.fail(f"reshape to {target} would mix samples of the dynamic batch")
        out[0] = None
        if -1 not in out[1:] and int(np.prod(out[1:])) != int(np.prod(shape[1:])):
            imp.fail(f"cannot reshape {list(shape)} to {target}: the element counts per sample differ")
    if batched and len(out) == 2 and x.rank >= 3:
        return [_flatten_at(imp, x, 1)]
    v = imp.value(x, PLAIN)
    return [Tensor(emit("reshape", v, shape=tuple(out)) if tuple(out) != tuple(v.shape) else v)]


def transpose(imp, ins, attrs):
    x = ins[0]
    perm = list(attrs.get("perm", reversed(range(x.rank))))
    if x.layout == CHANNELS_LAST and x.rank >= 3 and tuple(perm) == cl_perm(x.rank):
        return [Tensor(x.value)]          # NCHW -> NHWC of a value that is already channels last
    return [Tensor(imp.transpose(imp.value(x, PLAIN), perm))]


def concat(imp, ins, attrs):
    ins = [t for t in ins if t is not None]
    r = ins[0].rank
    axis = int(attrs["axis"])
    axis = axis + r if axis < 0 else axis
    layout = _layout_of(ins) if r >= 3 else PLAIN
    ax = cl_perm(r).index(axis) if layout == CHANNELS_LAST else axis
    return [Tensor(emit("concat", *[imp.value(t, layout) for t in ins], axis=ax), layout)]


def _axes(imp, ins, attrs, rank):
    axes = imp.ints(ins[1], "axes") if len(ins) > 1 and ins[1] is not None else attrs.get("axes")
    if axes is None:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


def squeeze(imp, ins, attrs):
    x = ins[0]
    axes = _axes(imp, ins, attrs, x.rank)
    shape = x.shape
    axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else axes
    if any(shape[a] != 1 for a in axes):
        imp.fail(f"cannot squeeze axes {axes} of shape {shape}")
    v = imp.value(x, PLAIN)
    return [Tensor(imp.reshape(v, tuple(d for i, d in enumerate(shape) if i not in axes)))]


def unsqueeze(imp, ins, attrs):
    x = ins[0]
    r = x.rank + len(_axes(imp, ins, attrs, 0) or [])
    axes = _axes(imp, ins, attrs, r)
    if axes is None:
        imp.fail("needs axes")
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    if x.shape and x.shape[0] is None and shape[0] != None:  # noqa: E711
        imp.fail("cannot insert an axis in front of the dynamic batch")
    return [Tensor(imp.reshape(imp.value(x, PLAIN), tuple(shape)))]


def identity(imp, ins, attrs):
    return [ins[0]]


def dropout(imp, ins, attrs):
    """Inference dropout is the identity; training mode (or a mode decided at run time) is refused."""
    if len(ins) > 2 and ins[2] is not None:
        mode = imp.known(ins[2], "training_mode")
        if bool(np.asarray(mode).item()):
            imp.fail("training_mode=true is not supported (import inference models)")
    return [ins[0], None]


def constant(imp, ins, attrs):
    from onnx import numpy_helper
    if "value" in attrs:
        return [Tensor(const=numpy_helper.to_array(attrs["value"]))]
    for k, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                  ("value_ints", np.int64)):
        if k in attrs:
            return [Tensor(const=np.asarray(attrs[k], dt))]
    imp.fail("supported forms: value, value_float(s), value_int(s)")


def pad(imp, ins, attrs):
    x = ins[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        imp.fail(f"mode {mode!r} is not supported (only 'constant')")
    if imp.opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
    else:
        pads = imp.ints(ins[1], "pads")
        value = 0.0 if len(ins) < 3 or ins[2] is None else float(np.asarray(imp.known(ins[2], "constant_value")).item())
        if len(ins) > 3 and ins[3] is not None:     # pads given for these axes only
            axes = [a + x.rank if a < 0 else a for a in imp.ints(ins[3], "axes")]
            if len(pads) != 2 * len(axes) or sorted(set(axes)) != sorted(axes) or \
                    not all(0 <= a < x.rank for a in axes):
                imp.fail(f"axes {axes} do not match pads {pads} for a rank-{x.rank} input")
            full = [0] * (2 * x.rank)
            for i, a in enumerate(axes):
                full[a], full[a + x.rank] = pads[i], pads[i + len(axes)]
            pads = full
    r = x.rank
    if r != 4 or len(pads) != 8 or any(pads[i] or pads[i + 4] for i in (0, 1)):
        imp.fail(f"only spatial padding of 4-D NCHW tensors is supported, got pads {pads}")
    if min(pads) < 0:
        imp.fail(f"negative pads {pads} (cropping) are not supported")
    y = emit("pad", imp.value(x, CHANNELS_LAST), padding=((pads[2], pads[6]), (pads[3], pads[7])), value=value)
    return [Tensor(y, CHANNELS_LAST)]


def reduce_mean(imp, ins, attrs):
    x = ins[0]
    r = x.rank
    axes = _axes(imp, ins, attrs, r)
    keep = bool(int(attrs.get("keepdims", 1)))
    if axes is None or axes == []:
        if int(attrs.get("noop_with_empty_axes", 0)):
            return [x]
        axes = list(range(r))
    if x.layout == CHANNELS_LAST and r >= 3:
        p = cl_perm(r)
        act = [p.index(a) for a in axes]
        rest = [a for a in p if a not in axes]
        if keep:
            return [Tensor(emit("reduce_mean", x.value, axis=tuple(act), keepdims=True), CHANNELS_LAST)]
        if rest == sorted(rest):
            return [Tensor(emit("reduce_mean", x.value, axis=tuple(act), keepdims=False))]
    return [Tensor(emit("reduce_mean", imp.value(x, PLAIN), axis=tuple(axes), keepdims=keep))]


def cast(imp, ins, attrs):
    import onnx
    if int(attrs["to"]) != onnx.TensorProto.FLOAT:
        imp.fail("casting a computed tensor to a type other than float32 is not supported")
    return [ins[0]]


def _loss(log_softmax_first):
    """SoftmaxCrossEntropyLoss (log_softmax first) and NegativeLogLikelihoodLoss over (N, C, d1, ...) scores
    and (N, d1, ...) integer targets, with class weights, ignore_index and reduction none/sum/mean, built
    from registry ops: the target's one-hot row is relu(1 - |t - c|) for the class indices c (exact for
    integer t), so targets may be constants or fed at run time (as numbers). mean divides by the summed
    weights of the counted elements, as the ONNX spec does."""
    def rule(imp, ins, attrs):
        x, t = ins[0], ins[1]
        w = ins[2] if len(ins) > 2 else None
        red = attrs.get("reduction", b"mean")
        red = red.decode() if isinstance(red, bytes) else red
        if red not in ("none", "sum", "mean"):
            imp.fail(f"reduction {red!r} is not one of none, sum, mean")
        r = x.rank
        if r < 2 or t.rank != r - 1:
            imp.fail(f"needs scores (N, C, d1, ...) and targets (N, d1, ...), got ranks {r} and {t.rank}")
        layout = x.layout if r >= 3 and x.const is None else PLAIN
        ax = r - 1 if layout == CHANNELS_LAST else 1          # the class axis of the values built here
        n_cls = x.shape[1]
        xv = imp.value(x, layout)
        logp = emit("log_softmax", xv, axis=ax) if log_softmax_first else xv
        if t.const is not None:
            tv = imp.const_value(np.asarray(t.const).astype(np.float32))
        else:
            tv = t.value
        shape1 = list(tv.shape)
        shape1.insert(ax, 1)
        t1 = imp.reshape(tv, tuple(shape1))                 # the target with a size-1 class axis
        col = [1] * r
        col[ax] = n_cls
        cls = imp.const_value(np.arange(n_cls, dtype=np.float32).reshape(col))
        one = imp.const_value(np.float32(1.0))

        def is_value(a, c):       # 1 where a == c (a integer-valued), else 0
            d = emit("sub", a, c)
            return emit("relu", emit("sub", one, emit("add", emit("relu", d), emit("relu", emit("neg", d)))))
        pick = is_value(t1, cls)                             # (N, C, d...) one-hot of the target
        if w is not None:
            if w.rank != 1 or w.shape[0] != n_cls:
                imp.fail(f"weight of shape {list(w.shape)} must be a ({n_cls},) vector")
            pick = emit("mul", pick, imp.reshape(imp.value(w, PLAIN), tuple(col)))
        if "ignore_index" in attrs:
            ii = imp.const_value(np.float32(int(attrs["ignore_index"])))
            pick = emit("mul", pick, emit("sub", one, is_value(t1, ii)))
        loss = emit("neg", emit("reduce_sum", emit("mul", logp, pick), axis=(ax,), keepdims=False))
        if red == "sum":
            loss = emit("reduce_sum", loss, axis=None, keepdims=False)
        elif red == "mean":
            total = emit("reduce_sum", loss, axis=None, keepdims=False)
            loss = emit("div", total, emit("reduce_sum", pick, axis=None, keepdims=False))
        # the loss has the targets' axes (N, d...), in ONNX order either way (the class axis is gone)
        return [Tensor(loss), Tensor(logp, layout)]
    return rule


# shape folding with the BATCH marker -------------------------------------------------------------------

def _arr(t):
    return np.asarray(t.const)


def fold_shape(imp, ins, attrs):
    x = ins[0]
    dims = [BATCH if d is None else d for d in x.shape]
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    arr = np.array(dims, dtype=object if any(d is BATCH for d in dims) else np.int64)
    return [Tensor(const=arr)]


def fold_gather(imp, ins, attrs):
    data, idx = _arr(ins[0]), _arr(ins[1]).astype(np.int64)
    return [Tensor(const=np.take(data, idx, axis=int(attrs.get("axis", 0))))]


def fold_concat(imp, ins, attrs):
    arrs = [_arr(t) for t in ins if t is not None]
    out = np.concatenate(arrs, axis=int(attrs["axis"]))
    return [Tensor(const=out if out.dtype == object and any(x is BATCH for x in out.ravel())
                   else out.astype(np.result_type(*[a for a in arrs if a.dtype != object] or [np.int64])))]


def fold_unsqueeze(imp, ins, attrs):
    a = _arr(ins[0])
    axes = _axes(imp, ins, attrs, a.ndim + len(_axes(imp, ins, attrs, 0) or []))
    for ax in axes:
        a = np.expand_dims(a, ax)
    return [Tensor(const=a)]


def fold_squeeze(imp, ins, attrs):
    a = _arr(ins[0])
    axes = _axes(imp, ins, attrs, a.ndim)
    return [Tensor(const=np.squeeze(a, axis=None if axes is None else tuple(axes)))]


def fold_slice(imp, ins, attrs):
    a = _arr(ins[0])
    if imp.opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = imp.ints(ins[1], "starts"), imp.ints(ins[2], "ends")
        axes = imp.ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else None
        steps = imp.ints(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    sl = [slice(None)] * a.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        sl[ax] = slice(int(s), int(e), int(st))
    return [Tensor(const=a[tuple(sl)])]


def fold_identity(imp, ins, attrs):
    return [ins[0]]


def fold_cast(imp, ins, attrs):
    from onnx import helper
    a = _arr(ins[0])
    if a.dtype == object:
        return [ins[0]]
    return [Tensor(const=a.astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"]))))]


SHAPE_FOLD = {"Shape": fold_shape, "Gather": fold_gather, "Concat": fold_concat, "Unsqueeze": fold_unsqueeze,
              "Squeeze": fold_squeeze, "Slice": fold_slice, "Identity": fold_identity, "Cast": fold_cast,
              "Dropout": dropout}
NEVER_FOLD = {"Constant", "DequantizeLinear", "QuantizeLinear", "QLinearConv", "QLinearMatMul"}

# integer element types a graph input may have when it is only the target of a loss op
LABEL_TYPES = (6, 7, 2, 3, 4, 5, 12, 13)      # INT32, INT64, UINT8, INT8, UINT16, INT16, UINT32, UINT64
LABEL_USES = {("SoftmaxCrossEntropyLoss", 1), ("NegativeLogLikelihoodLoss", 1)}

_POOL_ATTRS = {"kernel_shape", "strides", "pads", "auto_pad", "ceil_mode", "dilations"}

# ONNX op -> (rule, attributes the rule reads). Any other attribute present is refused by name.
# -- int8 (ir/ops/quant.py): QuantizeLinear / DequantizeLinear, a DQ -> Conv/Gemm/MatMul [-> Relu] -> Q
# pattern, QLinearConv and QLinearMatMul -> quantize / dequantize / conv2d_q / dense_q. Per-tensor u8/i8
# activations; weights i8 with zero point 0 (symmetric), per-tensor or per output channel.
QUANT_DTYPES = {np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8"}


def _per_tensor(imp, scale, zero_point, what):
    """(scale, zero point, dtype) of a per-tensor quantized activation (constant scale / zero point)."""
    s = np.asarray(imp.known(scale, f"{what} scale"), np.float32)
    z = np.zeros((), np.uint8) if zero_point is None else np.asarray(imp.known(zero_point, f"{what} zero point"))
    if s.size != 1 or z.size != 1:
        imp.fail(f"{what}: graphcnn quantizes activations per tensor; got {s.size} scales / {z.size} zero points")
    if z.dtype not in QUANT_DTYPES:
        imp.fail(f"{what}: zero point of dtype {z.dtype}; graphcnn's quantized activations are uint8 or int8")
    return float(s.ravel()[0]), int(z.ravel()[0]), QUANT_DTYPES[z.dtype]


def _int_const(imp, array):
    if imp.weights:
        imp.fail("a quantized ONNX model imports for inference only: use import_graph (gc.onnx.import_graph)")
    return imp.g.const(None, np.ascontiguousarray(array))


def quantize_linear(imp, ins, attrs):
    x, scale, zp = (ins + [None, None])[:3]
    s, z, dtype = _per_tensor(imp, scale, zp, "QuantizeLinear")
    if x.const is not None:
        imp.fail("QuantizeLinear of a constant: only activations are quantized at run time")
    return [Tensor(emit("quantize", imp.value(x, x.layout), scale=s, zero_point=z, dtype=dtype), x.layout)]


def dequantize_linear(imp, ins, attrs):
    x, scale, zp = (ins + [None, None])[:3]
    if x.const is not None:       # an integer weight or bias: kept (with its parameters) for conv2d_q / dense_q
        q = np.asarray(x.const)
        s = np.asarray(imp.known(scale, "DequantizeLinear scale"), np.float32)
        z = np.zeros((), q.dtype) if zp is None else np.asarray(imp.known(zp, "DequantizeLinear zero point"))
        axis = int(attrs.get("axis", 1))
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis % q.ndim] = s.size
        real = (q.astype(np.float64) - z.reshape(shape).astype(np.float64)) * s.reshape(shape)
        t = Tensor(const=real.astype(np.float32))
        imp.dequantized[id(t)] = (t, q, s, z, axis % max(q.ndim, 1))
        return [t]
    s, z, dtype = _per_tensor(imp, scale, zp, "DequantizeLinear")
    if QUANT_DTYPES.get(np.dtype(x.value.type.np_dtype)) != dtype:
        imp.fail(f"DequantizeLinear: the zero point's dtype ({dtype}) is not its input's ({x.value.type.dtype})")
    t = Tensor(emit("dequantize", imp.value(x, x.layout), scale=s, zero_point=z), x.layout, flat_of=None)
    imp.dequantized[id(t)] = (t, x, s, z, None)
    return [t]


def _consumers(imp, name):
    return [n for n in imp.model.graph.node if name in n.input]


def _requant_target(imp, out_name):
    """The (Relu node or None, QuantizeLinear node) that alone consume a float conv/gemm output, else None."""
    if any(o.name == out_name for o in imp.model.graph.output):
        return None
    users = _consumers(imp, out_name)
    relu = None
    if len(users) == 1 and users[0].op_type == "Relu":
        relu = users[0]
        if any(o.name == relu.output[0] for o in imp.model.graph.output):
            return None
        users = _consumers(imp, relu.output[0])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or users[0].input[0] != (relu.output[0] if relu else out_name):
        return None
    return relu, users[0]


def _weights_q(imp, w, b, x_scale, channels_axis, what):
    """(i8 weight array, per-channel scales, i32 bias array or None) of DequantizeLinear'd constants w, b."""
    _, wq, ws, wz, axis = imp.dequantized[id(w)]
    if wq.dtype != np.int8 or np.any(wz != 0):
        imp.fail(f"{what}: conv2d_q/dense_q need int8 weights with zero point 0 (symmetric), got {wq.dtype} "
                 f"with zero points {np.unique(wz)[:4]}")
    m = wq.shape[channels_axis]
    if ws.size not in (1, m) or (ws.size == m and m > 1 and axis != channels_axis):
        imp.fail(f"{what}: weight scales must be per tensor or per output channel (axis {channels_axis})")
    w_scale = np.broadcast_to(ws.ravel(), (m,)).astype(np.float32)
    bias = None
    if b is not None:
        if id(b) not in imp.dequantized:
            imp.fail(f"{what}: the bias must be a DequantizeLinear'd int32 constant")
        _, bq, bs, bz, _ = imp.dequantized[id(b)]
        want = np.float64(x_scale) * w_scale.astype(np.float64)
        if bq.dtype != np.int32 or np.any(bz != 0) or not np.allclose(np.broadcast_to(bs.ravel(), (m,)), want,
                                                                      rtol=1e-5, atol=0):
            imp.fail(f"{what}: the bias must be int32 with zero point 0 and scale x_scale * w_scale")
        bias = bq.reshape(m)
    return wq, w_scale, bias


def _requant_attrs(imp, x_scale, x_zp, w_scale, y, relu):
    s, z, dtype = y
    from ir.ops.quant import QUANT_RANGES
    return {"x_scale": x_scale, "x_zero_point": x_zp, "w_scale": tuple(float(v) for v in w_scale),
            "y_scale": s, "y_zero_point": z, "dtype": dtype,
            "y_min": max(QUANT_RANGES[dtype][0], z) if relu is not None else None, "y_max": None}


def _qdq_match(imp, x, w):
    """(x's quantized Tensor, x scale, x zero point, (relu, quantize) nodes) when the current float
    conv/gemm is a QDQ pattern, else None (the float rule converts it)."""
    if id(x) not in imp.dequantized or w is None or id(w) not in imp.dequantized:
        return None
    _, xq, xs, xz, axis = imp.dequantized[id(x)]
    if axis is not None:
        return None
    target = _requant_target(imp, imp.node.output[0])
    return None if target is None else (xq, xs, xz, target)


def _fuse_output(imp, y_value, layout, target):
    relu, qnode = target
    t = Tensor(y_value, layout)
    if relu is not None:
        imp.fused[relu.output[0]] = None
    imp.fused[qnode.output[0]] = t
    return [Tensor(emit("dequantize", y_value, scale=imp._y[0], zero_point=imp._y[1]), layout)]


def _qdq_conv(imp, x, w, b, attrs):
    m = _qdq_match(imp, x, w)
    if m is None:
        return None
    xq, xs, xz, (relu, qnode) = m
    if int(attrs.get("group", 1)) != 1 or x.rank != 4:
        imp.fail("a quantized (QDQ) Conv must be 2-D with group=1 (conv2d_q)")
    y = _per_tensor(imp, imp.env.get(qnode.input[1]), imp.env.get(qnode.input[2]) if len(qnode.input) > 2
                    and qnode.input[2] else None, "QuantizeLinear")
    wq, w_scale, bias = _weights_q(imp, w, b, xs, 0, "Conv")
    return _conv_q(imp, xq, xs, xz, wq, w_scale, bias, y, relu, qnode, attrs)


def _conv_q(imp, xq, xs, xz, wq, w_scale, bias, y, relu, qnode, attrs):
    kernel = attrs.get("kernel_shape", wq.shape[2:])
    v, kernel, strides, dil, pads, lifted = _window(imp, xq, attrs, kernel)
    if lifted:
        imp.fail("quantized 1-D convolutions are not supported")
    operands = [v, _int_const(imp, wq.transpose(2, 3, 1, 0))]
    if bias is not None:
        operands.append(_int_const(imp, bias))
    out = emit("conv2d_q", *operands, stride=strides, padding=pads, dilation=dil,
               **_requant_attrs(imp, xs, xz, w_scale, y, relu))
    if qnode is None:
        return [Tensor(out, CHANNELS_LAST)]
    imp._y = y
    return _fuse_output(imp, out, CHANNELS_LAST, (relu, qnode))


def _dense_q(imp, aq, xs, xz, wq, w_scale, bias, y, relu, qnode, flat_of):
    order = None
    if flat_of is not None:          # a flattened channels-last tensor: permute W's rows (as _matmul2d)
        src = flat_of.shape[1:]
        order = np.arange(int(np.prod(src))).reshape(src).transpose(
            tuple(p - 1 for p in cl_perm(len(src) + 1)[1:])).ravel()
        av = aq.value
    else:
        av = imp.value(aq, PLAIN)
    operands = [av, _int_const(imp, wq if order is None else wq[order])]
    if bias is not None:
        operands.append(_int_const(imp, bias))
    out = emit("dense_q", *operands, **_requant_attrs(imp, xs, xz, w_scale, y, relu))
    if qnode is None:
        return [Tensor(out)]
    imp._y = y
    return _fuse_output(imp, out, PLAIN, (relu, qnode))


def _qdq_dense(imp, a, b, c):
    m = _qdq_match(imp, a, b)
    if m is None:
        return None
    aq, xs, xz, (relu, qnode) = m
    y = _per_tensor(imp, imp.env.get(qnode.input[1]), imp.env.get(qnode.input[2]) if len(qnode.input) > 2
                    and qnode.input[2] else None, "QuantizeLinear")
    wq, w_scale, bias = _weights_q(imp, b, c, xs, 1, "Gemm/MatMul")
    return _dense_q(imp, aq, xs, xz, wq, w_scale, bias, y, relu, qnode, aq.flat_of)


def _qlinear_weight(imp, w, scale, zp, axis, what):
    wq = np.asarray(imp.known(w, f"{what} weight"))
    s = np.asarray(imp.known(scale, f"{what} weight scale"), np.float32)
    z = np.asarray(imp.known(zp, f"{what} weight zero point")) if zp is not None else np.zeros((), np.int8)
    t = Tensor(const=wq.astype(np.float32))
    imp.dequantized[id(t)] = (t, wq, s, z, axis)
    return t


def qlinear_conv(imp, ins, attrs):
    x, xs, xz, w, ws, wz, ys, yz, b = (ins + [None] * 9)[:9]
    xs, xz, _ = _per_tensor(imp, xs, xz, "QLinearConv x")
    y = _per_tensor(imp, ys, yz, "QLinearConv y")
    if int(attrs.get("group", 1)) != 1:
        imp.fail("QLinearConv with group != 1 is not supported (conv2d_q)")
    wt = _qlinear_weight(imp, w, ws, wz, 0, "QLinearConv")
    _, wq, w_scale_raw, wzr, _ = imp.dequantized[id(wt)]
    bias_t = None
    if b is not None:
        bias_t = Tensor(const=np.asarray(imp.known(b, "QLinearConv bias"), np.float32))
        m = wq.shape[0]
        bscale = np.float64(xs) * np.broadcast_to(w_scale_raw.ravel(), (m,)).astype(np.float64)
        imp.dequantized[id(bias_t)] = (bias_t, np.asarray(b.const), bscale.astype(np.float32),
                                       np.zeros(m, np.int32), 0)
    wq, w_scale, bias = _weights_q(imp, wt, bias_t, xs, 0, "QLinearConv")
    return _conv_q(imp, x, xs, xz, wq, w_scale, bias, y, None, None, attrs)


def qlinear_matmul(imp, ins, attrs):
    a, as_, az, b, bs, bz, ys, yz = (ins + [None] * 8)[:8]
    xs, xz, _ = _per_tensor(imp, as_, az, "QLinearMatMul a")
    y = _per_tensor(imp, ys, yz, "QLinearMatMul y")
    if a.rank != 2 or b.const is None or np.asarray(b.const).ndim != 2:
        imp.fail("QLinearMatMul: graphcnn imports a 2-D activation times a constant 2-D weight (dense_q)")
    wt = _qlinear_weight(imp, b, bs, bz, 1, "QLinearMatMul")
    wq, w_scale, _ = _weights_q(imp, wt, None, xs, 1, "QLinearMatMul")
    return _dense_q(imp, a, xs, xz, wq, w_scale, None, y, None, None, a.flat_of)


RULES = {
    "QuantizeLinear": (quantize_linear, {"axis", "saturate", "block_size", "output_dtype", "precision"}),
    "DequantizeLinear": (dequantize_linear, {"axis", "block_size"}),
    "QLinearConv": (qlinear_conv, {"kernel_shape", "strides", "pads", "auto_pad", "dilations", "group"}),
    "QLinearMatMul": (qlinear_matmul, set()),
    "Conv": (conv, {"kernel_shape", "strides", "pads", "auto_pad", "dilations", "group"}),
    "ConvTranspose": (conv_transpose, {"kernel_shape", "strides", "pads", "auto_pad", "dilations", "group",
                                       "output_padding", "output_shape"}),
    "MaxPool": (_pool("max_pool2d"), _POOL_ATTRS | {"storage_order"}),
    "AveragePool": (_pool("avg_pool2d"), _POOL_ATTRS | {"count_include_pad"}),
    "GlobalAveragePool": (_global_pool("global_avg_pool2d"), set()),
    "GlobalMaxPool": (_global_pool("global_max_pool2d"), set()),
    "BatchNormalization": (batch_normalization, {"epsilon", "momentum", "training_mode", "spatial"}),
    "Relu": (_unary("relu"), set()),
    "Sigmoid": (_unary("sigmoid"), set()),
    "Tanh": (_unary("tanh"), set()),
    "LeakyRelu": (leaky_relu, {"alpha"}),
    "PRelu": (prelu, set()),
    "Clip": (clip, {"min", "max"}),
    "HardSigmoid": (hard_sigmoid, {"alpha", "beta"}),
    "HardSwish": (hard_swish, set()),
    "Softmax": (_softmax("softmax"), {"axis"}),
    "LogSoftmax": (_softmax("log_softmax"), {"axis"}),
    "Gemm": (gemm, {"alpha", "beta", "transA", "transB"}),
    "MatMul": (matmul, set()),
    "Add": (_binary("add"), set()),
    "Sub": (_binary("sub"), set()),
    "Mul": (_binary("mul"), set()),
    "Div": (_binary("div"), set()),
    "Flatten": (flatten, {"axis"}),
    "Reshape": (reshape, {"shape", "allowzero"}),
    "Transpose": (transpose, {"perm"}),
    "Concat": (concat, {"axis"}),
    "Squeeze": (squeeze, {"axes"}),
    "Unsqueeze": (unsqueeze, {"axes"}),
    "Identity": (identity, set()),
    "Dropout": (dropout, {"ratio", "seed"}),
    "Constant": (constant, {"value", "value_float", "value_floats", "value_int", "value_ints"}),
    "Pad": (pad, {"mode", "pads", "value"}),
    "ReduceMean": (reduce_mean, {"axes", "keepdims", "noop_with_empty_axes"}),
    "Cast": (cast, {"to", "saturate", "round_mode"}),
    "SoftmaxCrossEntropyLoss": (_loss(True), {"reduction", "ignore_index"}),
    "NegativeLogLikelihoodLoss": (_loss(False), {"reduction", "ignore_index"}),
    "Shape": (fold_shape, {"start", "end"}),      # shapes are known at import (BATCH for the batch)
    "Gather": (lambda imp, ins, attrs: imp.fail("Gather on computed data is not supported (only shape folding)"),
               {"axis"}),
    "Slice": (lambda imp, ins, attrs: imp.fail("Slice on computed data is not supported (only shape folding)"),
              {"starts", "ends", "axes"}),
}


def _constant_only(op):
    def rule(imp, ins, attrs):
        imp.fail(f"{op} is supported only on values known at import (it folds); this one is computed at run time")
    return rule


# ops exporters emit in shape computations: folded by the reference evaluator when their inputs are known
for _op in ("Range", "Equal", "Where", "ConstantOfShape", "Expand", "Less", "Greater", "Not", "Min", "Max",
            "Floor", "Ceil", "Sqrt", "Neg", "ReduceProd", "Size"):
    RULES.setdefault(_op, (_constant_only(_op), {"value", "axes", "keepdims", "noop_with_empty_axes"}))


def load_model_proto(path_or_bytes, source=None):
    """Parse, check and shape-infer an ONNX model from a path or bytes; OnnxImportError if malformed."""
    import onnx
    src = source or (path_or_bytes if isinstance(path_or_bytes, str) else "<onnx bytes>")
    try:
        if isinstance(path_or_bytes, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(path_or_bytes))
        else:
            model = onnx.load(path_or_bytes)
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except FileNotFoundError:
        raise OnnxImportError(f"{src}: file not found") from None
    except Exception as e:   # onnx raises DecodeError, ValidationError, InferenceError...
        raise OnnxImportError(f"{src}: not a valid ONNX model ({type(e).__name__}: {str(e).strip()[:300]})") from None
    return model, src


def import_graph(path_or_bytes, static_inputs=None):
    """Import an ONNX model (a path or the file's bytes) as a gc.Graph with the file's input and output
    names and layout (NCHW); `gc.compile(g)(**feeds)` answers like onnxruntime's session.run(None, feeds).

    static_inputs: {name: array} freezes inputs that decide shapes (Reshape's shape, Clip's bounds given
    as inputs); they are no longer graph inputs."""
    model, src = load_model_proto(path_or_bytes)
    return Importer(model, static_inputs, src).convert()
