"""int8 everywhere fp32 goes (issue 15): `graphcnn compile --quantize int8 --calibrate DATA`, the quantized
.gcnn through gc.load and `graphcnn eval`, the .so/.h of a quantized graph through ctypes, and the ONNX
QDQ exporter/importer. References: gc.quantize's own runtime (the same kernels, so bit-identical), the
float model (accuracy), ONNX Runtime (QDQ)."""
import ctypes
import os
import re
import shutil

import numpy as np
import pytest

import graphcnn as gc
from graphcnn.cli import main, preprocess
from graphcnn.datasets.mnist import load_data

from conftest import load_example

NAME = "mnist_cnn"
CALIBRATION_IMAGES = 1000


def c_compiler():
    return next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
                None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """mnist_cnn trained one epoch on 4,000 bundled images, saved like `graphcnn train` saves it."""
    tmp = tmp_path_factory.mktemp("qcli")
    (x_train, y_train), (x_test, y_test) = load_data()
    model = load_example(NAME)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], backend="llvm")
    model.preprocess = {"scale": 1 / 255}
    model.fit(preprocess(x_train[:4000], model), y_train[:4000], epochs=1, batch_size=32, seed=0, verbose=0)
    gcnn = str(tmp / f"{NAME}.gcnn")
    model.save(gcnn)
    return {"tmp": tmp, "gcnn": gcnn, "model": model, "x_train": x_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def compiled(trained):
    """`graphcnn compile MODEL.gcnn --quantize int8 --calibrate mnist` to .gcnn + .so + .h."""
    out = trained["tmp"] / "int8"
    emit = "gcnn,so,h" if c_compiler() else "gcnn,h"
    rc = main(["compile", trained["gcnn"], "-o", str(out), "--quantize", "int8", "--calibrate", "mnist",
               "--calibration-images", str(CALIBRATION_IMAGES), "--emit", emit])
    assert rc == 0
    return dict(trained, out=out, qgcnn=str(out / f"{NAME}.gcnn"))


def test_compile_quantize_writes_a_gcnn_that_gc_load_runs_like_gc_quantize(compiled):
    rt = gc.load(compiled["qgcnn"])
    ops = [n.op for n in rt.graph.nodes]
    assert ops.count("conv2d_q") == 2 and ops.count("dense_q") == 1 and ops[0] == "quantize"
    assert rt.meta["quantization"]["calibration_images"] == CALIBRATION_IMAGES
    assert rt.meta["quantization"]["method"] == "percentile"
    # the CLI scaled the uint8 calibration images by the model's preprocess (1/255), as training did
    model = compiled["model"]
    want = gc.quantize(model, preprocess(compiled["x_train"][:CALIBRATION_IMAGES], model), method="percentile")
    x = preprocess(compiled["x_test"], rt.meta)
    assert want.backend == rt.backend == "llvm"
    np.testing.assert_array_equal(rt.predict(x), want.predict(x))


def test_eval_reports_the_int8_accuracy_close_to_fp32(compiled, capsys):
    accuracies = []
    for path in (compiled["gcnn"], compiled["qgcnn"]):
        capsys.readouterr()
        assert main(["eval", path]) == 0
        accuracies.append(float(re.match(r"accuracy (\S+)", capsys.readouterr().out).group(1)))
    fp32, int8 = accuracies
    rt = gc.load(compiled["qgcnn"])
    direct = float((rt.predict(preprocess(compiled["x_test"], rt.meta)).argmax(1) == compiled["y_test"]).mean())
    assert abs(int8 - direct) < 1e-4          # eval printed the quantized model's own accuracy
    assert fp32 > 0.9 and fp32 - int8 <= 0.01


def test_quantized_gcnn_is_inference_only(compiled):
    with pytest.raises(gc.GraphcnnError):
        gc.load_model(compiled["qgcnn"])


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8", "--emit", "gcnn"], "--quantize int8 needs --calibrate"),
    (["--emit", "gcnn"], "--emit gcnn writes the quantized model"),
    (["--calibrate", "mnist"], "need --quantize int8"),
    (["--quantize", "int8", "--calibrate", "no-such-file.npy"], "--calibrate 'no-such-file.npy'"),
    (["--quantize", "int8", "--calibrate", "mnist", "--calibration-images", "0"], "--calibration-images"),
])
def test_compile_quantize_usage_errors_name_the_flag(trained, tmp_path, capsys, args, message):
    assert main(["compile", trained["gcnn"], "-o", str(tmp_path / "o")] + args) == 2
    assert message in capsys.readouterr().err


def test_calibration_from_an_npy_file_gives_the_same_model(compiled, tmp_path):
    npy = tmp_path / "cal.npy"
    np.save(npy, compiled["x_train"][:CALIBRATION_IMAGES])
    assert main(["compile", compiled["gcnn"], "-o", str(tmp_path / "o"), "--quantize", "int8",
                 "--calibrate", str(npy), "--emit", "gcnn"]) == 0
    a, b = gc.load(str(tmp_path / "o" / f"{NAME}.gcnn"), backend="numpy"), gc.load(compiled["qgcnn"], backend="numpy")
    assert a.graph == b.graph


# -- the .so / .h of a quantized graph -------------------------------------------------------------------

def test_header_states_the_boundary_quantization(compiled):
    header = (compiled["out"] / f"{NAME}.h").read_text()
    g = gc.load(compiled["qgcnn"], backend="numpy").graph
    quantize = g.nodes[0]
    dequantize = next(n for n in g.nodes if n.op == "dequantize")
    macros = dict(re.findall(r"#define mnist_cnn_((?:IN|OUT)PUT_\w+) (\S+)", header))
    assert float.fromhex(macros["INPUT_SCALE"].rstrip("f")) == quantize.attrs["scale"]
    assert int(macros["INPUT_ZERO_POINT"]) == quantize.attrs["zero_point"]
    assert macros["INPUT_QUANT_TYPE"] == '"u8"'
    assert float.fromhex(macros["OUTPUT_SCALE"].rstrip("f")) == dequantize.attrs["scale"]
    assert int(macros["OUTPUT_ZERO_POINT"]) == dequantize.attrs["zero_point"]


def test_float_header_has_no_quantization_macros(trained, tmp_path):
    assert main(["compile", trained["gcnn"], "-o", str(tmp_path), "--emit", "h"]) == 0
    assert "_SCALE" not in (tmp_path / f"{NAME}.h").read_text()


def test_so_of_the_quantized_model_is_identical_to_gc_load(compiled):
    if c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the shared library cannot be linked")
    lib = ctypes.CDLL(str(compiled["out"] / f"{NAME}.so"))
    lib.mnist_cnn_workspace_size.restype = ctypes.c_size_t
    lib.mnist_cnn_workspace_size.argtypes = [ctypes.c_int64]
    lib.mnist_cnn_predict.restype = ctypes.c_int
    lib.mnist_cnn_predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    rt = gc.load(compiled["qgcnn"])
    assert rt.backend == "llvm"         # the same kernels as the .so, so the same bits
    x = np.ascontiguousarray(preprocess(compiled["x_test"], rt.meta)[..., None])
    n = len(x)
    out = np.full((n, 10), np.nan, np.float32)
    ws = np.empty(lib.mnist_cnn_workspace_size(n), np.uint8)
    assert lib.mnist_cnn_predict(x.ctypes.data, n, out.ctypes.data, ws.ctypes.data) == 0
    np.testing.assert_array_equal(out, rt.predict(x, batch_size=n))
    numpy_probs = gc.load(compiled["qgcnn"], backend="numpy").predict(x)
    np.testing.assert_array_equal(out.argmax(1), numpy_probs.argmax(1))


# -- ONNX: QDQ export run by ONNX Runtime --------------------------------------------------------------

def ort_run(path, x):
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_onnx_qdq_export_runs_in_onnx_runtime_with_the_same_classes(compiled, tmp_path):
    path = tmp_path / "q.onnx"
    assert main(["export", compiled["qgcnn"], "-o", str(path)]) == 0
    import onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 4 and "Conv" in ops and "Gemm" in ops
    rt = gc.load(compiled["qgcnn"])
    x = preprocess(compiled["x_test"], rt.meta)[..., None]
    ours, theirs = rt.predict(x), ort_run(path, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    agree = float((ours.argmax(1) == theirs.argmax(1)).mean())
    print(f"ONNX Runtime on the QDQ export: same class on {agree:.4f} of {len(x)} test images")
    assert agree >= 0.995


@pytest.mark.parametrize("dtype, y_min", [("u8", 11), ("i8", None)])
def test_onnx_qdq_export_of_a_clamped_conv_and_dense_is_within_one_quantum(tmp_path, dtype, y_min):
    from ir.ops import emit
    rng = np.random.default_rng(3)
    g = gc.Graph("qsmall")
    x = g.input("x", (None, 6, 6, 2), "f32")
    w, b = g.param("w", (3, 3, 2, 4), "i8"), g.param("b", (4,), "i32")
    wd = g.param("wd", (36, 3), "i8")
    yzp = 11 if dtype == "u8" else -5
    q = emit("quantize", x, scale=0.02, zero_point=3)
    y = emit("conv2d_q", q, w, b, x_scale=0.02, x_zero_point=3, w_scale=(0.01, 0.02, 0.03, 0.015), y_scale=0.05,
             y_zero_point=yzp, dtype=dtype, padding="same", y_min=y_min, y_max=200 if dtype == "u8" else None)
    p = emit("flatten", emit("max_pool2d", y, pool=2))
    d = emit("dense_q", p, wd, x_scale=0.05, x_zero_point=yzp, w_scale=(0.01, 0.02, 0.004), y_scale=0.1,
             y_zero_point=7, dtype="u8")
    g.output(emit("dequantize", d, scale=0.1, zero_point=7))
    weights = {"w": rng.integers(-127, 128, (3, 3, 2, 4)).astype(np.int8),
               "b": rng.integers(-300, 300, 4).astype(np.int32),
               "wd": rng.integers(-127, 128, (36, 3)).astype(np.int8)}
    from graphcnn.onnx import export
    export(g, str(tmp_path / "s.onnx"), weights=weights)
    xs = rng.uniform(-1, 4, (16, 6, 6, 2)).astype(np.float32)
    want = gc.compile(g, backend="numpy", params=weights)(xs)
    got = ort_run(tmp_path / "s.onnx", np.ascontiguousarray(xs.transpose(0, 3, 1, 2)))
    assert len(np.unique(want)) > 5
    # ONNX Runtime's requantization multiplier is its own float32 product, so a half-way case may round
    # the other way: at most one output quantum apart, and mostly equal
    np.testing.assert_allclose(got, want, atol=0.1 * 1.0001, rtol=0)
    assert np.mean(got == want) > 0.9


def test_onnx_qdq_round_trip_imports_the_integer_ops_back(compiled, tmp_path):
    from graphcnn.onnx import import_graph
    path = tmp_path / "q.onnx"
    assert main(["export", compiled["qgcnn"], "-o", str(path)]) == 0
    g = import_graph(str(path))
    ops = [n.op for n in g.nodes]
    assert ops.count("conv2d_q") == 2 and ops.count("dense_q") == 1 and "conv2d" not in ops
    rt = gc.load(compiled["qgcnn"], backend="numpy")
    x = preprocess(compiled["x_test"], rt.meta)[..., None]
    want = rt.predict(x)
    got = gc.compile(g, backend="numpy")(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(got, want)         # the same integer ops, the same NumPy kernels


@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
def test_onnx_runtime_quantize_static_models_import(trained, tmp_path, quant_format):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from graphcnn.onnx import export, import_graph
    fp32 = tmp_path / "fp32.onnx"
    export(trained["model"], str(fp32))
    x = preprocess(trained["x_train"][:200], trained["model"])[:, None]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x[i:i + 50]} for i in range(0, len(x), 50)])

        def get_next(self):
            return next(self.batches, None)
    import onnx
    assert onnx.load(str(fp32)).graph.input[0].name == "x"
    q = tmp_path / "q.onnx"
    # QOperator writes Gemm as com.microsoft QGemm (refused by name); its convs are QLinearConv
    only = {"op_types_to_quantize": ["Conv"]} if quant_format == "QOperator" else {}
    quantize_static(str(fp32), str(q), Reader(), quant_format=getattr(QuantFormat, quant_format),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True, **only)
    g = import_graph(str(q))
    ops = [n.op for n in g.nodes]
    assert ops.count("conv2d_q") == 2 and "conv2d" not in ops, ops
    xt = np.ascontiguousarray(preprocess(trained["x_test"], trained["model"])[:, None])
    ours = gc.compile(g, backend="numpy")(xt)
    theirs = ort_run(q, xt)
    agree = float((ours.argmax(1) == theirs.argmax(1)).mean())
    print(f"ORT quantize_static ({quant_format}) imported: same class as ONNX Runtime on {agree:.4f}")
    assert agree >= 0.995
