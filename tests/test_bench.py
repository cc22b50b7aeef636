"""graphcnn bench (graphcnn/bench.py): option checking, the table and ratio arithmetic on fake timings, the
FMA probe's arithmetic, the round interleaving, and one tiny real run without peers. No timed assertions:
the numbers a run prints depend on the machine and its load."""
import argparse
import os

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import bench
from graphcnn.errors import GraphcnnError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(**kw):
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    a = ap.parse_args([os.path.join(ROOT, "examples", "seed_dense.py")])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.mark.parametrize("kw, flag", [
    ({"batch": "1,x"}, "--batch"), ({"batch": "0"}, "--batch"), ({"batch": ""}, "--batch"),
    ({"batch": "1,1"}, "--batch"), ({"vs": "torch,tensorflow"}, "--vs"), ({"vs": "torch,torch"}, "--vs"),
    ({"threads": 0}, "--threads"), ({"rounds": 0}, "--rounds"), ({"repeats": -1}, "--repeats"),
    ({"images": 64}, "--images"),
])
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(GraphcnnError, match=flag):
        bench.check_arguments(args(**kw))


def test_good_options():
    assert bench.check_arguments(args(batch="1, 32", vs="onnxruntime,torch")) == ([1, 32], ["onnxruntime", "torch"])
    assert bench.check_arguments(args(vs="")) == ([1, 256], [])


def test_cli_bad_option_exits_2(capsys):
    from graphcnn.cli import main
    assert main(["bench", os.path.join(ROOT, "examples", "seed_dense.py"), "--vs", "caffe"]) == 2
    assert "--vs" in capsys.readouterr().err


def test_missing_peer_is_skipped_with_its_pip_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    have, skipped = bench.installed_peers(["torch", "onnxruntime"])
    assert have == ["onnxruntime"]
    assert skipped == {"torch": bench.PEER_INSTALL["torch"]} and "pip install torch==" in skipped["torch"]


def test_rotation():
    assert bench.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert bench.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert bench.rotated(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert bench.rotated([], 3) == []


def test_ratios_and_table_on_fake_timings():
    table = {
        "train_epoch_s": {"graphcnn-model": 1.0, "torch": 2.0, "keras": 4.0},
        "b1_s": {"graphcnn-so": 20e-6, "graphcnn-model": 60e-6, "torch": 50e-6, "onnxruntime": 40e-6},
        "b256_s": {"graphcnn-so": 0.010, "torch": 0.020, "onnxruntime": 0.005},
        "peak_rss_mb": {"graphcnn-so": 60.0, "torch": 300.0, "onnxruntime": 120.0},
    }
    peers = ["torch", "onnxruntime", "keras"]
    # the fastest PEER, not torch and not a graphcnn system
    assert bench.fastest_peer("b1_s", table["b1_s"], peers) == ("onnxruntime", 40e-6)
    assert bench.fastest_peer("train_epoch_s", table["train_epoch_s"], peers) == ("torch", 2.0)
    assert bench.fastest_peer("b1_s", {"graphcnn-so": 1.0}, peers) is None
    assert bench.ratio("b1_s", 20e-6, 40e-6) == pytest.approx(0.5)              # latency: 2x faster
    assert bench.ratio("b256_s", 0.010, 0.005) == pytest.approx(0.5)           # images/s: half as many
    assert bench.ratio("train_epoch_s", 1.0, 2.0) == pytest.approx(0.5)
    assert bench.display_value("b1_s", 20e-6) == pytest.approx(20.0)           # microseconds
    assert bench.display_value("b256_s", 0.010) == pytest.approx(25600.0)      # images per second
    systems = ["graphcnn-model", "graphcnn-so", "torch", "onnxruntime", "keras"]
    flops = {"b1_s": 2e6, "b256_s": 512e6, "train_epoch_s": 1e10}
    text = bench.format_table(table, systems, peers, flops, {s: 100.0 for s in systems})
    lines = text.splitlines()
    row = {line.split("  ")[0]: line.split() for line in lines}
    b1 = row["batch-1 latency, us"]
    # columns: label (3 words), 5 systems, fastest peer, 2 ratios
    assert b1[3:8] == ["60.0", "20.0", "50.0", "40.0", "-"]
    assert b1[8:] == ["onnxruntime", "1.50", "0.50"]
    b256 = row["batch-256, images/s"]
    assert b256[2:7] == ["-", "25600", "12800", "51200", "-"] and b256[7:] == ["onnxruntime", "-", "0.50"]
    assert row["peak RSS, MB"][-3:] == ["onnxruntime", "-", "0.50"]
    assert row["warm epoch, s"][-3:] == ["torch", "0.50", "-"]
    # % of peak: 2e6 flops in 20 us = 100 GFLOP/s = 100% of a 100 GFLOP/s peak; the epoch 1e10 in 1 s = 10%
    assert "graphcnn-so 100.0%" in text and "graphcnn-model 10.0%" in text
    assert bench.percent_of_peak("b1_s", None, 1.0, 1.0) is None


def test_medians_of_samples():
    samples = {"b1_s": {"a": [3.0, 1.0, 2.0], "b": [5.0, 7.0]}}
    assert bench.medians(samples) == {"b1_s": {"a": 2.0, "b": 6.0}}


class FakeSystem:
    def __init__(self, name, trains, log):
        self.name, self.trains, self.log, self.threads = name, trains, log, 1

    def first_epoch(self):
        self.log.append(("first", self.name))
        return 1.0

    def epoch(self):
        self.log.append(("epoch", self.name))

    def infer(self, b):
        return lambda: self.log.append((f"b{b}", self.name))


def test_rounds_interleave_with_rotation():
    log = []
    built = {n: FakeSystem(n, n != "so", log) for n in ("model", "so", "torch")}
    probes = {"1": lambda: log.append(("probe", "1")) or 7.0}
    samples = bench.run_rounds(built, [1], rounds=3, repeats=2, train=True, probes=probes)
    assert samples["fma_gflops"] == {"1": [7.0, 7.0, 7.0]}
    assert samples["train_first_s"] == {"model": [1.0] * 3, "torch": [1.0] * 3}
    assert set(samples["b1_s"]) == {"model", "so", "torch"} and all(len(v) == 3 for v in samples["b1_s"].values())
    firsts = [n for kind, n in log if kind == "first"]
    # round orders: (model, so, torch), (so, torch, model), (torch, model, so); `so` does not train
    assert firsts == ["model", "torch", "torch", "model", "torch", "model"]
    b1 = [n for kind, n in log if kind == "b1"]
    # each round: one untimed + 2 timed calls per system, systems in the rotated order
    assert b1[:9] == ["model"] * 3 + ["so"] * 3 + ["torch"] * 3
    assert b1[9:18] == ["so"] * 3 + ["torch"] * 3 + ["model"] * 3


def test_fma_probe_computes_its_chains():
    """The probe's result is the sum over its chains of acc <- acc * m + a, from 1 + j/64: checked against
    the same recurrence in float64, so the kernel really runs `iterations` dependent FMAs per chain."""
    fn, flops_per_iter, _jit = bench.fma_probe_function()
    from backends.llvm.jit import host_target
    lanes = host_target().vector_lanes
    chains = flops_per_iter // (2 * lanes)
    assert chains >= 8
    for iters in (0, 1, 1000):
        out = np.zeros(64, np.float32)
        fn(out.ctypes.data, iters)
        acc = 1.0 + np.arange(chains) / 64.0
        for _ in range(iters):
            acc = acc * np.float32(0.999999) + np.float32(1e-7)
        np.testing.assert_allclose(out[:lanes], np.full(lanes, acc.sum()), rtol=1e-5)
        assert not out[lanes:].any()
    assert np.isfinite(bench.fma_peak_gflops(1, seconds=0.002, repeats=1))


def test_graph_flops_from_the_op_registry():
    """A conv's flops are 2 * kh * kw * cin per output element (conv1 of mnist_cnn: 26x26x32 outputs)."""
    g = gc.Graph("one_conv")
    x = g.input("x", (None, 28, 28, 1))
    w = g.input("w", (3, 3, 1, 32))
    g.output(gc.ops.conv2d(x, w))
    assert bench.graph_flops(g, 3) == 3 * 26 * 26 * 32 * 2 * 3 * 3 * 1


def test_smoke_run_without_peers(tmp_path):
    """One round, one repeat, no peers: every graphcnn row is filled, the three ways agree (bench checks
    it before timing), RSS comes from child processes, the JSON is written."""
    out = tmp_path / "r.json"
    a = args(vs="", rounds=1, repeats=1, images=128, threads=1, json=str(out), quiet=True)
    res = bench.run(a)
    med = res["medians"]
    assert set(med) == {"train_first_s", "train_epoch_s", "b1_s", "b256_s", "peak_rss_mb"}
    assert set(med["b1_s"]) == set(bench.GRAPHCNN_SYSTEMS)
    assert set(med["train_epoch_s"]) == {"graphcnn-model"}
    assert all(v > 0 for per in med.values() for v in per.values())
    assert len(res["load_before"]) == 3 and res["fma_peak_gflops"]["1"][0] > 0
    # flops of the seed network (Dense 784 -> 10, sigmoid) at batch 1 include the 2 * 784 * 10 of the dense
    assert res["flops"]["b1_s"] >= 2 * 784 * 10
    import json
    assert json.loads(out.read_text())["model"] == res["model"]


# -- --int8 -------------------------------------------------------------------------------------------
TINY_CNN = '''import graphcnn as gc
from graphcnn import layers
model = gc.Sequential([layers.Input((28, 28, 1)), layers.Conv2D(4, 3, activation="relu"), layers.MaxPool2D(2),
                       layers.Flatten(), layers.Dense(10, activation="softmax")], name="tiny_cnn")
TRAIN = {"epochs": 1, "batch_size": 64}
'''


@pytest.fixture
def tiny_cnn(tmp_path):
    """A quantizable model (conv2d + dense; seed_dense's sigmoid dense stays float) that trains in a second."""
    path = tmp_path / "tiny_cnn.py"
    path.write_text(TINY_CNN)
    return str(path)


@pytest.mark.parametrize("kw, message", [
    ({"int8": True, "calibration_images": 0}, "--calibration-images must be an integer >= 1"),
    ({"int8": True, "calibration_images": -5}, "--calibration-images must be an integer >= 1"),
    ({"calibration_images": 100}, "needs --int8"),
])
def test_int8_bad_options(kw, message):
    with pytest.raises(GraphcnnError, match=message):
        bench.check_arguments(args(**kw))


def test_int8_cli_usage_errors_exit_2(capsys, tmp_path):
    from graphcnn.cli import main
    model = os.path.join(ROOT, "examples", "seed_dense.py")
    assert main(["bench", model, "--int8", "--calibration-images", "0"]) == 2
    assert "--calibration-images must be an integer >= 1" in capsys.readouterr().err
    assert main(["bench", model, "--calibration-images", "10"]) == 2
    assert "needs --int8" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "m.onnx"), "--int8"]) == 2
    assert "--int8" in capsys.readouterr().err


def int8_args(spec, **kw):
    return args(**dict({"model": spec, "int8": True, "calibration_images": 64, "images": 256, "threads": 1}, **kw))


def test_int8_calibration_beyond_the_bundled_images(tiny_cnn, tmp_path):
    from graphcnn import bench_int8
    ctx = bench.Context(tiny_cnn, 256, 1, str(tmp_path))
    with pytest.raises(GraphcnnError, match="--calibration-images 9000: the bundled MNIST subset has 8000"):
        bench_int8.build_systems(ctx, int8_args(tiny_cnn, calibration_images=9000), [], {}, say=lambda s: None)


def test_int8_rows_and_agreement_match_an_independent_computation(tiny_cnn, tmp_path):
    """The report's numbers are those of gc.quantize's runtime on the same calibration images, against the
    trained fp32 model, on the bundled test split; torch has no int8 row and says so."""
    from graphcnn import bench_int8
    ctx = bench.Context(tiny_cnn, 256, 1, str(tmp_path))
    skipped = {}
    built, report = bench_int8.build_systems(ctx, int8_args(tiny_cnn), ["torch"], skipped, say=lambda s: None)
    assert list(built) == ["graphcnn-runtime", "graphcnn-int8", "graphcnn-int8-so"]
    assert "no int8 row" in skipped["torch"]
    assert report["calibration_images"] == 64 and report["test_images"] == 2000
    (xtr, _), (xte, yte) = gc.datasets.mnist.load_data()
    xtr = xtr[:64].astype(np.float32).reshape(-1, 28, 28, 1) / np.float32(255)
    xte = xte.astype(np.float32).reshape(-1, 28, 28, 1) / np.float32(255)
    fp32_out = ctx.model.predict(xte)
    int8_out = gc.quantize(ctx.model, xtr, method="minmax").predict(xte)
    fp32, int8 = fp32_out.argmax(1), int8_out.argmax(1)
    assert report["fp32_test_accuracy"] == pytest.approx(np.mean(fp32 == yte))
    row = report["systems"]["graphcnn-int8"]
    assert row["agreement_pct"] == pytest.approx(100 * np.mean(int8 == fp32))
    assert row["test_accuracy"] == pytest.approx(np.mean(int8 == yte))
    assert row["accuracy_loss_points"] == pytest.approx(100 * (np.mean(fp32 == yte) - np.mean(int8 == yte)))
    assert row["max_abs_diff"] == pytest.approx(np.max(np.abs(int8_out - fp32_out)), abs=1e-5)
    # the .so runs the same int8 graph with the same kernels
    so = report["systems"]["graphcnn-int8-so"]
    assert so["agreement_pct"] == pytest.approx(row["agreement_pct"], abs=0.2) and so["max_abs_diff"] >= 0
    text = bench_int8.format_agreement(report)
    assert f"graphcnn-int8: same class as fp32 for {row['agreement_pct']:.2f}%" in text


@pytest.mark.parametrize("peer", ["onnxruntime", "tflite"])
def test_int8_peer_rows(peer, tiny_cnn, tmp_path):
    """onnxruntime-int8 / tflite-int8: the peer's own quantization of the same trained network (skipped when
    the peer is not installed) classifies the test images mostly as fp32 graphcnn does."""
    from graphcnn import bench_int8
    if not bench.installed_peers([peer])[0]:
        pytest.skip(f"{peer} is not installed")
    bench._set_thread_env(1)
    ctx = bench.Context(tiny_cnn, 1024, 1, str(tmp_path))
    skipped = {}
    built, report = bench_int8.build_systems(ctx, int8_args(tiny_cnn, images=1024), [peer], skipped,
                                             say=lambda s: None)
    row = bench_int8.INT8_PEERS[peer]
    assert row in built, skipped
    assert report["systems"][row]["agreement_pct"] > 80
    built[row].infer(1)()          # the timed call runs


def test_int8_smoke_run_without_peers(tiny_cnn, tmp_path):
    """One round through bench.run: the int8 rows are timed in the same rounds as the fp32 runtime, their
    peak RSS comes from child processes, and the JSON has the int8 section."""
    import json
    out = tmp_path / "r.json"
    a = int8_args(tiny_cnn, vs="", rounds=1, repeats=1, json=str(out), quiet=True)
    res = bench.run(a)
    rows = {"graphcnn-runtime", "graphcnn-int8", "graphcnn-int8-so"}
    assert set(res["medians"]) == {"b1_s", "b256_s", "peak_rss_mb"}           # no training rows with --int8
    assert all(set(per) == rows and all(v > 0 for v in per.values()) for per in res["medians"].values())
    section = json.loads(out.read_text())["int8"]
    assert set(section["systems"]) == rows - {"graphcnn-runtime"}
    assert 0 <= section["systems"]["graphcnn-int8"]["agreement_pct"] <= 100
