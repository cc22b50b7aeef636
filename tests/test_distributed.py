"""Data-parallel training over MPI (graphcnn/distributed.py): 2 and 3 ranks on this machine, 1 thread
each, against single-process runs of the same model in this process.

The contract: N ranks x 1 thread cut each global batch into N chunks exactly as one process with N
threads does and sum the chunk gradients in the same order, so the final weights are bit-identical to
that run; against the unsplit one-thread run they differ only by float32 summation order (bounded).
Jobs run under `mpiexec` with a timeout: a rank that dies or raises must end the whole job."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphcnn as gc
from graphcnn.errors import GraphcnnError

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
sys.path.insert(0, HERE)
import distributed_worker as worker  # noqa: E402

JOB_TIMEOUT = 90        # seconds; a hung job is a failure, not a stuck suite


def _mpiexec():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'graphcnn[mpi]')")
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec next to this Python or on PATH (pip install 'graphcnn[mpi]' ships one)")
    return found


def run_job(n, *args, env=None):
    """`mpiexec -n n python distributed_worker.py ARGS`, 1 thread per rank; the CompletedProcess."""
    full_env = dict(os.environ, GRAPHCNN_THREADS="1", **(env or {}))
    try:
        return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, WORKER, *args], env=full_env,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} did not end within {JOB_TIMEOUT} s "
                    f"(a rank hung): {e.stderr!r}")


def weights_of(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def relative_difference(a, b):
    return max(float(np.linalg.norm((a[k] - b[k]).astype(np.float64)) / max(np.linalg.norm(b[k]), 1e-30))
               for k in b)


@pytest.mark.parametrize("kind,n", [("dense", 2), ("conv", 3)])
def test_ranks_match_single_process_bit_for_bit(tmp_path, kind, n):
    out = str(tmp_path / "w.npz")
    job = run_job(n, "--kind", kind, "--out", out, env={"GRAPHCNN_DISTRIBUTED_CHECK": "1"})
    assert job.returncode == 0, job.stderr
    got = weights_of(out)
    same_chunks, history = worker.train(kind, threads=n)            # one process, n chunks per batch
    assert sorted(got) == sorted(same_chunks.weights)
    for k, w in same_chunks.weights.items():
        assert np.array_equal(got[k], w), f"{k}: differs from the {n}-thread single-process run"
    with open(out + ".json") as f:
        assert json.load(f) == history              # the global loss and accuracy, as one process logs them
    unsplit, _ = worker.train(kind, threads=1, epochs=1)      # one unsplit step per batch: another sum order
    job1 = run_job(n, "--kind", kind, "--out", out, "--epochs", "1")
    assert job1.returncode == 0, job1.stderr
    diff = relative_difference(weights_of(out), unsplit.weights)
    assert 0 <= diff <= 1e-6, f"{n} ranks vs the unsplit one-thread run after 1 epoch: {diff:.3g} relative"
    assert any(not np.array_equal(unsplit.weights[k], same_chunks.weights[k]) for k in unsplit.weights)


def test_killed_rank_ends_the_job_and_the_checkpoint_resumes(tmp_path):
    ckpt, out = str(tmp_path / "ck.gcnn"), str(tmp_path / "w.npz")
    job = run_job(2, "--kind", "conv", "--epochs", "4", "--checkpoint", ckpt, "--out", out,
                  "--kill-rank", "1", "--at-epoch", "2")
    assert job.returncode != 0 and not os.path.exists(out), "the job went on without rank 1"
    saved = gc.load_model(ckpt)
    assert saved.epochs_done == 2                   # rank 0's last atomic checkpoint, before the kill
    resumed = run_job(2, "--kind", "conv", "--epochs", "4", "--resume", ckpt, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    reference, _ = worker.train("conv", threads=2, epochs=4)
    for k, w in reference.weights.items():
        assert np.array_equal(weights_of(out)[k], w), f"{k}: the resumed job differs from an uninterrupted run"


def test_rank_that_raises_ends_the_job_with_its_message(tmp_path):
    job = run_job(3, "--kind", "dense", "--epochs", "3", "--out", str(tmp_path / "w.npz"), "--raise-rank", "2")
    assert job.returncode != 0
    assert "rank 2 of 3 failed: RuntimeError: injected failure on rank 2 at epoch 2" in job.stderr, job.stderr


def test_diverged_replica_is_named(tmp_path):
    job = run_job(2, "--kind", "dense", "--out", str(tmp_path / "w.npz"), "--perturb-rank", "1",
                  env={"GRAPHCNN_DISTRIBUTED_CHECK": "1"})
    assert job.returncode != 0
    assert "the weights of rank(s) [1] differ from rank 0's after step 4" in job.stderr, job.stderr


def test_cli_workers_matches_threads(tmp_path):
    _mpiexec()
    model_file = tmp_path / "tiny.py"
    model_file.write_text("import graphcnn as gc\nfrom graphcnn import layers\n"
                          "model = gc.Sequential([layers.Input((28, 28, 1)), layers.Flatten(), "
                          "layers.Dense(10, activation='softmax')], name='tiny')\n")
    outs = {}
    for how, extra, threads in (("workers", ["--workers", "2"], "1"), ("threads", [], "2")):
        outs[how] = str(tmp_path / f"{how}.gcnn")
        cmd = [sys.executable, "-m", "graphcnn.cli", "train", str(model_file), "--epochs", "1", "--quiet",
               "--out", outs[how], *extra]
        done = subprocess.run(cmd, env=dict(os.environ, GRAPHCNN_THREADS=threads), capture_output=True, text=True,
                              timeout=JOB_TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("test accuracy") == 1, done.stdout     # rank 0 alone reports
    a, b = gc.load_model(outs["workers"]), gc.load_model(outs["threads"])
    for k in b.weights:
        assert np.array_equal(a.weights[k], b.weights[k]), k


def test_settings_are_checked_without_mpi():
    model = worker.build("dense", 1)
    x, y = worker.data("dense")
    with pytest.raises(GraphcnnError, match="distributed must be True, False or None"):
        model.fit(x, y, distributed="yes", verbose=0)
    assert not gc.distributed.data_parallel(None)        # no init(): one process
    assert gc.distributed.rank() == 0 and gc.distributed.world_size() == 1
    from graphcnn.cli import main
    assert main(["train", "examples/seed_dense.py", "--workers", "0"]) == 2


def _bn_shard_step(w, x, y, eps):
    """float64 gradients of the mean loss of one shard of the tiny_bn net, its batch mean and variance."""
    m = len(y)
    h = x @ w["dense/kernel"] + w["dense/bias"]
    mean, var = h.mean(0), h.var(0)                       # biased, as BatchNormalization in training
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (h - mean) * inv
    z = w["batch_normalization/gamma"] * xhat + w["batch_normalization/beta"]
    a = np.maximum(z, 0.0)
    logits = a @ w["dense_1/kernel"] + w["dense_1/bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dlogits = p.copy()
    dlogits[np.arange(m), y] -= 1.0
    dlogits /= m
    dz = (dlogits @ w["dense_1/kernel"].T) * (z > 0)
    dxhat = dz * w["batch_normalization/gamma"]
    dh = inv / m * (m * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    grads = {"dense_1/kernel": a.T @ dlogits, "dense_1/bias": dlogits.sum(0),
             "batch_normalization/gamma": (dz * xhat).sum(0), "batch_normalization/beta": dz.sum(0),
             "dense/kernel": x.T @ dh, "dense/bias": dh.sum(0)}
    return grads, mean, var


def per_rank_batch_norm_reference(weights, x, y, ranks, epochs, batch, seed, lr=0.1, momentum=0.9, eps=1e-3):
    """float64 loops: each global batch cut into `ranks` shards (linspace), BatchNormalization statistics
    per shard, gradients and new moving statistics weighted by shard size, then SGD."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    mm, mv = "batch_normalization/moving_mean", "batch_normalization/moving_variance"
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(y))
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            bounds = np.linspace(0, len(idx), ranks + 1).astype(int)
            total, moving = {}, {mm: 0.0, mv: 0.0}
            for a, b in zip(bounds[:-1], bounds[1:]):
                share = (b - a) / len(idx)
                grads, mean, var = _bn_shard_step(w, x[idx[a:b]].astype(np.float64), y[idx[a:b]], eps)
                for k, g in grads.items():
                    total[k] = total.get(k, 0.0) + share * g
                moving[mm] = moving[mm] + share * (momentum * w[mm] + (1 - momentum) * mean)
                moving[mv] = moving[mv] + share * (momentum * w[mv] + (1 - momentum) * var)
            for k, g in total.items():
                w[k] = w[k] - lr * g
            w.update(moving)
    return w


def test_per_rank_batch_norm_matches_float64_reference(tmp_path):
    out = str(tmp_path / "w.npz")
    job = run_job(3, "--kind", "bn", "--per-rank-batch-norm", "--out", out, env={"GRAPHCNN_DISTRIBUTED_CHECK": "1"})
    assert job.returncode == 0, job.stderr
    initial = worker.build("bn", 1)
    x, y = worker.data("bn")
    initial.fit(x, y, epochs=0, seed=worker.SEED, verbose=0)         # the weights fit(seed=...) starts from
    want = per_rank_batch_norm_reference(initial.weights, x, y, 3, worker.EPOCHS, worker.BATCH, worker.SEED)
    got = weights_of(out)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # the reference is sensitive to the shards: with statistics over the whole batch it differs
    whole = per_rank_batch_norm_reference(initial.weights, x, y, 1, worker.EPOCHS, worker.BATCH, worker.SEED)
    assert max(np.abs(whole[k] - want[k]).max() for k in want) > 1e-3


def test_batch_norm_is_refused_without_the_option(tmp_path):
    job = run_job(2, "--kind", "bn", "--out", str(tmp_path / "w.npz"))
    assert job.returncode != 0
    assert "combines samples of the batch" in job.stderr and "batch_norm='per_rank'" in job.stderr, job.stderr
