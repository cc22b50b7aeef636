"""Every op's gradient rule against central finite differences, in float64, through the generated
NumPy code: loss = mse(op(inputs), target) (or the loss op itself)."""
import zlib

import numpy as np
import pytest

import ir
from backends.numpy import compile_numpy
from ir.ops import emit

CHECKS_PER_INPUT = 12


def check_grads(build, shapes, seed=0, positive=(), labels=None, eps=1e-6, tol=2e-5, nondiff=()):
    """build(g, *input_values) -> output value; finite-difference every input in `shapes`."""
    rng = np.random.default_rng(seed)
    g = ir.Graph("fd")
    ins = [g.input(f"in{i}", s) for i, s in enumerate(shapes)]
    extra = []
    if labels is not None:
        extra.append(g.input("labels", (None,)))
    out = build(g, *ins, *extra)
    if out.shape != ():
        target = g.input("target", out.shape)
        out = emit("mse", out, target)
    g.output(out)
    batch = 3
    feed = {}
    for v in g.inputs:
        shape = v.type.concrete(batch)
        if v.name == "labels":
            feed[v.name] = rng.integers(0, labels, shape[0]).astype(np.float64)
        elif v.name in positive:
            feed[v.name] = rng.uniform(0.1, 1.0, shape)
        else:
            feed[v.name] = rng.standard_normal(shape)
    wrt = [v.name for v in ins if v.name not in nondiff]
    gg = ir.grad(g, wrt=wrt)
    fn = compile_numpy(gg, compute_dtype=np.float64)
    f = compile_numpy(g, compute_dtype=np.float64)
    res = fn(**feed)
    grads = res[1:]
    for name, gr in zip(wrt, grads):
        x = feed[name]
        assert gr.shape == x.shape
        idx = rng.choice(x.size, size=min(CHECKS_PER_INPUT, x.size), replace=False)
        for i in idx:
            xp, xm = x.copy(), x.copy()
            xp.flat[i] += eps
            xm.flat[i] -= eps
            num = (float(f(**{**feed, name: xp})) - float(f(**{**feed, name: xm}))) / (2 * eps)
            ana = gr.flat[i]
            assert abs(num - ana) <= tol * max(1.0, abs(num)), f"d/d{name}[{i}]: analytic {ana} vs numeric {num}"


CONV_CASES = [
    dict(stride=1, padding="valid", dilation=1),
    dict(stride=2, padding="valid", dilation=1),
    dict(stride=1, padding="same", dilation=1),
    dict(stride=2, padding="same", dilation=1),
    dict(stride=1, padding=((1, 0), (2, 1)), dilation=1),
    dict(stride=1, padding="valid", dilation=2),
    dict(stride=(2, 1), padding="same", dilation=(1, 2)),
]


@pytest.mark.parametrize("attrs", CONV_CASES)
@pytest.mark.parametrize("act", ["linear", "relu", "tanh"])
def test_conv2d(attrs, act):
    check_grads(lambda g, x, w, b: emit("conv2d", x, w, b, activation=act, **attrs),
                [(None, 7, 6, 2), (3, 2, 2, 3), (3,)], seed=zlib.crc32(str(attrs).encode()) % 1000)


@pytest.mark.parametrize("batch_shape", [(1,), (5,)])
def test_conv2d_batch_sizes(batch_shape):
    # explicit batch sizes 1 and 5 (fixed-batch graphs)
    n = batch_shape[0]
    check_grads(lambda g, x, w: emit("conv2d", x, w, stride=2, padding="same"),
                [(n, 5, 5, 2), (3, 3, 2, 2)])


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("pool,stride,padding", [(2, None, "valid"), (3, 1, "valid"), (3, 2, "same"),
                                                 (2, 1, ((0, 1), (1, 0))), ((2, 3), (1, 2), "valid")])
def test_pools(op, pool, stride, padding):
    check_grads(lambda g, x: emit(op, x, pool=pool, stride=stride, padding=padding), [(None, 7, 7, 2)])


def test_avg_pool_count_include_pad():
    check_grads(lambda g, x: emit("avg_pool2d", x, pool=3, stride=2, padding="same", count_include_pad=True),
                [(None, 6, 6, 2)])


def test_global_avg_pool():
    check_grads(lambda g, x: emit("global_avg_pool2d", x), [(None, 4, 5, 3)])


@pytest.mark.parametrize("act", ["linear", "relu", "sigmoid", "tanh"])
def test_dense(act):
    check_grads(lambda g, x, w, b: emit("dense", x, w, b, activation=act), [(None, 6), (6, 4), (4,)])


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul(ta, tb):
    a = (5, 4) if ta else (4, 5)
    b = (3, 5) if tb else (5, 3)
    check_grads(lambda g, x, y: emit("matmul", x, y, transpose_a=ta, transpose_b=tb), [a, b])


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("sa,sb", [((None, 3, 4), (None, 3, 4)), ((None, 3, 4), (4,)), ((None, 3, 4), (3, 1)),
                                   ((None, 1, 4), (None, 3, 1))])
def test_binary_broadcast(op, sa, sb):
    check_grads(lambda g, x, y: emit(op, x, y), [sa, sb])


@pytest.mark.parametrize("op", ["relu", "sigmoid", "tanh", "neg"])
def test_unary(op):
    check_grads(lambda g, x: emit(op, x), [(None, 4, 3)])


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmaxes(op, axis):
    check_grads(lambda g, x: emit(op, x, axis=axis), [(None, 4, 5)])


def test_shape_ops():
    check_grads(lambda g, x: emit("transpose", emit("reshape", emit("flatten", x), shape=(None, 6, 4)),
                                  perm=(0, 2, 1)), [(None, 2, 3, 4)])


def test_bias_add_and_scale():
    check_grads(lambda g, x, b: emit("scale", emit("bias_add", x, b), factor=-2.5), [(None, 3, 3, 4), (4,)])


def test_dropout_is_a_fixed_mask_given_seed_and_step():
    check_grads(lambda g, x, s: emit("dropout", x, s, rate=0.4, seed=7), [(None, 6, 5), ()], positive=("in1",))


@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_crossentropy(from_logits):
    check_grads(lambda g, p, y: emit("sparse_categorical_crossentropy", p, y, from_logits=from_logits),
                [(None, 5)], positive=() if from_logits else ("in0",), labels=5)


@pytest.mark.parametrize("from_logits", [True, False])
def test_categorical_crossentropy(from_logits):
    check_grads(lambda g, p, t: emit("categorical_crossentropy", p, emit("softmax", t), from_logits=from_logits),
                [(None, 5), (None, 5)], positive=("in0",) if not from_logits else (), nondiff=("in1",))


def test_mse():
    check_grads(lambda g, p, t: emit("mse", p, t), [(None, 4), (None, 4)], nondiff=("in1",))


def test_fan_in_accumulates():
    # x used three times: gradients must be summed
    check_grads(lambda g, x: emit("mul", emit("add", x, x), emit("tanh", x)), [(None, 5)])


def test_grad_of_unconnected_input_is_zero():
    g = ir.Graph("z")
    x = g.input("x", (None, 3))
    t = g.input("t", (None, 3))
    g.param("w", (3,))
    g.output(emit("mse", x, t))
    gg = ir.grad(g, wrt=["x", "w"])
    fn = compile_numpy(gg)
    loss, dx, dw = fn(x=np.ones((2, 3)), t=np.full((2, 3), 3.0))
    np.testing.assert_allclose(loss, 4.0)
    np.testing.assert_allclose(dx, np.full((2, 3), 2 * (1 - 3) / 6), rtol=1e-6)
    assert np.all(dw == 0)
