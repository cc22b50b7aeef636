"""Per-op lowering rules of the LLVM backend: node -> (kernel function, operand list).

Operands are value names (resolved to arena/argument addresses by codegen) or llvmlite constants
(a null pointer for an absent bias). Kernels come from backends/llvm/kernels; identical kernels are
generated once per module (KernelCache)."""
from __future__ import annotations

from llvmlite import ir as ll

from .kernels import conv, elementwise, loss, matmul, optimizer, pool

NULL = ll.Constant(ll.PointerType(), None)


def _conv_common(node):
    a = node.attrs
    return dict(stride=tuple(a["stride"]), padding=tuple(map(tuple, a["padding"])), dilation=tuple(a["dilation"]))


def lower_conv2d(cache, node, target):
    x, w = node.inputs[:2]
    has_bias = len(node.inputs) > 2
    spec = dict(in_hwc=tuple(x.shape[1:]), kernel_hw=tuple(w.shape[:2]), filters=w.shape[3], has_bias=has_bias,
                activation=node.attrs["activation"], **_conv_common(node))
    fn = cache.get(("conv2d", repr(spec)),
                   lambda m, name: conv.build_conv2d(m, name, target=target, **spec))
    return fn, [x.name, w.name, node.inputs[2].name if has_bias else NULL, node.outputs[0].name]


def lower_conv2d_grad_input(cache, node, target):
    dy, w = node.inputs
    spec = dict(in_hwc=tuple(node.attrs["input_shape"]), kernel_hw=tuple(w.shape[:2]), filters=w.shape[3],
                **_conv_common(node))
    fn = cache.get(("conv2d_grad_input", repr(spec)),
                   lambda m, name: conv.build_conv2d_grad_input(m, name, target=target, **spec))
    return fn, [dy.name, w.name, node.outputs[0].name]


def lower_conv2d_grad_filter(cache, node, target):
    x, dy = node.inputs
    spec = dict(in_hwc=tuple(x.shape[1:]), kernel_hw=tuple(node.attrs["kernel_hw"]), filters=dy.shape[3],
                **_conv_common(node))
    fn = cache.get(("conv2d_grad_filter", repr(spec)),
                   lambda m, name: conv.build_conv2d_grad_filter(m, name, target=target, **spec))
    return fn, [x.name, dy.name, node.outputs[0].name]


def lower_dense(cache, node, target):
    x, w = node.inputs[:2]
    has_bias = len(node.inputs) > 2
    spec = dict(in_features=w.shape[0], units=w.shape[1], has_bias=has_bias, activation=node.attrs["activation"])
    fn = cache.get(("dense", repr(spec)), lambda m, name: matmul.build_dense(m, name, target=target, **spec))
    return fn, [x.name, w.name, node.inputs[2].name if has_bias else NULL, node.outputs[0].name]


def lower_matmul(cache, node, target):
    a, b = node.inputs
    spec = dict(a_shape=tuple(a.shape), b_shape=tuple(b.shape), transpose_a=node.attrs["transpose_a"],
                transpose_b=node.attrs["transpose_b"])
    fn = cache.get(("matmul", repr(spec)), lambda m, name: matmul.build_matmul(m, name, target=target, **spec))
    return fn, [a.name, b.name, node.outputs[0].name]


LOWERINGS = {
    "conv2d": lower_conv2d,
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
    return spec


# op -> (kernel module, node -> builder kwargs); operands are the node's inputs then its output
SPECS = {
    **{op: (elementwise, lambda nd: dict(shape=_shape(nd.outputs[0])))
       for op in ("relu", "sigmoid", "tanh", "neg", "relu_grad", "sigmoid_grad", "tanh_grad", "bias_add")},
    "scale": (elementwise, lambda nd: dict(shape=_shape(nd.outputs[0]), factor=nd.attrs["factor"])),
    **{op: (elementwise, lambda nd: dict(a_shape=_shape(nd.inputs[0]), b_shape=_shape(nd.inputs[1])))
       for op in ("add", "sub", "mul")},
    "sum_to": (elementwise, lambda nd: dict(x_shape=_shape(nd.inputs[0]), out_shape=_shape(nd.outputs[0]))),
    "bias_add_grad": (elementwise, lambda nd: dict(shape=_shape(nd.inputs[0]))),
    "transpose": (elementwise, lambda nd: dict(in_shape=_shape(nd.inputs[0]), perm=tuple(nd.attrs["perm"]))),
    **{op: (elementwise, lambda nd: dict(shape=_shape(nd.inputs[0]), axis=nd.attrs["axis"]))
       for op in ("softmax", "log_softmax", "softmax_grad", "log_softmax_grad")},
    **{op: (pool, _pool_spec) for op in ("max_pool2d", "avg_pool2d", "max_pool2d_grad", "avg_pool2d_grad")},
    **{op: (pool, lambda nd: dict(in_hwc=_shape(nd.inputs[0])[1:] if nd.op == "global_avg_pool2d"
                                  else tuple(nd.attrs["input_shape"])))
       for op in ("global_avg_pool2d", "global_avg_pool2d_grad")},
    **{op: (loss, lambda nd: dict(num_classes=nd.inputs[0].shape[1], from_logits=nd.attrs["from_logits"]))
       for op in ("sparse_categorical_crossentropy", "sparse_categorical_crossentropy_grad",
                  "categorical_crossentropy", "categorical_crossentropy_grad")},
    **{op: (loss, lambda nd: dict(shape=_shape(nd.inputs[0]))) for op in ("mse", "mse_grad")},
}


def lower_generic(cache, node, target):
    module, spec_of = SPECS[node.op]
    spec = spec_of(node)
    build = getattr(module, f"build_{node.op}")
    fn = cache.get((node.op, repr(spec)), lambda m, name: build(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name]


def lower_dropout(cache, node, target):
    spec = dict(shape=_shape(node.inputs[0]), rate=node.attrs["rate"], seed=node.attrs["seed"],
                has_step=len(node.inputs) > 1, index_base=True)
    build = getattr(elementwise, f"build_{node.op}")
    fn = cache.get((node.op, repr(spec)), lambda m, name: build(m, name, target=target, **spec))
    # ("sample_base", k): codegen passes first_sample * k, the flat index of this call's first element,
    # so a batch split across threads draws exactly the unsplit batch's mask
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name, ("sample_base", node.inputs[0].type.numel(1))]


def lower_adam(cache, node, target):
    a = node.attrs
    spec = dict(size=node.inputs[0].type.numel(1), lr=a["lr"], beta_1=a["beta_1"], beta_2=a["beta_2"],
                epsilon=a["epsilon"])
    fn = cache.get(("adam", repr(spec)), lambda m, name: optimizer.build_adam_update(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs]


def lower_sgd(cache, node, target):
    a = node.attrs
    spec = dict(size=node.inputs[0].type.numel(1), lr=a["lr"], momentum=a["momentum"], nesterov=a["nesterov"],
                has_velocity=len(node.inputs) > 2)
    fn = cache.get(("sgd", repr(spec)), lambda m, name: optimizer.build_sgd_update(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs]


LOWERINGS.update({op: lower_generic for op in SPECS})
LOWERINGS.update({"dropout": lower_dropout, "dropout_grad": lower_dropout,
                  "adam_update": lower_adam, "sgd_update": lower_sgd})
