"""Native embedding: `graphcnn compile --target llvm --emit so,h` -> NAME.so + NAME.h, used from C
(examples/embed_c) and through ctypes. The reference is the Python runtime, gc.load(path).predict."""
import ctypes
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import graphcnn as gc
from graphcnn.datasets import write_idx
from graphcnn.datasets.mnist import load_data

from conftest import ROOT, load_example

NAME = "mnist_cnn"
OK, ERR_NULL_ARG, ERR_BAD_BATCH, ERR_WORKSPACE_TOO_SMALL = 0, 1, 2, 3


def c_compiler():
    return next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
                None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A briefly trained mnist_cnn saved as .gcnn and compiled to NAME.so/NAME.h through the CLI."""
    if c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the shared library cannot be linked")
    tmp = tmp_path_factory.mktemp("embed")
    (x_train, y_train), (x_test, y_test) = load_data()
    model = load_example(NAME)
    model.compile(backend="numpy")
    # one quick epoch so classes are well separated (argmax is not decided by float noise)
    model.fit(x_train[:1000] / 255.0, y_train[:1000], epochs=1, batch_size=64, seed=0, verbose=0)
    gcnn = str(tmp / f"{NAME}.gcnn")
    model.save(gcnn)
    out = tmp / "lib"
    res = subprocess.run([sys.executable, "-m", "graphcnn.cli", "compile", gcnn, "-o", str(out),
                          "--target", "llvm", "--emit", "so,h"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(out / f"{NAME}.so"))
    lib.mnist_cnn_workspace_size.restype = ctypes.c_size_t
    lib.mnist_cnn_workspace_size.argtypes = [ctypes.c_int64]
    lib.mnist_cnn_predict.restype = ctypes.c_int
    lib.mnist_cnn_predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.mnist_cnn_predict_checked.restype = ctypes.c_int
    lib.mnist_cnn_predict_checked.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_size_t]
    with open(out / f"{NAME}.h") as f:
        header = f.read()
    macros = {k: int(v) for k, v in re.findall(r"#define mnist_cnn_(\w+) (-?\d+)", header)}
    return {"tmp": tmp, "gcnn": gcnn, "libdir": out, "lib": lib, "header": header, "macros": macros,
            "runtime": gc.load(gcnn), "x_test": x_test, "y_test": y_test}


def c_predict(lib, x, workspace_offset=0):
    """Probabilities from NAME_predict on float32 NHWC images x."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    out = np.full((n, 10), np.nan, np.float32)
    ws = np.empty(lib.mnist_cnn_workspace_size(n) + workspace_offset, np.uint8)
    rc = lib.mnist_cnn_predict(x.ctypes.data, n, out.ctypes.data, ws.ctypes.data + workspace_offset)
    assert rc == OK
    return out


def test_header_states_the_model_sizes(exported):
    m, h = exported["macros"], exported["header"]
    assert (m["INPUT_H"], m["INPUT_W"], m["INPUT_C"], m["INPUT_SIZE"], m["OUTPUT_SIZE"]) == (28, 28, 1, 784, 10)
    assert (m["OK"], m["ERR_NULL_ARG"], m["ERR_BAD_BATCH"], m["ERR_WORKSPACE_TOO_SMALL"]) == (0, 1, 2, 3)
    # the memory plan (`graphcnn show --memory`): 28,032 bytes per image (conv+pool fused: the pooled outputs only), nothing fixed
    assert (m["ARENA_PER_IMAGE_BYTES"], m["ARENA_FIXED_BYTES"]) == (28032, 0)
    assert "#ifndef GRAPHCNN_MNIST_CNN_H" in h and "#include <stdint.h>" in h and "#include <stddef.h>" in h
    for proto in ("size_t mnist_cnn_workspace_size(int64_t batch);",
                  "int mnist_cnn_predict(const float *input, int64_t batch, float *output, void *workspace);"):
        assert proto in h


def test_c_program_classifies_all_test_images_like_the_runtime(exported):
    if shutil.which("make") is None:
        pytest.skip("no `make` on PATH to build examples/embed_c")
    tmp, x_test = exported["tmp"], exported["x_test"]
    exe = tmp / "classify"
    res = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "examples", "embed_c"), f"MODEL={NAME}",
                          f"LIBDIR={exported['libdir']}", f"OUT={exe}", f"CC={c_compiler()}"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    images = tmp / "t10k-images.idx"
    write_idx(str(images), x_test)
    run = subprocess.run([str(exe), str(images)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    classes = np.array([int(line) for line in run.stdout.split()])
    expect = exported["runtime"].predict(x_test / 255.0).argmax(-1)
    assert classes.shape == (2000,)
    np.testing.assert_array_equal(classes, expect)
    assert (classes == exported["y_test"]).mean() > 0.5      # trained: far above chance (0.1)
    # --probs prints the class then the output row
    run = subprocess.run([str(exe), "--probs", "--batch", "7", str(images)], capture_output=True, text=True)
    rows = np.array([[float(v) for v in line.split()] for line in run.stdout.splitlines()[:20]])
    np.testing.assert_allclose(rows[:, 1:], exported["runtime"].predict(x_test[:20] / 255.0), atol=1e-5)
    np.testing.assert_array_equal(rows[:, 0], classes[:20])


def test_c_program_rejects_a_bad_file(exported):
    exe = exported["tmp"] / "classify"
    if not exe.exists():
        pytest.skip("examples/embed_c was not built")
    bad = exported["tmp"] / "bad.idx"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))     # a gzip header, not raw IDX
    run = subprocess.run([str(exe), str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and "not a raw uint8" in run.stderr


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_probabilities_match_the_runtime(exported, batch):
    x = (exported["x_test"][:300] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    got = np.concatenate([c_predict(exported["lib"], x[s:s + batch]) for s in range(0, 300, batch)])
    np.testing.assert_allclose(got, exported["runtime"].predict(x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_unaligned_workspace_gives_the_same_result(exported):
    x = (exported["x_test"][:5] / 255.0).astype(np.float32)
    base = c_predict(exported["lib"], x)
    for offset in (1, 3, 17, 63):
        np.testing.assert_array_equal(c_predict(exported["lib"], x, workspace_offset=offset), base)


def test_workspace_size_is_exact_and_monotone(exported):
    lib, m = exported["lib"], exported["macros"]
    sizes = [lib.mnist_cnn_workspace_size(b) for b in range(1, 300)]
    # a library for this host holds its GEMM weights packed at export (tests/test_prepack.py), so no kernel
    # needs scratch: the workspace is the planned arena alone
    scratch = m["SCRATCH_FIXED_BYTES"]
    assert m["SCRATCH_PER_IMAGE_BYTES"] == 0 and scratch == 0
    assert sizes == [b * 28032 + scratch + 64 for b in range(1, 300)]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    for bad in (0, -1, -(2 ** 63), m["MAX_BATCH"] + 1, 2 ** 62):
        assert lib.mnist_cnn_workspace_size(bad) == 0, bad
    assert lib.mnist_cnn_workspace_size(m["MAX_BATCH"]) == m["MAX_BATCH"] * 28032 + scratch + 64 < 2 ** 63


def test_predict_writes_only_the_output_rows_and_the_workspace(exported):
    lib = exported["lib"]
    n = 3
    x = (exported["x_test"][:n] / 255.0).astype(np.float32)
    out = np.full((n + 2, 10), -7.0, np.float32)           # 2 guard rows after the output
    need = lib.mnist_cnn_workspace_size(n)
    ws = np.full(need + 4096, 0xAB, np.uint8)              # guard bytes after the workspace
    assert lib.mnist_cnn_predict_checked(x.ctypes.data, n, out.ctypes.data, ws.ctypes.data, need) == OK
    assert (out[n:] == -7.0).all()
    assert (ws[need:] == 0xAB).all()


def test_error_codes(exported):
    lib = exported["lib"]
    x = np.zeros((4, 28, 28, 1), np.float32)
    out = np.zeros((4, 10), np.float32)
    need = lib.mnist_cnn_workspace_size(4)
    ws = np.zeros(need, np.uint8)
    xp, op, wp = x.ctypes.data, out.ctypes.data, ws.ctypes.data
    assert lib.mnist_cnn_predict(None, 4, op, wp) == ERR_NULL_ARG
    assert lib.mnist_cnn_predict(xp, 4, None, wp) == ERR_NULL_ARG
    assert lib.mnist_cnn_predict(xp, 4, op, None) == ERR_NULL_ARG
    for batch in (0, -1, exported["macros"]["MAX_BATCH"] + 1):
        assert lib.mnist_cnn_predict(xp, batch, op, wp) == ERR_BAD_BATCH
        assert lib.mnist_cnn_predict_checked(xp, batch, op, wp, need) == ERR_BAD_BATCH
    assert lib.mnist_cnn_predict_checked(None, 4, op, wp, need) == ERR_NULL_ARG
    assert lib.mnist_cnn_predict_checked(xp, 4, op, wp, need - 1) == ERR_WORKSPACE_TOO_SMALL
    assert lib.mnist_cnn_predict_checked(xp, 4, op, wp, 0) == ERR_WORKSPACE_TOO_SMALL
    assert lib.mnist_cnn_predict_checked(xp, 4, op, wp, need) == OK
    assert lib.mnist_cnn_predict_checked(xp, 3, op, wp, need) == OK     # a smaller batch fits too


def test_concurrent_calls_with_separate_workspaces(exported):
    lib = exported["lib"]
    x = (exported["x_test"][:64] / 255.0).astype(np.float32)
    expect = c_predict(lib, x)
    results = [None] * 4

    def work(i):
        results[i] = [c_predict(lib, x) for _ in range(5)]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        for got in r:
            np.testing.assert_array_equal(got, expect)


def test_batch1_latency_report(exported):
    """Prints batch-1 latency through the C API (ctypes) and through gc.load(...).predict. No timing asserts."""
    lib, rt = exported["lib"], exported["runtime"]
    x = np.ascontiguousarray(exported["x_test"][:1] / 255.0, np.float32).reshape(1, 28, 28, 1)
    out = np.empty((1, 10), np.float32)
    ws = np.empty(lib.mnist_cnn_workspace_size(1), np.uint8)
    xp, op, wp, f = x.ctypes.data, out.ctypes.data, ws.ctypes.data, lib.mnist_cnn_predict

    def median_us(call, reps):
        for _ in range(20):
            call()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    c_us = median_us(lambda: f(xp, 1, op, wp), 1000)
    py_us = median_us(lambda: rt.predict(x), 1000)
    np.testing.assert_allclose(out, rt.predict(x), atol=1e-5)
    print(f"\nbatch-1 latency (median of 1000): C API via ctypes {c_us:.1f} us, "
          f"gc.load(...).predict {py_us:.1f} us")


# -- write_native directly: argument checks and the other emit kinds ---------------------------------
def inference_graph_and_weights():
    from ir.passes import run_pipeline
    model = load_example(NAME)
    g = model.inference_graph()
    return run_pipeline(g, "inference").graph, model.weights


def test_write_native_emits_obj_llvm_asm(tmp_path):
    from backends.llvm.export import write_native
    g, w = inference_graph_and_weights()
    paths = write_native(g, w, str(tmp_path), ["obj", "llvm", "asm", "h"])
    assert [os.path.basename(p) for p in paths] == [f"{NAME}.ll", f"{NAME}.s", f"{NAME}.o", f"{NAME}.h"]
    ll = (tmp_path / f"{NAME}.ll").read_text()
    assert re.search(r"define .*i64 @mnist_cnn_workspace_size\(i64", ll) and "@mnist_cnn_predict_checked" in ll
    assert (tmp_path / f"{NAME}.o").read_bytes()[:4] == b"\x7fELF"
    assert "mnist_cnn_predict" in (tmp_path / f"{NAME}.s").read_text()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]       # no temp files left


def test_write_native_rejects_bad_arguments(tmp_path):
    from backends.llvm.export import write_native
    g, w = inference_graph_and_weights()
    with pytest.raises(ValueError, match="unknown emit"):
        write_native(g, w, str(tmp_path), ["so", "py"])
    with pytest.raises(ValueError, match="emit is empty"):
        write_native(g, w, str(tmp_path), [])
    missing = dict(w)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="weights has no entry"):
        write_native(g, missing, str(tmp_path), ["h"])
    wrong = {k: np.zeros((3,), np.float32) for k in w}
    with pytest.raises(ValueError, match="has shape"):
        write_native(g, wrong, str(tmp_path), ["h"])


def test_missing_c_compiler_is_a_clear_error(monkeypatch):
    from backends.llvm.export import NativeExportError, find_c_compiler
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(NativeExportError, match="needs a C compiler"):
        find_c_compiler()


def test_c_identifier():
    from backends.llvm.export import c_identifier
    assert c_identifier("mnist_cnn") == "mnist_cnn"
    # a name that had to change carries 8 hex digits of its SHA-256: 'my-net' and 'my_net' stay distinct
    assert c_identifier("my-net.v2") == "my_net_v2_" + hashlib.sha256(b"my-net.v2").hexdigest()[:8]
    assert c_identifier("my_net_v2") == "my_net_v2"
    assert c_identifier("3layers") == "g3layers_" + hashlib.sha256(b"3layers").hexdigest()[:8]
    assert c_identifier("") == "model"


def test_docs_service_recipe_serves_predictions(exported):
    """The ThreadingHTTPServer recipe in docs/embedding.md, run as written (model path and port swapped)."""
    import json
    import urllib.error
    import urllib.request
    with open(os.path.join(ROOT, "docs", "embedding.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    recipe = next(b for b in blocks if "ThreadingHTTPServer" in b)
    namespace = {"__name__": "embedding_recipe"}
    exec(recipe.replace('"mnist_cnn.gcnn"', repr(exported["gcnn"])), namespace)
    server = namespace["ThreadingHTTPServer"](("127.0.0.1", 0), namespace["Handler"])
    namespace["Handler"].log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        x = exported["x_test"][:4]
        with urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(x.tolist()).encode())) as r:
            reply = json.loads(r.read())
        expect = exported["runtime"].predict(x / 255.0)
        assert reply["classes"] == expect.argmax(-1).tolist()
        np.testing.assert_allclose(reply["probabilities"], expect, atol=1e-6)
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(urllib.request.Request(url, data=b"[[1, 2]]"))
        assert bad.value.code == 400
    finally:
        server.shutdown()
        server.server_close()
