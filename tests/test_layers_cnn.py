"""The CNN layers vs independent float64 NumPy references (tests/reference_nn.py), both backends, shapes
with 1s and primes. Layers over ops that land from other branches (batch_norm, depthwise, concat, pad,
global_max_pool2d, leaky_relu, clip, groups, random_flip/translation) run when those ops exist."""
import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers as L
import ir
import reference_nn as ref

BACKENDS = ["numpy", "llvm"]


def has_op(name):
    return name in ir.ops.REGISTRY


def needs(*ops):
    missing = [o for o in ops if not has_op(o)]
    return pytest.mark.skipif(bool(missing), reason=f"op(s) {missing} not in this branch yet (H1/H5/H8)")


def model_of(inp, out, name="t", backend="numpy"):
    m = gc.Model(inp, out, name=name)
    m.compile(backend=backend, loss="mse")
    return m


def rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,offset", [(1 / 255, 0.0), (2.0, -1.0), (-0.5, 3.0)])
def test_rescaling(backend, scale, offset, rng):
    inp = L.Input((3, 5, 1))
    m = model_of(inp, L.Rescaling(scale, offset)(inp), backend=backend)
    x = rand(rng, 2, 3, 5, 1) * 100
    np.testing.assert_allclose(m.predict(x), x.astype(np.float64) * scale + offset, rtol=1e-6, atol=1e-5)


def test_identity_and_rescaling_errors(rng):
    inp = L.Input((4,))
    y = L.Dense(2)(L.Identity()(inp))
    m = model_of(inp, y)
    x = rand(rng, 3, 4)
    w = m.get_weights()
    np.testing.assert_allclose(m.predict(x), x @ w["dense/kernel"] + w["dense/bias"], rtol=1e-5, atol=1e-6)
    with pytest.raises(gc.LayerError, match="scale"):
        L.Rescaling(float("nan"))
    with pytest.raises(gc.LayerError, match="negative_slope"):
        L.LeakyReLU(-1)


def test_random_layers_are_identity_in_inference(rng):
    inp = L.Input((5, 3, 2))
    y = L.RandomTranslation(0.2, 0.2, seed=1)(L.RandomFlip("horizontal", seed=1)(inp))
    m = model_of(inp, L.Flatten()(y))
    g = m.inference_graph()
    assert [n.op for n in g.nodes] == ["flatten"]
    x = rand(rng, 4, 5, 3, 2)
    np.testing.assert_array_equal(m.predict(x), x.reshape(4, -1))
    with pytest.raises(gc.LayerError, match="mode"):
        L.RandomFlip("diagonal")


@needs("random_flip")
def test_random_flip_in_training_flips_whole_images(rng):
    inp = L.Input((4, 6, 1))
    m = model_of(inp, L.Flatten()(L.RandomFlip("horizontal", seed=3)(inp)))
    g = m.training_graph()
    assert any(n.op == "random_flip" for n in g.nodes)


@needs("batch_norm", "batch_norm_train")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 1, 7), (6,)])
def test_batch_normalization_training_and_inference(backend, shape, rng):
    inp = L.Input(shape)
    bn = L.BatchNormalization(name="bn")
    h = bn(inp)
    flat = L.Flatten()(h) if len(shape) > 1 else h
    m = gc.Model(inp, L.Dense(2, name="head")(flat), name="bnnet")
    m.compile(optimizer={"name": "sgd", "lr": 0.1}, loss="mse", backend=backend)
    n = 5
    x = rand(rng, n, *shape) * 2 + 1
    t = rand(rng, n, 2)
    w0 = m.get_weights()
    assert np.array_equal(w0["bn/gamma"], np.ones(shape[-1])) and not w0["bn/beta"].any()
    assert not w0["bn/moving_mean"].any() and np.array_equal(w0["bn/moving_variance"], np.ones(shape[-1]))
    hist = m.fit(x, t, epochs=1, batch_size=n, shuffle=False, verbose=0)
    xd = x.astype(np.float64)
    axes = tuple(range(xd.ndim - 1))
    mean, var = xd.mean(axes), xd.var(axes)                  # biased, as Keras
    yt = ref.batch_norm(xd, w0["bn/gamma"], w0["bn/beta"], mean, var, 1e-3).reshape(n, -1)
    pred = yt @ w0["head/kernel"] + w0["head/bias"]
    assert hist.history["loss"][0] == pytest.approx(np.mean((pred - t) ** 2), rel=1e-4)
    w1 = m.get_weights()
    np.testing.assert_allclose(w1["bn/moving_mean"], 0.01 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w1["bn/moving_variance"], 0.99 + 0.01 * var, rtol=1e-5, atol=1e-6)
    yi = ref.batch_norm(xd, w1["bn/gamma"], w1["bn/beta"], w1["bn/moving_mean"], w1["bn/moving_variance"], 1e-3)
    np.testing.assert_allclose(m.predict(x), yi.reshape(n, -1) @ w1["head/kernel"] + w1["head/bias"],
                               rtol=1e-4, atol=1e-5)
    assert m.summary(print_fn=lambda s: None) is None
    assert set(m._trainable) == {"bn/gamma", "bn/beta", "head/kernel", "head/bias"}


@needs("depthwise_conv2d")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mult,stride,padding,dilation", [(1, 1, "same", 1), (2, 2, "valid", 1), (3, 1, "same", 2)])
def test_depthwise_and_separable(backend, mult, stride, padding, dilation, rng):
    inp = L.Input((7, 5, 3))
    d = L.DepthwiseConv2D(3, strides=stride, padding=padding, depth_multiplier=mult, dilation_rate=dilation,
                          name="dw")(inp)
    s = L.SeparableConv2D(4, 3, strides=stride, padding=padding, depth_multiplier=mult, dilation_rate=dilation,
                          activation="relu", name="sep")(inp)
    m = gc.Model(inp, [d, s], name="dws")
    m.compile(backend=backend)
    x = rand(rng, 2, 7, 5, 3)
    w = m.get_weights()
    st, dl = (stride, stride), (dilation, dilation)
    want_d = ref.depthwise_conv2d(x, w["dw/depthwise_kernel"], st, padding, dl) + w["dw/bias"]
    inner = ref.depthwise_conv2d(x, w["sep/depthwise_kernel"], st, padding, dl)
    want_s = ref.relu(ref.conv2d(inner, w["sep/pointwise_kernel"], w["sep/bias"]))
    got_d, got_s = m.predict(x)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


@needs("depthwise_conv2d")
def test_depthwise_initializer_uses_keras_fans():
    m = gc.Sequential([L.Input((5, 5, 3)), L.DepthwiseConv2D(3, depth_multiplier=2)], seed=9)
    rng = np.random.default_rng(9)
    lim = np.sqrt(6 / (3 * 3 * 3 + 3 * 3 * 2))
    np.testing.assert_array_equal(m.get_weights()["depthwise_conv2d/depthwise_kernel"],
                                  rng.uniform(-lim, lim, (3, 3, 3, 2)).astype(np.float32))
    s = gc.Sequential([L.Input((5, 5, 3)), L.SeparableConv2D(4, 3)], seed=2).get_weights()
    assert s["separable_conv2d/pointwise_kernel"].shape == (1, 1, 3, 4)
    assert np.abs(s["separable_conv2d/pointwise_kernel"]).max() <= np.sqrt(6 / (3 + 4))


@needs("conv2d")
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_conv(backend, rng):
    if "groups" not in ir.ops.get_op("conv2d").attrs:
        pytest.skip("conv2d has no groups attribute in this branch yet (H5)")
    inp = L.Input((6, 5, 4))
    m = model_of(inp, L.Conv2D(6, 3, groups=2, padding="same", name="g")(inp), backend=backend)
    w = m.get_weights()
    assert w["g/kernel"].shape == (3, 3, 2, 6)
    x = rand(rng, 3, 6, 5, 4)
    np.testing.assert_allclose(m.predict(x), ref.conv2d(x, w["g/kernel"], w["g/bias"], padding="same", groups=2),
                               rtol=1e-5, atol=1e-5)


@needs("concat")
@pytest.mark.parametrize("backend", BACKENDS)
def test_concatenate(backend, rng):
    inp = L.Input((3, 5, 2))
    a = L.Conv2D(3, 1, name="a")(inp)
    m = model_of(inp, L.Concatenate()([inp, a, inp]), backend=backend)
    x = rand(rng, 2, 3, 5, 2)
    w = m.get_weights()
    ya = ref.conv2d(x, w["a/kernel"], w["a/bias"])
    np.testing.assert_allclose(m.predict(x), np.concatenate([x, ya, x], -1), rtol=1e-5, atol=1e-6)
    m2 = model_of(inp, L.Concatenate(axis=1)([inp, inp]), backend=backend)
    np.testing.assert_array_equal(m2.predict(x), np.concatenate([x, x], 1))


def test_concatenate_errors():
    inp = L.Input((4, 4, 2))
    b = L.Conv2D(3, 3)(inp)
    with pytest.raises(gc.LayerError, match=r"differ outside the concatenation axis.*same padding"):
        L.Concatenate()([inp, b])
    with pytest.raises(gc.LayerError, match="non-batch axis"):
        L.Concatenate(axis=0)
    with pytest.raises(gc.LayerError, match="does not fit"):
        L.Concatenate(axis=5)([inp, inp])


@needs("pad")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [1, (2, 0), ((0, 1), (3, 2))])
def test_zero_padding(backend, padding, rng):
    inp = L.Input((3, 2, 5))
    m = model_of(inp, L.ZeroPadding2D(padding)(inp), backend=backend)
    x = rand(rng, 2, 3, 2, 5)
    p = L.ZeroPadding2D(padding).padding
    np.testing.assert_array_equal(m.predict(x), np.pad(x, ((0, 0), p[0], p[1], (0, 0))))


@needs("global_max_pool2d")
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_max_pooling(backend, rng):
    inp = L.Input((3, 7, 2))
    m = model_of(inp, L.GlobalMaxPooling2D()(inp), backend=backend)
    x = rand(rng, 4, 3, 7, 2)
    np.testing.assert_array_equal(m.predict(x), x.max(axis=(1, 2)))


@needs("leaky_relu", "clip")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer,fn", [
    (lambda: L.LeakyReLU(), lambda x: np.where(x >= 0, x, 0.3 * x)),
    (lambda: L.LeakyReLU(negative_slope=0.05), lambda x: np.where(x >= 0, x, 0.05 * x)),
    (lambda: L.ReLU(max_value=6.0), lambda x: np.clip(x, 0, 6)),
    (lambda: L.ReLU(negative_slope=0.1), lambda x: np.where(x >= 0, x, 0.1 * x)),
    (lambda: L.ReLU(max_value=1.5, negative_slope=0.2), lambda x: np.minimum(np.where(x >= 0, x, 0.2 * x), 1.5)),
])
def test_relu_family(backend, layer, fn, rng):
    inp = L.Input((11,))
    m = model_of(inp, layer()(inp), backend=backend)
    x = rand(rng, 3, 11) * 8
    np.testing.assert_allclose(m.predict(x), fn(x.astype(np.float64)), rtol=1e-6, atol=1e-6)


def test_plain_relu_keeps_the_relu_op():
    inp = L.Input((4,))
    m = model_of(inp, L.ReLU()(inp))
    assert [n.op for n in m.inference_graph().nodes] == ["relu"]


def batch_coupling_known():
    import importlib.util
    return importlib.util.find_spec("ir.passes.batch_coupling") is not None


@needs("batch_norm", "batch_norm_train")
@pytest.mark.skipif(not batch_coupling_known(), reason="needs H2's batch-coupling analysis (ir/passes/batch_coupling.py)")
def test_batch_norm_training_same_for_one_and_two_threads(rng):
    """Batch statistics are over the whole batch whatever the thread count (issue 11 item 6)."""
    x = rand(rng, 24, 6, 6, 3)
    y = rng.integers(0, 4, 24)

    def run(threads):
        inp = L.Input((6, 6, 3))
        h = L.ReLU()(L.BatchNormalization()(L.Conv2D(5, 3, use_bias=False)(inp)))
        m = gc.Model(inp, L.Dense(4, activation="softmax")(L.Flatten()(h)), name="bnthreads")
        m.compile(backend="llvm", threads=threads)
        hist = m.fit(x, y, epochs=2, batch_size=12, seed=2, verbose=0)
        return m.get_weights(), hist.history["loss"]
    w1, l1 = run(1)
    w2, l2 = run(2)
    w2b, l2b = run(2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-5, err_msg=k)
        assert np.array_equal(w2[k], w2b[k]), k               # bit-identical run to run
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert l2 == l2b


@needs("batch_norm", "batch_norm_train", "depthwise_conv2d")
def test_bn_and_depthwise_match_pytorch(rng):
    """Extra comparison with PyTorch (not a test dependency): training-mode BN output and depthwise conv."""
    torch = pytest.importorskip("torch")
    inp = L.Input((5, 6, 4))
    d = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="dw")(inp)
    m = gc.Model(inp, L.Flatten()(L.BatchNormalization(name="bn")(d)), name="torchcmp")
    m.compile(optimizer={"name": "sgd", "lr": 1e-3}, loss="mse", backend="numpy")
    x = rand(rng, 3, 5, 6, 4)
    w = m.get_weights()["dw/depthwise_kernel"]                  # (kh, kw, C, M)
    tw = torch.tensor(w).permute(2, 3, 0, 1).reshape(8, 1, 3, 3)   # out channel c*M + m
    tx = torch.tensor(x).permute(0, 3, 1, 2)
    td = torch.nn.functional.conv2d(tx, tw, padding=1, groups=4)
    tb = torch.nn.functional.batch_norm(td, None, None, torch.ones(8), torch.zeros(8), training=True, eps=1e-3)
    want = tb.permute(0, 2, 3, 1).reshape(3, -1).double().numpy()
    inner = gc.Model(inp, d, name="dwonly")
    inner.set_weights({"dw/depthwise_kernel": w})
    np.testing.assert_allclose(inner.predict(x), td.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    target = np.zeros_like(want, dtype=np.float32)
    h = m.fit(x, target, epochs=1, batch_size=3, shuffle=False, verbose=0)
    assert h.history["loss"][0] == pytest.approx(np.mean(want ** 2), rel=1e-4)
