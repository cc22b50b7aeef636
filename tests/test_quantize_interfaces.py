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
