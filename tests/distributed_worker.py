"""The training script tests/test_distributed.py runs under mpiexec (and imports for its single-process
references): a small Dense net or a tiny conv net on generated data, 1 thread per rank by default.

    mpiexec -n 2 python tests/distributed_worker.py --kind conv --out w.npz [--checkpoint ck.gcnn]
        [--resume ck.gcnn] [--kill-rank R --at-epoch E] [--raise-rank R --at-epoch E] [--perturb-rank R]
        [--kind bn --per-rank-batch-norm]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphcnn as gc  # noqa: E402
from graphcnn import layers  # noqa: E402

EPOCHS, BATCH, SEED = 2, 40, 7   # 100 samples: batches of 40, 40, 20 (the last one uneven)


def data(kind):
    """Generated samples with a learnable rule (float64 draws, stored as float32)."""
    rng = np.random.default_rng(11)
    if kind in ("dense", "bn"):
        x = rng.normal(size=(100, 12)).astype(np.float32)
        y = (x[:, :3].sum(1) > 0).astype(np.int64) + (x[:, 3] > 0.5)
    else:
        x = rng.uniform(size=(100, 10, 10, 1)).astype(np.float32)
        y = (x[:, :5].mean((1, 2, 3)) > x[:, 5:].mean((1, 2, 3))).astype(np.int64)
    return x, y


def build(kind, threads):
    if kind == "bn":        # SGD: the float64 reference in tests/test_distributed.py mirrors this net
        model = gc.Sequential([layers.Input((12,)), layers.Dense(8), layers.BatchNormalization(momentum=0.9),
                               layers.ReLU(), layers.Dense(3, activation="softmax")], name="tiny_bn")
        model.compile("sgd", learning_rate=0.1, backend="llvm", threads=threads)
        return model
    if kind == "dense":
        net = [layers.Input((12,)), layers.Dense(16, activation="relu"), layers.Dropout(0.25),
               layers.Dense(3, activation="softmax")]
    else:
        net = [layers.Input((10, 10, 1)), layers.Conv2D(4, 3, activation="relu"), layers.MaxPool2D(2),
               layers.Flatten(), layers.Dropout(0.25), layers.Dense(2, activation="softmax")]
    model = gc.Sequential(net, name=f"tiny_{kind}")
    model.compile("adam", metrics=["accuracy"], backend="llvm", threads=threads)
    return model


class FailAt(gc.callbacks.Callback):
    """On rank `rank`, at the start of epoch `epoch`: die by SIGKILL, raise, or change one weight."""

    def __init__(self, rank, epoch, how):
        super().__init__()
        self.rank, self.epoch, self.how = rank, epoch, how

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.epoch:
            return
        # every rank gets here first: rank 0 has then written the previous epoch's checkpoint, so what
        # the test finds after the failure does not depend on timing
        gc.distributed.init().Barrier()
        if gc.distributed.rank() != self.rank:
            return
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "raise":
            raise RuntimeError(f"injected failure on rank {self.rank} at epoch {epoch + 1}")
        else:
            w = next(iter(self.model.weights.values()))
            w.reshape(-1)[0] += 1.0


def train(kind, threads=1, epochs=EPOCHS, distributed=False, checkpoint=None, resume=None, callbacks=()):
    x, y = data(kind)
    if resume:
        model = gc.load_model(resume)
        start = model.epochs_done
    else:
        model, start = build(kind, threads), 0
    cbs = list(callbacks) + ([gc.callbacks.ModelCheckpoint(checkpoint)] if checkpoint else [])
    hist = model.fit(x, y, epochs=epochs, initial_epoch=start, batch_size=BATCH, seed=SEED, verbose=0,
                     callbacks=cbs, distributed=distributed)
    return model, hist.history


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["dense", "conv", "bn"], default="dense")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--resume")
    p.add_argument("--kill-rank", type=int)
    p.add_argument("--raise-rank", type=int)
    p.add_argument("--perturb-rank", type=int)
    p.add_argument("--at-epoch", type=int, default=1)
    p.add_argument("--per-rank-batch-norm", action="store_true")
    a = p.parse_args()
    gc.distributed.init(batch_norm="per_rank" if a.per_rank_batch_norm else None)
    cbs = [FailAt(r, a.at_epoch, how) for r, how in ((a.kill_rank, "kill"), (a.raise_rank, "raise"),
                                                     (a.perturb_rank, "perturb")) if r is not None]
    model, history = train(a.kind, epochs=a.epochs, distributed=True, checkpoint=a.checkpoint, resume=a.resume,
                           callbacks=cbs)
    if gc.distributed.is_root():
        np.savez(a.out, **model.weights)
        with open(a.out + ".json", "w") as f:
            json.dump(history, f)


if __name__ == "__main__":
    main()
