"""The CNN ops (batch_norm, batch_norm_train, depthwise_conv2d, grouped conv2d, concat, pad,
global_max_pool2d, reduce_sum/mean) on both backends, forward and gradients, against naive float64
NumPy references written here (loops over output pixels and window taps), float64 central differences,
and (when installed) PyTorch in float64."""
import warnings

import numpy as np
import pytest

import graphcnn as gc
import ir
from ir.ops import emit
from ir.types import IRError

BACKENDS = ("numpy", "llvm")


# ------------------------------------------------------------------------------------------------------
# naive float64 references

def _explicit_pads(padding, hw, ext, stride):
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        pads = []
        for size, e, s in zip(hw, ext, stride):
            out = -(-size // s)
            total = max((out - 1) * s + e - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return padding


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def ref_window_conv(x, w, b, stride, padding, dilation, groups=None, depthwise=False):
    """Direct convolution over output pixels and taps: grouped (w (kh,kw,C/g,F)) or depthwise
    (w (kh,kw,C,M), output channel c*M+m)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, h, wd, c = x.shape
    kh, kw = w.shape[:2]
    s, d = _pair(stride), _pair(dilation)
    ext = ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1)
    (pt, pb), (pl, pr) = _explicit_pads(padding, (h, wd), ext, s)
    xp = np.zeros((n, h + pt + pb, wd + pl + pr, c))
    xp[:, pt:pt + h, pl:pl + wd] = x
    oh = (h + pt + pb - ext[0]) // s[0] + 1
    ow = (wd + pl + pr - ext[1]) // s[1] + 1
    f = c * w.shape[3] if depthwise else w.shape[3]
    out = np.zeros((n, oh, ow, f))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for bb in range(kw):
                    patch = xp[:, i * s[0] + a * d[0], j * s[1] + bb * d[1], :]     # (n, c)
                    if depthwise:
                        out[:, i, j] += (patch[:, :, None] * w[a, bb][None]).reshape(n, f)
                    else:
                        cg, fg = c // groups, f // groups
                        for g in range(groups):
                            out[:, i, j, g * fg:(g + 1) * fg] += patch[:, g * cg:(g + 1) * cg] @ w[a, bb, :, g * fg:(g + 1) * fg]
    if b is not None:
        out += np.asarray(b, np.float64)
    return out


def ref_batch_norm(x, gamma, beta, mean, var, eps=1e-3):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def ref_batch_norm_train(x, gamma, beta, eps=1e-3):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    var = ((x - mean) ** 2).mean(axis=axes)
    return ref_batch_norm(x, gamma, beta, mean, var, eps), mean, var


def ref_pad(x, padding, value):
    (t, b), (l, r) = padding
    n, h, w, c = x.shape
    out = np.full((n, h + t + b, w + l + r, c), float(value))
    out[:, t:t + h, l:l + w] = x
    return out


# ------------------------------------------------------------------------------------------------------
# harness: one graph per case, compiled through the inference pipeline on each backend

def _compile(g, backend):
    with warnings.catch_warnings():
        # the LLVM backend must lower every op itself, not fall back to NumPy
        warnings.filterwarnings("error", message=".*using the NumPy backend.*")
        return gc.compile(g, backend=backend)


def _run_case(backend, shapes, build, ref, rng, batch_sizes=(1, 3), positive=(), grad=True, tol=2e-5):
    """build(*values) -> value (or tuple, the first differentiated); ref(*float64 arrays) -> array(s).
    Checks the forward pass against ref and d mse(out0, target) / d inputs against central differences of
    the float64 reference along random directions."""
    g = ir.Graph("case")
    ins = [g.input(f"in{i}", s) for i, s in enumerate(shapes)]
    outs = build(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    target = g.input("target", outs[0].shape)
    if outs[0].shape[:1] == (None,):
        loss = emit("mse", outs[0], target)
    else:                                   # no batch axis (a full reduction): the same mean, spelled out
        diff = emit("sub", outs[0], target)
        loss = emit("mul", diff, diff)
        loss = emit("reduce_mean", loss, axis=None) if loss.shape else loss
    g.output(*outs)
    fwd = _compile(g, backend)
    if grad:
        g.output(loss)
        gg = ir.grad(g, wrt=[v.name for v in ins], loss=loss.name)
        bwd = _compile(gg, backend)
    for n in batch_sizes:
        arrays = []
        for i, s in enumerate(shapes):
            shape = tuple(n if d is None else d for d in s)
            a = rng.standard_normal(shape)
            arrays.append(np.abs(a) + 0.5 if i in positive else a)
        arrays32 = [a.astype(np.float32) for a in arrays]
        want = ref(*[a.astype(np.float64) for a in arrays32])
        want = want if isinstance(want, tuple) else (want,)
        tshape = tuple(n if d is None else d for d in outs[0].shape)
        t = rng.standard_normal(tshape).astype(np.float32)
        feed = {f"in{i}": a for i, a in enumerate(arrays32)}
        got = fwd(**feed, target=t)
        got = got if isinstance(got, tuple) else (got,)
        for k, (o, r) in enumerate(zip(got, want)):
            assert o.shape == r.shape, (k, o.shape, r.shape)
            np.testing.assert_allclose(o, r, rtol=tol, atol=tol * max(1.0, float(np.nanmax(np.abs(r)))),
                                       err_msg=f"{backend} output {k} batch {n}")
        if not grad:
            continue
        res = bwd(**feed, target=t)
        grads = res[len(outs) + 1:]

        def loss64(arrs):
            y = ref(*arrs)
            y = y[0] if isinstance(y, tuple) else y
            return np.mean((y - t.astype(np.float64)) ** 2)

        base = [a.astype(np.float64) for a in arrays32]
        for i, gr in enumerate(grads):
            assert gr.shape == arrays32[i].shape
            for _ in range(2):
                d = rng.standard_normal(base[i].shape)
                h = 1e-6
                plus = [a if j != i else a + h * d for j, a in enumerate(base)]
                minus = [a if j != i else a - h * d for j, a in enumerate(base)]
                fd = (loss64(plus) - loss64(minus)) / (2 * h)
                an = float(np.sum(gr.astype(np.float64) * d))
                assert abs(an - fd) <= 1e-3 * max(1.0, abs(fd)), (backend, i, n, an, fd)
    return fwd


# ------------------------------------------------------------------------------------------------------
# batch normalization

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(None, 5, 3, 7), (None, 1, 1, 1), (None, 13), (None, 2, 17)])
def test_batch_norm_inference(backend, shape, rng):
    c = (shape[-1],)
    _run_case(backend, [shape, c, c, c, c],
              lambda x, g, b, m, v: gc.ops.batch_norm(x, g, b, m, v, epsilon=1e-3),
              lambda x, g, b, m, v: ref_batch_norm(x, g, b, m, v, 1e-3), rng, positive=(4,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(None, 5, 3, 7), (None, 1, 1, 1), (None, 13), (None, 2, 17)])
def test_batch_norm_train(backend, shape, rng):
    c = (shape[-1],)
    # batch 1 with one element per channel has zero variance: y = beta, the gradient wrt x ~ 1/sqrt(eps)
    sizes = (2, 3) if shape[1:-1] in ((), (1, 1)) else (1, 3)
    _run_case(backend, [shape, c, c], lambda x, g, b: gc.ops.batch_norm_train(x, g, b, epsilon=1e-3),
              lambda x, g, b: ref_batch_norm_train(x, g, b, 1e-3), rng, batch_sizes=sizes, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_nan_and_inf_stay_in_their_channel(backend):
    g = ir.Graph("bn")
    x = g.input("x", (None, 3, 4))
    c = [g.input(k, (4,)) for k in ("g", "b", "m", "v")]
    y, mean, var = gc.ops.batch_norm_train(x, c[0], c[1])
    g.output(y, mean, var, gc.ops.batch_norm(x, *c))
    xs = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    xs[1, 2, 1] = np.nan
    xs[0, 0, 2] = np.inf
    ones = np.ones(4, np.float32)
    with np.errstate(invalid="ignore"):           # inf - inf in the NumPy kernel is the point here
        y, mean, var, yi = _compile(g, backend)(x=xs, g=ones, b=ones, m=ones, v=ones)
    assert np.isnan(mean[1]) and np.isnan(y[..., 1]).all()
    assert np.isinf(mean[2]) and np.isnan(var[2])
    assert np.isfinite(y[..., [0, 3]]).all() and np.isfinite(mean[[0, 3]]).all()
    assert np.isnan(yi[1, 2, 1]) and np.isinf(yi[0, 0, 2])
    assert np.isfinite(np.delete(yi.reshape(-1), [1 * 12 + 2 * 4 + 1, 2])).all()


def test_batch_norm_bad_input_names_the_problem():
    g = ir.Graph("bad")
    x = g.input("x", (None, 4, 4, 3))
    with pytest.raises(IRError, match=r"batch_norm: gamma must be f32\[3\]"):
        gc.ops.batch_norm(x, g.input("g", (4,)), *[g.input(k, (3,)) for k in "bmv"])
    with pytest.raises(IRError, match="epsilon must be finite and > 0"):
        gc.ops.batch_norm_train(x, g.input("g2", (3,)), g.input("b2", (3,)), epsilon=0.0)
    with pytest.raises(IRError, match="rank >= 2"):
        gc.ops.batch_norm_train(g.input("vec", (3,)), g.input("g3", (3,)), g.input("b3", (3,)))


# ------------------------------------------------------------------------------------------------------
# depthwise and grouped convolution

DEPTHWISE = [
    # (x shape, (kh, kw, M), stride, padding, dilation, bias)
    ((None, 7, 6, 5), (3, 3, 1), 1, "same", 1, True),
    ((None, 9, 8, 3), (3, 2, 2), 2, "valid", 1, False),
    ((None, 7, 7, 17), (3, 3, 1), 2, "same", 1, True),
    ((None, 8, 9, 4), (2, 3, 3), 1, ((1, 2), (0, 3)), 2, True),
    ((None, 1, 1, 1), (1, 1, 1), 1, "valid", 1, True),
    ((None, 5, 5, 2), (5, 5, 1), 3, "same", 1, False),
    ((None, 6, 5, 33), (3, 3, 1), 1, "valid", (2, 1), False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(DEPTHWISE)))
def test_depthwise_conv2d(backend, case, rng):
    xs, (kh, kw, m), stride, padding, dilation, bias = DEPTHWISE[case]
    c = xs[3]
    shapes = [xs, (kh, kw, c, m)] + ([(c * m,)] if bias else [])

    def build(x, w, b=None):
        return gc.ops.depthwise_conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)

    def ref(x, w, b=None):
        return ref_window_conv(x, w, b, stride, padding, dilation, depthwise=True)

    _run_case(backend, shapes, build, ref, rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_depthwise_fused_bias_activation_equals_unfused(backend, activation, rng):
    g = ir.Graph("dw")
    x, w, b = g.input("x", (None, 6, 6, 9)), g.input("w", (3, 3, 9, 2)), g.input("b", (18,))
    y = gc.ops.depthwise_conv2d(x, w, b, padding="same")
    g.output(emit(activation, y))
    fused = _compile(g, backend)
    assert len(fused.pipeline.graph.nodes) == 1
    unfused = gc.compile(g, backend=backend, passes=["verify"])
    feed = dict(x=rng.standard_normal((2, 6, 6, 9)).astype(np.float32),
                w=rng.standard_normal((3, 3, 9, 2)).astype(np.float32), b=rng.standard_normal(18).astype(np.float32))
    np.testing.assert_array_equal(fused(**feed), unfused(**feed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_nan_reaches_only_its_windows(backend):
    g = ir.Graph("dw")
    x, w = g.input("x", (None, 5, 5, 3)), g.input("w", (3, 3, 3, 1))
    g.output(gc.ops.depthwise_conv2d(x, w, padding="same"))
    xs = np.ones((1, 5, 5, 3), np.float32)
    xs[0, 0, 0, 1] = np.nan
    out = _compile(g, backend)(x=xs, w=np.ones((3, 3, 3, 1), np.float32))
    assert np.isnan(out[0, :2, :2, 1]).all()
    nan_mask = np.zeros(out.shape, bool)
    nan_mask[0, :2, :2, 1] = True
    assert np.isfinite(out[~nan_mask]).all()


GROUPED = [
    ((None, 6, 5, 4), (3, 3, 2, 6), 2, 1, "same"),
    ((None, 7, 7, 6), (3, 3, 2, 9), 3, 2, "valid"),
    ((None, 5, 5, 4), (3, 3, 1, 8), 4, 1, "same"),       # groups == channels: becomes depthwise
    ((None, 3, 3, 2), (1, 1, 1, 4), 2, 1, "valid"),     # (1 filter per group hits an LLVM conv2d_grad_input F=1 bug)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(GROUPED)))
def test_grouped_conv2d(backend, case, rng):
    xs, ws, groups, stride, padding = GROUPED[case]
    _run_case(backend, [xs, ws, (ws[3],)],
              lambda x, w, b: gc.ops.relu(gc.ops.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)),
              lambda x, w, b: np.maximum(ref_window_conv(x, w, b, stride, padding, 1, groups=groups), 0), rng)


def test_grouped_conv2d_refuses_groups_that_do_not_divide():
    g = ir.Graph("bad")
    x = g.input("x", (None, 5, 5, 6))
    with pytest.raises(IRError, match=r"groups=4 must divide the input channels \(6\) and the filters \(8\)"):
        gc.ops.conv2d(x, g.input("w", (3, 3, 1, 8)), groups=4)
    with pytest.raises(IRError, match="kernel expects 4"):
        gc.ops.conv2d(x, g.input("w2", (3, 3, 2, 8)), groups=2)
    with pytest.raises(IRError, match="groups must be a positive int"):
        gc.ops.conv2d(x, g.input("w3", (3, 3, 6, 8)), groups=0)


# ------------------------------------------------------------------------------------------------------
# concat, pad, global max pooling, reductions

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_concat(backend, axis, rng):
    shapes = [(None, 3, 4, 5), (None, 3, 4, 5), (None, 3, 4, 5)]
    shapes[1] = tuple(d + 2 if i == axis % 4 else d for i, d in enumerate(shapes[1]))
    shapes[2] = tuple(1 if i == axis % 4 else d for i, d in enumerate(shapes[2]))
    _run_case(backend, shapes, lambda *v: gc.ops.concat(v, axis=axis),
              lambda *v: np.concatenate(v, axis=axis), rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis,start,stop", [(3, 1, 4), (1, 0, 1), (2, 2, 5)])
def test_slice(backend, axis, start, stop, rng):
    index = (slice(None),) * axis + (slice(start, stop),)
    _run_case(backend, [(None, 3, 5, 6)], lambda x: emit("slice", x, axis=axis, start=start, stop=stop),
              lambda x: x[index], rng)


def test_concat_refuses_the_batch_axis_and_mismatched_shapes():
    g = ir.Graph("bad")
    a, b = g.input("a", (None, 3)), g.input("b", (None, 4))
    with pytest.raises(IRError, match="batch axis"):
        gc.ops.concat([a, a], axis=0)
    with pytest.raises(IRError, match=r"value 1 f32\[\?,3,3\] does not match value 0"):
        gc.ops.concat([g.input("c", (None, 2, 3)), g.input("d", (None, 3, 3))], axis=2)
    assert gc.ops.concat([a, b]).shape == (None, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding,value", [(((1, 2), (0, 3)), 0.0), (((0, 0), (1, 1)), -1.5), (1, 2.0)])
def test_pad(backend, padding, value, rng):
    pads = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    _run_case(backend, [(None, 4, 3, 5)], lambda x: gc.ops.pad(x, padding, value),
              lambda x: ref_pad(x, pads, value), rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(None, 4, 5, 19), (None, 1, 1, 1), (None, 3, 1, 8)])
def test_global_max_pool2d(backend, shape, rng):
    _run_case(backend, [shape], gc.ops.global_max_pool2d, lambda x: x.max(axis=(1, 2)), rng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_max_pool2d_nan_propagates_and_routes_to_the_first_max(backend):
    g = ir.Graph("gmp")
    x = g.input("x", (None, 2, 3, 9))
    y = gc.ops.global_max_pool2d(x)
    t = g.input("t", (None, 9))
    g.output(y, emit("mse", y, t))
    gg = ir.grad(g, wrt=["x"], loss=g.outputs[1].name)
    xs = np.random.default_rng(3).standard_normal((2, 2, 3, 9)).astype(np.float32)
    xs[0, 1, 1, 4] = np.nan
    xs[0, 1, 2, 4] = np.nan
    xs[1, :, :, 7] = 2.0                      # a tie everywhere: the first position gets the gradient
    y, _, dx = _compile(gg, backend)(x=xs, t=np.zeros((2, 9), np.float32))
    assert np.isnan(y[0, 4]) and np.isfinite(np.delete(y.reshape(-1), 4)).all()
    assert np.isnan(dx[0, 1, 1, 4]) and (dx[0, :, :, 4].reshape(-1)[[0, 1, 2, 3, 5]] == 0).all()
    want = 2 * 2.0 / 18
    assert dx[1, 0, 0, 7] == np.float32(want) and (dx[1, :, :, 7].reshape(-1)[1:] == 0).all()


REDUCE = [(None, False), (-1, False), ((1, 2), True), (0, False), ((0, 2), True), (1, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean"])
@pytest.mark.parametrize("axis,keepdims", REDUCE)
def test_reductions(backend, op, axis, keepdims, rng):
    fn = getattr(gc.ops, op)
    ref = np.sum if op == "reduce_sum" else np.mean
    _run_case(backend, [(None, 3, 7)], lambda x: fn(x, axis=axis, keepdims=keepdims),
              lambda x: ref(x, axis=axis, keepdims=keepdims), rng)


def test_reductions_over_the_batch_couple_it():
    g = ir.Graph("r")
    x = g.input("x", (None, 3, 4))
    per_sample = gc.ops.reduce_sum(x, axis=(1, 2))
    coupled = gc.ops.reduce_mean(x, axis=0)
    assert per_sample.shape == (None,) and coupled.shape == (3, 4)
    assert not per_sample.producer.opdef.couples_batch(per_sample.producer)
    assert coupled.producer.opdef.couples_batch(coupled.producer)
    with pytest.raises(IRError, match="repeated axis"):
        gc.ops.reduce_sum(x, axis=(1, -2))
    with pytest.raises(IRError, match="out of range"):
        gc.ops.reduce_sum(x, axis=3)


# ------------------------------------------------------------------------------------------------------
# PyTorch, float64: an independent second opinion (skipped when torch is absent)

def _torch_conv(torch, x, w_t, stride, padding, dilation, groups):
    F = torch.nn.functional
    (pt, pb), (pl, pr) = padding
    xt = F.pad(x.permute(0, 3, 1, 2), (pl, pr, pt, pb))
    return F.conv2d(xt, w_t, stride=stride, dilation=dilation, groups=groups).permute(0, 2, 3, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_pytorch(backend, rng):
    torch = pytest.importorskip("torch")
    g = ir.Graph("net")
    shapes = {"x": (None, 7, 6, 4), "dw": (3, 3, 4, 2), "gw": (3, 3, 4, 6), "gamma": (6,), "beta": (6,),
              "mean": (8,), "var": (8,), "g2": (8,), "b2": (8,)}
    v = {k: g.input(k, s) for k, s in shapes.items()}
    d = gc.ops.depthwise_conv2d(v["x"], v["dw"], stride=(2, 1), padding="same", dilation=1)       # (N,4,6,8)
    d = gc.ops.batch_norm(d, v["g2"], v["b2"], v["mean"], v["var"])
    grp = gc.ops.conv2d(gc.ops.pad(d, ((1, 0), (0, 1))), v["gw"], groups=2)                      # (N,3,5,6)
    bn, _, _ = gc.ops.batch_norm_train(grp, v["gamma"], v["beta"])
    cat = gc.ops.concat([bn, gc.ops.reduce_mean(grp, axis=-1, keepdims=True)], axis=-1)         # (N,3,5,7)
    out = gc.ops.global_max_pool2d(cat)
    loss = gc.ops.reduce_sum(gc.ops.mul(out, out))
    g.output(out, loss)
    gg = ir.grad(g, wrt=list(shapes), loss=loss.name)
    arrays = {k: rng.standard_normal(tuple(3 if x is None else x for x in s)).astype(np.float32)
              for k, s in shapes.items()}
    arrays["var"] = np.abs(arrays["var"]) + 0.5
    res = _compile(gg, backend)(**arrays)
    tv = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True) for k, a in arrays.items()}
    F = torch.nn.functional
    dw_t = tv["dw"].permute(2, 3, 0, 1).reshape(8, 1, 3, 3)            # [c*M + m, 0, i, j]
    td = _torch_conv(torch, tv["x"], dw_t, (2, 1), ((1, 1), (1, 1)), 1, 4)
    # inference BN by its formula: torch's batch_norm does not differentiate the running statistics
    td = (td - tv["mean"]) / torch.sqrt(tv["var"] + 1e-3) * tv["g2"] + tv["b2"]
    tg = _torch_conv(torch, td, tv["gw"].permute(3, 2, 0, 1), 1, ((1, 0), (0, 1)), 1, 2)
    tbn = F.batch_norm(tg.permute(0, 3, 1, 2), None, None, tv["gamma"], tv["beta"], True, 0.0,
                       1e-3).permute(0, 2, 3, 1)
    tcat = torch.cat([tbn, tg.mean(dim=-1, keepdim=True)], dim=-1)
    tout = tcat.amax(dim=(1, 2))
    tloss = (tout * tout).sum()
    tloss.backward()
    np.testing.assert_allclose(res[0], tout.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res[1], tloss.item(), rtol=1e-4)
    for k, gr in zip(shapes, res[2:]):
        want = tv[k].grad.numpy()
        np.testing.assert_allclose(gr, want, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(want).max()), err_msg=k)


# ------------------------------------------------------------------------------------------------------
# memory planning with branches: a residual block's skip value

def _residual_block(skip_first):
    g = ir.Graph("res")
    x = g.input("x", (None, 6, 6, 4))
    skip = gc.ops.relu(gc.ops.conv2d(x, g.param("w0", (3, 3, 4, 4)), padding="same"))
    y = gc.ops.relu(gc.ops.conv2d(skip, g.param("w1", (3, 3, 4, 4)), padding="same"))
    y = gc.ops.conv2d(y, g.param("w2", (3, 3, 4, 4)), padding="same")
    total = gc.ops.add(skip, y) if skip_first else gc.ops.add(y, skip)
    g.output(gc.ops.global_avg_pool2d(gc.ops.relu(total)))
    return g, skip


@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_skip_value_stays_live_and_the_add_reuses_a_dying_operand(backend, skip_first, rng):
    from ir.passes.verify_plan import verify_plan
    g, skip = _residual_block(skip_first)
    params = {p.name: (rng.standard_normal(p.shape) * 0.3).astype(np.float32) for p in g.params}
    fn = gc.compile(g, backend=backend, params=params)
    pg = fn.pipeline.graph
    plan = pg.memory_plan
    verify_plan(pg, plan)
    names = [n.name for n in pg.nodes]
    add = next(n for n in pg.nodes if n.op == "add")
    skip_v = plan.values[skip.name]
    # the skip value is live from its conv to the add, across the whole branch
    assert skip_v.first_use == names.index(skip.name) and skip_v.last_use == names.index(add.name)
    branch = [n.name for n in pg.nodes[names.index(skip.name) + 1:names.index(add.name)]]
    assert len(branch) == 2 and all(plan.values[b].offset != skip_v.offset for b in branch)
    # both operands die at the add: it writes over one of them in place
    assert plan.values[add.name].storage in {plan.values[v.name].storage for v in add.inputs}
    unplanned = gc.compile(g, backend=backend, params=params, passes=["verify"])
    xs = rng.standard_normal((3, 6, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(fn(x=xs), unplanned(x=xs))


def test_residual_add_writes_into_the_skip_value_when_only_it_dies():
    from ir.passes import run_pipeline
    g = ir.Graph("res2")
    x = g.input("x", (None, 8, 4))
    skip = gc.ops.relu(x)
    y = gc.ops.tanh(skip)
    total = gc.ops.add(y, skip)           # y is still needed afterwards: only the skip value (b) dies here
    g.output(gc.ops.mul(total, y))
    pg = run_pipeline(g, ["verify", "plan_memory"]).graph
    assert pg.memory_plan.values[total.name].storage == pg.memory_plan.values[skip.name].storage
    for backend in BACKENDS:
        xs = np.random.default_rng(2).standard_normal((3, 8, 4)).astype(np.float32)
        got = gc.compile(g, backend=backend)(x=xs)
        s = np.maximum(xs, 0)
        np.testing.assert_allclose(got, (np.tanh(s) + s) * np.tanh(s), rtol=1e-6, atol=1e-6)


def test_batch_norm_backends_agree_to_the_last_bit(rng):
    g = ir.Graph("bn")
    x = g.input("x", (None, 5, 37))
    c = [g.input(k, (37,)) for k in ("g", "b", "m", "v")]
    y, mean, var = gc.ops.batch_norm_train(x, c[0], c[1])
    g.output(gc.ops.batch_norm(x, *c), mean, var)
    feed = {"x": (rng.standard_normal((4, 5, 37)) * 3 + 1).astype(np.float32)}
    feed.update({k: rng.standard_normal(37).astype(np.float32) for k in ("g", "b", "m")})
    feed["v"] = (np.abs(rng.standard_normal(37)) + 0.1).astype(np.float32)
    a, b = (_compile(g, backend)(**feed) for backend in BACKENDS)
    np.testing.assert_array_equal(a[0], b[0])          # same float32 steps, no fused multiply-add
    np.testing.assert_allclose(a[1], b[1], rtol=1e-7)  # float64 sums, rounded once
    np.testing.assert_allclose(a[2], b[2], rtol=1e-6)


def test_cnn_ops_round_trip_through_text_and_json():
    from ir.serialize import graph_from_json, graph_to_json
    from ir.text import parse_graph, print_graph
    g = ir.Graph("rt")
    x = g.input("x", (None, 6, 6, 4))
    p = {k: g.param(k, s) for k, s in (("dw", (3, 3, 4, 2)), ("w", (3, 3, 2, 8)), ("g", (8,)), ("b", (8,)))}
    y = gc.ops.depthwise_conv2d(x, p["dw"], stride=2, padding=((1, 0), (0, 1)), dilation=1)
    y = gc.ops.conv2d(gc.ops.pad(y, 1, value=-2.0), p["w"], groups=4)
    y, mean, var = gc.ops.batch_norm_train(y, p["g"], p["b"], epsilon=1e-5)
    z = gc.ops.batch_norm(y, p["g"], p["b"], mean, var)
    cat = gc.ops.concat([z, y, gc.ops.reduce_mean(y, axis=(3,), keepdims=True)], axis=-1)
    g.output(gc.ops.global_max_pool2d(cat), gc.ops.reduce_sum(cat, axis=None))
    assert parse_graph(print_graph(g)) == g
    assert graph_from_json(graph_to_json(g)) == g


def test_bad_attributes_name_the_op_and_the_problem():
    g = ir.Graph("bad")
    x = g.input("x", (None, 5, 5, 3))
    with pytest.raises(IRError, match=r"depthwise_conv2d: input has 3 channels but the depthwise kernel"):
        gc.ops.depthwise_conv2d(x, g.input("w", (3, 3, 4, 1)))
    with pytest.raises(IRError, match=r"depthwise_conv2d: bias must have shape \(6,\)"):
        emit("depthwise_conv2d", x, g.input("w3", (3, 3, 3, 2)), g.input("b3", (3,)))
    with pytest.raises(IRError, match="depthwise_conv2d: kernel extent"):
        gc.ops.depthwise_conv2d(x, g.input("w4", (7, 7, 3, 1)))
    with pytest.raises(IRError, match="pad: padding must be >= 0"):
        gc.ops.pad(x, ((1, -1), (0, 0)))
    with pytest.raises(IRError, match=r"pad: padding must be \(\(top, bottom\), \(left, right\)\)"):
        gc.ops.pad(x, "same")
    with pytest.raises(IRError, match=r"slice: need 0 <= start < stop <= 3"):
        emit("slice", x, axis=3, start=2, stop=5)
    with pytest.raises(IRError, match="slice: cannot slice the batch axis"):
        emit("slice", x, axis=0, start=0, stop=1)
    with pytest.raises(IRError, match="keepdims must be a bool"):
        gc.ops.reduce_mean(x, axis=1, keepdims="yes")


def test_llvm_kernel_builders_refuse_bad_arguments():
    from llvmlite import ir as ll

    from backends.llvm.jit import host_target
    from backends.llvm.kernels import depthwise, norm, shape
    target = host_target()
    with pytest.raises(ValueError, match="depthwise_conv2d: kernel_shape"):
        depthwise.build_depthwise_conv2d(ll.Module(), "k", in_hwc=(5, 5, 3), kernel_shape=(3, 3, 4, 1), stride=1,
                                         padding=((0, 0), (0, 0)), dilation=1, target=target)
    with pytest.raises(ValueError, match="batch_norm: epsilon"):
        norm.build_batch_norm(ll.Module(), "k", shape=(None, 4), epsilon=0.0, target=target)
    with pytest.raises(ValueError, match="concat: shapes"):
        shape.build_concat(ll.Module(), "k", shapes=[(None, 2, 3), (None, 3, 3)], axis=2, target=target)
    with pytest.raises(ValueError, match="slice: need"):
        shape.build_slice(ll.Module(), "k", in_shape=(None, 4), axis=1, start=3, stop=3, target=target)


def test_cnn_kernels_loop_in_vector_registers():
    """The memory-bound CNN kernels run their channel loops on <lanes x float> vectors (any host width)."""
    from llvmlite import ir as ll

    from backends.llvm import jit
    from backends.llvm.kernels import depthwise, norm, reduce, shape
    target = jit.host_target()
    module = ll.Module(name="cnn_vectors")
    c = 4 * target.vector_lanes
    geo = dict(in_hwc=(6, 6, c), kernel_shape=(3, 3, c, 1), stride=1, padding=((1, 1), (1, 1)), dilation=1)
    depthwise.build_depthwise_conv2d(module, "dw", activation="relu", has_bias=True, target=target, **geo)
    depthwise.build_depthwise_conv2d_grad_filter(module, "dw_filter", target=target, **geo)
    depthwise.build_depthwise_conv2d_grad_input(module, "dw_input", target=target, **geo)
    norm.build_batch_norm_train(module, "bn_train", shape=(None, 5, c), epsilon=1e-3, target=target)
    norm.build_batch_norm_train_grad(module, "bn_grad", shape=(None, 5, c), epsilon=1e-3, target=target)
    reduce.build_global_max_pool2d(module, "gmp", in_hwc=(3, 3, c), target=target)
    shape.build_pad(module, "pad", in_hwc=(3, 3, c), padding=((1, 1), (1, 1)), value=-1.0, target=target)
    text = jit.JitModule(str(module)).optimized_ir
    vec = f"<{target.vector_lanes} x float>"
    for name in ("dw", "dw_filter", "dw_input", "bn_train", "bn_grad", "gmp", "pad"):
        start = text.index(f"@{name}(")
        assert vec in text[start:text.index("\n}", start)], f"{name} has no {vec} operations"
