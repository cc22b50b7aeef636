"""Differential tests: random op configurations and random small graphs, both backends, forward and
gradients (gc.grad), against independent float64 references (tests/reference_ops.py).

Tolerance (float32 result r vs float64 reference e, per output tensor): NaN positions must match
exactly, infinities exactly, and every finite element must satisfy
    |r - e| <= 4 * (L + 4) * 2**-24 * max(mag)
where L is the longest sum behind one element (taps x channels, features, window size, batch for
weight gradients; `Family.length`) and mag the same computation on |inputs| and |dy| for sums of
products (the classic bound for recursive summation is L * u * sum|terms|), or |e| (+ |dy| for
gradients) for the elementwise and softmax families. The bound is per tensor (its max), so a single
wrong element of ordinary size is always caught: a dropped x*W term is off by its whole value.

Counts per run are printed (`pytest -s`): cases, groups, graphs, mismatches."""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import graphcnn as gc
from op_cases import FAMILIES, Packed, op_case
from ir.ops import REGISTRY, emit

U = 2.0 ** -24
GROUP = 20                     # configurations compiled together in one graph (one LLVM compile per group)
OP_GROUPS = 34                 # x GROUP x 3 batch draws = 2,040 op cases per run (~1 s of compiling per group)
GRAPHS = 200                   # issue 9: >= 2,000 op cases and >= 200 random graphs per CI run
STATS = collections.Counter()
SEEN_OPS: set = set()

# no shrinking: each shrink step recompiles, and the failure messages already name the whole configuration
SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    t0 = time.perf_counter()
    yield
    print(f"\n[differential] {dict(STATS)}; wall {time.perf_counter() - t0:.1f} s")


class LlvmMismatch(AssertionError):
    """An LLVM result disagrees while NumPy agrees (a kernel bug, told apart from NumPy or IR failures)."""


def mismatch(got, ref, mag, length, what) -> str | None:
    """None when got (float32) matches the float64 reference within the bound in the module doc."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return f"{what}: shape {got.shape}, expected {ref.shape}"
    nan_g, nan_r = np.isnan(got), np.isnan(ref)
    if not np.array_equal(nan_g, nan_r):
        idx = np.argwhere(nan_g != nan_r)[0]
        return f"{what}: NaN positions differ, first at {tuple(idx)}: got {got[tuple(idx)]}, expected {ref[tuple(idx)]}"
    inf_r = np.isinf(ref)
    if not np.array_equal(got[inf_r], ref[inf_r]) or np.isinf(got[~inf_r & ~nan_r]).any():
        return f"{what}: infinities differ"
    fin = ~nan_r & ~inf_r
    if not fin.any():
        return None
    mag = np.asarray(mag, np.float64)
    mag = np.broadcast_to(mag, ref.shape)[fin]
    scale = np.max(mag[np.isfinite(mag)], initial=0.0) + np.max(np.abs(ref[fin]))
    bound = 4 * (length + 4) * U * scale + 1e-30
    err = np.abs(got[fin] - ref[fin])
    if err.max() > bound:
        k = int(np.argmax(err))
        idx = tuple(np.argwhere(fin)[k])
        return f"{what}: max error {err.max():.3g} > bound {bound:.3g} at {idx}: got {got[idx]!r}, expected {ref[idx]!r}"
    return None


def compile_both(graph, passes="inference"):
    return {"llvm": gc.compile(graph, backend="llvm", passes=passes),
            "numpy": gc.compile(graph, backend="numpy", passes=passes)}


def run_group(cases, batches, seed):
    """Compile a group of cases once per backend, run it on one random draw per batch size, and compare
    every output and gradient with the reference. Returns the mismatch messages."""
    pk = Packed(cases)
    gg = pk.grad_graph()
    exes = compile_both(gg)
    for exe in exes.values():
        SEEN_OPS.update(nd.op for nd in exe.graph.nodes)
    SEEN_OPS.update(nd.op for nd in gg.nodes)
    rng = np.random.default_rng(seed)
    problems = []
    for n in batches:
        feeds = pk.feeds(rng, n)
        refs = pk.reference(feeds)
        results = {name: exe(**{k: feeds[k] for k, _ in exe.inputs}) for name, exe in exes.items()}
        problems += compare_cases(pk, refs, results, n)
        STATS["op cases (configuration x batch draw)"] += len(cases)
    return problems


def compare_cases(pk, refs, results, n):
    k_out = len(pk.outputs)
    grad_pos = {v.name: k_out + 1 + j for j, v in enumerate(pk.wrt)}
    problems = []
    for i, ((fam, cfg), names, (y, grads, length, y_mag, g_mag)) in enumerate(zip(pk.cases, pk.inputs, refs)):
        for backend, outs in results.items():
            checks = [(outs[i], y, y_mag, "forward")]
            checks += [(outs[grad_pos[names[k]]], grads[k], g_mag[k], f"d/d{k}") for k in grads]
            for got, ref, mag, what in checks:
                msg = mismatch(got, ref, mag, length, f"{backend} {what}")
                if msg:
                    problems.append(f"case {i} {fam} {cfg} n={n}: {msg}")
    return problems


@settings(max_examples=OP_GROUPS, **SETTINGS)
@given(cases=st.lists(op_case(), min_size=GROUP, max_size=GROUP), n=st.sampled_from((2, 3, 5, 7)),
       seed=st.integers(0, 2 ** 32 - 1))
def test_random_ops_match_float64_reference(cases, n, seed):
    # one compile, three data draws: batch 1 (every batch loop of length 1), n, and n again
    problems = run_group(cases, (1, n, n), seed)
    STATS["op configurations"] += len(cases)
    STATS["op groups (one compile per backend)"] += 1
    STATS["op mismatches"] += len(problems)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.slow
@settings(max_examples=14, **SETTINGS)
@given(cases=st.lists(op_case(), min_size=GROUP, max_size=GROUP), n=st.sampled_from((2, 3, 4, 6, 8)),
       seed=st.integers(0, 2 ** 32 - 1))
def test_deep_random_ops_match_float64_reference(cases, n, seed):
    """The deeper run: 14 more groups (280 configurations, 840 cases) drawn independently of the
    CI run above (hypothesis derives the derandomized stream from the test's name)."""
    problems = run_group(cases, (1, n, n + 1), seed)
    STATS["deep op configurations"] += len(cases)
    STATS["deep op mismatches"] += len(problems)
    assert not problems, "\n".join(problems[:10])


def test_random_ops_exercised_every_declared_op():
    """The families declare which ops they exercise; the random run above must really have compiled
    each of them (runs after it: same module, file order)."""
    if STATS["op groups (one compile per backend)"] < OP_GROUPS:
        pytest.fail("run test_random_ops_match_float64_reference first (the whole module)")
    declared = set().union(*(f.ops for f in FAMILIES.values()))
    assert declared - SEEN_OPS == set()


def test_every_registered_op_has_a_differential_family():
    covered = set().union(*(f.ops for f in FAMILIES.values())) | SEPARATELY_TESTED
    missing = sorted(set(REGISTRY) - covered)
    assert not missing, f"registered ops without a differential test family in tests/op_cases.py: {missing}"


# -- regression cases: the count-1 bugs of issue 9 ------------------------------------------------------

REGRESSIONS = {
    "dense with 1 input feature": ("dense", dict(k=1, m=4, bias=False, activation="linear"), 3),
    "dense(1) head, backward": ("dense", dict(k=5, m=1, bias=True, activation="linear"), 4),
    "dense on batch 1 (weight gradient sums one row)": ("dense", dict(k=3, m=4, bias=True, activation="relu"), 1),
    "matmul inner dimension 1": ("matmul", dict(form="rows", m=3, k=1, n=4, ta=False, tb=False), 2),
    "matmul rows = batch 1": ("matmul", dict(form="rows", m=3, k=4, n=5, ta=False, tb=True), 1),
    "matmul transpose_a over batch 1": ("matmul", dict(form="inner", m=3, k=1, n=4, ta=True, tb=False), 1),
    "1x1 conv on 1 channel": ("conv2d", dict(h=3, w=3, c=1, f=2, k=(1, 1), stride=(1, 1), dil=(1, 1),
                                             padding="valid", bias=False, activation="linear"), 2),
    "conv on a 1x1 image": ("conv2d", dict(h=1, w=1, c=3, f=2, k=(1, 1), stride=(1, 1), dil=(1, 1),
                                           padding="valid", bias=True, activation="relu"), 2),
    "conv kernel = input": ("conv2d", dict(h=3, w=5, c=2, f=1, k=(3, 5), stride=(1, 1), dil=(1, 1),
                                           padding="valid", bias=True, activation="linear"), 2),
    "conv stride > kernel, dilation, asymmetric padding": (
        "conv2d", dict(h=7, w=5, c=2, f=3, k=(2, 3), stride=(4, 3), dil=(3, 1), padding=((0, 2), (1, 0)),
                       bias=False, activation="tanh"), 2),
    "1-filter conv": ("conv2d", dict(h=5, w=5, c=3, f=1, k=(3, 3), stride=(1, 1), dil=(1, 1), padding="same",
                                     bias=True, activation="sigmoid"), 3),
    "max pool on a 1x1 image": ("max_pool2d", dict(h=1, w=1, c=3, pool=(1, 1), stride=None, padding="valid",
                                                   include_pad=False), 2),
    "avg pool on a 1x1 image": ("avg_pool2d", dict(h=1, w=1, c=2, pool=(1, 1), stride=None, padding="valid",
                                                   include_pad=False), 2),
    "max pool window = image": ("max_pool2d", dict(h=3, w=2, c=2, pool=(3, 2), stride=None, padding="valid",
                                                   include_pad=False), 2),
    "global average pool of 1x1": ("global_avg_pool2d", dict(h=1, w=1, c=5), 1),
    "softmax over length 1": ("softmax", dict(op="softmax", shape=(None, 1), axis=-1), 3),
}
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_count_one_regression(name, backend):
    fam, cfg, n = REGRESSIONS[name]
    pk = Packed([(fam, cfg)], name="regression")
    exe = gc.compile(pk.grad_graph(), backend=backend)
    feeds = pk.feeds(np.random.default_rng(7), n)
    outs = exe(**{k: feeds[k] for k, _ in exe.inputs})
    problems = compare_cases(pk, pk.reference(feeds), {backend: outs}, n)
    if problems:
        raise (LlvmMismatch if backend == "llvm" else AssertionError)("\n".join(problems))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_dense_one_feature_gives_x_times_w(backend):
    """The one-line symptom of issue 9: dense(x (N,1), W (1,4)) with x = 3 is [3, 3, 3, 3]."""
    g = gc.Graph("one_feature")
    x = g.input("x", (None, 1))
    g.output(gc.ops.dense(x, g.const("w", np.ones((1, 4), np.float32))))
    np.testing.assert_array_equal(gc.compile(g, backend=backend)(x=np.full((2, 1), 3, np.float32)),
                                  np.full((2, 4), 3, np.float32))


# -- ops outside the gradient families: dropout (mask identity) and optimizer updates ----------------

SEPARATELY_TESTED = {"dropout", "dropout_grad", "sgd_update", "adam_update", "rmsprop_update",
                     "random_flip", "random_translation", "random_translation_grad",
                     # int8 (inference only): exact integer loops, all backends bit-identical, test_quantize.py
                     "quantize", "dequantize", "conv2d_q", "dense_q",
                     # inference-only fusion (a grad graph never forms it): test_conv_pool_fusion.py, against
                     # the unfused kernels (bit-identical) and the float64 reference
                     "conv2d_max_pool"}


@settings(max_examples=30, **SETTINGS)
@given(shape=st.lists(st.sampled_from((1, 2, 3, 5, 17)), min_size=1, max_size=3),
       rate=st.sampled_from((0.0, 0.1, 0.5, 0.9)), seed=st.integers(0, 2 ** 31), step=st.integers(0, 1000),
       n=st.sampled_from((1, 2, 7)))
def test_dropout_masks_agree(shape, rate, seed, step, n):
    """Both backends draw the same mask, keep x / (1 - rate) or 0, and the gradient uses that mask."""
    g = gc.Graph("dropout")
    x = g.input("x", (None,) + tuple(shape))
    s = g.input("step", ())
    y = emit("dropout", x, s, rate=rate, seed=seed)
    g.output(y, emit("dropout_grad", x, s, rate=rate, seed=seed))
    xs = np.random.default_rng(seed).uniform(0.5, 1.5, (n,) + tuple(shape)).astype(np.float32)
    outs = {b: exe(x=xs, step=np.float32(step)) for b, exe in compile_both(g, passes="none").items()}
    y_np, dy_np = outs["numpy"]
    np.testing.assert_array_equal(outs["llvm"][0], y_np)
    np.testing.assert_array_equal(outs["llvm"][1], dy_np)
    kept = y_np != 0
    np.testing.assert_allclose(y_np[kept], xs[kept] / np.float32(1 - rate), rtol=2 * U)
    np.testing.assert_array_equal(dy_np != 0, kept)
    STATS["dropout cases"] += 1


RMSPROP_VARIANTS = {"rmsprop": (0.0, False), "rmsprop_momentum": (0.9, False), "rmsprop_centered": (0.0, True),
                    "rmsprop_centered_momentum": (0.5, True)}       # name -> (momentum, centered)


@settings(max_examples=60, **SETTINGS)
@given(size=st.sampled_from((1, 3, 8, 17, 33)),
       opt=st.sampled_from(("sgd", "sgd_momentum", "nesterov", "adam") + tuple(RMSPROP_VARIANTS)),
       lr=st.sampled_from((1e-3, 0.1, 1.0)), t=st.integers(1, 50), seed=st.integers(0, 2 ** 31))
def test_optimizer_updates_match_keras_formulas(size, opt, lr, t, seed):
    rng = np.random.default_rng(seed)
    g = gc.Graph("update")
    w = g.param("w", (size,))
    grad = g.input("g", (size,))
    rate = g.input("lr", ())                  # the learning rate is an operand, fed each step
    lr = float(np.float32(lr))                # what the float32 input holds
    state = {"w": rng.standard_normal(size).astype(np.float32)}
    if opt == "adam":
        m, v = g.param("m", (size,)), g.param("v", (size,))
        tt = g.input("t", ())
        outs = emit("adam_update", w, grad, rate, tt, m, v)
        state.update(m=rng.standard_normal(size).astype(np.float32),
                     v=rng.uniform(0, 2, size).astype(np.float32))
    elif opt == "sgd":
        outs = (emit("sgd_update", w, grad, rate),)
    elif opt.startswith("rmsprop"):
        momentum, centered = RMSPROP_VARIANTS[opt]
        slots = [g.param("velocity", (size,))]
        # velocity >= 1 and |average_gradient| <= 0.3 keep the centered denominator positive
        state["velocity"] = rng.uniform(1.0, 2.0, size).astype(np.float32)
        if momentum:
            slots.append(g.param("momentum_buffer", (size,)))
            state["momentum_buffer"] = rng.standard_normal(size).astype(np.float32)
        if centered:
            slots.append(g.param("average_gradient", (size,)))
            state["average_gradient"] = rng.uniform(-0.3, 0.3, size).astype(np.float32)
        outs = emit("rmsprop_update", w, grad, rate, *slots, rho=0.9, momentum=momentum, epsilon=1e-7,
                    centered=centered)
    else:
        vel = g.param("velocity", (size,))
        outs = emit("sgd_update", w, grad, rate, vel, momentum=0.9, nesterov=opt == "nesterov")
        state["velocity"] = rng.standard_normal(size).astype(np.float32)
    for p, o in zip(g.params, outs):
        g.set_update(p, o)
    g.output(outs[0])
    gv = rng.standard_normal(size).astype(np.float32)
    s64 = {k: a.astype(np.float64) for k, a in state.items()}
    g64 = gv.astype(np.float64)
    if opt == "adam":          # Keras 3 Adam, t = the step number after increment
        b1, b2, eps = 0.9, 0.999, 1e-7
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        m64 = s64["m"] + (g64 - s64["m"]) * (1 - b1)
        v64 = s64["v"] + (g64 * g64 - s64["v"]) * (1 - b2)
        expect = s64["w"] - alpha * m64 / (np.sqrt(v64) + eps)
    elif opt == "sgd":
        expect = s64["w"] - lr * g64
    elif opt.startswith("rmsprop"):      # Keras 3 RMSprop (keras/src/optimizers/rmsprop.py)
        momentum, centered = RMSPROP_VARIANTS[opt]
        rho, eps = 0.9, 1e-7
        vel64 = rho * s64["velocity"] + (1 - rho) * g64 * g64
        if centered:
            avg64 = rho * s64["average_gradient"] + (1 - rho) * g64
            denominator = vel64 - avg64 * avg64 + eps
        else:
            denominator = vel64 + eps
        increment = lr * g64 / np.sqrt(denominator)
        slots64 = {"velocity": vel64, **({"average_gradient": avg64} if centered else {})}
        if momentum:
            slots64["momentum_buffer"] = momentum * s64["momentum_buffer"] + increment
            expect = s64["w"] - slots64["momentum_buffer"]
        else:
            expect = s64["w"] - increment
    else:                      # Keras SGD: velocity = momentum * velocity - lr * g
        vel64 = 0.9 * s64["velocity"] - lr * g64
        expect = s64["w"] + (0.9 * vel64 - lr * g64 if opt == "nesterov" else vel64)
    for backend in ("numpy", "llvm"):
        exe = gc.compile(g, backend=backend, params={k: a.copy() for k, a in state.items()}, passes="none")
        feeds = {"g": gv, "lr": np.float32(lr), **({"t": np.float32(t)} if opt == "adam" else {})}
        got = exe(**feeds)
        scale = np.abs(s64["w"]) + np.abs(expect) + lr * 30 + np.abs(s64.get("momentum_buffer", 0.0))
        np.testing.assert_array_less(np.abs(got - expect), 16 * U * scale, err_msg=f"{backend} {opt}")
        np.testing.assert_array_equal(exe.state["w"], got)
        for slot, want in (slots64.items() if opt.startswith("rmsprop") else ()):
            np.testing.assert_array_less(np.abs(exe.state[slot] - want), 16 * U * (np.abs(want) + np.abs(s64[slot]) + 1),
                                         err_msg=f"{backend} {opt} slot {slot}")
    STATS["optimizer cases"] += 1


# -- augmentation ops: the per-image draw of ir/ops/augment.py, re-implemented here from its docstring ------

MASK32 = 0xFFFFFFFF


def contract_mix32(x: int) -> int:
    """The dropout/augmentation hash, written out from the contract (not imported from a backend)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def contract_uniform(image: int, stream: int, seed: int, step: int) -> np.float32:
    """r_k of image i: (mix32((2i + k + 1) ^ key) >> 8) * 2**-24, key = mix32(seed * 0x9E3779B9 + step)."""
    key = contract_mix32((seed * 0x9E3779B9 + step) & MASK32)
    return np.float32((contract_mix32(((2 * image + stream + 1) & MASK32) ^ key) >> 8) * 2.0 ** -24)


def contract_fill(index: int, size: int, mode: str):
    """Tap index -> in-image index (None: outside, constant mode), Keras's fill modes."""
    if 0 <= index < size:
        return index
    if mode == "constant":
        return None
    if mode == "nearest":
        return min(max(index, 0), size - 1)
    if mode == "wrap":
        return index % size
    j = index % (2 * size)                       # reflect: d c b a | a b c d | d c b a
    return j if j < size else 2 * size - 1 - j


def translation_reference(x, factors, fill_mode, interpolation, fill_value, seed, step):
    """float64 RandomTranslation of x (N, H, W, C) and the (N, H, W, H, W) matrix of weights out <- in
    (per image; `fill_value` terms are returned separately), from the augment.py docstring: the shift
    and source coordinate in float32 steps, then bilinear / nearest taps, zero-weight taps skipped."""
    n, h, w, c = x.shape
    out = np.zeros(x.shape)
    matrix = np.zeros((n, h, w, h, w))
    for i in range(n):
        taps = []
        for stream, size, (lo, hi) in ((0, h, factors[0]), (1, w, factors[1])):
            lo, hi = np.float32(lo), np.float32(hi)
            shift = (lo + (hi - lo) * contract_uniform(i, stream, seed, step)) * np.float32(size)
            axis_taps = []
            for p in range(size):
                coord = np.float32(p) - shift
                if interpolation == "nearest":
                    axis_taps.append([(int(np.rint(coord)), 1.0)])
                else:
                    low = np.floor(coord)
                    frac = float(coord - low)
                    axis_taps.append([(int(low), 1.0 - frac), (int(low) + 1, frac)])
            taps.append(axis_taps)
        for py in range(h):
            for px in range(w):
                for ry, wy in taps[0][py]:
                    for rx, wx in taps[1][px]:
                        weight = wy * wx
                        if weight == 0:
                            continue
                        sy, sx = contract_fill(ry, h, fill_mode), contract_fill(rx, w, fill_mode)
                        if sy is None or sx is None:
                            out[i, py, px] += weight * fill_value
                        else:
                            out[i, py, px] += weight * x[i, sy, sx]
                            matrix[i, py, px, sy, sx] += weight
    return out, matrix


AUG_SHAPES = st.tuples(st.sampled_from((1, 2, 3)), st.sampled_from((1, 2, 3, 5, 7)), st.sampled_from((1, 2, 5, 7)),
                       st.sampled_from((1, 3)))


def _aug_graph(op, grad_op, shape, attrs):
    g = gc.Graph(op)
    x = g.input("x", (None,) + shape[1:])
    dy = g.input("dy", (None,) + shape[1:])
    step = g.input("step", ())
    g.output(emit(op, x, step, **attrs), emit(grad_op, dy, step, **attrs))
    return g


@settings(max_examples=15, **SETTINGS)
@given(shape=AUG_SHAPES, mode=st.sampled_from(("horizontal", "vertical", "horizontal_and_vertical")),
       seed=st.integers(0, 2 ** 31), step=st.integers(0, 1000))
def test_random_flip_is_the_contract_flip_on_both_backends(shape, mode, seed, step):
    """Both backends draw the same flips; image i is flipped (along the mode's axes) exactly when the
    contract's r_0 < 0.5, else copied; the gradient (the same op on dy) flips dy the same way."""
    g = _aug_graph("random_flip", "random_flip", shape, dict(mode=mode, seed=seed))
    rng = np.random.default_rng(seed)
    xs, dys = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    outs = {b: exe(x=xs, dy=dys, step=np.float32(step)) for b, exe in compile_both(g, passes="none").items()}
    for k in range(2):
        np.testing.assert_array_equal(outs["llvm"][k], outs["numpy"][k])
    axes = {"horizontal": (1,), "vertical": (0,), "horizontal_and_vertical": (0, 1)}[mode]
    for i in range(shape[0]):
        flip = contract_uniform(i, 0, seed, step) < np.float32(0.5)
        for got, src in zip(outs["numpy"], (xs, dys)):
            np.testing.assert_array_equal(got[i], np.flip(src[i], axes) if flip else src[i],
                                          err_msg=f"image {i} flip={flip}")
    STATS["random_flip cases"] += 1


FACTORS = (0.0, 0.2, 0.5, 1.0, (-0.5, 0.3), (0.1, 0.1), (-1.0, -0.4))


@settings(max_examples=30, **SETTINGS)
@given(shape=AUG_SHAPES, hf=st.sampled_from(FACTORS), wf=st.sampled_from(FACTORS),
       fill_mode=st.sampled_from(("reflect", "wrap", "constant", "nearest")),
       interpolation=st.sampled_from(("bilinear", "nearest")), fill_value=st.sampled_from((0.0, 1.5)),
       seed=st.integers(0, 2 ** 31), step=st.integers(0, 1000))
def test_random_translation_matches_contract_and_gradient_is_adjoint(shape, hf, wf, fill_mode, interpolation,
                                                                      fill_value, seed, step):
    """Both backends agree bit for bit; the output is the float64 translation of the contract's draw; the
    gradient is its adjoint: dx = Tᵀ dy with T the (fill-free) weight matrix of the reference."""
    attrs = dict(height_factor=hf, width_factor=wf, fill_mode=fill_mode, interpolation=interpolation,
                 fill_value=fill_value, seed=seed)
    g = _aug_graph("random_translation", "random_translation_grad", shape, attrs)
    rng = np.random.default_rng(seed)
    xs, dys = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    outs = {b: exe(x=xs, dy=dys, step=np.float32(step)) for b, exe in compile_both(g, passes="none").items()}
    for k in range(2):
        np.testing.assert_array_equal(outs["llvm"][k], outs["numpy"][k], err_msg=f"output {k}")
    factors = [(-abs(f), abs(f)) if not isinstance(f, tuple) else tuple(sorted(f)) for f in (hf, wf)]
    y64, matrix = translation_reference(xs.astype(np.float64), factors, fill_mode, interpolation, fill_value, seed,
                                        step)
    dx64 = np.einsum("nabyx,nabc->nyxc", matrix, dys.astype(np.float64))
    # an output sums at most 4 weighted taps; an input pixel's gradient at most 4 per output pixel (an
    # edge pixel under the nearest fill mode): recursive-summation bounds on the sums of |terms|
    terms = 4 * shape[1] * shape[2]
    for got, want, mag, length in (
            (outs["numpy"][0], y64, np.abs(xs).max() + fill_value, 4),
            (outs["numpy"][1], dx64, np.einsum("nabyx,nabc->nyxc", matrix, np.abs(dys)), terms)):
        np.testing.assert_array_less(np.abs(got - want), 4 * (length + 4) * U * (mag + np.abs(want)) + 1e-30)
    STATS["random_translation cases"] += 1


# -- random small graphs: chains and diamonds of registered ops, both backends ------------------------
# Compared with the NumPy backend in float64 (compute_dtype) as the anchor: every LLVM and NumPy float32
# output must match its NaN positions exactly and lie within 1e-4 * max|anchor| + 1e-6 of it (errors
# compound along a chain of up to 7 ops, each within the per-op bound above). Forward only: the op
# cases above check every gradient op.

def _unary_choices(v):
    rank = v.type.rank
    choices = ["relu", "sigmoid", "tanh", "neg", "scale", "softmax", "log_softmax", "bias_add", "dropout"]
    if rank == 4:
        choices += ["conv2d", "conv2d", "max_pool2d", "avg_pool2d", "global_avg_pool2d", "flatten", "transpose"]
    else:
        choices += ["dense", "dense", "matmul"]
    return choices


def grow_graph(draw, name):
    """A random forward graph on one NHWC input: each step applies an op to a random earlier value
    (chains and branches) or joins two same-shape values with add/sub/mul (diamonds)."""
    g = gc.Graph(name)
    shape = (None,) + tuple(draw(st.sampled_from(DIMS_G)) for _ in range(2)) + (draw(st.sampled_from((1, 2, 3))),)
    live = [g.input("x", shape)]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))

    def const(shape):
        return g.const(g.fresh_name("k"), (rng.standard_normal(shape) * 0.7).astype(np.float32))

    for _ in range(draw(st.integers(2, 7))):
        v = draw(st.sampled_from(live))
        partners = [u for u in live if u is not v and u.shape == v.shape]
        op = draw(st.sampled_from(_unary_choices(v) + (["join"] * 3 if partners else [])))
        if op == "join":
            y = emit(draw(st.sampled_from(("add", "sub", "mul"))), v, draw(st.sampled_from(partners)))
        elif op in ("relu", "sigmoid", "tanh", "neg", "flatten", "global_avg_pool2d"):
            y = emit(op, v)
        elif op == "scale":
            y = emit("scale", v, factor=draw(st.sampled_from((0.5, -2.0, 3.0))))
        elif op in ("softmax", "log_softmax"):
            y = emit(op, v, axis=-1)
        elif op == "bias_add":
            y = emit("bias_add", v, const((v.shape[-1],)))
        elif op == "dropout":
            y = emit("dropout", v, rate=0.5, seed=3)        # the inference pipeline removes it
        elif op == "transpose":
            y = emit("transpose", v, perm=(0, 2, 1, 3))
        elif op in ("max_pool2d", "avg_pool2d"):
            y = emit(op, v, pool=draw(st.sampled_from((1, 2, 3))), stride=draw(st.sampled_from((None, 1, 2))),
                     padding="same")
        elif op == "conv2d":
            k = draw(st.sampled_from((1, 2, 3)))
            f = draw(st.sampled_from((1, 2, 3, 5)))
            y = emit("conv2d", v, const((k, k, v.shape[3], f)), stride=draw(st.sampled_from((1, 2))),
                     padding="same", dilation=draw(st.sampled_from((1, 2))))
            if draw(st.booleans()):
                y = emit("bias_add", y, const((f,)))
        elif op == "dense":
            units = draw(st.sampled_from((1, 2, 3, 5)))
            y = emit("dense", v, const((v.shape[1], units)))
            if draw(st.booleans()):
                y = emit("bias_add", y, const((units,)))
        else:       # matmul by a constant matrix
            y = emit("matmul", v, const((v.shape[1], draw(st.sampled_from((1, 2, 4))))))
        live.append(y)
    users = g.users()
    g.output(*[v for v in live[1:] if not users[v.name]])
    return g


DIMS_G = (1, 2, 3, 5, 7)


@settings(max_examples=GRAPHS, **SETTINGS)
@given(data=st.data(), n=st.sampled_from((1, 2, 3, 5)))
def test_random_graphs_agree_across_backends(data, n):
    from backends.numpy import compile_numpy
    g = grow_graph(data.draw, "random_graph")
    exes = compile_both(g)
    anchor = compile_numpy(gc.compile(g, backend="numpy").graph, compute_dtype=np.float64)
    x = (np.random.default_rng(n).standard_normal((n,) + g.inputs[0].shape[1:]) * 2).astype(np.float32)
    ref = anchor(x=x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    problems = []
    for backend, exe in exes.items():
        outs = exe(x=x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for k, (got, want) in enumerate(zip(outs, ref)):
            got = np.asarray(got, np.float64)
            if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
                problems.append(f"{backend} output {k}: shape or NaN positions differ")
                continue
            fin = ~np.isnan(want)
            bound = 1e-4 * np.max(np.abs(want[fin]), initial=0.0) + 1e-6
            err = np.max(np.abs(got[fin] - want[fin]), initial=0.0)
            if err > bound:
                problems.append(f"{backend} output {k} (%{g.outputs[k].name}): error {err:.3g} > {bound:.3g}")
    STATS["random graphs"] += 1
    STATS["random graph mismatches"] += len(problems)
    assert not problems, "\n".join(problems) + "\n" + str(g)
