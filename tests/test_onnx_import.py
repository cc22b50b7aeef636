"""gc.onnx.import_graph on CNN classifiers exported by torch.onnx.export (tests/data/onnx/make_models.py,
random weights): both backends match ONNX Runtime within 1e-4 relative, and the compiled graphs hold no
transposes inside (at most one at each graph input and output). Plus the importer's errors."""
from __future__ import annotations

import glob
import os

import numpy as np
import onnx  # noqa: F401  (the test extra installs onnx and onnxruntime: these tests run in CI)
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphcnn as gc
from graphcnn.onnx import OnnxImportError, import_graph
from ir.ops import view_ops
from ir.passes import run_pipeline

DATA = os.path.join(os.path.dirname(__file__), "data", "onnx")
MODELS = sorted(glob.glob(os.path.join(DATA, "*.onnx")))


def ort_run(model, feeds):
    src = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def interior_transposes(graph) -> list:
    """Transpose nodes of the optimized graph that neither read a graph input nor feed (through views)
    only graph outputs."""
    g = run_pipeline(graph, "inference").graph
    outputs = {v.name for v in g.outputs}
    users = g.users()
    views = view_ops()

    def reaches_only_outputs(v):
        if v.name in outputs:
            return True
        us = users[v.name]
        return bool(us) and all(u.op in views and reaches_only_outputs(u.outputs[0]) for u in us)

    def from_input(v):
        while v.producer is not None and v.producer.op in views:
            v = v.producer.inputs[0]
        return v.kind == "input"

    return [n for n in g.nodes if n.op == "transpose" and not from_input(n.inputs[0])
            and not reaches_only_outputs(n.outputs[0])]


def test_models_present():
    assert len(MODELS) >= 5, MODELS
    assert sum(os.path.getsize(p) for p in MODELS) < 1_000_000


@pytest.mark.parametrize("path", MODELS, ids=[os.path.basename(p)[:-5] for p in MODELS])
def test_imported_cnn_has_no_interior_transposes(path):
    g = import_graph(path)
    assert [v.name for v in g.inputs] == ["input"] and [v.name for v in g.outputs] == ["logits"]
    assert g.inputs[0].shape == (None, 3, 16, 16)          # NCHW at the boundary, dynamic batch
    assert interior_transposes(g) == []
    opt = run_pipeline(g, "inference").graph
    assert sum(n.op == "transpose" for n in opt.nodes) <= 2


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("path", MODELS, ids=[os.path.basename(p)[:-5] for p in MODELS])
def test_imported_cnn_matches_onnxruntime(path, backend):
    g = import_graph(path)
    fn = gc.compile(g, backend=backend)
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        want = ort_run(path, {"input": x})[0]
        got = fn(input=x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_bytes_and_path_agree():
    path = MODELS[0]
    with open(path, "rb") as f:
        data = f.read()
    assert import_graph(data) == import_graph(path)


# -- hand-built models: folding, static inputs and errors ---------------------------------------------------

def make(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def i64(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def test_reshape_shape_input_must_be_frozen():
    m = make([helper.make_node("Reshape", ["x", "s"], ["y"])], [f32("x", ["N", 2, 3]), i64("s", [2])],
             [f32("y", ["N", 6])])
    with pytest.raises(OnnxImportError, match=r"graph input 's' has element type INT64.*static_inputs"):
        import_graph(m.SerializeToString())
    g = import_graph(m.SerializeToString(), static_inputs={"s": np.array([0, -1], np.int64)})
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    assert [v.name for v in g.inputs] == ["x"]
    np.testing.assert_array_equal(gc.compile(g, backend="numpy")(x=x), x.reshape(2, 6))


def test_shape_gather_concat_reshape_chain_folds_with_the_dynamic_batch():
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
             helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [helper.make_tensor("ax", TensorProto.INT64, [1], [0]),
             helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])]
    m = make(nodes, [f32("x", ["N", 2, 3, 4])], [f32("y", ["N", 24])], inits)
    g = import_graph(m.SerializeToString())
    x = np.random.default_rng(0).standard_normal((5, 2, 3, 4)).astype(np.float32)
    for backend in ("numpy", "llvm"):
        np.testing.assert_array_equal(gc.compile(g, backend=backend)(x=x), ort_run(m, {"x": x})[0])


def test_arithmetic_on_the_dynamic_batch_is_refused():
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Mul", ["sh", "two"], ["sh2"]),
             helper.make_node("Reshape", ["x", "sh2"], ["y"])]
    m = make(nodes, [f32("x", ["N", 2])], [f32("y", ["M", 2])], [helper.make_tensor("two", TensorProto.INT64, [1], [2])])
    with pytest.raises(OnnxImportError, match="dynamic batch"):
        import_graph(m.SerializeToString())


def test_unfrozen_float_clip_bound_computed_at_run_time_is_refused():
    m = make([helper.make_node("Relu", ["lo"], ["lo2"]), helper.make_node("Clip", ["x", "lo2"], ["y"])],
             [f32("x", [1, 4]), f32("lo", [])], [f32("y", [1, 4])], opset=13)
    with pytest.raises(OnnxImportError, match=r"op Clip.*input min decides a shape or a bound, so it must be known at import"):
        import_graph(m.SerializeToString())


def test_unsupported_op_is_one_error_naming_node_op_and_opset():
    m = make([helper.make_node("Softplus", ["x"], ["y"], name="sp1")], [f32("x", [1, 4])], [f32("y", [1, 4])])
    with pytest.raises(OnnxImportError, match=r"node 'sp1' \(op Softplus, opset 17\): op Softplus is not supported"):
        import_graph(m.SerializeToString())


def test_unsupported_attribute_is_named():
    m = make([helper.make_node("Softmax", ["x"], ["y"], axis=1, name="s")], [f32("x", [2, 4])], [f32("y", [2, 4])])
    m.graph.node[0].attribute.append(helper.make_attribute("bogus", 1))
    with pytest.raises(OnnxImportError, match=r"not a valid ONNX model|attribute\(s\) bogus"):
        import_graph(m.SerializeToString())


def test_malformed_bytes_and_missing_file():
    with pytest.raises(OnnxImportError, match="not a valid ONNX model"):
        import_graph(b"\x08\x07garbage")
    with pytest.raises(OnnxImportError, match="not found|not a valid"):
        import_graph("/nonexistent/model.onnx")


def test_hostile_names_go_through_name_validation():
    bad = "x\x00'); import os #"
    m = make([helper.make_node("Relu", [bad], ["y"])], [f32(bad, [1, 2])], [f32("y", [1, 2])])
    with pytest.raises(OnnxImportError, match="non-printable"):
        import_graph(m.SerializeToString())
    quote = "x'); __import__('os').system('echo pwned') #"
    m = make([helper.make_node("Relu", [quote], ["out\"]"])], [f32(quote, [1, 2])], [f32("out\"]", [1, 2])])
    g = import_graph(m.SerializeToString())
    x = np.array([[-1.0, 2.0]], np.float32)
    for backend in ("numpy", "llvm"):
        np.testing.assert_array_equal(gc.compile(g, backend=backend)(**{quote: x}), [[0.0, 2.0]])


def test_gemm_alpha_beta_trans_and_div_broadcast():
    rng = np.random.default_rng(3)
    B = rng.standard_normal((5, 4)).astype(np.float32)
    C = rng.standard_normal((5,)).astype(np.float32)
    d = np.array([2.0, -4.0, 0.5, 8.0, 1.0], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], alpha=0.5, beta=2.0, transB=1),
             helper.make_node("Div", ["g", "d"], ["y"])]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in (("B", B), ("C", C), ("d", d))]
    m = make(nodes, [f32("x", ["N", 4])], [f32("y", ["N", 5])], inits)
    g = import_graph(m.SerializeToString())
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = ort_run(m, {"x": x})[0]
    for backend in ("numpy", "llvm"):
        np.testing.assert_allclose(gc.compile(g, backend=backend)(x=x), want, rtol=1e-6, atol=1e-6)


def test_div_nan_inf_both_backends():
    a = np.array([[1.0, -1.0, 0.0, np.nan, np.inf, 3.0, 7.0]], np.float32)
    b = np.array([[0.0, 0.0, 0.0, 1.0, 2.0, np.inf, 3.0]], np.float32)
    m = make([helper.make_node("Div", ["a", "b"], ["y"])], [f32("a", [1, 7]), f32("b", [1, 7])], [f32("y", [1, 7])])
    g = import_graph(m.SerializeToString())
    with np.errstate(divide="ignore", invalid="ignore"):
        want = a / b
    for backend in ("numpy", "llvm"):
        np.testing.assert_array_equal(gc.compile(g, backend=backend)(a=a, b=b), want)


def test_prelu_leaky_relu_exact():
    x = np.array([[-3.0, -0.5, 0.0, 0.25, 9.0, np.nan, -np.inf, np.inf]], np.float32)
    slope = np.float32(0.2)
    m = make([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2)], [f32("x", [1, 8])], [f32("y", [1, 8])])
    g = import_graph(m.SerializeToString())
    want = np.where(x > 0, x, x * slope)
    for backend in ("numpy", "llvm"):
        np.testing.assert_array_equal(gc.compile(g, backend=backend)(x=x), want)


def test_mutated_attributes_give_one_clear_error_or_the_right_answer():
    """Perturb every integer attribute of a torch-exported CNN: each mutant imports and matches ONNX
    Runtime, or fails with one OnnxImportError (or ORT refuses it too) — never another exception."""
    base = onnx.load(os.path.join(DATA, "resnext_tiny.onnx"))
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    targets = [(i, j) for i, n in enumerate(base.graph.node) for j, a in enumerate(n.attribute)
               if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
    outcomes = {"match": 0, "refused": 0}
    for k, (i, j) in enumerate(targets):
        for delta in (-2, 1, 5):
            m = onnx.ModelProto()
            m.CopyFrom(base)
            a = m.graph.node[i].attribute[j]
            if a.type == onnx.AttributeProto.INT:
                a.i += delta
            else:
                if not a.ints:
                    continue
                a.ints[k % len(a.ints)] += delta
            data = m.SerializeToString()
            try:
                g = import_graph(data)
            except OnnxImportError:
                outcomes["refused"] += 1
                continue
            try:
                want = ort_run(data, {"input": x})[0]
            except Exception:
                pytest.fail(f"graphcnn imported a mutant ONNX Runtime refuses: node {i} attribute {a.name}")
            got = gc.compile(g, backend="numpy")(input=x)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
            outcomes["match"] += 1
    assert outcomes["refused"] > 0 and outcomes["match"] > 0, outcomes


def test_flatten_of_channels_last_used_by_gemm_and_by_an_add():
    """A Flatten of a conv output feeds a Gemm (rows permuted, no transpose) AND an elementwise Add
    (needs the NCHW element order): both answers match ORT."""
    rng = np.random.default_rng(8)
    W = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    B = rng.standard_normal((4 * 3 * 3, 5)).astype(np.float32)
    off = rng.standard_normal((1, 36)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "B"], ["y"]), helper.make_node("Add", ["f", "off"], ["z"])]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in (("W", W), ("B", B), ("off", off))]
    m = make(nodes, [f32("x", ["N", 2, 5, 5])], [f32("y", ["N", 5]), f32("z", ["N", 36])], inits)
    g = import_graph(m.SerializeToString())
    x = rng.standard_normal((3, 2, 5, 5)).astype(np.float32)
    want = ort_run(m, {"x": x})
    for backend in ("numpy", "llvm"):
        got = gc.compile(g, backend=backend)(x=x)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    bad = make([helper.make_node("Reshape", ["x", "s"], ["y"])], [f32("x", ["N", 2, 3])], [f32("y", ["N", 5])],
               [helper.make_tensor("s", TensorProto.INT64, [2], [0, 5])])
    with pytest.raises(OnnxImportError, match="element counts per sample differ"):
        import_graph(bad.SerializeToString())


def test_cli_compiles_an_onnx_model_to_a_standalone_module(tmp_path):
    import importlib.util
    from graphcnn.cli import main
    src = os.path.join(DATA, "resnet_tiny.onnx")
    assert main(["compile", src, "-o", str(tmp_path), "--target", "numpy", "--emit", "py"]) == 0
    py = [p for p in os.listdir(tmp_path) if p.endswith(".py")]
    assert len(py) == 1
    sp = importlib.util.spec_from_file_location("onnx_standalone", os.path.join(tmp_path, py[0]))
    mod = importlib.util.module_from_spec(sp)
    sp.loader.exec_module(mod)
    x = np.random.default_rng(9).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(mod.predict(x), ort_run(src, {"input": x})[0], rtol=1e-4, atol=1e-6)
    assert main(["train", src]) == 2        # 3x16x16 inputs: the bundled 28x28x1 MNIST does not fit


def test_output_names_that_collide_with_internal_names():
    """ONNX output names equal to names graphcnn gives internal values ('relu1', 'transpose1')."""
    m = make([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["relu1"]),
              helper.make_node("Tanh", ["a"], ["t1"])],
             [f32("x", ["N", 2])], [f32("relu1", ["N", 2]), f32("t1", ["N", 2]), f32("a", ["N", 2])])
    g = import_graph(m.SerializeToString())
    assert [v.name for v in g.outputs] == ["relu1", "t1", "a"]
    x = np.array([[-1.0, 0.5], [2.0, -3.0]], np.float32)
    for got, want in zip(gc.compile(g, backend="numpy")(x=x), ort_run(m, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=1e-6)


# -- import_model: a trainable gc.Model ----------------------------------------------------------------------

@pytest.mark.parametrize("path", MODELS, ids=[os.path.basename(p)[:-5] for p in MODELS])
def test_import_model_predicts_like_import_graph_and_onnxruntime(path):
    m = gc.onnx.import_model(path)
    assert m.input_shape == (3, 16, 16)                   # NCHW, as in the file
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = ort_run(path, {"input": x})[0]
    ref = gc.compile(import_graph(path), backend="llvm")(input=x)
    got = m.predict(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    # the file's float initializers are the model's weights (rearranged for graphcnn, same values)
    with open(path, "rb") as f:
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(f.read()).graph.initializer
                 if i.data_type == TensorProto.FLOAT}
    names = {k.split("/", 1)[1] for k in m.weights}
    assert set(inits) <= names, set(inits) - names
    for k, a in inits.items():
        assert sorted(m.weights[f"onnx/{k}"].ravel().tolist()) == sorted(a.ravel().tolist()), k


def test_import_model_nhwc_layout_needs_no_transpose():
    path = os.path.join(DATA, "resnet_tiny.onnx")
    m = gc.onnx.import_model(path, layout="nhwc")
    assert m.input_shape == (16, 16, 3)
    opt = run_pipeline(m.inference_graph(), "inference").graph
    assert [n for n in opt.nodes if n.op == "transpose"] == []
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ort_run(path, {"input": x})[0]
    np.testing.assert_allclose(m.predict(x.transpose(0, 2, 3, 1)), want, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_import_model_fine_tunes_saves_loads_and_compiles_to_so(tmp_path, backend):
    import ctypes
    from graphcnn.cli import main
    path = os.path.join(DATA, "resnet_tiny.onnx")
    m = gc.onnx.import_model(path)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) * 3        # a rule the random net does not know
    m.compile(optimizer="adam", loss={"name": "sparse_categorical_crossentropy", "from_logits": True},
              backend=backend)
    frozen = [k for k in m._specs["onnx"] if not m._specs["onnx"][k].trainable]
    proto = onnx.load(path)
    stats = {n.input[i] for n in proto.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    inits = {i.name for i in proto.graph.initializer}
    assert stats and set(frozen) & inits == stats        # of the file's arrays, exactly the BN statistics
    before_w = {k: v.copy() for k, v in m.weights.items()}
    before = m.evaluate(x, y)
    m.fit(x, y, epochs=1, batch_size=16, verbose=0, seed=0)
    after = m.evaluate(x, y)
    assert after < before, (before, after)
    for k in frozen:                                   # batch-norm statistics: inference mode, unchanged
        np.testing.assert_array_equal(m.weights[f"onnx/{k}"], before_w[f"onnx/{k}"])
    changed = [k for k in m._trainable if not np.array_equal(m.weights[k], before_w[k])]
    assert len(changed) == len(m._trainable)
    pred = m.predict(x[:5])
    m.save(str(tmp_path / "tuned.gcnn"))
    m2 = gc.load_model(str(tmp_path / "tuned.gcnn"))
    np.testing.assert_array_equal(m2.predict(x[:5]), pred)
    np.testing.assert_array_equal(gc.load(str(tmp_path / "tuned.gcnn"), backend=backend).predict(x[:5]), pred)
    if backend != "llvm":
        return
    out = tmp_path / "so"
    assert main(["compile", str(tmp_path / "tuned.gcnn"), "-o", str(out)]) == 0
    name = m.name
    lib = ctypes.CDLL(str(out / f"{name}.so"))
    getattr(lib, f"{name}_workspace_size").restype = ctypes.c_size_t
    getattr(lib, f"{name}_workspace_size").argtypes = [ctypes.c_int64]
    fn = getattr(lib, f"{name}_predict")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    xin = np.ascontiguousarray(x[:5])
    res = np.zeros((5, 10), np.float32)
    ws = np.zeros(getattr(lib, f"{name}_workspace_size")(5) // 4 + 16, np.float32)
    assert fn(xin.ctypes.data, 5, res.ctypes.data, ws.ctypes.data) == 0
    np.testing.assert_allclose(res, pred, rtol=1e-5, atol=1e-6 * float(np.abs(pred).max()))


def test_import_model_refuses_fixed_batch_and_several_outputs():
    fixed = make([helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2, 3])], [f32("y", [2, 3])])
    with pytest.raises(OnnxImportError, match="fixed first axis 2.*dynamic_axes"):
        gc.onnx.import_model(fixed.SerializeToString())
    two = make([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Tanh", ["x"], ["z"])],
               [f32("x", ["N", 3])], [f32("y", ["N", 3]), f32("z", ["N", 3])])
    with pytest.raises(OnnxImportError, match="one output, this one has 2"):
        gc.onnx.import_model(two.SerializeToString())
    with pytest.raises(OnnxImportError, match="layout must be"):
        gc.onnx.import_model(two.SerializeToString(), layout="NHWC!")


def test_shared_initializer_in_two_layouts_is_refused_by_import_model():
    w = onnx.numpy_helper.from_array(np.array([[1, 2], [3, 4]], np.float32), "w")
    m = make([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])],
             [f32("x", ["N", 2])], [f32("y", ["N", 2])], [w])
    x = np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)
    shared = gc.onnx.import_model(m.SerializeToString())      # used twice in one layout: one tied weight
    assert len(shared.weights) == 1
    np.testing.assert_allclose(shared.predict(x), ort_run(m, {"x": x})[0])
    t = make([helper.make_node("Gemm", ["x", "w"], ["a"], transB=1), helper.make_node("MatMul", ["a", "w"], ["y"])],
             [f32("x", ["N", 2])], [f32("y", ["N", 2])], [w])
    with pytest.raises(OnnxImportError, match="initializer 'w' is used in two layouts"):
        gc.onnx.import_model(t.SerializeToString())
    np.testing.assert_allclose(gc.compile(import_graph(t.SerializeToString()), backend="numpy")(x=x),
                               ort_run(t, {"x": x})[0], rtol=1e-6)


# -- every command that takes MODEL accepts model.onnx -----------------------------------------------------

@pytest.fixture(scope="module")
def mnist_onnx(tmp_path_factory):
    """A small MNIST convnet written by graphcnn's exporter: NCHW (N, 1, 28, 28) in, logits out."""
    from graphcnn import layers
    net = gc.Sequential([layers.Input((28, 28, 1)), layers.Conv2D(4, 3, activation="relu"), layers.MaxPool2D(2),
                         layers.Flatten(), layers.Dense(10)], name="small_cnn", seed=1)
    net.build()
    path = str(tmp_path_factory.mktemp("onnx") / "small_cnn.onnx")
    gc.onnx.export(net, path)
    return path


def test_cli_show_compile_run_train_bench_take_an_onnx_model(mnist_onnx, tmp_path, capsys):
    from graphcnn.cli import main
    assert main(["show", mnist_onnx]) == 0
    assert "conv2d" in capsys.readouterr().out
    assert main(["compile", mnist_onnx, "-o", str(tmp_path / "so")]) == 0
    assert sorted(os.listdir(tmp_path / "so")) == ["small_cnn.h", "small_cnn.so"]
    capsys.readouterr()
    # run: images (N, H, W) uint8, scaled by 1/255 as for a .gcnn; classes = ORT's argmax on NCHW input
    imgs = np.random.default_rng(5).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", imgs)
    assert main(["run", mnist_onnx, str(tmp_path / "imgs.npy")]) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    logits = ort_run(mnist_onnx, {"x": (imgs.astype(np.float32) / 255)[:, None]})[0]
    assert got == logits.argmax(-1).tolist()
    # train: fine-tunes the file's weights on the bundled MNIST subset and saves a .gcnn
    out = str(tmp_path / "tuned.gcnn")
    assert main(["train", mnist_onnx, "--epochs", "1", "--quiet", "--out", out]) == 0
    acc = float(capsys.readouterr().out.split()[2])
    assert acc > 0.5                      # from a random start, one epoch of the subset learns digits
    rt = gc.load(out)
    assert rt.input_shape == (28, 28, 1)
    assert main(["bench", mnist_onnx, "--batch", "1,4", "--repeats", "3", "--rounds", "2",
                 "--threads", "1"]) == 0
    report = capsys.readouterr().out
    assert "onnxruntime" in report and "graphcnn-llvm" in report
    diff = float(report.split("max rel. difference ")[1].split(",")[0])
    assert diff < 1e-4


def test_cli_onnx_model_errors(tmp_path, capsys):
    from graphcnn.cli import main
    assert main(["run", str(tmp_path / "missing.onnx"), str(tmp_path / "x.npy")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert main(["show", str(tmp_path / "bad.onnx")]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err
    assert main(["train", os.path.join(DATA, "resnet_tiny.onnx"), "--epochs", "1"]) == 2
    assert "input shape is fixed by the file" in capsys.readouterr().err


# -- importer coverage beyond the node cases: dilated/ceil pools, N-D MatMul, losses -----------------------

def out_of_rank(name, rank):
    """A float graph output of known rank and unknown sizes (shape inference fills them in)."""
    return f32(name, [f"d{i}" for i in range(rank)])


POOLS = [  # op, kernel, strides, dilations, pads (t, l, b, r), ceil_mode, count_include_pad
    ("MaxPool", [3, 2], [2, 1], [2, 3], [1, 0, 2, 1], 1, 0),
    ("MaxPool", [2, 2], [3, 2], [2, 2], [0, 0, 0, 0], 1, 0),
    ("AveragePool", [3, 3], [2, 2], [2, 1], [1, 1, 1, 1], 0, 0),
    ("AveragePool", [3, 2], [2, 3], [1, 2], [1, 1, 0, 1], 1, 1),
    ("AveragePool", [2, 3], [2, 2], [1, 1], [1, 1, 1, 1], 1, 1),      # ceil window past the pads, counted
    ("AveragePool", [3, 3], [3, 2], [2, 2], [2, 0, 1, 2], 1, 0),
]


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("case", POOLS, ids=[f"{p[0]}{i}" for i, p in enumerate(POOLS)])
def test_dilated_and_ceil_mode_pools_match_onnxruntime(case, backend):
    op, kernel, strides, dil, pads, ceil, include = case
    attrs = dict(kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=ceil)
    if dil != [1, 1]:
        attrs["dilations"] = dil
    if op == "AveragePool":
        attrs["count_include_pad"] = include
    m = make([helper.make_node(op, ["x"], ["y"], **attrs)], [f32("x", ["N", 3, 11, 10])],
             [out_of_rank("y", 4)], opset=19)
    x = np.random.default_rng(12).standard_normal((2, 3, 11, 10)).astype(np.float32)
    x[0, 1, :4, :5] = -np.inf                    # a max window of -inf only stays -inf (pad is not a value)
    want = ort_run(m, {"x": x})[0]
    got = gc.compile(import_graph(m.SerializeToString()), backend=backend)(x=x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [((None, 3, 4), (4, 5), True), ((None, 2, 3, 4), (2, 4, 5), False),
                                    ((None, 3, 4), (None, 4, 2), False), ((None, 4), (4,), True),
                                    ((2, 3, 4), (4, 5), True), ((4,), (3, 4, 2), True)])
def test_nd_matmul_batched_and_with_weights(shapes):
    sa, sb, b_is_weight = shapes
    rng = np.random.default_rng(13)
    concrete = lambda s: tuple(3 if d is None else d for d in s)  # noqa: E731
    a = rng.standard_normal(concrete(sa)).astype(np.float32)
    b = rng.standard_normal(concrete(sb)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(b, "b")] if b_is_weight else []
    ins = [f32("a", ["N" if d is None else d for d in sa])] + ([] if b_is_weight else
                                                             [f32("b", ["N" if d is None else d for d in sb])])
    rank = len(np.matmul(a, b).shape)
    m = make([helper.make_node("MatMul", ["a", "b"], ["y"])], ins, [out_of_rank("y", rank)], inits)
    feeds = {"a": a} if b_is_weight else {"a": a, "b": b}
    want = ort_run(m, feeds)[0]
    for backend in ("numpy", "llvm"):
        got = gc.compile(import_graph(m.SerializeToString()), backend=backend)(**feeds)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if sa[0] is None and b_is_weight:       # the weight of a batched N-D MatMul is a trainable model weight
        model = gc.onnx.import_model(m.SerializeToString())
        assert list(model.weights) == ["onnx/b"]
        np.testing.assert_allclose(model.predict(a), want, rtol=1e-5, atol=1e-5)


def test_matmul_broadcast_that_would_move_the_batch_is_refused():
    m = make([helper.make_node("MatMul", ["a", "b"], ["y"])], [f32("a", ["N", 4]), f32("b", [2, 4, 3])],
             [out_of_rank("y", 2)])
    with pytest.raises(OnnxImportError, match="would move the dynamic batch"):
        import_graph(m.SerializeToString())


@pytest.mark.parametrize("op", ["SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"])
def test_losses_with_constant_targets_after_a_conv_and_integer_input_misuse(op):
    """A loss over a conv's channels-last scores (the class axis is the channels), with targets as an
    initializer; an integer graph input used as anything but a loss target is refused."""
    rng = np.random.default_rng(14)
    w = onnx.numpy_helper.from_array(rng.standard_normal((5, 2, 3, 3)).astype(np.float32), "w")
    t = onnx.numpy_helper.from_array(rng.integers(0, 5, (1, 4, 4)).astype(np.int64), "t")
    cw = onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 5).astype(np.float32), "cw")
    m = make([helper.make_node("Conv", ["x", "w"], ["s"]),
              helper.make_node(op, ["s", "t", "cw"], ["loss"], reduction="mean", ignore_index=3)],
             [f32("x", [1, 2, 6, 6])], [f32("loss", [])],
             [w, t, cw], opset=13)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    want = ort_run(m, {"x": x})[0]
    for backend in ("numpy", "llvm"):
        got = gc.compile(import_graph(m.SerializeToString()), backend=backend)(x=x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bad = make([helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("Add", ["x", "f"], ["y"])],
               [f32("x", ["N", 3]), helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 3])],
               [f32("y", ["N", 3])])
    with pytest.raises(OnnxImportError, match="'i' has element type INT64.*only be the target of a loss"):
        import_graph(bad.SerializeToString())


def test_import_model_freezes_weights_that_would_get_no_gradient():
    """ConvTranspose is conv2d_grad_input, which has no gradient rule: its weight is non-trainable
    (visible in the model) rather than a trainable weight that fit silently never changes."""
    w = onnx.numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    b = onnx.numpy_helper.from_array(np.zeros(108, np.float32), "b")
    m = make([helper.make_node("ConvTranspose", ["x", "w"], ["t"]), helper.make_node("Flatten", ["t"], ["f"]),
              helper.make_node("Add", ["f", "b"], ["y"])],
             [f32("x", ["N", 2, 4, 4])], [f32("y", ["N", 108])], [w, b])
    model = gc.onnx.import_model(m.SerializeToString())
    assert model._trainable == ["onnx/b"]
    model.compile(loss="mse", backend="numpy")
    x = np.random.default_rng(15).standard_normal((4, 2, 4, 4)).astype(np.float32)
    before = model.get_weights()
    model.fit(x, np.ones((4, 108), np.float32), epochs=1, verbose=0)
    after = model.get_weights()
    np.testing.assert_array_equal(after["onnx/w"], before["onnx/w"])
    assert not np.array_equal(after["onnx/b"], before["onnx/b"])


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_fixed_batch_file_matches_onnxruntime(backend):
    """An ONNX file exported with a fixed batch of 2 (no dynamic axis): a plain conv + pool + Gemm net."""
    rng = np.random.default_rng(16)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    d = onnx.numpy_helper.from_array(rng.standard_normal((36, 5)).astype(np.float32), "d")
    m = make([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "d"], ["y"])],
             [f32("x", [2, 3, 8, 8])], [f32("y", [2, 5])], [w, d])
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ort_run(m, {"x": x})[0]
    got = gc.compile(import_graph(m.SerializeToString()), backend=backend)(x=x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
