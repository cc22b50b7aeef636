"""The LLVM backend against the NumPy backend: every op forward and backward (through gradient graphs),
the example networks' inference and training steps, dropout masks, input checking."""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphcnn as gc
import ir
from backends.llvm import compile_llvm
from backends.llvm.jit import host_target
from backends.numpy import compile_numpy
from ir.ops import emit
from conftest import load_example

CASES = {
    "conv_valid_relu": (lambda g, x, w, b: emit("conv2d", x, w, b, activation="relu"), [(None, 9, 8, 3), (3, 3, 3, 5), (5,)]),
    "conv_same_s2": (lambda g, x, w: emit("conv2d", x, w, stride=2, padding="same"), [(None, 9, 9, 2), (3, 3, 2, 4)]),
    "conv_dil_pad": (lambda g, x, w: emit("conv2d", x, w, padding=((1, 0), (2, 1)), dilation=2), [(None, 9, 8, 1), (2, 3, 1, 6)]),
    "conv_tanh_5x5": (lambda g, x, w, b: emit("conv2d", x, w, b, activation="tanh", padding="same"), [(None, 8, 8, 4), (5, 5, 4, 16), (16,)]),
    "maxpool_2": (lambda g, x: emit("max_pool2d", x, pool=2), [(None, 8, 8, 3)]),
    "maxpool_3s2same": (lambda g, x: emit("max_pool2d", x, pool=3, stride=2, padding="same"), [(None, 7, 7, 3)]),
    "avgpool_3s1": (lambda g, x: emit("avg_pool2d", x, pool=3, stride=1, padding="same"), [(None, 6, 6, 2)]),
    "avgpool_incl": (lambda g, x: emit("avg_pool2d", x, pool=2, stride=1, padding=((0, 1), (1, 0)), count_include_pad=True), [(None, 5, 5, 2)]),
    "gap": (lambda g, x: emit("global_avg_pool2d", x), [(None, 4, 5, 3)]),
    "dense_sigmoid": (lambda g, x, w, b: emit("dense", x, w, b, activation="sigmoid"), [(None, 13), (13, 7), (7,)]),
    "matmul_tt": (lambda g, a, b: emit("matmul", a, b, transpose_a=True, transpose_b=True), [(6, 5), (3, 6)]),
    "broadcast": (lambda g, a, b, c: emit("mul", emit("sub", emit("add", a, b), c), a), [(None, 3, 4), (4,), (3, 1)]),
    "unary": (lambda g, x: emit("tanh", emit("sigmoid", emit("neg", emit("scale", x, factor=1.5)))), [(None, 5, 3)]),
    "softmaxes": (lambda g, x: emit("add", emit("softmax", x, axis=1), emit("log_softmax", x)), [(None, 4, 6)]),
    "shapes": (lambda g, x: emit("transpose", emit("reshape", emit("flatten", x), shape=(None, 6, 4)), perm=(0, 2, 1)), [(None, 2, 3, 4)]),
    "bias": (lambda g, x, b: emit("relu", emit("bias_add", x, b)), [(None, 3, 3, 4), (4,)]),
}


def _feed(g, batch, rng):
    return {v.name: rng.standard_normal(v.type.concrete(batch)).astype(np.float32) for v in g.inputs}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_forward_and_gradients_match_numpy(case):
    build, shapes = CASES[case]
    g = ir.Graph(case)
    ins = [g.input(f"in{i}", s) for i, s in enumerate(shapes)]
    out = build(g, *ins)
    t = g.input("target", out.shape)
    g.output(out, emit("mse", out, t))
    gg = ir.grad(g, wrt=[v.name for v in ins], loss=g.outputs[1].name)
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        feed = _feed(gg, batch, rng)
        ref = compile_numpy(gg)(**feed)
        got = compile_llvm(gg)(**feed)
        for r, o in zip(ref, got):
            np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss,from_logits", [("sparse_categorical_crossentropy", True),
                                              ("sparse_categorical_crossentropy", False),
                                              ("categorical_crossentropy", True),
                                              ("categorical_crossentropy", False), ("mse", False)])
def test_losses_match(loss, from_logits):
    g = ir.Graph("l")
    p = g.input("p", (None, 6))
    t = g.input("t", (None,) if loss.startswith("sparse") else (None, 6))
    q = emit("softmax", p) if not from_logits and loss != "mse" else p
    g.output(emit(loss, q, t, **({} if loss == "mse" else {"from_logits": from_logits})))
    gg = ir.grad(g, wrt=["p"])
    rng = np.random.default_rng(1)
    feed = {"p": rng.standard_normal((5, 6)).astype(np.float32) * 3,
            "t": rng.integers(0, 6, 5).astype(np.float32) if loss.startswith("sparse") else
            rng.random((5, 6)).astype(np.float32)}
    for r, o in zip(compile_numpy(gg)(**feed), compile_llvm(gg)(**feed)):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-6)


def test_dropout_masks_identical_across_backends():
    g = ir.Graph("d")
    x = g.input("x", (None, 300, 7))
    s = g.input("s", ())
    g.output(emit("dropout", x, s, rate=0.3, seed=12345))
    xs = np.ones((50, 300, 7), np.float32)
    for step in (0, 1, 77):
        a = compile_numpy(g)(x=xs, s=np.float32(step))
        b = compile_llvm(g)(x=xs, s=np.float32(step))
        assert np.array_equal(a, b)
        assert abs((a > 0).mean() - 0.7) < 0.01


@pytest.mark.parametrize("name", ["mnist_cnn", "lenet5", "seed_dense"])
def test_examples_inference_match(name):
    m = load_example(name)
    g = m.inference_graph()
    x = np.random.default_rng(2).random((9,) + tuple(m.input_shape)).astype(np.float32)
    ref = gc.compile(g, "numpy", m.weights)(x=x)
    got = gc.compile(g, "llvm", m.weights)(x=x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_cnn", "lenet5"])
def test_training_100_steps_match_numpy(name):
    """Weights agree closely for the first steps; over 100 steps float32 rounding differences flip a few
    relu/max-pool decisions and Adam amplifies them (NumPy vs NumPy with a different summation order
    diverges the same way), so the 100-step run is compared by its loss curve and accuracy."""
    from graphcnn.datasets import mnist
    (x, y), _ = mnist.load_data()
    x = x[:1280].astype(np.float32) / 255
    y = y[:1280]
    runs = {}
    for backend in ("numpy", "llvm"):
        m = load_example(name)
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], backend=backend)
        m.fit(x, y, epochs=1, batch_size=128, seed=0, verbose=0, shuffle=False)        # 10 steps
        w10 = m.get_weights()
        h = m.fit(x, y, epochs=9, batch_size=128, seed=0, verbose=0)                  # 90 more steps
        runs[backend] = (w10, h.history, m.evaluate(x, y))
    (wa, ha, ea), (wb, hb, eb) = runs["numpy"], runs["llvm"]
    for k in wa:   # after 10 steps: all but a handful of weights (near-dead units) within 1e-3
        diff = np.abs(wb[k] - wa[k])
        assert (diff > 1e-3).mean() < 1e-3 and diff.max() < 1e-2, (k, diff.max(), (diff > 1e-3).sum())
    np.testing.assert_allclose(hb["loss"], ha["loss"], rtol=1e-2)
    np.testing.assert_allclose(eb, ea, rtol=1e-2, atol=5e-3)


def test_bad_inputs_are_checked_before_native_code():
    m = load_example("mnist_cnn")
    fn = gc.compile(m.inference_graph(), "llvm", m.weights)
    with pytest.raises(ValueError, match="shape"):
        fn(x=np.zeros((2, 28, 27, 1), np.float32))
    with pytest.raises(ValueError, match="numbers"):
        fn(x=np.array([["a"]]))
    with pytest.raises(TypeError, match="missing"):
        fn()
    out = fn(x=np.asfortranarray(np.zeros((3, 28, 28, 1), np.float64)))   # converted, not rejected
    assert out.shape == (3, 10)


def test_asm_uses_host_vectors():
    from backends.llvm.jit import host_target
    m = load_example("mnist_cnn")
    fn = gc.compile(m.inference_graph(), "llvm", m.weights)
    reg = {512: "zmm", 256: "ymm", 128: "xmm"}[host_target().vector_bits]
    assert reg in fn.asm


def test_compiled_code_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHCNN_CACHE", str(tmp_path))
    m = load_example("lenet5")
    g = m.inference_graph()
    x = np.random.default_rng(3).random((4, 28, 28, 1)).astype(np.float32)
    cold = gc.compile(g, "llvm", m.weights)
    warm = gc.compile(g, "llvm", m.weights)
    assert [p.jit.cache_hit for p in cold._parts] == [False]
    assert [p.jit.cache_hit for p in warm._parts] == [True]
    assert list(tmp_path.glob("*.gcjit"))        # verified entries (backends/llvm/jit.py)
    np.testing.assert_array_equal(cold(x=x), warm(x=x))


def test_fused_code_has_no_separate_bias_or_relu_pass():
    m = load_example("mnist_cnn")
    g = m.inference_graph()
    npx = gc.compile(g, "numpy", m.weights)
    assert "K.bias_add(" not in npx.source and "K.relu(" not in npx.source
    assert npx.source.count("activation='relu'") == 2
    native = gc.compile(g, "llvm", m.weights)
    kernels = [line for line in native.llvm_ir.splitlines() if line.startswith("define")]
    assert not any("_relu" in k or "_bias_add" in k for k in kernels), kernels
    # one kernel per conv (plus, with several threads, the row-split variant a batch-1 team runs)
    assert sum("_conv2d" in k and "_conv2d_rows" not in k for k in kernels) == 2


# ------------------------------------------------------------------------------------------------------
# portable native builds: graphcnn compile --cpu / --features

def _c_compiler():
    return next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
                None)


@pytest.mark.skipif(not host_target().triple.startswith("x86_64"), reason="x86-64 CPU names")
def test_avx2_baseline_library_runs_here_and_matches(tmp_path):
    """A .so built for the x86-64-v3 (AVX2) baseline uses no 512-bit registers, records its target in
    the header, and runs on this host (any AVX-512 host runs AVX2 code) with the runtime's outputs."""
    if _c_compiler() is None:
        pytest.skip("no C compiler to link the shared library")
    m = load_example("lenet5")
    m.compile(backend="numpy")
    gcnn = str(tmp_path / "lenet5.gcnn")
    m.save(gcnn)
    out = tmp_path / "lib"
    res = subprocess.run([sys.executable, "-m", "graphcnn.cli", "compile", gcnn, "-o", str(out), "--cpu",
                          "x86-64-v3", "--emit", "so,h,asm"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    header = (out / "lenet5.h").read_text()
    assert '#define lenet5_TARGET_CPU "x86-64-v3"' in header
    assert "Target CPU: x86-64-v3 (256-bit vectors)" in header
    asm = (out / "lenet5.s").read_text()
    assert "%ymm" in asm and "%zmm" not in asm
    lib = ctypes.CDLL(str(out / "lenet5.so"))
    lib.lenet5_workspace_size.restype = ctypes.c_size_t
    lib.lenet5_workspace_size.argtypes = [ctypes.c_int64]
    lib.lenet5_predict.restype = ctypes.c_int
    lib.lenet5_predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    x = np.random.default_rng(5).random((3, 28, 28, 1)).astype(np.float32)
    got = np.full((3, 10), np.nan, np.float32)
    ws = np.empty(lib.lenet5_workspace_size(3), np.uint8)
    assert lib.lenet5_predict(x.ctypes.data, 3, got.ctypes.data, ws.ctypes.data) == 0
    np.testing.assert_allclose(got, gc.load(gcnn).predict(x), rtol=1e-4, atol=1e-6)
    assert re.search(r"#define lenet5_TARGET_FEATURES \"\"", header)


def test_bad_cpu_or_features_are_usage_errors(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = os.path.join(root, "examples", "lenet5.py")
    for extra, msg in [(["--cpu", "no-such-cpu"], "not a recognized processor"),
                       (["--features", "avx2"], "comma-separated"),
                       (["--features", "+avx2 */ int x; /*"], "comma-separated"),
                       (["--target", "numpy", "--cpu", "x86-64-v3"], "need --target llvm")]:
        res = subprocess.run([sys.executable, "-m", "graphcnn.cli", "compile", model, "-o", str(tmp_path / "o"),
                              *extra], capture_output=True, text=True, cwd=root)
        assert res.returncode == 2 and msg in res.stderr, (extra, res.returncode, res.stderr)


def test_header_text_is_quoted_for_c():
    from backends.llvm.export import c_comment_text, c_string_literal
    hostile = 'a*/ int evil; /*b\n"\\?\x00é'
    comment = c_comment_text(hostile)
    assert "*/" not in comment and "/*" not in comment and "\n" not in comment and "\x00" not in comment
    assert all(" " <= ch <= "~" for ch in comment)
    lit = c_string_literal(hostile)
    body = lit[1:-1]
    assert lit[0] == lit[-1] == '"' and '"' not in body.replace('\\042', '') and "\n" not in body
    assert all(" " <= ch <= "~" for ch in lit)


# ------------------------------------------------------------------------------------------------------
# native calls never crash: no malloc, small stack (issue 10, item 3)

_NATIVE_CALL = r"""
import ctypes, resource, sys, threading
import numpy as np
lib_path, x_path, want_path, mode = sys.argv[1:5]
lib = ctypes.CDLL(lib_path)
lib.mnist_cnn_workspace_size.restype = ctypes.c_size_t
lib.mnist_cnn_workspace_size.argtypes = [ctypes.c_int64]
lib.mnist_cnn_predict.restype = ctypes.c_int
lib.mnist_cnn_predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
x = np.load(x_path)
n = x.shape[0]
out = np.full((n, 10), np.nan, np.float32)
ws = np.zeros(lib.mnist_cnn_workspace_size(n), np.uint8)
result = {}
def call():
    result["rc"] = lib.mnist_cnn_predict(x.ctypes.data, n, out.ctypes.data, ws.ctypes.data)
if mode == "rlimit":
    # from here on the process cannot grow by more than 8 MiB: any malloc of real size fails
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * resource.getpagesize() + (8 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    call()
else:
    threading.stack_size(128 * 1024)       # musl's default thread stack
    t = threading.Thread(target=call)
    t.start()
    t.join()
assert result["rc"] == 0, result
np.testing.assert_allclose(out, np.load(want_path), rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.fixture(scope="module")
def mnist_library(tmp_path_factory):
    from backends.llvm.export import write_native
    from ir.passes import run_pipeline
    if _c_compiler() is None:
        pytest.skip("no C compiler to link the shared library")
    tmp = tmp_path_factory.mktemp("native")
    m = load_example("mnist_cnn")
    g = run_pipeline(m.inference_graph(), "inference").graph
    write_native(g, m.weights, str(tmp), ["so", "h", "asm"])
    x = np.random.default_rng(2).random((5, 28, 28, 1)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    np.save(tmp / "want.npy", gc.compile(m.inference_graph(), "numpy", m.weights)(x=x))
    return tmp


@pytest.mark.parametrize("mode", ["rlimit", "small_stack"])
def test_native_predict_needs_no_heap_and_little_stack(mnist_library, mode):
    """Under RLIMIT_AS (no room to allocate) and on a 128 KiB thread stack the C API works: kernel
    scratch comes from the caller's workspace, frames are small. A signal would fail this test."""
    t = mnist_library
    res = subprocess.run([sys.executable, "-c", _NATIVE_CALL, str(t / "mnist_cnn.so"), str(t / "x.npy"),
                          str(t / "want.npy"), mode], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, (res.returncode, res.stderr[-2000:])


def test_native_stack_frames_stay_below_the_stated_bound(mnist_library):
    from backends.llvm.export import STACK_BOUND_BYTES
    asm = (mnist_library / "mnist_cnn.s").read_text()
    header = (mnist_library / "mnist_cnn.h").read_text()
    assert f"less than {STACK_BOUND_BYTES} bytes of stack" in header
    assert "malloc" not in asm and "alloca" not in asm
    frames = [int(v) for v in re.findall(r"subq\s+\$(\d+),\s*%rsp", asm)]
    assert frames, "no stack frames found in the assembly"
    # predict -> run -> graph -> one kernel: four frames at most, each well below a quarter of the bound
    assert max(frames, default=0) + 64 * 8 < STACK_BOUND_BYTES // 4, sorted(frames)[-5:]
