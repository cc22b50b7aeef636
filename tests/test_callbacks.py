"""gc.callbacks (Keras's Callback protocol) and the fit options: validation_split, initial_epoch,
class/sample weights, metrics, verbose, divergence guard, bad labels."""
import csv
import math

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import callbacks as C
from graphcnn import layers as L
from ir.ops import get_op


def small(name="cb"):
    return gc.Sequential([L.Input((6,)), L.Dense(8, activation="relu"), L.Dense(3, activation="softmax")], name=name)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 6)).astype(np.float32)
    x[np.arange(n), y] += 1.5
    return x, y


class Recorder(C.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin",))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", sorted(logs)))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, dict(logs)))

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(("batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, dict(logs)))


def test_hook_order_and_logs():
    x, y = data(20)
    m = small()
    m.compile(backend="numpy", metrics=["accuracy"])
    rec = Recorder()
    h = m.fit(x, y, epochs=2, batch_size=8, seed=0, verbose=0, callbacks=[rec], validation_data=(x, y))
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["train_begin"] + (["epoch_begin"] + ["batch_begin", "batch_end"] * 3 + ["epoch_end"]) * 2 + \
        ["train_end"]
    assert rec.model is m
    ends = [c for c in rec.calls if c[0] == "epoch_end"]
    assert [e[1] for e in ends] == [0, 1]
    assert set(ends[0][2]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert ends[1][2]["loss"] == h.history["loss"][1]
    # the last batch's running mean is the epoch's loss
    last_batch = [c for c in rec.calls if c[0] == "batch_end"][2]
    assert math.isclose(last_batch[2]["loss"], h.history["loss"][0])
    assert h.epoch == [0, 1] and m.history is h


@pytest.mark.parametrize("bad", [["nonsense", 42], "EarlyStopping", [object()], C.History()])
def test_unknown_callbacks_refused(bad):
    x, y = data(8)
    m = small()
    m.compile(backend="numpy")
    with pytest.raises(gc.GraphcnnError, match="callbacks"):
        m.fit(x, y, epochs=1, verbose=0, callbacks=bad)


def test_stop_training_from_a_callback():
    class StopAfterOne(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True
    x, y = data(16)
    m = small()
    m.compile(backend="numpy")
    h = m.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[StopAfterOne()])
    assert h.epoch == [0]


class FakeLogs(C.Callback):
    """Replaces val_loss with a scripted sequence (runs before EarlyStopping in the list)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.values[epoch]


def test_early_stopping_patience_and_restore():
    x, y = data(16)
    m = small()
    m.compile(backend="numpy")
    snapshots = []

    class Snap(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append(self.model.get_weights())
    es = C.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    h = m.fit(x, y, epochs=10, batch_size=8, seed=0, verbose=0, validation_data=(x, y),
              callbacks=[FakeLogs([1.0, 0.5, 0.7, 0.8, 0.9, 1, 1, 1, 1, 1]), Snap(), es])
    assert h.epoch == [0, 1, 2]                 # 0.7 after the best 0.5: patience 1 exhausted at epoch 2
    assert es.stopped_epoch == 2 and es.best_epoch == 1 and es.best == 0.5
    for k, v in m.get_weights().items():
        np.testing.assert_array_equal(v, snapshots[1][k])     # best epoch's weights are back


def test_early_stopping_stops_when_real_validation_loss_rises():
    """A model that overfits noise: the validation loss rises, EarlyStopping(patience=1) ends the run."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(24, 6)).astype(np.float32), rng.integers(0, 3, 24)
    vx, vy = rng.normal(size=(24, 6)).astype(np.float32), rng.integers(0, 3, 24)
    m = gc.Sequential([L.Input((6,)), L.Dense(64, activation="relu"), L.Dense(3, activation="softmax")])
    m.compile(optimizer={"name": "adam", "lr": 0.05}, backend="numpy")
    es = C.EarlyStopping(patience=1)
    h = m.fit(x, y, epochs=60, batch_size=8, seed=0, verbose=0, validation_data=(vx, vy), callbacks=[es])
    v = h.history["val_loss"]
    assert len(v) < 60 and es.stopped_epoch == len(v) - 1
    assert v[-1] >= min(v) and v[-2] >= min(v)        # the last two epochs did not improve on the best


def test_early_stopping_mode_and_errors():
    assert C.EarlyStopping(monitor="val_accuracy").mode == "max"
    assert C.EarlyStopping(monitor="loss").mode == "min"
    with pytest.raises(gc.GraphcnnError, match="mode"):
        C.EarlyStopping(mode="up")
    with pytest.raises(gc.GraphcnnError, match="patience"):
        C.EarlyStopping(patience=-1)
    x, y = data(8)
    m = small()
    m.compile(backend="numpy")
    with pytest.raises(gc.GraphcnnError, match="val_loss.*not among"):
        m.fit(x, y, epochs=1, verbose=0, callbacks=[C.EarlyStopping()])


def test_model_checkpoint_keeps_the_best(tmp_path):
    x, y = data(16)
    m = small()
    m.compile(backend="numpy")
    saved = {}

    class Snap(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved[epoch] = self.model.predict(x)
    path = tmp_path / "best.gcnn"
    ck = C.ModelCheckpoint(path, monitor="val_loss", save_best_only=True)
    m.fit(x, y, epochs=4, batch_size=8, seed=0, verbose=0, validation_data=(x, y),
          callbacks=[FakeLogs([0.9, 0.4, 0.6, 0.5]), ck, Snap()])
    np.testing.assert_allclose(gc.load(path, backend="numpy").predict(x), saved[1], rtol=1e-6, atol=1e-7)
    assert gc.load_model(path).epochs_done == 2
    assert not list(tmp_path.glob(".tmp-*"))              # atomic
    every = C.ModelCheckpoint(str(tmp_path / "e{epoch:02d}.gcnn"))
    m.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[every])
    assert sorted(p.name for p in tmp_path.glob("e*.gcnn")) == ["e01.gcnn", "e02.gcnn"]


def test_learning_rate_scheduler_changes_the_step():
    """lr 0 after the first epoch leaves the weights untouched from then on."""
    x, y = data(16)
    m = gc.Sequential([L.Input((6,)), L.Dense(3, activation="softmax")], name="lrs")
    m.compile(optimizer={"name": "sgd", "lr": 0.1}, backend="numpy")
    seen, weights = [], []

    class Snap(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(logs["learning_rate"])
            weights.append(self.model.get_weights())
    sched = C.LearningRateScheduler(lambda epoch, lr: lr if epoch == 0 else 1e-30)
    m.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[sched, Snap()])
    assert seen == [pytest.approx(0.1), 1e-30, 1e-30]
    for k in weights[0]:
        np.testing.assert_allclose(weights[2][k], weights[1][k], atol=1e-20)
    with pytest.raises(gc.GraphcnnError, match="positive finite"):
        m.fit(x, y, epochs=1, verbose=0, callbacks=[C.LearningRateScheduler(lambda e: -1.0)])


def test_csv_logger(tmp_path):
    x, y = data(16)
    m = small()
    m.compile(backend="numpy", metrics=["accuracy"])
    p = tmp_path / "log.csv"
    h = m.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[C.CSVLogger(p)])
    rows = list(csv.DictReader(open(p)))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert [float(r["loss"]) for r in rows] == pytest.approx(h.history["loss"])
    m.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[C.CSVLogger(p, append=True)])
    assert len(list(csv.DictReader(open(p)))) == 3


# -- fit options --------------------------------------------------------------------------------------
def test_validation_split_takes_the_last_samples():
    x, y = data(40)
    a, b = small("a"), small("b")
    for m in (a, b):
        m.compile(backend="numpy", metrics=["accuracy"])
    ha = a.fit(x, y, epochs=2, batch_size=8, seed=1, verbose=0, validation_split=0.25)
    hb = b.fit(x[:30], y[:30], epochs=2, batch_size=8, seed=1, verbose=0, validation_data=(x[30:], y[30:]))
    assert ha.history == hb.history
    with pytest.raises(gc.GraphcnnError, match="not both"):
        a.fit(x, y, validation_split=0.2, validation_data=(x, y), verbose=0)
    with pytest.raises(gc.GraphcnnError, match=r"\[0, 1\)"):
        a.fit(x, y, validation_split=1.5, verbose=0)


def test_initial_epoch_and_epoch_checks():
    x, y = data(16)
    m = small()
    m.compile(backend="numpy")
    assert m.fit(x, y, epochs=3, initial_epoch=1, batch_size=8, verbose=0).epoch == [1, 2]
    with pytest.raises(gc.GraphcnnError, match="initial_epoch"):
        m.fit(x, y, epochs=1, initial_epoch=2, verbose=0)
    with pytest.raises(gc.GraphcnnError, match="verbose"):
        m.fit(x, y, epochs=1, verbose=3)


def test_metrics_against_numpy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 7, 50)
    m = gc.Sequential([L.Input((6,)), L.Dense(7, activation="softmax")], name="met")
    m.compile(backend="numpy", metrics=["accuracy", "sparse_categorical_accuracy", "sparse_top_k_categorical_accuracy"])
    loss, acc, sacc, top5 = m.evaluate(x, y)
    p = m.predict(x).astype(np.float64)
    assert acc == sacc == pytest.approx(np.mean(p.argmax(1) == y))
    ranks = np.argsort(-p, axis=1)[:, :5]
    assert top5 == pytest.approx(np.mean([y[i] in ranks[i] for i in range(50)]))
    ref = -np.mean(np.log(np.clip(p[np.arange(50), y], 1e-7, 1)))
    assert loss == pytest.approx(ref, rel=1e-5)
    onehot = np.eye(7, dtype=np.float32)[y]
    m.compile(loss="categorical_crossentropy", backend="numpy", metrics=["top_k_categorical_accuracy", "accuracy"])
    _, top5b, acc2 = m.evaluate(x, onehot)
    assert top5b == pytest.approx(top5) and acc2 == pytest.approx(acc)
    with pytest.raises(gc.GraphcnnError, match="unknown metric"):
        m.compile(metrics=["f1"])


def test_top_k_counts_ties_as_hits():
    from graphcnn.training_loop import _top_k_hits

    class M:
        compiled = {"loss": "sparse_categorical_crossentropy"}
    pred = np.array([[0.2, 0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    assert _top_k_hits(M, pred, np.array([5, 1]), k=5).tolist() == [True, True]
    assert _top_k_hits(M, pred, np.array([5, 1]), k=1).tolist() == [True, False]


def test_string_labels_clear_error():
    x, _ = data(4)
    m = small()
    m.compile(backend="numpy")
    with pytest.raises(gc.GraphcnnError, match=r"y must be numbers.*np.unique"):
        m.fit(x, np.array(["cat", "dog", "cat", "dog"]), verbose=0)


def test_divergence_stops_with_message_and_keeps_weights():
    x, y = data(64)
    m = gc.Sequential([L.Input((6,)), L.Dense(3)], name="div")
    m.compile(optimizer={"name": "sgd", "lr": 1e6}, loss="mse", backend="numpy")
    target = np.eye(3, dtype=np.float32)[y] * 100
    with pytest.raises(gc.TrainingError, match=r"the loss became .* at epoch 1, batch \d+ \(over 10000 x.*diverged"):
        m.fit(x, target, epochs=3, batch_size=8, seed=0, verbose=0)


@pytest.mark.parametrize("backend, threads", [("numpy", None), ("llvm", 1), ("llvm", 2)])
def test_divergence_keeps_the_weights_of_the_last_good_step(backend, threads):
    """The refused step leaves no trace: the state copy put back (numpy, one LLVM thread) or, for the
    threaded LLVM step, the update never applied (Executable.train_step)."""
    x, y = data(64)
    m = gc.Sequential([L.Input((6,)), L.Dense(3)], name="div_kept")
    m.compile(optimizer={"name": "sgd", "lr": 1e6}, loss="mse", backend=backend,
              **({"threads": threads} if threads else {}))
    target = np.eye(3, dtype=np.float32)[y] * 100
    kept = []

    class Keep(C.Callback):
        def on_train_batch_end(self, batch, logs=None):
            kept.append(m.get_weights())

    with pytest.raises(gc.TrainingError, match="diverged"):
        m.fit(x, target, epochs=3, batch_size=8, seed=0, verbose=0, callbacks=[Keep()])
    if threads == 2:
        assert m._executable("train").split_training
    assert kept, "the first step should have been accepted"
    now = m.get_weights()
    assert sorted(now) == sorted(kept[-1])
    for name in now:
        assert now[name].tobytes() == kept[-1][name].tobytes(), name


def test_verbose_prints_one_line_per_epoch_when_not_a_tty(capsys):
    x, y = data(16)
    m = small()
    m.compile(backend="numpy", metrics=["accuracy"])
    for verbose in (1, 2):                       # pytest's stderr is not a terminal
        m.fit(x, y, epochs=2, batch_size=4, verbose=verbose, validation_data=(x, y))
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert "\r" not in err
        assert len(lines) == 2 and lines[0].startswith("Epoch 1/2") and "val_accuracy: " in lines[1]
    m.fit(x, y, epochs=1, verbose=0)
    assert capsys.readouterr().err == ""


def weighted_loss_available():
    return len(get_op("sparse_categorical_crossentropy").inputs) >= 3


@pytest.mark.skipif(not weighted_loss_available(), reason="needs the per-sample weight input of the loss ops (H7)")
def test_class_weight_equals_sample_weight_and_reference():
    x, y = data(24)
    cw = {0: 1.0, 1: 3.0, 2: 0.5}
    a, b = small("a"), small("b")
    for m in (a, b):
        m.compile(optimizer={"name": "sgd", "lr": 0.1}, backend="numpy")
    ha = a.fit(x, y, epochs=1, batch_size=24, seed=0, verbose=0, class_weight=cw, shuffle=False)
    hb = b.fit(x, y, epochs=1, batch_size=24, seed=0, verbose=0, sample_weight=np.array([cw[c] for c in y]),
               shuffle=False)
    assert ha.history == hb.history
    p = small("a")
    p.build()
    pr = p.predict(x).astype(np.float64)
    w = np.array([cw[c] for c in y])
    ref = np.sum(w * -np.log(np.clip(pr[np.arange(24), y], 1e-7, 1))) / 24      # Keras: sum(w*l)/N
    assert ha.history["loss"][0] == pytest.approx(ref, rel=1e-5)


def test_sample_weight_checks():
    x, y = data(8)
    m = small()
    m.compile(backend="numpy")
    with pytest.raises(gc.GraphcnnError, match="shape"):
        m.fit(x, y, sample_weight=np.ones(3), verbose=0)
    with pytest.raises(gc.GraphcnnError, match=">= 0"):
        m.fit(x, y, sample_weight=-np.ones(8), verbose=0)
    with pytest.raises(gc.GraphcnnError, match="dict"):
        m.fit(x, y, class_weight=[1, 2], verbose=0)
