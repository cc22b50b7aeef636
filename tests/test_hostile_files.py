"""Hostile and careless inputs cost bounded memory and time, and are refused with one clear error (issue 10).

Each resource case measures peak RSS in a subprocess (resource.getrusage) and compares it with what the
valid content needs; no timings are asserted. Cases: a meta.json model config that disagrees with the
graph, padding far beyond the kernel, a weights bomb, Average/Paeth PNGs, arenas after a large batch,
inputs in a shape the model does not accept."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphcnn as gc
import ir
from graphcnn import layers as L
from graphcnn.artifact import ArtifactError, model_from_artifact, read_artifact
from graphcnn.datasets.idx import DatasetError
from graphcnn.datasets import png as png_module
from graphcnn.datasets.png import read_png_gray
from graphcnn.errors import GraphcnnError
from conftest import ROOT
from test_artifact_fuzz import _entries, _resign, _zip
from test_datasets import build_png, png_chunk

MB = 1 << 20


def _peak_rss_of(code: str) -> dict:
    """Run `code` in a fresh interpreter; -> {"baseline": MB after imports, "peak": MB, "result": str}."""
    script = textwrap.dedent("""
        import json, resource, sys
        import numpy as np, graphcnn as gc, graphcnn.artifact, graphcnn.datasets.png
        def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        baseline = rss_mb()
        try:
        {body}
            result = "ok"
        except Exception as e:
            result = f"{{type(e).__name__}}: {{e}}"
        print(json.dumps({{"baseline": baseline, "peak": rss_mb(), "result": result}}))
        """).format(body=textwrap.indent(textwrap.dedent(code), "    "))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _dense_model(units=10, activation="softmax"):
    return gc.Sequential([L.Input((28, 28, 1)), L.Flatten(), L.Dense(units, activation=activation)],
                         name="seed", seed=1)


def _edited(path, out, edit_meta=None, edit_graph=None, entries=None):
    """Write a re-signed copy of the artifact at `path` with meta.json / graph.json edited."""
    e = entries or _entries(open(path, "rb").read())
    meta, graph = json.loads(e["meta.json"]), json.loads(e["graph.json"])
    if edit_meta:
        edit_meta(meta)
    if edit_graph:
        edit_graph(graph)
    e = dict(e, **{"meta.json": json.dumps(meta).encode(), "graph.json": json.dumps(graph).encode()})
    out.write_bytes(_zip(_resign(e)))
    return out


@pytest.fixture(scope="module")
def seed_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "seed.gcnn"
    _dense_model().save(path)
    return path


# -- 1. meta.json's model config must describe the graph -----------------------------------------------
def _set_dense(**config):
    def edit(meta):
        meta["model"]["layers"][2]["config"].update(config)
    return edit


def test_config_describing_another_model_is_refused(seed_artifact, tmp_path):
    # relu instead of softmax: same weights, different model; before the fix training resumed the relu model
    bad = _edited(seed_artifact, tmp_path / "relu.gcnn", _set_dense(activation="relu"))
    with pytest.raises(ArtifactError, match=r"relu.gcnn: meta.json's model config describes a different model "
                                            r"than graph.json .*relu.*softmax"):
        model_from_artifact(bad)
    assert gc.load(bad, backend="numpy").predict(np.zeros((1, 28, 28))).sum() == pytest.approx(1.0)  # graph intact


def test_config_bomb_is_refused_before_any_weight_is_built(seed_artifact, tmp_path):
    # a 3-million-unit Dense in the config: 9.4 GB of float32 weights (17.5 GB while initialized in float64)
    bomb = _edited(seed_artifact, tmp_path / "bomb.gcnn", _set_dense(units=3_000_000))
    assert bomb.stat().st_size < 40_000
    r = _peak_rss_of(f"graphcnn.artifact.model_from_artifact({str(bomb)!r})")
    assert r["result"].startswith("ArtifactError") and "f32[784,3000000]" in r["result"], r
    assert r["peak"] - r["baseline"] < 50, r      # MB; the config's weights would be 9,400 MB


def test_matching_config_rebuilds_the_same_model(seed_artifact):
    model = model_from_artifact(seed_artifact)
    x = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
    assert np.array_equal(model.predict(x), gc.load(seed_artifact).predict(x))


def test_train_refuses_a_mismatched_artifact(seed_artifact, tmp_path):
    bad = _edited(seed_artifact, tmp_path / "mismatch.gcnn", _set_dense(activation="sigmoid"))
    p = subprocess.run([sys.executable, "-m", "graphcnn.cli", "train", str(bad), "--epochs", "1", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "describes a different model" in p.stderr


# -- 2. padding bounded by the kernel ------------------------------------------------------------------
def _conv_graph(x_shape, w_shape, **attrs):
    g = gc.Graph("c")
    y = gc.ops.conv2d(g.input("x", (None,) + x_shape), g.input("w", w_shape), **attrs)
    g.output(y)
    return g


@pytest.mark.parametrize("w_shape,attrs,message", [
    ((3, 3, 1, 8), dict(padding=4095), r"conv2d: padding \(4095, 4095\) along the height is larger than the kernel "
                                       r"extent 3 \(kernel \(3, 3\), dilation \(1, 1\)\)"),
    ((3, 3, 1, 8), dict(padding=((0, 0), (4, 1))), r"padding \(4, 1\) along the width is larger than the kernel extent 3"),
    ((2, 2, 1, 8), dict(padding=4095, dilation=4095), r"with dilation 4095 gives an output of 4123 pixels, more "
                                                      r"than the 31 an undilated 2-tap kernel"),
    ((30, 30, 1, 2), {}, r"^conv2d: kernel extent \(30, 30\) \(kernel \(30, 30\), dilation \(1, 1\)\) is larger than "
                        r"the padded input \(28, 28\) \(input \(28, 28\), padding \(\(0, 0\), \(0, 0\)\)\); use "
                        r"padding='same' or a smaller kernel$"),
])
def test_conv_geometry_refusals_name_the_op_and_values(w_shape, attrs, message):
    with pytest.raises(ir.IRError, match=message):
        _conv_graph((28, 28, 1), w_shape, **attrs)


def test_pool_window_larger_than_input_message():
    g = gc.Graph("p")
    with pytest.raises(ir.IRError, match=r"^max_pool2d: pool window extent \(30, 30\) is larger than the padded "
                                         r"input \(28, 28\)"):
        gc.ops.max_pool2d(g.input("x", (None, 28, 28, 1)), 30)


def _naive_conv(x, w, pads, stride, dilation):
    """Independent float64 reference: explicit zero padding, then the sliding sum."""
    (t, b), (l, r) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (t, b), (l, r), (0, 0)))
    kh, kw, c, f = w.shape
    eh, ew = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    oh, ow = (xp.shape[1] - eh) // stride[0] + 1, (xp.shape[2] - ew) // stride[1] + 1
    out = np.zeros((x.shape[0], oh, ow, f))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for bb in range(kw):
                    pix = xp[:, i * stride[0] + a * dilation[0], j * stride[1] + bb * dilation[1], :]
                    out[:, i, j, :] += pix @ w[a, bb].astype(np.float64)
    return out


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("x_shape,w_shape,pads,stride,dilation", [
    ((7, 5, 2), (3, 2, 2, 3), ((3, 3), (2, 2)), (1, 1), (1, 1)),     # pad == extent on every side: the bound
    # 1x1 image and kernel, pad == extent 1 (2 channels: the 1-channel case is H1's tests/test_count1.py)
    ((1, 1, 2), (1, 1, 2, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ((11, 13, 3), (2, 3, 3, 5), ((3, 0), (1, 5)), (2, 3), (2, 2)),   # dilated extents 3 and 5
])
def test_conv_at_the_padding_bound_matches_a_naive_reference(backend, x_shape, w_shape, pads, stride, dilation):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2,) + x_shape).astype(np.float32)
    x[0, 0, 0, 0] = np.nan                                            # NaN stays where it reaches
    w = rng.standard_normal(w_shape).astype(np.float32)
    g = _conv_graph(x_shape, w_shape, padding=pads, stride=stride, dilation=dilation)
    got = gc.compile(g, backend=backend)(x=x, w=w)
    want = _naive_conv(x, w, pads, stride, dilation)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-5, atol=1e-5)


def test_artifact_with_padding_4095_is_refused_cheaply(tmp_path):
    m = gc.Sequential([L.Input((28, 28, 1)), L.Conv2D(8, 3, padding="same"), L.Flatten(), L.Dense(2)],
                      name="pad", seed=0)
    m.save(tmp_path / "pad.gcnn")

    def pad_4095(graph):
        conv = next(n for n in graph["nodes"] if n["op"] == "conv2d")
        conv["attrs"]["padding"] = [[4095, 4095], [4095, 4095]]
    bad = _edited(tmp_path / "pad.gcnn", tmp_path / "pad4095.gcnn", edit_graph=pad_4095)
    with pytest.raises(ArtifactError, match=r"pad4095.gcnn: graph.json: .*conv2d: padding \(4095, 4095\) .*"
                                            r"larger than the kernel extent 3"):
        read_artifact(bad)


# -- 3. weights capped by what graph.json declares -----------------------------------------------------
def _npy_stream_entry(n_floats: int) -> bytes:
    """An .npz whose p0.npy declares n_floats float32 of low-entropy data (zip ratio below the bomb cap)."""
    import io
    import zipfile
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (n_floats,)})
    block = np.zeros(MB, np.uint8)
    block[::150] = np.random.default_rng(0).integers(0, 255, block[::150].size)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("p0.npy", "w", force_zip64=True) as f:
            f.write(head.getvalue())
            for _ in range(n_floats * 4 // MB):
                f.write(block.tobytes())
    return out.getvalue()


def test_weights_bomb_is_refused_after_reading_only_what_the_graph_declares(seed_artifact, tmp_path):
    e = _entries(seed_artifact.read_bytes())
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(e["weights.npz"])) as z:
        p1 = z.read("p1.npy")
    bomb_npz = _npy_stream_entry(100 * MB // 4)              # p0 claims 100 MB; the graph declares 31 kB
    with zipfile.ZipFile(io.BytesIO(bomb_npz), "a") as z:
        z.writestr("p1.npy", p1)
    bad = tmp_path / "wbomb.gcnn"
    bad.write_bytes(_zip(_resign(dict(e, **{"weights.npz": bomb_npz}))))
    r = _peak_rss_of(f"graphcnn.artifact.read_artifact({str(bad)!r})")
    assert r["result"].startswith("ArtifactError") and "graph.json declares 31400 bytes" in r["result"], r
    assert r["peak"] - r["baseline"] < 20, r      # MB; before: the 100 MB entry was read (3.2 GB for 9 MB files)


def test_inner_entry_over_its_declared_size_is_refused(seed_artifact, tmp_path):
    # an npz whose p0 is bigger than dense/kernel but the npz as a whole is within the total cap
    e = _entries(seed_artifact.read_bytes())
    import io
    a = dict(np.load(io.BytesIO(e["weights.npz"])))
    buf = io.BytesIO()
    np.savez(buf, p0=np.zeros(784 * 10 + 5000, np.float32), p1=a["p1"][:0])
    bad = tmp_path / "entry.gcnn"
    bad.write_bytes(_zip(_resign(dict(e, **{"weights.npz": buf.getvalue()}))))
    with pytest.raises(ArtifactError, match=r"weights.npz entry 'p0.npy' is \d+ bytes, over the \d+-byte limit "
                                            r"\(graph.json declares 31360 bytes for param 'dense/kernel' f32"):
        read_artifact(bad)


def test_large_valid_weights_load_within_twice_their_size(tmp_path):
    m = gc.Sequential([L.Input((784,)), L.Dense(6400), L.Dense(10)], name="big", seed=0)
    path = tmp_path / "big.gcnn"
    m.save(path)
    weights_mb = sum(w.nbytes for w in m.weights.values()) / MB       # 19.2 MB
    r = _peak_rss_of(f"g, w, meta = graphcnn.artifact.read_artifact({str(path)!r})")
    assert r["result"] == "ok"
    assert r["peak"] - r["baseline"] < 2.4 * weights_mb, (r, weights_mb)   # file bytes + arrays (measured 2.1x)


# -- 4. PNG decoding: vectorized filters, documented limits --------------------------------------------
@pytest.mark.parametrize("h,w,color_type", [(1, 1, 0), (7, 13, 2), (31, 17, 6), (13, 1, 4), (1, 29, 0), (64, 48, 6)])
def test_png_every_filter_mix_decodes_exactly(tmp_path, h, w, color_type):
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[color_type]
    rng = np.random.default_rng(h * 100 + w)
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    for filters in ([4] * h, [3] * h, list(rng.integers(0, 5, h)), list(rng.integers(0, 3, h)), [2] * h, [1] * h):
        path = tmp_path / "img.png"
        path.write_bytes(build_png(pixels, color_type, [int(f) for f in filters]))
        got = read_png_gray(path)
        if channels <= 2:
            want = pixels[:, :, 0]
        else:
            rgb = pixels[:, :, :3].astype(np.int64)
            want = ((299 * rgb[:, :, 0] + 587 * rgb[:, :, 1] + 114 * rgb[:, :, 2] + 500) // 1000).astype(np.uint8)
        assert np.array_equal(got, want), filters


def test_png_both_decoders_agree_on_none_sub_up(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    kinds = rng.integers(0, 3, 37).astype(np.uint8)
    kinds[0] = 2                                     # Up on the first row reads the all-zero row above
    assert np.array_equal(png_module._unfilter_none_sub_up(kinds, data), png_module._unfilter_wavefront(kinds, data))


def test_png_large_paeth_image_costs_what_its_pixels_need(tmp_path):
    # 2048 x 2048 gray, every row Paeth: 15 kB of file, 4 MB of pixels
    import zlib
    rows = np.zeros((2048, 2049), np.uint8)
    rows[:, 0] = 4
    rows[::7, 1::3] = 200
    ihdr = np.array([2048, 2048], ">u4").tobytes() + bytes([8, 0, 0, 0, 0])
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + png_chunk(b"IEND", b""))
    path = tmp_path / "paeth.png"
    path.write_bytes(data)
    r = _peak_rss_of(f"a = graphcnn.datasets.png.read_png_gray({str(path)!r}); assert a.shape == (2048, 2048)")
    assert r["result"] == "ok", r
    assert r["peak"] - r["baseline"] < 12 * 4, r     # MB: a few copies of the 4 MB image, int16 temporaries


@pytest.mark.parametrize("w,h,filt,message", [
    (8193, 8192, 0, r"PNG of 8193x8192 pixels is over this reader's limit of 67108864 pixels"),
    (70000, 1, 4, r"uses Average/Paeth filters; this reader decodes those only when width \+ height <= 65536"),
])
def test_png_documented_limits(tmp_path, w, h, filt, message):
    import zlib
    rows = np.zeros((h, w + 1), np.uint8) if w * h <= 1 << 20 else np.zeros((1, 2), np.uint8)
    rows[:, 0] = filt
    ihdr = np.array([w, h], ">u4").tobytes() + bytes([8, 0, 0, 0, 0])
    path = tmp_path / "limit.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows.tobytes()))
                     + png_chunk(b"IEND", b""))
    with pytest.raises(DatasetError, match=message) as err:
        read_png_gray(path)
    assert str(path) in str(err.value)


# -- 5. arenas shrink after a large batch ---------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_arena_of_a_large_batch_is_not_kept(backend, monkeypatch):
    from backends import executable as E
    m = gc.Sequential([L.Input((12, 12, 2)), L.Conv2D(6, 3, activation="relu"), L.Flatten(), L.Dense(3)],
                      name="arenas", seed=2)
    g = m.inference_graph()
    fn = gc.compile(g, backend=backend, params=m.weights, **({"threads": 1} if backend == "llvm" else {}))
    arenas = fn.arenas if backend == "numpy" else fn._main.arenas
    x = np.random.default_rng(0).standard_normal((300, 12, 12, 2)).astype(np.float32)
    small = fn(x=x[:4])
    kept = arenas.get(4)
    assert arenas.get(4) is kept                           # small arenas are reused
    monkeypatch.setattr(E, "RETAIN_ARENA_BYTES", 4 * MB)   # the batch of 300 needs more than this
    big = fn(x=x)
    assert arenas.resident_bytes() <= 4 * MB
    assert np.array_equal(fn(x=x), big)                    # same numbers from a fresh arena
    assert arenas.resident_bytes() <= 4 * MB
    assert np.array_equal(fn(x=x[:4]), small)
    # another batch size may sum in another order (BLAS blocks by the row count): close, not equal
    np.testing.assert_allclose(big[:4], small, rtol=1e-5, atol=1e-6)


def test_arena_cache_drops_largest_first(monkeypatch):
    from backends import executable as E
    monkeypatch.setattr(E, "RETAIN_ARENA_BYTES", 1000)
    cache = E.ArenaCache(lambda n: 100 * n)
    for n in (1, 2, 50):
        cache.get(n)
    cache.release(50)
    assert cache.resident_bytes() == 300 and cache.get(1).buffer.nbytes == 100
    assert cache.get(2).buffer.ctypes.data % E.ARENA_ALIGN == 0


def test_resident_memory_after_a_large_predict_is_released():
    code = """
        import resource
        m = gc.Sequential([gc.layers.Input((28, 28, 1)), gc.layers.Conv2D(32, 3, activation="relu"),
                           gc.layers.Flatten(), gc.layers.Dense(10)], name="rss", seed=0)
        fn = gc.compile(m.inference_graph(), backend="numpy", params=m.weights)
        x = np.zeros((2000, 28, 28, 1), np.float32)
        fn(x=x[:8])
        def resident(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        before = resident()
        fn(x=x)
        del x
        print("RESIDENT", before, resident())
    """
    script = "import numpy as np, graphcnn as gc\n" + textwrap.dedent(code)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    before, after = map(float, p.stdout.split("RESIDENT")[1].split())
    assert after - before < 30, (before, after)   # MB; the arena of batch 2000 is ~170 MB


# -- 6. Runtime.predict accepts only the documented input forms ---------------------------------------------
@pytest.fixture(scope="module")
def rgb_and_gray(tmp_path_factory):
    d = tmp_path_factory.mktemp("forms")
    rgb = gc.Sequential([L.Input((6, 5, 3)), L.Conv2D(2, 2), L.Flatten(), L.Dense(4)], name="rgb", seed=0)
    gray = gc.Sequential([L.Input((6, 5, 1)), L.Flatten(), L.Dense(4)], name="gray", seed=0)
    rgb.save(d / "rgb.gcnn")
    gray.save(d / "gray.gcnn")
    return gc.load(d / "rgb.gcnn", backend="numpy"), gc.load(d / "gray.gcnn", backend="numpy")


def test_nchw_array_is_refused_for_a_three_channel_model(rgb_and_gray):
    rgb, _ = rgb_and_gray
    with pytest.raises(GraphcnnError, match=r"x has shape \(2, 3, 6, 5\); model 'rgb' expects \(N, 6, 5, 3\) or "
                                            r"\(N, 90\) \(channels last: NHWC, not NCHW\)"):
        rgb.predict(np.zeros((2, 3, 6, 5), np.float32))
    for shape in [(2, 5, 6, 3), (2, 6, 15), (2, 90, 1)]:
        with pytest.raises(GraphcnnError, match=r"expects \(N, 6, 5, 3\)"):
            rgb.predict(np.zeros(shape, np.float32))


def test_documented_input_forms_give_the_same_outputs(rgb_and_gray):
    rgb, gray = rgb_and_gray
    x = np.random.default_rng(1).standard_normal((3, 6, 5, 3)).astype(np.float32)
    assert np.array_equal(rgb.predict(x.reshape(3, 90)), rgb.predict(x))
    xg = x[..., :1]
    want = gray.predict(xg)
    assert np.array_equal(gray.predict(xg[..., 0]), want)          # (N, H, W) for a 1-channel model
    assert np.array_equal(gray.predict(xg.reshape(3, 30)), want)   # flattened
    with pytest.raises(GraphcnnError, match=r"expects \(N, 6, 5, 1\) or \(N, 6, 5\) or \(N, 30\)"):
        gray.predict(xg.reshape(3, 5, 6))                           # same size, not an accepted form


@pytest.mark.parametrize("bad,message", [
    (np.full((2, 6, 5, 3), np.nan, np.float32), r"x contains 180 NaN or infinite values"),
    (np.where(np.arange(90).reshape(1, 6, 5, 3) == 7, np.inf, 0.0), r"x contains 1 NaN or infinite value$"),
    (np.zeros((2, 6, 5, 3), complex), r"x must hold real numbers, got dtype complex128"),
    (np.zeros((0, 6, 5, 3)), r"x is empty"),
])
def test_predict_refuses_non_finite_complex_and_empty(rgb_and_gray, bad, message):
    with pytest.raises(GraphcnnError, match=message):
        rgb_and_gray[0].predict(bad)
