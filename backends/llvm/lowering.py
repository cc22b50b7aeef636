"""Per-op lowering rules of the LLVM backend: node -> (kernel function, operand list).

Operands are value names (resolved to arena/argument addresses by codegen), llvmlite constants (a null
pointer for an absent bias) or codegen tokens: SCRATCH (the kernel's scratch memory) and
("sample_base", k). Kernels come from backends/llvm/kernels; identical kernels are
generated once per module (KernelCache)."""
from __future__ import annotations

from llvmlite import ir as ll

from ir.ops import activations as activation_table
from ir.ops import get_op, in_place_update_ops

from .codegen import LoweringError
from .kernels import augment, conv, depthwise, elementwise, loss, matmul, norm, optimizer, pool, quant
from .kernels import reduce as reduce_kernels
from .kernels import shape as shape_kernels

NULL = ll.Constant(ll.PointerType(), None)
# operand: this call's scratch memory (codegen points it at the arena's scratch region, sized for the
# largest scratch_need of the graph's kernels)
SCRATCH = ("scratch",)


def _conv_common(node):
    a = node.attrs
    return dict(stride=tuple(a["stride"]), padding=tuple(map(tuple, a["padding"])), dilation=tuple(a["dilation"]))


def _weights(cache, kind, spec, build, sources):
    """(packing, weight operand) of a GEMM kernel: its weights packed per call (the weight value's name), or,
    when codegen may pre-pack (cache.prepack: the graph's leaves keep their values between the calls that
    share a packing, see codegen.lower_graph) and every source is a leaf, the token ("packed", pack
    kernel, source names): a derived argument that the kernel's own pack_only variant fills once."""
    if not (cache.prepack and all(v.kind in ("param", "const") for v in sources)):
        return "per_call", sources[0].name
    pack = cache.get((f"{kind}_pack", repr(spec)), lambda m, name: build(m, name, packing="pack_only"),
                     exported=True)
    return "prepacked", ("packed", pack, tuple(v.name for v in sources))


def lower_conv2d(cache, node, target, split_rows=False):
    """conv2d and conv2d_max_pool (the same kernel with its `pool` window). split_rows: the kernel variant
    computing one part of the output pixels (intra-op parallelism, codegen's team entry), which takes
    (part, parts) before n."""
    x, w = node.inputs[:2]
    has_bias, has_residual = len(node.inputs) > 2, len(node.inputs) > 3
    spec = dict(in_hwc=tuple(x.shape[1:]), kernel_hw=tuple(w.shape[:2]), filters=w.shape[3], has_bias=has_bias,
                has_residual=has_residual, activation=node.attrs["activation"],
                activation_params=node.attrs["activation_params"], **_conv_common(node))
    if node.op == "conv2d_max_pool":
        spec["pool"] = tuple(node.attrs["pool"])
    if node.attrs.get("groups", 1) != 1:
        raise LoweringError(f"LLVM backend: grouped conv2d %{node.name} must be split by the "
                            f"decompose_grouped_conv pass first (it is in the inference and training pipelines)")
    packing, w_operand = _weights(cache, "conv2d", spec,
                                  lambda m, name, **kw: conv.build_conv2d(m, name, target=target, **kw, **spec), [w])
    fn = cache.get((node.op + ("_rows" if split_rows else ""), repr(spec), packing),
                   lambda m, name: conv.build_conv2d(m, name, target=target, split_rows=split_rows, packing=packing,
                                                     **spec))
    return fn, [x.name, w_operand, node.inputs[2].name if has_bias else NULL,
                node.inputs[3].name if has_residual else NULL, node.outputs[0].name, SCRATCH]


def lower_depthwise_conv2d(cache, node, target):
    x, w = node.inputs[:2]
    has_bias = len(node.inputs) > 2
    spec = dict(in_hwc=tuple(x.shape[1:]), kernel_shape=tuple(w.shape), has_bias=has_bias,
                activation=node.attrs["activation"], activation_params=node.attrs["activation_params"],
                **_conv_common(node))
    fn = cache.get(("depthwise_conv2d", repr(spec)),
                   lambda m, name: depthwise.build_depthwise_conv2d(m, name, target=target, **spec))
    return fn, [x.name, w.name, node.inputs[2].name if has_bias else NULL, node.outputs[0].name]


def lower_conv2d_grad_input(cache, node, target):
    dy, w = node.inputs
    spec = dict(in_hwc=tuple(node.attrs["input_shape"]), kernel_hw=tuple(w.shape[:2]), filters=w.shape[3],
                **_conv_common(node))
    fn = cache.get(("conv2d_grad_input", repr(spec)),
                   lambda m, name: conv.build_conv2d_grad_input(m, name, target=target, **spec))
    return fn, [dy.name, w.name, node.outputs[0].name, SCRATCH]


def lower_conv2d_grad_filter(cache, node, target):
    x, dy = node.inputs
    spec = dict(in_hwc=tuple(x.shape[1:]), kernel_hw=tuple(node.attrs["kernel_hw"]), filters=dy.shape[3],
                **_conv_common(node))
    fn = cache.get(("conv2d_grad_filter", repr(spec)),
                   lambda m, name: conv.build_conv2d_grad_filter(m, name, target=target, **spec))
    return fn, [x.name, dy.name, node.outputs[0].name, SCRATCH]


def lower_dense(cache, node, target):
    x, w = node.inputs[:2]
    has_bias = len(node.inputs) > 2
    spec = dict(in_features=w.shape[0], units=w.shape[1], has_bias=has_bias, activation=node.attrs["activation"],
                activation_params=node.attrs["activation_params"])
    packing, w_operand = _weights(cache, "dense", spec,
                                  lambda m, name, **kw: matmul.build_dense(m, name, target=target, **kw, **spec), [w])
    fn = cache.get(("dense", repr(spec), packing),
                   lambda m, name: matmul.build_dense(m, name, target=target, packing=packing, **spec))
    return fn, [x.name, w_operand, node.inputs[2].name if has_bias else NULL, node.outputs[0].name, SCRATCH]


def lower_matmul(cache, node, target):
    a, b = node.inputs
    spec = dict(a_shape=tuple(a.shape), b_shape=tuple(b.shape), transpose_a=node.attrs["transpose_a"],
                transpose_b=node.attrs["transpose_b"])
    fn = cache.get(("matmul", repr(spec)), lambda m, name: matmul.build_matmul(m, name, target=target, **spec))
    return fn, [a.name, b.name, node.outputs[0].name, SCRATCH]


def _requant_spec(node):
    """The quantization attributes of a conv2d_q / dense_q node as its kernel's keywords."""
    a = node.attrs
    return dict(x_dtype=node.inputs[0].dtype, x_scale=a["x_scale"], x_zero_point=a["x_zero_point"],
                w_scale=tuple(a["w_scale"]), y_scale=a["y_scale"], y_zero_point=a["y_zero_point"], dtype=a["dtype"],
                y_min=a["y_min"], y_max=a["y_max"], has_bias=len(node.inputs) > 2)


def lower_conv2d_q(cache, node, target):
    x, w = node.inputs[:2]
    spec = dict(in_hwc=tuple(x.shape[1:]), kernel_hw=tuple(w.shape[:2]), filters=w.shape[3], **_conv_common(node),
                **_requant_spec(node))
    if len(node.inputs) > 3:
        r = node.inputs[3]
        spec.update(r_dtype=r.dtype, r_scale=node.attrs["r_scale"], r_zero_point=node.attrs["r_zero_point"])
    fn, operands = _lower_int_gemm(cache, node, "conv2d_q", spec, lambda m, name, **kw: quant.build_conv2d_q(
        m, name, target=target, **kw, **spec))
    return fn, operands[:3] + [node.inputs[3].name if len(node.inputs) > 3 else NULL] + operands[3:]


def _lower_int_gemm(cache, node, kind, spec, build):
    """conv2d_q / dense_q: the weights and the bias (folded with the zero points) are packed together."""
    x = node.inputs[0]
    # weights and bias only (a conv2d_q residual, inputs[3], is an activation)
    packing, w_operand = _weights(cache, kind, spec, build, node.inputs[1:3])
    fn = cache.get((kind, repr(spec), packing), lambda m, name: build(m, name, packing=packing))
    bias = node.inputs[2].name if spec["has_bias"] and packing == "per_call" else NULL
    return fn, [x.name, w_operand, bias, node.outputs[0].name, SCRATCH]


def lower_dense_q(cache, node, target):
    x, w = node.inputs[:2]
    spec = dict(in_features=w.shape[0], units=w.shape[1], **_requant_spec(node))
    return _lower_int_gemm(cache, node, "dense_q", spec, lambda m, name, **kw: quant.build_dense_q(
        m, name, target=target, **kw, **spec))


LOWERINGS = {
    "conv2d_q": lower_conv2d_q,
    "dense_q": lower_dense_q,
    "conv2d": lower_conv2d,
    "conv2d_max_pool": lower_conv2d,
    "depthwise_conv2d": lower_depthwise_conv2d,
    "conv2d_grad_input": lower_conv2d_grad_input,
    "conv2d_grad_filter": lower_conv2d_grad_filter,
    "dense": lower_dense,
    "matmul": lower_matmul,
}


# -- memory-bound ops (kernels/elementwise.py, pool.py, loss.py, optimizer.py) -------------------------

def _shape(v):
    return tuple(v.shape)


def _pool_spec(node):
    a = node.attrs
    x = node.outputs[0] if node.op.endswith("_grad") else node.inputs[0]
    spec = dict(in_hwc=_shape(x)[1:], pool=tuple(a["pool"]), stride=tuple(a["stride"]),
                padding=tuple(map(tuple, a["padding"])))
    if node.op.startswith("avg"):
        spec["count_include_pad"] = a["count_include_pad"]
    if node.op == "max_pool2d_grad" and a["relu_mask"]:
        spec["relu_mask"] = True
    if node.op == "max_pool2d" and x.dtype != "f32":       # int8 values (codegen's QUANTIZED_LOWERINGS)
        spec["dtype"] = x.dtype
    return spec


def _has_weight(node):
    """A loss node with its optional per-sample weight operand."""
    return len(node.inputs) > get_op(node.op).n_fixed


# op -> (kernel module, node -> builder kwargs); operands are the node's inputs then its output
SPECS = {
    **{op: (elementwise, lambda nd: dict(shape=_shape(nd.outputs[0]))) for op in ("neg", "bias_add")},
    "scale": (elementwise, lambda nd: dict(shape=_shape(nd.outputs[0]), factor=nd.attrs["factor"])),
    **{op: (elementwise, lambda nd: dict(a_shape=_shape(nd.inputs[0]), b_shape=_shape(nd.inputs[1])))
       for op in ("add", "sub", "mul", "div")},
    "sum_to": (elementwise, lambda nd: dict(x_shape=_shape(nd.inputs[0]), out_shape=_shape(nd.outputs[0]))),
    "bias_add_grad": (elementwise, lambda nd: dict(shape=_shape(nd.inputs[0]))),
    "transpose": (elementwise, lambda nd: dict(in_shape=_shape(nd.inputs[0]), perm=tuple(nd.attrs["perm"]))),
    **{op: (elementwise, lambda nd: dict(shape=_shape(nd.inputs[0]), axis=nd.attrs["axis"]))
       for op in ("softmax", "log_softmax", "softmax_grad", "log_softmax_grad")},
    **{op: (pool, _pool_spec) for op in ("max_pool2d", "avg_pool2d", "max_pool2d_grad", "avg_pool2d_grad")},
    "global_avg_pool2d": (pool, lambda nd: dict(in_hwc=_shape(nd.inputs[0])[1:], dtype=nd.inputs[0].dtype)),
    "global_avg_pool2d_grad": (pool, lambda nd: dict(in_hwc=tuple(nd.attrs["input_shape"]))),
    **{op: (loss, lambda nd: dict(num_classes=nd.inputs[0].shape[1], from_logits=nd.attrs["from_logits"],
                                  has_weight=_has_weight(nd)))
       for op in ("sparse_categorical_crossentropy", "sparse_categorical_crossentropy_grad",
                  "categorical_crossentropy", "categorical_crossentropy_grad",
                  "binary_crossentropy", "binary_crossentropy_grad")},
    **{op: (loss, lambda nd: dict(shape=_shape(nd.inputs[0]), has_weight=_has_weight(nd)))
       for op in ("mse", "mse_grad")},
    # int8 (kernels/quant.py)
    "quantize": (quant, lambda nd: dict(shape=_shape(nd.inputs[0]), scale=nd.attrs["scale"],
                                        zero_point=nd.attrs["zero_point"], dtype=nd.attrs["dtype"])),
    "dequantize": (quant, lambda nd: dict(shape=_shape(nd.inputs[0]), scale=nd.attrs["scale"],
                                          zero_point=nd.attrs["zero_point"], dtype=nd.inputs[0].dtype)),
    # CNN ops: kernels/norm.py, reduce.py, shape.py, depthwise.py
    **{op: (norm, lambda nd: dict(shape=_shape(nd.inputs[0]), epsilon=nd.attrs["epsilon"]))
       for op in ("batch_norm", "batch_norm_train", "batch_norm_train_grad")},
    "batch_norm_scale": (norm, lambda nd: dict(channels=nd.inputs[0].shape[0], epsilon=nd.attrs["epsilon"])),
    "rsqrt": (norm, lambda nd: dict(shape=_shape(nd.outputs[0]))),
    **{op: (reduce_kernels, lambda nd: dict(x_shape=_shape(nd.inputs[0]), axis=tuple(nd.attrs["axis"])))
       for op in ("reduce_sum", "reduce_mean")},
    "reduce_grad": (reduce_kernels, lambda nd: dict(out_shape=_shape(nd.outputs[0]), axis=tuple(nd.attrs["axis"]),
                                            mean=nd.attrs["mean"])),
    "global_max_pool2d": (reduce_kernels, lambda nd: dict(in_hwc=_shape(nd.inputs[0])[1:], dtype=nd.inputs[0].dtype)),
    "global_max_pool2d_grad": (reduce_kernels, lambda nd: dict(in_hwc=_shape(nd.inputs[0])[1:])),
    "concat": (shape_kernels, lambda nd: dict(shapes=[_shape(v) for v in nd.inputs], axis=nd.attrs["axis"])),
    "slice": (shape_kernels, lambda nd: dict(in_shape=_shape(nd.inputs[0]), axis=nd.attrs["axis"], start=nd.attrs["start"],
                                     stop=nd.attrs["stop"])),
    "slice_grad": (shape_kernels, lambda nd: dict(dy_shape=_shape(nd.inputs[0]), axis=nd.attrs["axis"],
                                                  start=nd.attrs["start"], size=nd.attrs["size"])),
    "pad": (shape_kernels, lambda nd: dict(in_hwc=_shape(nd.inputs[0])[1:], padding=tuple(map(tuple, nd.attrs["padding"])),
                                   value=nd.attrs["value"])),
    "pad_grad": (shape_kernels, lambda nd: dict(in_hwc=_shape(nd.outputs[0])[1:],
                                        padding=tuple(map(tuple, nd.attrs["padding"])))),
    "depthwise_conv2d_grad_input": (depthwise, lambda nd: dict(
        in_hwc=_shape(nd.outputs[0])[1:], kernel_shape=_shape(nd.inputs[1]), **_conv_common(nd))),
    "depthwise_conv2d_grad_filter": (depthwise, lambda nd: dict(
        in_hwc=_shape(nd.inputs[0])[1:], kernel_shape=tuple(nd.attrs["kernel_shape"]), **_conv_common(nd))),
}


def lower_generic(cache, node, target):
    module, spec_of = SPECS[node.op]
    spec = spec_of(node)
    build = getattr(module, f"build_{node.op}")
    fn = cache.get((node.op, repr(spec)), lambda m, name: build(m, name, target=target, **spec))
    operands = [v.name for v in node.inputs] + [v.name for v in node.outputs]      # every output buffer
    # a kernel built with a scratch argument (KernelBuilder(scratch_arg=True)) gets the shared region
    return fn, operands + ([SCRATCH] if any(a.name == "scratch" for a in fn.args) else [])


def lower_activation(cache, node, target):
    """A table activation (or its `_grad` op): its parameters are the node's attributes."""
    spec = activation_table.GRAD_OPS.get(node.op) or activation_table.TABLE[node.op]
    args = dict(kind=spec.name, params=spec.normalize(node.attrs, node.op), shape=_shape(node.outputs[0]))
    build = elementwise.build_activation_grad if node.op == spec.grad_op else elementwise.build_activation
    fn = cache.get((node.op, repr(args)), lambda m, name: build(m, name, target=target, **args))
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name]


def lower_dropout(cache, node, target):
    spec = dict(shape=_shape(node.inputs[0]), rate=node.attrs["rate"], seed=node.attrs["seed"],
                has_step=len(node.inputs) > 1, index_base=True)
    build = getattr(elementwise, f"build_{node.op}")
    fn = cache.get((node.op, repr(spec)), lambda m, name: build(m, name, target=target, **spec))
    # ("sample_base", k): codegen passes first_sample * k, the flat index of this call's first element,
    # so a batch split across threads draws exactly the unsplit batch's mask
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name, ("sample_base", node.inputs[0].type.numel(1))]


def lower_update(cache, node, target):
    """Optimizer updates: one builder per op (optimizer.build_<op>), the node's settings as its keywords."""
    spec = dict(size=node.inputs[0].type.numel(1), **node.attrs)
    build = getattr(optimizer, f"build_{node.op}")
    fn = cache.get((node.op, repr(sorted(spec.items()))), lambda m, name: build(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs]


LOWERINGS.update({op: lower_generic for op in SPECS})
LOWERINGS.update({op: lower_activation for op in activation_table.NAMES if op != "linear"})
LOWERINGS.update({op: lower_activation for op in activation_table.GRAD_OPS})
LOWERINGS.update({"dropout": lower_dropout, "dropout_grad": lower_dropout})
LOWERINGS.update({op: lower_update for op in in_place_update_ops()})


def lower_augment(cache, node, target):
    """random_flip / random_translation(_grad): per-image draws keyed by the image's index in the whole
    batch, so the kernel takes the call's first sample as its `base` (("sample_base", 1))."""
    spec = dict(shape=_shape(node.inputs[0]), has_step=len(node.inputs) > 1,
                **{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in node.attrs.items()})
    build = getattr(augment, f"build_{node.op}")
    fn = cache.get((node.op, repr(sorted(spec.items()))), lambda m, name: build(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name, ("sample_base", 1)]


LOWERINGS.update({op: lower_augment for op in ("random_flip", "random_translation", "random_translation_grad")})
