"""Save -> gc.load_model -> fit continues bit-identically to an uninterrupted run (issue 11 item 5)."""
import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers as L
from graphcnn.artifact import ArtifactError, read_artifact


def residual_net():
    inp = L.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    y = L.Conv2D(4, 3, padding="same")(x)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.Dropout(0.3)(L.Flatten()(x))
    return gc.Model(inp, L.Dense(3, activation="softmax")(x), name="resume_net")


def sequential_net():
    return gc.Sequential([L.Input((6, 6, 2)), L.Conv2D(3, 3, activation="relu"), L.Flatten(), L.Dropout(0.2),
                          L.Dense(3, activation="softmax")], name="resume_seq")


def data(n=40):
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("make,optimizer,backend", [
    (residual_net, "adam", "numpy"),
    (sequential_net, {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "numpy"),
    (residual_net, "adam", "llvm"),
])
def test_resume_is_bit_identical(tmp_path, make, optimizer, backend):
    x, y = data()
    full = make()
    full.compile(optimizer=optimizer, metrics=["accuracy"], backend=backend)
    h_full = full.fit(x, y, epochs=3, batch_size=8, seed=11, verbose=0)

    first = make()
    first.compile(optimizer=optimizer, metrics=["accuracy"], backend=backend)
    first.fit(x, y, epochs=1, batch_size=8, seed=11, verbose=0)
    path = tmp_path / "ckpt.gcnn"
    first.save(path)
    resumed = gc.load_model(path)
    assert resumed.epochs_done == 1
    assert resumed.compiled["backend"] == backend
    h_rest = resumed.fit(x, y, epochs=3, initial_epoch=1, batch_size=8, seed=11, verbose=0)

    w_full, w_res = full.get_weights(), resumed.get_weights()
    assert sorted(w_full) == sorted(w_res)
    for k in w_full:
        assert np.array_equal(w_full[k], w_res[k]), k
    assert h_rest.history["loss"] == h_full.history["loss"][1:]
    assert h_rest.epoch == [1, 2]
    np.testing.assert_array_equal(full.predict(x), resumed.predict(x))


def test_save_stores_optimizer_state_and_step(tmp_path):
    x, y = data()
    m = residual_net()
    m.compile(backend="numpy")
    m.fit(x, y, epochs=1, batch_size=10, seed=0, verbose=0)
    m.save(tmp_path / "m.gcnn")
    graph, weights, meta, state = read_artifact(tmp_path / "m.gcnn", with_state=True)
    assert float(state["step"]) == 4.0                       # 40 samples / batch 10
    assert set(state) == {"step"} | {f"{k}/{s}" for k in weights for s in ("m", "v")}
    for k, v in state.items():
        np.testing.assert_array_equal(v, m._opt_state[k])
    assert meta["training"]["epochs_done"] == 1
    rt = gc.load(tmp_path / "m.gcnn", backend="numpy")       # the inference runtime ignores the state
    np.testing.assert_allclose(rt.predict(x), m.predict(x), rtol=1e-6, atol=1e-7)


def test_uncompiled_model_saves_without_state(tmp_path):
    m = residual_net()
    m.save(tmp_path / "u.gcnn")
    *_, state = read_artifact(tmp_path / "u.gcnn", with_state=True)
    assert state == {}
    back = gc.load_model(tmp_path / "u.gcnn")
    assert back.compiled is None
    for k, v in m.get_weights().items():
        np.testing.assert_array_equal(back.get_weights()[k], v)


def test_config_that_disagrees_with_graph_is_refused(tmp_path):
    """meta.json's model config must describe the stored graph (else training would resume another model)."""
    import io
    import json
    import zipfile
    from graphcnn.artifact import integrity_digests, INTEGRITY
    m = sequential_net()
    m.save(tmp_path / "m.gcnn")
    with zipfile.ZipFile(tmp_path / "m.gcnn") as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    meta = json.loads(entries["meta.json"])
    meta["model"]["layers"][1]["config"]["filters"] = 5
    meta[INTEGRITY] = integrity_digests(meta, entries["graph.json"], entries["weights.npz"])
    entries["meta.json"] = json.dumps(meta).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in entries.items():
            z.writestr(k, v)
    (tmp_path / "bad.gcnn").write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match="describes a different model than graph.json"):
        gc.load_model(tmp_path / "bad.gcnn")


def test_cli_train_resumes_a_gcnn(tmp_path, monkeypatch):
    from graphcnn import cli
    x, y = data(64)
    m = sequential_net()
    m.compile(backend="numpy", metrics=["accuracy"])
    m.fit(x, y, epochs=1, batch_size=16, seed=0, verbose=0)
    m.save(tmp_path / "start.gcnn")
    xt, yt = data(16)
    monkeypatch.setattr(cli, "load_data", lambda d: ((x, y), (xt, yt)))
    out = tmp_path / "after.gcnn"
    rc = cli.main(["train", str(tmp_path / "start.gcnn"), "--epochs", "1", "--batch-size", "16", "--quiet",
                   "--out", str(out)])
    assert rc == 0
    after = gc.load_model(out)
    assert after.epochs_done == 2
    *_, state = read_artifact(out, with_state=True)
    assert float(state["step"]) == 8.0                       # 4 steps before + 4 resumed


def test_resume_with_optimizer_object_and_schedule(tmp_path):
    """gc.optimizers (AdamW + CosineDecay, the rate fed as the 'lr' input) resumes bit-identically too."""
    optimizers = getattr(gc, "optimizers", None)
    if optimizers is None:
        pytest.skip("gc.optimizers lands from H7")
    x, y = data()

    def opt():
        return optimizers.AdamW(learning_rate=optimizers.schedules.CosineDecay(1e-2, 20), weight_decay=1e-3)
    full = residual_net()
    full.compile(optimizer=opt(), backend="numpy")
    full.fit(x, y, epochs=3, batch_size=8, seed=1, verbose=0)
    part = residual_net()
    part.compile(optimizer=opt(), backend="numpy")
    part.fit(x, y, epochs=1, batch_size=8, seed=1, verbose=0)
    part.save(tmp_path / "s.gcnn")
    resumed = gc.load_model(tmp_path / "s.gcnn")
    assert type(resumed.optimizer).__name__ == "AdamW"
    assert resumed.learning_rate == pytest.approx(0.5e-2 * (1 + np.cos(np.pi * 5 / 20)))     # step 5 of 20
    resumed.fit(x, y, epochs=3, initial_epoch=1, batch_size=8, seed=1, verbose=0)
    for k, v in full.get_weights().items():
        assert np.array_equal(v, resumed.get_weights()[k]), k
