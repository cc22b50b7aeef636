"""Augmentation ops random_flip / random_translation: the per-image draw contract re-implemented here
with Python ints, an independent float64 reference (fill modes from np.pad, interpolation by explicit
loops), the adjoint checked against the reference's transposed matrix and finite differences, NumPy and
LLVM bit-identical (NaN and inf included, split batches included), identity in the inference pipeline,
and bad attributes refused with the op's name."""
import numpy as np
import pytest
from llvmlite import ir as llir

import graphcnn as gc
import ir
from backends.llvm import compile_llvm, jit
from backends.llvm.kernels import augment as A
from backends.numpy import compile_numpy
from backends.numpy import kernels as K
from ir.ops import emit
from ir.passes import run_pipeline
from ir.types import IRError
from test_autodiff import check_grads

M32 = 0xFFFFFFFF


def mix32(x):
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def draw(seed, step, image, stream):
    """The contract: r = (mix32((2i + k + 1) ^ mix32(seed * 0x9E3779B9 + step)) >> 8) * 2**-24."""
    key = mix32((seed * 0x9E3779B9 + step) & M32)
    return (mix32(((2 * image + stream + 1) & M32) ^ key) >> 8) / 2 ** 24


PAD_MODES = {"reflect": "symmetric", "wrap": "wrap", "nearest": "edge", "constant": "constant"}


def ref_flip(x, mode, seed, step):
    out = np.array(x, np.float64)
    for i in range(len(x)):
        if draw(seed, step, i, 0) < 0.5:
            if mode != "horizontal":
                out[i] = out[i, ::-1]
            if mode != "vertical":
                out[i] = out[i, :, ::-1]
    return out


def ref_shift(factor, size, r):
    """The shift in pixels, in float32 steps as the contract states."""
    lo, hi = np.float32(factor[0]), np.float32(factor[1])
    return (lo + (hi - lo) * np.float32(r)) * np.float32(size)


def ref_axis_taps(p, shift, interpolation):
    s = float(np.float32(np.float32(p) - shift))
    if interpolation == "nearest":
        return [(int(np.rint(s)), 1.0)]
    lo = np.floor(s)
    return [(int(lo), 1.0 - (s - lo)), (int(lo) + 1, s - lo)]


def ref_translation(x, hf, wf, fill_mode, interpolation, fill_value, seed, step):
    """float64: the image padded by np.pad in the fill mode's numpy name, sampled tap by tap."""
    n, h, w, c = x.shape
    pad = 2 * max(h, w) + 2
    out = np.zeros(x.shape)
    for i in range(n):
        kw = dict(constant_values=fill_value) if fill_mode == "constant" else {}
        big = np.pad(np.asarray(x[i], np.float64), ((pad, pad), (pad, pad), (0, 0)), mode=PAD_MODES[fill_mode], **kw)
        sh, sw = ref_shift(hf, h, draw(seed, step, i, 0)), ref_shift(wf, w, draw(seed, step, i, 1))
        for y in range(h):
            for xx in range(w):
                acc = np.zeros(c)
                for ry, wy in ref_axis_taps(y, sh, interpolation):
                    for cx, wx in ref_axis_taps(xx, sw, interpolation):
                        if wy * wx != 0:
                            acc += wy * wx * big[ry + pad, cx + pad]
                out[i, y, xx] = acc
    return out


def factor_pair(f):
    return tuple(sorted(f)) if isinstance(f, tuple) else (-abs(f), abs(f))


def graph_of(op, shape, with_step=True, **attrs):
    g = ir.Graph("aug")
    x = g.input("x", (None,) + shape[1:])
    s = g.input("s", ()) if with_step else None
    g.output(emit(op, x, s, **attrs))
    return g


def images(shape, seed=0, specials=True):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if specials and x.size > 2:
        x.flat[1], x.flat[-2] = np.inf, np.nan
    return x


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                                                 np.asarray(b, np.float32).view(np.uint32))


SHAPES = [(6, 5, 7, 3), (3, 1, 1, 1), (4, 1, 13, 2), (2, 11, 2, 1)]


# -- the draws -------------------------------------------------------------------------------------
def test_draws_follow_the_contract_and_are_uniform():
    for seed, step, stream in ((0, 0, 0), (12345, 7, 1), (M32, 3, 0)):
        got = K.augment_uniform(50, seed, step, stream, base=9)
        assert got.dtype == np.float32
        assert [float(v) for v in got] == [draw(seed, step, 9 + i, stream) for i in range(50)]
    r = K.augment_uniform(20000, 5, 1, 0)
    assert 0.0 <= r.min() and r.max() < 1.0 and abs(r.mean() - 0.5) < 0.01
    flips = K.augment_uniform(4000, 5, 1, 0) < 0.5
    assert abs(flips.mean() - 0.5) < 0.03
    # streams, steps and seeds draw differently
    a, b, c = K.augment_uniform(64, 5, 1, 0), K.augment_uniform(64, 5, 1, 1), K.augment_uniform(64, 5, 2, 0)
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9


# -- forward against the float64 reference -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["horizontal", "vertical", "horizontal_and_vertical"])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_flip_matches_reference_on_both_backends(mode, shape):
    x = images(shape, 1)
    g = graph_of("random_flip", shape, mode=mode, seed=11)
    for step in (0, 4):
        want = ref_flip(x, mode, 11, step)
        a = compile_numpy(g)(x=x, s=np.float32(step))
        b = compile_llvm(g)(x=x, s=np.float32(step))
        assert same_bits(a, want.astype(np.float32)) and same_bits(a, b)


TRANSLATIONS = [
    dict(height_factor=0.3, width_factor=(-0.5, 0.2), fill_mode="reflect", interpolation="bilinear"),
    dict(height_factor=1.0, width_factor=1.0, fill_mode="reflect", interpolation="bilinear"),
    dict(height_factor=0.9, width_factor=0.6, fill_mode="constant", interpolation="bilinear", fill_value=-2.5),
    dict(height_factor=(0.2, 0.7), width_factor=0.0, fill_mode="wrap", interpolation="bilinear"),
    dict(height_factor=1.0, width_factor=1.0, fill_mode="nearest", interpolation="bilinear"),
    dict(height_factor=0.5, width_factor=0.5, fill_mode="reflect", interpolation="nearest"),
    dict(height_factor=1.0, width_factor=(-1.0, -0.5), fill_mode="constant", interpolation="nearest", fill_value=3.0),
    dict(height_factor=0.8, width_factor=0.8, fill_mode="wrap", interpolation="nearest"),
]


@pytest.mark.parametrize("attrs", TRANSLATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_translation_matches_reference_on_both_backends(attrs, shape):
    x = images(shape, 2, specials=False)
    g = graph_of("random_translation", shape, seed=21, **attrs)
    hf, wf = factor_pair(attrs["height_factor"]), factor_pair(attrs["width_factor"])
    for step in (0, 5):
        want = ref_translation(x, hf, wf, attrs["fill_mode"], attrs["interpolation"], attrs.get("fill_value", 0.0),
                               21, step)
        a = compile_numpy(g)(x=x, s=np.float32(step))
        np.testing.assert_allclose(a, want, rtol=2e-6, atol=2e-6)
        assert same_bits(a, compile_llvm(g)(x=x, s=np.float32(step)))


@pytest.mark.parametrize("attrs", TRANSLATIONS[:3] + TRANSLATIONS[5:7])
def test_nan_and_inf_stay_where_the_taps_put_them(attrs):
    shape = (5, 6, 7, 2)
    x = images(shape, 3)
    g = graph_of("random_translation", shape, seed=2, **attrs)
    hf, wf = factor_pair(attrs["height_factor"]), factor_pair(attrs["width_factor"])
    with np.errstate(invalid="ignore"):
        want = ref_translation(x, hf, wf, attrs["fill_mode"], attrs["interpolation"], attrs.get("fill_value", 0.0),
                               2, 1)
    a = compile_numpy(g)(x=x, s=np.float32(1))
    assert np.array_equal(np.isnan(a), np.isnan(want)) and np.array_equal(np.isinf(a), np.isinf(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(a[ok], want[ok], rtol=2e-6, atol=2e-6)
    assert same_bits(a, compile_llvm(g)(x=x, s=np.float32(1)))


def test_integer_shift_copies_pixels_exactly():
    """factor 1/4 of 8 rows with r fixed by the draw is generally fractional; with interpolation
    'nearest' every output pixel is an input pixel (or the fill)."""
    shape = (8, 8, 8, 1)
    x = images(shape, 4, specials=False)
    out = compile_numpy(graph_of("random_translation", shape, height_factor=0.25, width_factor=0.25,
                                 fill_mode="constant", interpolation="nearest", fill_value=7.0, seed=1))(
        x=x, s=np.float32(0))
    assert np.isin(out, np.append(x.ravel(), 7.0)).all()


# -- gradients -------------------------------------------------------------------------------------
def reference_matrix(shape, attrs, seed, step):
    """The float64 linear map of random_translation (without the fill, which is an offset), column by column."""
    size = int(np.prod(shape))
    hf, wf = factor_pair(attrs["height_factor"]), factor_pair(attrs["width_factor"])
    cols = []
    for j in range(size):
        e = np.zeros(size)
        e[j] = 1.0
        cols.append(ref_translation(e.reshape(shape), hf, wf, attrs["fill_mode"], attrs["interpolation"], 0.0,
                                    seed, step).ravel())
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("attrs", TRANSLATIONS)
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 1, 3, 1)])
def test_translation_gradient_is_the_reference_transpose(attrs, shape):
    attrs = dict(attrs, fill_value=0.0)
    dy = images(shape, 5, specials=False)
    want = (reference_matrix(shape, attrs, 8, 3).T @ dy.astype(np.float64).ravel()).reshape(shape)
    g = graph_of("random_translation_grad", shape, seed=8, **attrs)
    a = compile_numpy(g)(x=dy, s=np.float32(3))
    np.testing.assert_allclose(a, want, rtol=3e-6, atol=3e-6)
    assert same_bits(a, compile_llvm(g)(x=dy, s=np.float32(3)))


@pytest.mark.parametrize("op,attrs", [("random_flip", dict(mode="horizontal_and_vertical", seed=4)),
                                      ("random_translation", dict(TRANSLATIONS[0], seed=4)),
                                      ("random_translation", dict(TRANSLATIONS[2], seed=4))])
def test_autodiff_matches_finite_differences(op, attrs):
    check_grads(lambda g, x, s: emit(op, x, s, **attrs), [(None, 4, 5, 2), ()], nondiff=("in1",))


def test_grad_graph_bit_identical_across_backends():
    g = ir.Graph("gr")
    x = g.input("x", (None, 6, 5, 3))
    s = g.input("s", ())
    t = g.input("t", (None, 6, 5, 3))
    y = emit("random_translation", emit("random_flip", x, s, mode="vertical", seed=1), s, seed=2,
             **TRANSLATIONS[0])
    g.output(emit("mse", y, t))
    gg = ir.grad(g, wrt=["x"])
    feed = dict(x=images((7, 6, 5, 3), 6, specials=False), s=np.float32(2),
                t=images((7, 6, 5, 3), 7, specials=False))
    for a, b in zip(compile_numpy(gg)(**feed), compile_llvm(gg)(**feed)):
        assert same_bits(a, b)


# -- split batches (threads) -----------------------------------------------------------------------
def test_llvm_kernel_base_draws_like_the_whole_batch():
    target = jit.host_target()
    module = llir.Module("aug_base")
    spec = dict(shape=(None, 5, 4, 2), seed=9)
    A.build_random_flip(module, "flip", mode="horizontal", target=target, **spec)
    A.build_random_translation(module, "tr", target=target, **spec, **{k: factor_pair(v) if "factor" in k else v
                                                                       for k, v in TRANSLATIONS[2].items()})
    A.build_random_translation(module, "tr_nostep", target=target, has_step=False, shape=(None, 5, 4, 2), seed=9,
                               height_factor=(-1.0, 1.0), width_factor=(-1.0, 1.0))
    jm = jit.JitModule(str(module))
    import ctypes
    x = images((9, 5, 4, 2), 8, specials=False)
    step = np.array(6, np.float32)

    def run(name, xs, base, with_step=True):
        out = np.empty_like(xs)
        args = [xs.ctypes.data] + ([step.ctypes.data] if with_step else []) + [out.ctypes.data]
        proto = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * len(args)), ctypes.c_int64, ctypes.c_int64)
        proto(jm.address(name))(*args, base, len(xs))
        return out

    tr = {k: factor_pair(v) if "factor" in k else v for k, v in TRANSLATIONS[2].items()}
    whole = {"flip": K.random_flip(x, np.empty_like(x), "horizontal", 9, 6),
             "tr": K.random_translation(x, np.empty_like(x), seed=9, step=6, **tr),
             "tr_nostep": K.random_translation(x, np.empty_like(x), (-1.0, 1.0), (-1.0, 1.0), "reflect", "bilinear",
                                               0.0, 9, 0)}
    for name, want in whole.items():
        with_step = name != "tr_nostep"
        assert same_bits(run(name, x, 0, with_step), want)
        assert same_bits(run(name, np.ascontiguousarray(x[4:]), 4, with_step), want[4:])


def test_threads_split_inference_like_one_call():
    g = graph_of("random_translation", (1, 6, 6, 1), with_step=False, seed=3, **TRANSLATIONS[1])
    x = images((17, 6, 6, 1), 9, specials=False)
    one = compile_llvm(g, threads=1)(x=x)
    assert same_bits(compile_llvm(g, threads=2)(x=x), one)
    assert same_bits(compile_numpy(g)(x=x), one)


# -- pipelines, ops API, IR round trips ------------------------------------------------------------
def test_identity_in_inference_and_kept_in_training():
    g = ir.Graph("inf")
    x = g.input("x", (None, 4, 4, 1))
    y = gc.ops.random_translation(gc.ops.random_flip(x, seed=1), 0.5, 0.5, seed=2)
    g.output(gc.ops.relu(y))
    opt = run_pipeline(g, "inference").graph
    assert not [n for n in opt.nodes if n.op.startswith("random_")]
    xs = images((3, 4, 4, 1), 10, specials=False)
    np.testing.assert_array_equal(gc.compile(g, "llvm")(x=xs), np.maximum(xs, 0))
    np.testing.assert_array_equal(gc.compile(g, "numpy")(x=xs), np.maximum(xs, 0))
    # with a random op as the graph output the result name survives (an exact copy)
    g2 = ir.Graph("inf2")
    x2 = g2.input("x", (None, 4, 4, 1))
    g2.output(gc.ops.random_flip(x2, mode="vertical", seed=5))
    np.testing.assert_array_equal(gc.compile(g2, "numpy")(x=xs), xs)
    assert "random_flip" in run_pipeline(g2, "training").graph.nodes[0].op


def test_text_and_json_round_trip():
    g = ir.Graph("rt")
    x = g.input("x", (None, 5, 5, 3))
    s = g.input("s", ())
    g.output(gc.ops.random_translation(gc.ops.random_flip(x, "horizontal_and_vertical", seed=3, step=s),
                                       (-0.2, 0.4), 0.1, fill_mode="constant", interpolation="nearest",
                                       seed=7, fill_value=-1.5, step=s))
    text = ir.text.print_graph(g)
    back = ir.text.parse_graph(text)
    assert ir.text.print_graph(back) == text
    js = ir.serialize.graph_from_json(ir.serialize.graph_to_json(g))
    assert ir.text.print_graph(js) == text
    node = g.nodes[-1]
    assert node.attrs["height_factor"] == (-0.2, 0.4) and node.attrs["width_factor"] == (-0.1, 0.1)


@pytest.mark.parametrize("op,attrs,shape,msg", [
    ("random_flip", dict(mode="diagonal"), (None, 4, 4, 1), "random_flip: mode must be one of"),
    ("random_flip", dict(seed=True), (None, 4, 4, 1), "random_flip: seed must be an int"),
    ("random_flip", {}, (None, 16), r"random_flip: expects a float32 image batch \(N, H, W, C\)"),
    ("random_translation", dict(height_factor=1.5, width_factor=0.1), (None, 4, 4, 1),
     r"random_translation: height_factor must be a number in \[-1, 1\]"),
    ("random_translation", dict(height_factor=(0.1, 0.2, 0.3), width_factor=0.1), (None, 4, 4, 1),
     "height_factor must be a number or a"),
    ("random_translation", dict(height_factor=0.1, width_factor="x"), (None, 4, 4, 1), "width_factor"),
    ("random_translation", dict(height_factor=0.1, width_factor=0.1, fill_mode="mirror"), (None, 4, 4, 1),
     "fill_mode must be one of reflect, wrap, constant, nearest"),
    ("random_translation", dict(height_factor=0.1, width_factor=0.1, interpolation="bicubic"), (None, 4, 4, 1),
     "interpolation must be one of bilinear, nearest"),
    ("random_translation", dict(height_factor=0.1, width_factor=0.1, fill_value="0"), (None, 4, 4, 1),
     "fill_value must be a finite number"),
    ("random_translation", dict(height_factor=0.1, width_factor=0.1, fill_value=float("inf")), (None, 4, 4, 1),
     "fill_value must be a finite number"),
    ("random_translation", dict(height_factor=float("nan"), width_factor=0.1), (None, 4, 4, 1), "height_factor"),
    ("random_translation", dict(width_factor=0.1), (None, 4, 4, 1), "missing required attribute 'height_factor'"),
])
def test_bad_attributes_are_refused(op, attrs, shape, msg):
    g = ir.Graph("bad")
    x = g.input("x", shape)
    with pytest.raises(IRError, match=msg):
        emit(op, x, **attrs)


def test_step_must_be_a_scalar():
    g = ir.Graph("bad")
    x = g.input("x", (None, 4, 4, 1))
    s = g.input("s", (2,))
    with pytest.raises(IRError, match="random_flip: step must be a float32 scalar"):
        emit("random_flip", x, s)


# -- in a training step ----------------------------------------------------------------------------
def augmented_training_graph(augment=True):
    from ir.training import make_training_graph
    g = ir.Graph("train_aug")
    x = g.input("x", (None, 6, 6, 2))
    labels = g.input("labels", (None,))
    step = g.param("step", ())
    w = g.param("w", (72, 5))
    y = gc.ops.random_translation(gc.ops.random_flip(x, seed=3, step=step), 0.4, 0.4, seed=4, step=step) \
        if augment else x
    logits = emit("dense", emit("flatten", y), w)
    g.output(emit("sparse_categorical_crossentropy", logits, labels, from_logits=True))
    return make_training_graph(g, g.outputs[0].name, "sgd", {"lr": 0.5})


def test_training_step_splits_across_threads_like_one_call():
    """The gradient half runs per thread chunk with the chunk's first image as the draw index: two
    threads reach the one-thread weights (chunk gradients are summed in another order: 1e-6)."""
    tg = augmented_training_graph()
    assert {"random_flip", "random_translation"} <= {n.op for n in tg.nodes}
    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((72, 5)).astype(np.float32) * 0.1
    x = rng.random((16, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 5, 16).astype(np.float32)
    weights = {}
    for name, exe in (("numpy", gc.compile(tg, "numpy", {"w": w0.copy()}, passes="training")),
                      ("llvm1", gc.compile(tg, "llvm", {"w": w0.copy()}, passes="training", threads=1)),
                      ("llvm2", gc.compile(tg, "llvm", {"w": w0.copy()}, passes="training", threads=2))):
        for _ in range(3):
            exe(x=x, labels=labels)
        weights[name] = exe.state["w"].copy()
        assert exe.state["step"] == 3
    np.testing.assert_allclose(weights["llvm2"], weights["llvm1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights["numpy"], weights["llvm1"], rtol=1e-5, atol=1e-6)
    # the augmentation matters: the same steps on un-augmented images move the weights elsewhere
    plain = gc.compile(augmented_training_graph(augment=False), "numpy", {"w": w0.copy()}, passes="training")
    for _ in range(3):
        plain(x=x, labels=labels)
    assert np.abs(plain.state["w"] - weights["numpy"]).max() > 1e-2
