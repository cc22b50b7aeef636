"""Pre-packed GEMM weights (gc.compile(..., frozen_params=True), gc.load's Runtime): the kernels read
weights packed once by their own pack_only variant instead of packing them on every call. The results
must be bit-identical to packing per call, on shapes with 1s and primes, NaN/inf weights, every batch
size and the intra-op team path; a replaced param is re-packed; a frozen param cannot be written in place."""
from __future__ import annotations

import numpy as np
import pytest

import graphcnn as gc
from backends.llvm import thread_pool
from graphcnn.ops import emit

from reference_nn import conv2d as ref_conv2d

CONVS = [  # (H, W, C), (kh, kw), filters, stride, padding, dilation, residual, activation
    ((1, 1, 1), (1, 1), 1, 1, "valid", 1, False, "linear"),
    ((7, 5, 3), (3, 3), 17, 1, "same", 1, True, "relu"),
    ((11, 13, 2), (2, 5), 31, (2, 3), ((1, 0), (2, 2)), 1, False, "tanh"),
    ((9, 9, 5), (3, 3), 64, 1, "valid", (2, 2), True, "linear"),
    ((13, 13, 32), (3, 3), 64, 1, "valid", 1, False, "relu"),      # mnist_cnn's conv2: intra-op splits it
]
DENSES = [(1, 1), (3, 29), (61, 5), (1600, 10), (200, 37)]


def _conv_graph(case):
    hwc, k, f, stride, padding, dil, residual, act = case
    g = gc.Graph("prepack_conv")
    x = g.input("x", (None,) + hwc)
    w, b = g.param("w", k + (hwc[2], f)), g.param("b", (f,))
    y = emit("conv2d", x, w, b, stride=stride, padding=padding, dilation=dil)
    if residual:
        y = emit("add", y, g.input("r", (None,) + tuple(y.shape[1:])))
    g.output(emit(act, y) if act != "linear" else y)
    return g


def _compare(g, params, feeds_for, batches=(1, 2, 3, 7), threads=None):
    per_call = gc.compile(g, backend="llvm", params=params, threads=threads)
    frozen = gc.compile(g, backend="llvm", params=params, threads=threads, frozen_params=True)
    assert frozen._main.layout.packed, "no weights were pre-packed"
    assert not per_call._main.layout.packed
    for n in batches:
        feeds = feeds_for(n)
        want = per_call(**feeds)
        np.testing.assert_array_equal(frozen(**feeds), want, err_msg=f"batch {n}")
    return frozen


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[0]}k{c[1]}f{c[2]}")
def test_prepacked_conv2d_is_bit_identical_to_per_call_packing(case):
    g = _conv_graph(case)
    rng = np.random.default_rng(len(case[0]) * 100 + case[2])
    w = rng.standard_normal(g.value("w").shape).astype(np.float32)
    b = rng.standard_normal(case[2]).astype(np.float32)
    w.flat[0], w.flat[-1] = np.nan, np.inf            # non-finite weights travel through the packing too
    inputs = {v.name: v for v in g.inputs}

    def feeds(n):
        return {k: rng.standard_normal((n,) + tuple(v.shape[1:])).astype(np.float32) for k, v in inputs.items()}
    frozen = _compare(g, {"w": w, "b": b}, feeds)
    # and both agree with the float64 reference where it is finite
    w2 = np.nan_to_num(w, nan=0.5, posinf=-0.25)
    frozen.state["w"] = w2                          # a replaced param is packed again
    x = feeds(3)
    got = frozen(**x)
    if case[6] or case[7] != "linear":
        return                                      # the reference below covers the plain conv cases
    hwc, k, f, stride, padding, dil = case[:6]
    node = next(nd for nd in frozen.graph.nodes if nd.op == "conv2d")
    want = ref_conv2d(x["x"].astype(np.float64), w2.astype(np.float64), b, node.attrs["stride"],
                      node.attrs["padding"], node.attrs["dilation"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("kin,units", DENSES)
def test_prepacked_dense_is_bit_identical_and_matches_the_reference(kin, units):
    g = gc.Graph("prepack_dense")
    x = g.input("x", (None, kin))
    g.output(emit("relu", emit("dense", x, g.param("w", (kin, units)), g.param("b", (units,)))))
    rng = np.random.default_rng(kin * 7 + units)
    w = rng.standard_normal((kin, units)).astype(np.float32)
    b = rng.standard_normal(units).astype(np.float32)
    frozen = _compare(g, {"w": w, "b": b}, lambda n: {"x": rng.standard_normal((n, kin)).astype(np.float32)})
    xs = rng.standard_normal((5, kin)).astype(np.float32)
    want = np.maximum(xs.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(frozen(x=xs), want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.skipif(not thread_pool.available(), reason="the native pool needs Linux on x86-64")
def test_prepacked_weights_on_the_intra_op_team_path(monkeypatch):
    monkeypatch.setenv("GRAPHCNN_INTRA_OP", "1")
    g = _conv_graph(CONVS[4])
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal(g.value("w").shape).astype(np.float32) * 0.1,
              "b": rng.standard_normal(64).astype(np.float32)}
    frozen = _compare(g, params, lambda n: {"x": rng.standard_normal((n, 13, 13, 32)).astype(np.float32)},
                      batches=(1,), threads=2)
    assert frozen._main.team_parts == 2


def test_frozen_params_are_read_only_copies_on_both_backends():
    g = gc.Graph("frozen")
    x = g.input("x", (None, 3))
    g.output(emit("dense", x, g.param("w", (3, 2))))
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    for backend in ("llvm", "numpy"):
        exe = gc.compile(g, backend=backend, params={"w": w}, frozen_params=True)
        with pytest.raises(ValueError, match="read-only"):
            exe.state["w"][0, 0] = 5
        w[0, 0] = 100                                  # the caller's array is not the executable's
        np.testing.assert_array_equal(exe(x=np.eye(3, dtype=np.float32)), np.arange(6).reshape(3, 2))
        w[0, 0] = 0
        assert w.flags.writeable
    with pytest.raises(TypeError, match="frozen_params must be a bool"):
        gc.compile(g, params={"w": w}, frozen_params="yes")


@pytest.mark.parametrize("backend", ["llvm", "numpy"])
def test_frozen_params_are_refused_for_a_training_step(backend):
    m = gc.Sequential([gc.layers.Input((4,)), gc.layers.Dense(3)])
    m.compile(optimizer="sgd", loss="mse")
    with pytest.raises(gc.IRError, match="updates its params"):
        gc.compile(m.training_graph(False), backend=backend, passes="training", frozen_params=True)


def test_runtime_packs_once_and_matches_the_model(tmp_path):
    m = gc.Sequential([gc.layers.Input((6, 6, 1)), gc.layers.Conv2D(5, 3, activation="relu"), gc.layers.Flatten(),
                       gc.layers.Dense(3)])
    path = tmp_path / "m.gcnn"
    m.save(path)
    rt = gc.load(path)
    assert len(rt.executable._main.layout.packed) == 2
    x = np.random.default_rng(0).random((4, 6, 6, 1), np.float32)
    np.testing.assert_array_equal(rt.predict(x), m.predict(x))
    np.testing.assert_array_equal(rt.predict(x[:1]), m.predict(x[:1]))


def _so_predict(folder, name, x):
    """NAME_predict of folder/NAME.so on float32 images x -> (outputs, SCRATCH_FIXED_BYTES of NAME.h)."""
    import ctypes
    import os
    import re
    lib = ctypes.CDLL(os.path.join(folder, f"{name}.so"))
    size = getattr(lib, f"{name}_workspace_size")
    size.argtypes, size.restype = [ctypes.c_int64], ctypes.c_size_t
    predict = getattr(lib, f"{name}_predict")
    predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    x = np.ascontiguousarray(x, np.float32)
    out = np.full((len(x), 3), np.nan, np.float32)
    ws = np.empty(size(len(x)), np.uint8)
    assert predict(x.ctypes.data, len(x), out.ctypes.data, ws.ctypes.data) == 0
    header = open(os.path.join(folder, f"{name}.h")).read()
    return out, int(re.search(rf"#define {name}_SCRATCH_FIXED_BYTES (\d+)ULL", header).group(1))


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_exported_library_holds_packed_weights_bit_identical_to_packing_per_call(tmp_path, int8):
    """A .so for this host packs its GEMM weights at export (the pack kernels run here, once) and needs no
    kernel scratch; one for another target (here: this host named differently) packs per call. Both give
    the same bits."""
    import dataclasses
    from backends.llvm.export import NativeExportError, find_c_compiler, write_native
    from backends.llvm.jit import host_target
    from ir.passes import run_pipeline
    try:
        find_c_compiler()
    except NativeExportError as e:
        pytest.skip(str(e))
    L = gc.layers
    m = gc.Sequential([L.Input((9, 7, 2)), L.Conv2D(11, 3, activation="relu"), L.MaxPooling2D(),
                       L.Flatten(), L.Dense(3)], name="packed_so")
    m.build()
    rng = np.random.default_rng(4)
    x = rng.random((13, 9, 7, 2), np.float32)
    if int8:
        q = gc.quantize(m, x)
        g, weights = q.graph, q.weights
    else:
        g, weights = run_pipeline(m.inference_graph(), "inference").graph, m.get_weights()
    host = host_target()
    other = dataclasses.replace(host, features=",".join(filter(None, [host.features, "+sse2"])))
    assert other != host
    results = {}
    for label, target in (("host", None), ("other", other)):
        folder = tmp_path / label
        write_native(g, weights, str(folder), ["so", "h"], target=target)
        results[label] = _so_predict(str(folder), "packed_so", x)
    (packed_out, packed_scratch), (per_call_out, per_call_scratch) = results["host"], results["other"]
    np.testing.assert_array_equal(packed_out, per_call_out)
    assert packed_scratch < per_call_scratch
    want = q.predict(x) if int8 else m.predict(x)
    np.testing.assert_allclose(packed_out, want, rtol=1e-5, atol=1e-6)
