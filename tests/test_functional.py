"""The functional API: symbolic tensors, gc.Model with branches / several inputs and outputs, shared
layers, Sequential as the chain special case, save/load/compile/summary, and build-time errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers as L
import reference_nn as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def residual(name="res"):
    inp = L.Input((5, 7, 2))
    a = L.Conv2D(3, 3, padding="same", activation="relu", name="c1")(inp)
    b = L.Conv2D(3, (1, 3), padding="same", name="c2")(a)
    s = L.Add(name="sum")([a, b])
    r = L.ReLU()(s)
    f = L.Flatten()(r)
    return gc.Model(inp, L.Dense(4, activation="softmax", name="head")(f), name=name)


def residual_reference(w, x):
    a = ref.relu(ref.conv2d(x, w["c1/kernel"], w["c1/bias"], padding="same"))
    b = ref.conv2d(a, w["c2/kernel"], w["c2/bias"], padding="same")
    r = ref.relu(a + b).reshape(len(x), -1)
    return ref.softmax(r @ w["head/kernel"] + w["head/bias"])


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_residual_model_matches_reference(backend, rng):
    m = residual()
    m.compile(backend=backend)
    x = rng.normal(size=(3, 5, 7, 2)).astype(np.float32)
    np.testing.assert_allclose(m.predict(x), residual_reference(m.get_weights(), x), rtol=1e-5, atol=1e-6)
    x1 = x[:1]                                            # batch of one
    np.testing.assert_allclose(m.predict(x1), residual_reference(m.get_weights(), x1), rtol=1e-5, atol=1e-6)


def test_symbolic_tensor_shapes_and_repr():
    inp = L.Input((28, 28, 1))
    y = L.Conv2D(8, 3)(inp)
    assert y.shape == (None, 26, 26, 8)
    assert inp.output.shape == (None, 28, 28, 1)
    assert "Conv2D" in repr(y)


def test_multiple_inputs_and_outputs(rng):
    a, b = L.Input((4,), name="a"), L.Input((4,), name="b")
    shared = L.Dense(3, name="shared")                   # one layer called twice: one set of weights
    ya, yb = shared(a), shared(b)
    total = L.Add()([ya, yb])
    diff = L.Subtract()([ya, yb])
    prod = L.Multiply()([ya, yb, ya])
    m = gc.Model([a, b], [total, diff, prod], name="multi")
    m.compile(backend="numpy")
    xa, xb = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    w = m.get_weights()
    assert sorted(w) == ["shared/bias", "shared/kernel"]
    ra = xa.astype(np.float64) @ w["shared/kernel"] + w["shared/bias"]
    rb = xb.astype(np.float64) @ w["shared/kernel"] + w["shared/bias"]
    for got in (m.predict([xa, xb]), m.predict({"a": xa, "b": xb})):
        assert len(got) == 3
        np.testing.assert_allclose(got[0], ra + rb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], ra - rb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[2], ra * rb * ra, rtol=1e-5, atol=1e-6)
    with pytest.raises(gc.GraphcnnError, match="keys"):
        m.predict({"a": xa})
    with pytest.raises(gc.GraphcnnError, match="2 inputs"):
        m.predict(xa)
    with pytest.raises(gc.GraphcnnError, match="3 outputs"):
        m.evaluate([xa, xb], np.zeros(5))


def sequential_layers():
    return [L.Input((8, 8, 1)), L.Conv2D(4, 3, activation="relu", padding="same"), L.MaxPool2D(2), L.Flatten(),
            L.Dropout(0.25), L.Dense(3, activation="softmax")]


def test_sequential_is_the_chain_special_case(rng):
    """Same layers, same seed: a Sequential and the equivalent gc.Model build the same graph and train
    to bit-identical weights."""
    seq = gc.Sequential(sequential_layers(), name="same")
    ls = sequential_layers()
    x = ls[0]
    for layer in ls[1:]:
        x = layer(x)
    fun = gc.Model(ls[0], x, name="same")
    assert seq.inference_graph() == fun.inference_graph()
    xs = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
    ys = rng.integers(0, 3, 32)
    for m in (seq, fun):
        m.compile(backend="numpy")
        m.fit(xs, ys, epochs=2, batch_size=8, seed=5, verbose=0)
    for k, v in seq.get_weights().items():
        assert np.array_equal(v, fun.get_weights()[k]), k


def test_sequential_initial_weights_are_keras_glorot_in_layer_order():
    """Independent reference of the initialisation: one default_rng(seed), layers in order, each kernel
    Glorot-uniform with Keras's fans, biases zero."""
    m = gc.Sequential([L.Input((6, 6, 2)), L.Conv2D(5, 3), L.Flatten(), L.Dense(7)], seed=42)
    rng = np.random.default_rng(42)
    lim_c = np.sqrt(6 / (3 * 3 * 2 + 3 * 3 * 5))
    conv = rng.uniform(-lim_c, lim_c, size=(3, 3, 2, 5)).astype(np.float32)
    lim_d = np.sqrt(6 / (4 * 4 * 5 + 7))
    dense = rng.uniform(-lim_d, lim_d, size=(80, 7)).astype(np.float32)
    w = m.get_weights()
    np.testing.assert_array_equal(w["conv2d/kernel"], conv)
    np.testing.assert_array_equal(w["dense/kernel"], dense)
    assert not w["conv2d/bias"].any() and not w["dense/bias"].any()


def test_save_load_and_load_model_round_trip(tmp_path, rng):
    m = residual()
    m.compile(backend="numpy")
    x = rng.normal(size=(6, 5, 7, 2)).astype(np.float32)
    m.fit(x, rng.integers(0, 4, 6), epochs=1, batch_size=3, seed=0, verbose=0)
    m.save(tmp_path / "res.gcnn")
    np.testing.assert_allclose(gc.load(tmp_path / "res.gcnn", backend="numpy").predict(x), m.predict(x),
                               rtol=1e-6, atol=1e-7)
    assert m.get_layer("sum").kind == "add"
    with pytest.raises(gc.GraphcnnError, match="no layer 'nope'"):
        m.get_layer("nope")
    back = gc.load_model(tmp_path / "res.gcnn")
    assert isinstance(back, gc.Model) and not isinstance(back, gc.Sequential)
    assert [l.name for l in back.layers] == [l.name for l in m.layers]
    assert back.inference_graph() == m.inference_graph()
    np.testing.assert_array_equal(back.predict(x), m.predict(x))


def test_summary_lists_shapes_params_and_connections():
    lines = []
    residual().summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "sum (Add)" in text and "(None, 5, 7, 3)" in text
    row = next(l for l in lines if l.startswith("sum (Add)"))
    assert row.split()[-2:] == ["c1,", "c2"]
    c1 = next(l for l in lines if l.startswith("c1 (Conv2D)"))
    assert " 57 " in c1                                   # 3*3*2*3 + 3
    total = 57 + (1 * 3 * 3 * 3 + 3) + (5 * 7 * 3 * 4 + 4)
    assert f"Total params: {total}" in text


def test_gc_compile_and_cli_compile_functional(tmp_path, rng):
    m = residual(name="resfile")
    fn = gc.compile(m.inference_graph(), backend="numpy", params=m.get_weights())
    x = rng.normal(size=(2, 5, 7, 2)).astype(np.float32)
    np.testing.assert_allclose(fn(x=x), residual_reference(m.get_weights(), x), rtol=1e-5, atol=1e-6)
    src = tmp_path / "net.py"
    src.write_text("import graphcnn as gc\nfrom graphcnn import layers as L\n"
                   "inp = L.Input((5, 7, 2))\n"
                   "a = L.Conv2D(3, 3, padding='same', activation='relu')(inp)\n"
                   "b = L.Conv2D(3, 3, padding='same')(a)\n"
                   "model = gc.Model(inp, L.Dense(2)(L.Flatten()(L.Add()([a, b]))), name='netfile')\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "graphcnn.cli", "compile", str(src), "-o", str(out), "--target",
                        "numpy", "--emit", "ir,py"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    from ir.text import parse_graph
    emitted = parse_graph((out / "netfile.ir").read_text())
    # the residual add is fused into the second conv (its 4th operand is the skip value a)
    assert [len(n.inputs) for n in emitted.nodes if n.op == "conv2d"] == [3, 4]
    assert not any(n.op == "add" for n in emitted.nodes)


# -- build-time errors --------------------------------------------------------------------------------
def test_add_shape_mismatch_names_layer_shapes_and_fix():
    inp = L.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same")(inp)
    b = L.Conv2D(4, 3, strides=2, padding="same")(inp)
    with pytest.raises(gc.LayerError, match=r"Add.*\(None, 8, 8, 4\).*\(None, 4, 4, 4\).*1x1 Conv2D"):
        L.Add()([a, b])
    with pytest.raises(gc.LayerError, match="exactly 2"):
        L.Subtract()([a, a, a])
    with pytest.raises(gc.LayerError, match="one tensor"):
        L.Add()(a)


def test_layer_called_on_foreign_things():
    g = gc.Graph("other")
    v = g.input("x", (None, 4))
    with pytest.raises(gc.LayerError, match=r"gc\.Graph 'other'.*gc\.ops"):
        L.Dense(2)(v)
    with pytest.raises(gc.LayerError, match="model.predict"):
        L.Dense(2)(np.zeros((1, 4)))
    with pytest.raises(gc.LayerError, match="not callable"):
        L.Input((3,))(L.Input((3,)))
    m = residual()
    with pytest.raises(gc.GraphcnnError, match="nesting models"):
        m(L.Input((5, 7, 2)))


def test_disconnected_and_unused_inputs_and_outputs():
    a, b = L.Input((4,)), L.Input((4,))
    y = L.Add()([L.Dense(2)(a), L.Dense(2)(b)])
    with pytest.raises(gc.GraphcnnError, match=r"disconnected.*not among the model's inputs"):
        gc.Model(a, y)
    with pytest.raises(gc.GraphcnnError, match="no output depends on input"):
        gc.Model([a, b], L.Dense(2)(a))
    with pytest.raises(gc.GraphcnnError, match="one of the inputs"):
        gc.Model(a, a)
    with pytest.raises(gc.GraphcnnError, match="inputs must be layers.Input"):
        gc.Model(L.Dense(2)(a), y)
    with pytest.raises(gc.GraphcnnError, match="give inputs and outputs"):
        gc.Model()


def test_shared_layer_on_another_shape_and_duplicate_names():
    d = L.Dense(2)
    d(L.Input((4,)))
    with pytest.raises(gc.LayerError, match=r"built for input shape \(None, 4\).*\(None, 5\)"):
        d(L.Input((5,)))
    inp = L.Input((4,))
    y = L.Dense(2, name="same")(L.Dense(3, name="same")(inp))
    with pytest.raises(gc.LayerError, match="two layers are named 'same'"):
        gc.Model(inp, y)
    inp = L.Input((4,))
    m = gc.Model(inp, L.Dense(2)(L.Dense(3, name="dense")(inp)))      # the auto name skips the user's
    assert [l.name for l in m.layers] == ["input", "dense", "dense_1"]


def test_groups_must_divide_channels():
    with pytest.raises(gc.LayerError, match=r"groups=2 does not divide the 3 input channels"):
        L.Conv2D(4, 3, groups=2)(L.Input((8, 8, 3)))
    with pytest.raises(gc.LayerError, match=r"filters \(5\) must be divisible by groups \(2\)"):
        L.Conv2D(5, 3, groups=2)


def test_batch_norm_rank_is_checked():
    with pytest.raises(gc.LayerError, match=r"BatchNormalization.*\(None, 2, 3, 4, 5\).*Flatten"):
        L.BatchNormalization()(L.Input((2, 3, 4, 5)))
    with pytest.raises(gc.LayerError, match="axis=-1"):
        L.BatchNormalization(axis=1)


def test_errors_inside_conv_name_the_layer():
    with pytest.raises(gc.LayerError, match=r"Conv2D layer called on \(None, 4, 4, 1\).*larger"):
        L.Conv2D(2, 5)(L.Input((4, 4, 1)))


def test_branches_reload_in_the_saved_order():
    """Two branches built one after the other reload to the same graph (node order included)."""
    a, b = L.Input((4,)), L.Input((4,))
    x = L.Dense(3)(L.Dense(3)(a))
    y = L.Dense(3)(b)
    m = gc.Model([a, b], L.Add()([x, y]))
    from graphcnn.model import model_from_config
    back = model_from_config(m.config())
    back.build()
    assert back.inference_graph() == m.inference_graph()


def test_cyclic_or_broken_config_is_refused():
    from graphcnn.model import model_from_config
    cfg = residual().config()
    # make c1 read from c2, which reads from c1: a cycle no call order can satisfy
    node = next(n for n in cfg["nodes"] if n["layer"] == "c1")
    node["inbound"] = [["c2", 0]]
    with pytest.raises(gc.GraphcnnError, match="cyclic"):
        model_from_config(cfg)
    cfg = residual().config()
    cfg["layers"][1]["class"] = "os.system"
    with pytest.raises(gc.GraphcnnError, match="unknown class"):
        model_from_config(cfg)
    cfg = residual().config()
    cfg["outputs"] = [["nothere", 0]]
    with pytest.raises(gc.GraphcnnError, match="unknown layer call"):
        model_from_config(cfg)


def test_cli_train_a_functional_model_file(tmp_path, monkeypatch, rng):
    from graphcnn import cli
    src = tmp_path / "fnet.py"
    src.write_text("import graphcnn as gc\nfrom graphcnn import layers as L\n"
                   "inp = L.Input((28, 28, 1))\n"
                   "a = L.Conv2D(2, 5, strides=3, activation='relu')(inp)\n"
                   "b = L.Conv2D(2, 3, padding='same')(a)\n"
                   "model = gc.Model(inp, L.Dense(10, activation='softmax')(L.Flatten()(L.Add()([a, b]))),"
                   " name='fnet')\nTRAIN = {'epochs': 1, 'batch_size': 16}\n")
    x = rng.integers(0, 255, (48, 28, 28)).astype(np.uint8)
    y = rng.integers(0, 10, 48)
    monkeypatch.setattr(cli, "load_data", lambda d: ((x, y), (x[:16], y[:16])))
    out = tmp_path / "fnet.gcnn"
    assert cli.main(["train", str(src), "--backend", "numpy", "--quiet", "--out", str(out)]) == 0
    m = gc.load_model(out)
    assert m.epochs_done == 1 and m.compiled["metrics"] == ["accuracy"]
    assert [l.name for l in m.layers][:2] == ["input", "conv2d"]
    np.testing.assert_array_equal(m.predict(x[:4] / 255), gc.load(out, backend="numpy").predict(x[:4] / 255))
