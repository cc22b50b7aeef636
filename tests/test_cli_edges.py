"""CLI rough edges (issue 10, item 7): each case exits with the documented code and, for bad input, exactly
one line on stderr naming the argument or file; nothing is printed or saved before a usage error."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphcnn as gc
import ir
from graphcnn import layers as L
from graphcnn.atomic_file import UnsafeTargetError, write_file_atomically
from graphcnn.datasets import mnist
from conftest import ROOT

TINY = """\
import graphcnn as gc
from graphcnn import layers
model = gc.Sequential([layers.Input((28, 28, 1)), layers.Flatten(), layers.Dense(10, activation="softmax")],
                      name="tiny", seed=0)
"""


def cli(*args, cwd=ROOT, pythonpath=ROOT, stdin=None):
    p = subprocess.run([sys.executable, "-m", "graphcnn.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=dict(os.environ, PYTHONPATH=pythonpath), stdin=stdin)
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, out, err, *fragments):
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_edges")
    (d / "tiny.py").write_text(TINY)
    model = gc.Sequential([L.Input((28, 28, 1)), L.Flatten(), L.Dense(10, activation="softmax")], name="tiny",
                          seed=0)
    model.save(d / "tiny.gcnn")
    return d


def test_show_format_json_prints_the_ir_json(work):
    rc, out, err = cli("show", work / "tiny.py", "--format", "json")
    assert rc == 0, err
    g = ir.serialize.graph_from_json(json.loads(out))
    assert g == gc.load(work / "tiny.gcnn", backend="numpy").graph


def test_bench_runs_from_an_installed_copy_without_the_source_tree(work, tmp_path):
    # what `pip install .` installs (pyproject: graphcnn*, ir*, backends*), somewhere else, run from elsewhere
    site = tmp_path / "site"
    for pkg in ("graphcnn", "ir", "backends"):
        shutil.copytree(os.path.join(ROOT, pkg), site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (site / "benchmarks").exists()
    rc, out, err = cli("bench", work / "tiny.py", "--vs", "", "--rounds", "1", "--repeats", "1", "--batch", "1",
                       "--images", "128", "--threads", "1", "--no-rss", cwd=tmp_path, pythonpath=site)
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith("batch-1 latency, us"))
    runtime_us, model_us, so_us = (float(v) for v in row.split()[3:6])
    assert runtime_us > 0 and model_us > 0 and so_us > 0
    one_line_error(*cli("bench", work / "tiny.py", "--vs", "tensorflow", cwd=tmp_path, pythonpath=site),
                   "--vs: unknown tensorflow")
    one_line_error(*cli("bench", work / "tiny.py", "--batch", "1,x"), "--batch '1,x'")


def test_run_into_a_closed_pipe_exits_quietly(work):
    np.save(work / "many.npy", np.zeros((3000, 28, 28), np.uint8))
    p = subprocess.Popen([sys.executable, "-m", "graphcnn.cli", "run", str(work / "tiny.gcnn"), str(work / "many.npy"),
                          "--backend", "numpy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    p.stdout.close()                      # the reader is gone before the first line is written (`| head -0`)
    err = p.stderr.read().decode()
    assert p.wait() == 0 and err == ""
    # and a real `| head -1`: the one line arrives, nothing on stderr, exit status 0 under pipefail
    sh = subprocess.run(["bash", "-o", "pipefail", "-c",
                         f"{sys.executable} -m graphcnn.cli run {work / 'tiny.gcnn'} {work / 'many.npy'} "
                         f"--backend numpy 2>{work / 'err.txt'} | head -1"],
                        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert sh.returncode == 0 and len(sh.stdout.splitlines()) == 1
    assert (work / "err.txt").read_text() == ""


def test_compile_into_an_existing_file_is_a_usage_error(work, tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    one_line_error(*cli("compile", work / "tiny.py", "-o", target, "--target", "numpy"),
                   f"-o {target}: exists and is not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("flags,fragment", [
    (["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0 (train saves the model it trains"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "-0.1"], "--lr must be a positive finite number"),
])
def test_train_settings_are_checked_before_anything_runs(work, tmp_path, flags, fragment):
    out = tmp_path / "never.gcnn"
    one_line_error(*cli("train", work / "tiny.py", "--out", out, *flags), fragment)   # no banner first
    assert not out.exists()


def test_train_settings_from_the_model_file_are_checked_too(tmp_path):
    (tmp_path / "m.py").write_text(TINY + "TRAIN = {'epochs': 0}\n")
    one_line_error(*cli("train", tmp_path / "m.py", "--out", tmp_path / "x.gcnn"),
                   "TRAIN['epochs'] must be an integer >= 1, got 0")
    assert not (tmp_path / "x.gcnn").exists()


@pytest.mark.parametrize("array,fragment", [
    (np.zeros((2, 28, 28), np.complex64), "holds complex64 values; expected real numbers"),
    (np.full((28, 28), np.nan, np.float32), "contains 784 NaN or infinite values"),
    (np.array(["a", "b"]), "holds <U1 values"),
    (np.zeros((5,), np.float32), "expected images of shape (H, W), (N, H, W) or (N, H, W, C), got shape (5,)"),
])
def test_run_refuses_inputs_it_cannot_use(work, tmp_path, array, fragment):
    np.save(tmp_path / "bad.npy", array)
    one_line_error(*cli("run", work / "tiny.gcnn", tmp_path / "bad.npy", "--backend", "numpy"),
                   f"input {tmp_path / 'bad.npy'}: {fragment}")


def test_eval_needs_only_the_test_files(work, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(mnist.bundled_path(), name), tmp_path / name)
    rc, only_test, err = cli("eval", work / "tiny.gcnn", "--data", tmp_path, "--backend", "numpy")
    assert rc == 0, err
    rc, bundled, err = cli("eval", work / "tiny.gcnn", "--backend", "numpy")
    assert rc == 0, err
    assert only_test == bundled and re.match(r"accuracy 0\.\d{4}  loss \d+\.\d{4}  on 2000 test images", only_test)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    one_line_error(*cli("eval", work / "tiny.gcnn", "--data", tmp_path),
                   "missing the test split t10k-labels-idx1-ubyte[.gz]")


# -- saving: non-regular targets, killed writers -----------------------------------------------------------
def test_save_refuses_a_symlink_a_fifo_and_a_folder(tmp_path):
    model = gc.Sequential([L.Input((4,)), L.Dense(2)], name="s", seed=0)
    target = tmp_path / "real.gcnn"
    target.write_bytes(b"original")
    (tmp_path / "link.gcnn").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.gcnn")
    (tmp_path / "dir.gcnn").mkdir()
    for name, kind in (("link.gcnn", "a symbolic link"), ("fifo.gcnn", "a FIFO"), ("dir.gcnn", "a folder")):
        with pytest.raises(UnsafeTargetError, match=f"{name}: exists and is {kind}; refusing to replace it"):
            model.save(tmp_path / name)
    assert target.read_bytes() == b"original" and (tmp_path / "link.gcnn").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["dir.gcnn", "fifo.gcnn", "link.gcnn", "real.gcnn"]
    one_line_error(*cli("train", os.path.join(ROOT, "examples", "seed_dense.py"), "--epochs", "1", "--quiet",
                        "--out", tmp_path / "link.gcnn", "--backend", "numpy"), "is a symbolic link")


def test_a_writer_killed_mid_save_leaves_a_named_temp_that_the_next_save_removes(tmp_path):
    target = tmp_path / "model.gcnn"
    target.write_bytes(b"previous version")
    child = textwrap.dedent(f"""
        import os, sys, time
        import graphcnn.atomic_file as A
        def stuck_fsync(fd):                 # the data is written; stop here as if the disk were slow
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stuck_fsync
        A.write_file_atomically({str(target)!r}, b"new version" * 1000)
        """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.stdout.readline().strip() == b"writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    strays = [n for n in os.listdir(tmp_path) if n != "model.gcnn"]
    assert len(strays) == 1 and re.fullmatch(rf"\.model\.gcnn\.{p.pid}\.[0-9a-f]{{8}}\.partial", strays[0])
    assert target.read_bytes() == b"previous version"          # the kill never damaged the saved file
    write_file_atomically(target, b"next save")
    assert os.listdir(tmp_path) == ["model.gcnn"] and target.read_bytes() == b"next save"


def test_temp_files_of_live_processes_are_left_alone(tmp_path):
    mine = tmp_path / f".x.bin.{os.getpid()}.0123abcd.partial"
    mine.write_bytes(b"in progress")
    write_file_atomically(tmp_path / "x.bin", b"x")
    assert mine.exists() and (tmp_path / "x.bin").read_bytes() == b"x"
