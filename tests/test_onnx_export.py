"""gc.onnx.export and `graphcnn export`: the file passes onnx.checker and ONNX Runtime answers like
graphcnn (1e-5), NCHW at the boundary by default, NHWC on request; export -> import round trips."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphcnn as gc
from graphcnn.cli import main
from graphcnn.onnx import OnnxExportError, export, import_graph
from ir.ops import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    sp = importlib.util.spec_from_file_location(f"ex_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(sp)
    sp.loader.exec_module(mod)
    return mod.model


def run_ort(path, feeds):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def mnist_model():
    """examples/mnist_cnn.py with non-zero biases (initial weights have zero biases, which would hide a
    misplaced bias)."""
    m = load_example("mnist_cnn")
    m.compile(backend="numpy")
    rng = np.random.default_rng(0)
    m.set_weights({k: rng.uniform(-0.2, 0.2, v.shape) for k, v in m.get_weights().items() if v.ndim == 1})
    return m


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_mnist_cnn_ort_matches_graphcnn_nchw(mnist_model, tmp_path, opset):
    path = str(tmp_path / "m.onnx")
    export(mnist_model, path, opset=opset)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", 1, 28, 28]
    x = np.random.default_rng(1).random((5, 28, 28, 1), np.float32)
    want = mnist_model.predict(x)
    got = run_ort(path, {model.graph.input[0].name: x.transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # NCHW throughout: no transposes (the Gemm's rows are permuted to the NCHW flatten order instead)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool",
                                                     "Flatten", "Gemm", "Softmax", "Identity"]


def test_mnist_cnn_nhwc_layout_and_round_trip(mnist_model, tmp_path):
    path = str(tmp_path / "m.onnx")
    export(mnist_model, path, layout="nhwc")
    x = np.random.default_rng(2).random((3, 28, 28, 1), np.float32)
    want = mnist_model.predict(x)
    name = onnx.load(path).graph.input[0].name
    np.testing.assert_allclose(run_ort(path, {name: x})[0], want, rtol=1e-5, atol=1e-7)
    # export (NCHW) -> import: graphcnn again, with the same numbers
    export(mnist_model, str(tmp_path / "c.onnx"))
    g = import_graph(str(tmp_path / "c.onnx"))
    for backend in ("numpy", "llvm"):
        np.testing.assert_allclose(gc.compile(g, backend=backend)(**{name: x.transpose(0, 3, 1, 2)}), want,
                                   rtol=1e-5, atol=1e-7)


def test_cnn_ops_graph_exports(tmp_path):
    """depthwise, grouped conv, batch norm, pad, concat, pools, reduce_mean, div and softmax through ONNX."""
    rng = np.random.default_rng(4)
    g = gc.Graph("ops")
    x = g.input("x", (None, 9, 7, 4))
    c = lambda a: g.const(None, a.astype(np.float32))  # noqa: E731
    y = gc.ops.depthwise_conv2d(x, c(rng.standard_normal((3, 3, 4, 2))), c(rng.standard_normal(8)), padding="same")
    y = gc.ops.batch_norm(y, c(rng.uniform(0.5, 1.5, 8)), c(rng.standard_normal(8)), c(rng.standard_normal(8)),
                          c(rng.uniform(0.5, 2, 8)))
    y = gc.ops.relu(y)
    z = gc.ops.conv2d(gc.ops.pad(y, ((1, 0), (0, 2))), c(rng.standard_normal((3, 3, 4, 6))), stride=(2, 1), groups=2)
    z = gc.ops.max_pool2d(z, 2, stride=1)
    w = gc.ops.avg_pool2d(gc.ops.conv2d(y, c(rng.standard_normal((1, 1, 8, 6)))), 3, stride=2, padding="same",
                          count_include_pad=True)
    m = gc.ops.concat([gc.ops.global_max_pool2d(z), gc.ops.global_avg_pool2d(w),
                       gc.ops.reduce_mean(y, axis=(1, 2))], axis=-1)
    out = gc.ops.softmax(gc.ops.dense(gc.ops.tanh(m), c(rng.standard_normal((20, 5)))))
    g.output(out, z)
    fn = gc.compile(g, backend="numpy")
    xs = rng.standard_normal((2, 9, 7, 4)).astype(np.float32)
    want = fn(x=xs)
    for opset in (13, 18):
        path = str(tmp_path / f"ops{opset}.onnx")
        export(g, path, opset=opset)
        got = run_ort(path, {"x": xs.transpose(0, 3, 1, 2)})
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1].transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_export_errors_and_atomic_write(mnist_model, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxExportError, match="opset"):
        export(mnist_model, str(path), opset=7)
    with pytest.raises(OnnxExportError, match="layout"):
        export(mnist_model, str(path), layout="nwhc")
    g = gc.Graph("p")
    x = g.input("x", (None, 4))
    g.output(gc.ops.dense(x, g.param("w", (4, 2))))
    with pytest.raises(OnnxExportError, match=r"no value for param %w"):
        export(g, str(path))
    g2 = gc.Graph("loss")
    p = g2.input("p", (None, 3))
    g2.output(gc.ops.mse(p, g2.input("t", (None, 3))))
    with pytest.raises(OnnxExportError, match="op 'mse' has no ONNX export rule"):
        export(g2, str(path))
    assert os.listdir(tmp_path) == []          # nothing half-written left behind


def test_cli_export(tmp_path, capsys):
    out = str(tmp_path / "cli.onnx")
    assert main(["export", os.path.join(ROOT, "examples", "mnist_cnn.py"), "-o", out, "--opset", "18"]) == 0
    onnx.checker.check_model(onnx.load(out))
    assert main(["export", os.path.join(ROOT, "examples", "mnist_cnn.py"), "-o", out, "--opset", "3"]) == 2
    assert "opset" in capsys.readouterr().err
    # an .onnx MODEL: show and re-export
    src = os.path.join(ROOT, "tests", "data", "onnx", "resnet_tiny.onnx")
    assert main(["show", src]) == 0
    again = str(tmp_path / "again.onnx")
    assert main(["export", src, "-o", again]) == 0
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(again, {"input": x})[0], run_ort(src, {"input": x})[0], rtol=1e-5, atol=1e-6)


def randomized(model, seed):
    """The model with every 1-D weight (biases, batch-norm gamma/beta/mean/var) random, so a misplaced
    bias or statistic cannot hide behind Keras's zero/one initial values."""
    model.build()
    rng = np.random.default_rng(seed)
    model.set_weights({k: (rng.uniform(0.5, 2.0, v.shape) if k.endswith(("variance", "var", "gamma")) else
                           rng.uniform(-0.3, 0.3, v.shape)) for k, v in model.get_weights().items() if v.ndim == 1})
    return model


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("example", ["resnet8", "mobilenet_tiny"])
def test_cnn_examples_export_and_ort_matches_graphcnn(example, backend, tmp_path):
    """batch norm, depthwise conv, residual adds, clip (relu6) fused into convs, global pooling."""
    m = randomized(load_example(example), 7)
    m.compile(backend=backend)
    path = str(tmp_path / f"{example}.onnx")
    export(m, path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert "Transpose" not in [n.op_type for n in proto.graph.node]       # NCHW from input to output
    x = np.random.default_rng(8).random((4,) + m.input_shape, np.float32)
    want = m.predict(x)
    got = run_ort(path, {proto.graph.input[0].name: x.transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_activation_table_slice_reduce_sum_and_transposed_conv_export(tmp_path):
    """leaky_relu and clip fused into conv/dense and standalone, a channel slice, reduce_sum (kept and
    not), rsqrt, div, and conv2d_grad_input (ONNX ConvTranspose) through ONNX Runtime."""
    rng = np.random.default_rng(11)
    g = gc.Graph("acts")
    x = g.input("x", (None, 8, 6, 3))
    c = lambda a: g.const(None, np.asarray(a, np.float32))  # noqa: E731
    y = gc.ops.conv2d(x, c(rng.standard_normal((3, 3, 3, 6))), c(rng.standard_normal(6)), padding="same")
    y = gc.ops.leaky_relu(y, alpha=0.2)                                  # fused into the conv
    z = gc.ops.clip(emit("slice", y, axis=-1, start=1, stop=5), 0.0, 0.8)  # standalone (slice between)
    z = gc.ops.leaky_relu(gc.ops.mul(z, z), alpha=0.05)                   # standalone
    up = emit("conv2d_grad_input", z, c(rng.standard_normal((3, 3, 2, 4))), stride=(2, 2),
              padding=((1, 1), (0, 1)), dilation=(1, 1), input_shape=(15, 12, 2))
    s = gc.ops.reduce_sum(up, axis=(1, 2), keepdims=True)
    r = emit("rsqrt", gc.ops.add(gc.ops.mul(s, s), c(1.0)))
    h = gc.ops.flatten(gc.ops.mul(up, r))
    d = gc.ops.clip(gc.ops.dense(h, c(rng.standard_normal((h.shape[1], 5)) * 0.1), c(rng.standard_normal(5))),
                    None, 0.5)                                           # fused, upper bound only
    q = emit("div", up, gc.ops.add(gc.ops.mul(s, s), c(1.0)))              # 4-D div, broadcast (N,1,1,C)
    g.output(d, gc.ops.reduce_sum(z, axis=(1, 2)), up, q)
    xs = rng.standard_normal((3, 8, 6, 3)).astype(np.float32)
    path = str(tmp_path / "acts.onnx")
    export(g, path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert {"LeakyRelu", "Clip", "Slice", "ReduceSum", "ConvTranspose", "Reciprocal", "Div"} <= set(ops)
    got = run_ort(path, {"x": xs.transpose(0, 3, 1, 2)})
    for backend in ("numpy", "llvm"):
        want = gc.compile(g, backend=backend)(x=xs)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[2], want[2].transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[3], want[3].transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
