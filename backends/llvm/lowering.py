"""Per-op lowering rules of the LLVM backend: node -> (kernel function, operand list).

Operands are value names (resolved to arena/argument addresses by codegen) or llvmlite constants
(a null pointer for an absent bias). Kernels come from backends/llvm/kernels; identical kernels are
generated once per module (KernelCache)."""
from __future__ import annotations

from llvmlite import ir as ll

from .kernels import conv, matmul, pointwise, pooling

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


# -- memory-bound ops (kernels/pointwise.py, kernels/pooling.py) -----------------------------------

def _map(op):
    def lower(cache, node, target):
        spec = dict(op=op, in_shapes=tuple(tuple(v.shape) for v in node.inputs),
                    out_shape=tuple(node.outputs[0].shape))
        if op == "scale":
            spec["factor"] = node.attrs["factor"]
        fn = cache.get((op, repr(spec)), lambda m, name: pointwise.build_map(m, name, target=target, **spec))
        return fn, [v.name for v in node.inputs] + [node.outputs[0].name]
    return lower


def lower_sum_to(cache, node, target):
    spec = dict(x_shape=tuple(node.inputs[0].shape), out_shape=tuple(node.outputs[0].shape))
    fn = cache.get(("sum_to", repr(spec)), lambda m, name: pointwise.build_sum_to(m, name, target=target, **spec))
    return fn, [node.inputs[0].name, node.outputs[0].name]


def lower_bias_add_grad(cache, node, target):
    spec = dict(x_shape=tuple(node.inputs[0].shape), out_shape=tuple(node.outputs[0].shape))
    fn = cache.get(("sum_to", repr(spec)), lambda m, name: pointwise.build_sum_to(m, name, target=target, **spec))
    return fn, [node.inputs[0].name, node.outputs[0].name]


def lower_global_avg_pool2d(cache, node, target):
    x = node.inputs[0]
    h, w, c = x.shape[1:]
    spec = dict(x_shape=tuple(x.shape), out_shape=(None, 1, 1, c), scale=1.0 / (h * w))
    fn = cache.get(("gap", repr(spec)), lambda m, name: pointwise.build_sum_to(m, name, target=target, **spec))
    return fn, [x.name, node.outputs[0].name]


def lower_global_avg_pool2d_grad(cache, node, target):
    spec = dict(in_shape=tuple(node.attrs["input_shape"]))
    fn = cache.get(("gap_grad", repr(spec)),
                   lambda m, name: pointwise.build_global_avg_pool2d_grad(m, name, target=target, **spec))
    return fn, [node.inputs[0].name, node.outputs[0].name]


def lower_transpose(cache, node, target):
    spec = dict(in_shape=tuple(node.inputs[0].shape), perm=tuple(node.attrs["perm"]))
    fn = cache.get(("transpose", repr(spec)), lambda m, name: pointwise.build_transpose(m, name, target=target, **spec))
    return fn, [node.inputs[0].name, node.outputs[0].name]


def lower_dropout(cache, node, target):
    has_step = len(node.inputs) > 1
    spec = dict(shape=tuple(node.inputs[0].shape), rate=node.attrs["rate"], seed=node.attrs["seed"], has_step=has_step)
    fn = cache.get(("dropout", repr(spec)), lambda m, name: pointwise.build_dropout(m, name, target=target, **spec))
    # ("sample_base", k): codegen passes first_sample * k, the flat index of this call's first element
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name, ("sample_base", node.inputs[0].type.numel(1))]


def lower_softmax(cache, node, target):
    spec = dict(op=node.op, shape=tuple(node.inputs[0].shape), axis=node.attrs["axis"])
    fn = cache.get((node.op, repr(spec)), lambda m, name: pointwise.build_softmax(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name]


def lower_loss(cache, node, target):
    k = node.inputs[0].type.numel(1) if node.op.startswith("mse") else node.inputs[0].shape[1]
    spec = dict(op=node.op, k=k, from_logits=node.attrs.get("from_logits", False))
    fn = cache.get((node.op, repr(spec)), lambda m, name: pointwise.build_loss(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name]


def lower_pool(cache, node, target):
    a = node.attrs
    x_shape = node.outputs[0].shape[1:] if node.op.endswith("_grad") else node.inputs[0].shape[1:]
    out_hw = (node.inputs[-1].shape[1:3] if node.op.endswith("_grad") else node.outputs[0].shape[1:3])
    spec = dict(op=node.op, in_shape=tuple(x_shape), out_hw=tuple(out_hw), pool=tuple(a["pool"]),
                stride=tuple(a["stride"]), padding=tuple(map(tuple, a["padding"])),
                count_include_pad=a.get("count_include_pad", False))
    fn = cache.get((node.op, repr(spec)), lambda m, name: pooling.build_pool(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [node.outputs[0].name]


def lower_adam(cache, node, target):
    a = node.attrs
    spec = dict(size=node.inputs[0].type.numel(1), lr=a["lr"], beta_1=a["beta_1"], beta_2=a["beta_2"],
                epsilon=a["epsilon"])
    fn = cache.get(("adam", repr(spec)), lambda m, name: pointwise.build_adam(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [NULL]


def lower_sgd(cache, node, target):
    a = node.attrs
    spec = dict(size=node.inputs[0].type.numel(1), lr=a["lr"], momentum=a["momentum"], nesterov=a["nesterov"],
                has_velocity=len(node.inputs) > 2)
    fn = cache.get(("sgd", repr(spec)), lambda m, name: pointwise.build_sgd(m, name, target=target, **spec))
    return fn, [v.name for v in node.inputs] + [NULL]


for _op in ("relu", "sigmoid", "tanh", "neg", "scale", "relu_grad", "sigmoid_grad", "tanh_grad", "add", "sub",
            "mul", "bias_add"):
    LOWERINGS[_op] = _map(_op)
LOWERINGS.update({
    "sum_to": lower_sum_to, "bias_add_grad": lower_bias_add_grad,
    "global_avg_pool2d": lower_global_avg_pool2d, "global_avg_pool2d_grad": lower_global_avg_pool2d_grad,
    "transpose": lower_transpose, "dropout": lower_dropout, "dropout_grad": lower_dropout,
    "softmax": lower_softmax, "log_softmax": lower_softmax, "softmax_grad": lower_softmax,
    "log_softmax_grad": lower_softmax,
    "max_pool2d": lower_pool, "avg_pool2d": lower_pool, "max_pool2d_grad": lower_pool, "avg_pool2d_grad": lower_pool,
    "adam_update": lower_adam, "sgd_update": lower_sgd,
})
for _op in ("sparse_categorical_crossentropy", "categorical_crossentropy", "mse"):
    LOWERINGS[_op] = lower_loss
    LOWERINGS[_op + "_grad"] = lower_loss
