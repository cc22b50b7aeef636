"""The graphcnn command line: exit codes, show (IR round trip), train/eval/run, compile --target numpy."""
import os
import subprocess
import sys

import numpy as np
import pytest

import ir
from graphcnn.cli import main
from conftest import ROOT

EX = os.path.join(ROOT, "examples")


def run_cli(*args):
    """Run the CLI in a subprocess (real exit codes, real stdout/stderr)."""
    p = subprocess.run([sys.executable, "-m", "graphcnn.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    return p.returncode, p.stdout, p.stderr


def test_show_prints_ir_that_parses_back(capsys):
    assert main(["show", os.path.join(EX, "mnist_cnn.py")]) == 0
    text = capsys.readouterr().out
    g = ir.parse_graph(text)
    from conftest import load_example
    assert g == load_example("mnist_cnn").inference_graph()


def test_show_dot_and_passes(capsys):
    assert main(["show", os.path.join(EX, "lenet5.py"), "--format", "dot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('digraph "lenet5"') and "conv2d" in out
    assert main(["show", os.path.join(EX, "lenet5.py"), "--passes"]) == 0
    assert "IR after verify" in capsys.readouterr().out


@pytest.mark.parametrize("args,code,msg", [
    (["show", "nope.py"], 2, "not found"),
    (["show", os.path.join(EX, "mnist_cnn.py") + ":missing"], 2, "defines no 'missing'"),
    (["train", os.path.join(EX, "mnist_cnn.py"), "--data", "/nonexistent"], 2, "--data"),
    (["run", "missing.gcnn", "x.npy"], 2, "no such file"),
    (["compile", os.path.join(EX, "lenet5.py"), "-o", "/tmp/gc_out", "--target", "numpy", "--emit", "so"], 2,
     "not available"),
    (["frobnicate"], 2, ""),
])
def test_bad_usage_exit_2_with_one_line(args, code, msg):
    rc, out, err = run_cli(*args)
    assert rc == code
    assert msg in err
    if msg:
        assert len(err.strip().splitlines()) == 1


def test_bad_artifact_is_refused(tmp_path):
    bad = tmp_path / "bad.gcnn"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    rc, out, err = run_cli("eval", str(bad))
    assert rc == 2 and "bad.gcnn" in err


def test_train_eval_run_compile_numpy(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(
        "import graphcnn as gc\nfrom graphcnn import layers\n"
        "def build():\n"
        "    return gc.Sequential([layers.Input((28, 28, 1)), layers.Conv2D(4, 5, strides=2, activation='relu'),\n"
        "                          layers.Flatten(), layers.Dense(10, activation='softmax')], name='tiny')\n")
    out = tmp_path / "tiny.gcnn"
    rc, so, se = run_cli("train", f"{model}:build", "--epochs", "1", "--batch-size", "64", "--backend", "numpy",
                         "--out", str(out), "--quiet")
    assert rc == 0, se
    acc = float(so.split("test accuracy")[1].split()[0])
    assert acc > 0.8                     # one epoch on the bundled 8,000 images
    rc, so, se = run_cli("eval", str(out), "--backend", "numpy")
    assert rc == 0, se
    assert abs(float(so.split()[1]) - acc) < 1e-3
    from graphcnn.datasets import mnist
    _, (xte, yte) = mnist.load_data()
    np.save(tmp_path / "five.npy", xte[:5])
    rc, so, se = run_cli("run", str(out), str(tmp_path / "five.npy"), "--backend", "numpy")
    assert rc == 0, se
    import graphcnn as gc
    rt = gc.load(out, backend="numpy")
    expect = rt.predict(xte[:5].astype(np.float32) / 255).argmax(-1)
    assert [int(s) for s in so.split()] == list(expect)
    # standalone NumPy module: same predictions, needs only NumPy
    od = tmp_path / "gen"
    rc, so, se = run_cli("compile", str(out), "-o", str(od), "--target", "numpy", "--emit", "py,ir")
    assert rc == 0, se
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import tiny; "
            "x = np.load(sys.argv[2]).astype(np.float32)[..., None] / 255; "
            "np.save(sys.argv[3], tiny.predict(x))")
    p = subprocess.run([sys.executable, "-c", code, str(od), str(tmp_path / "five.npy"), str(tmp_path / "p.npy")],
                       capture_output=True, text=True, cwd=str(tmp_path), env={"PATH": os.environ.get("PATH", "")})
    assert p.returncode == 0, p.stderr
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), rt.predict(xte[:5].astype(np.float32) / 255),
                               rtol=1e-5, atol=1e-6)
    assert ir.parse_graph((od / "tiny.ir").read_text(), consts={}) is not None
