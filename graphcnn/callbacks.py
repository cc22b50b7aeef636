"""Keras's Callback protocol for Model.fit: hooks called by the training loop, `self.model` set by
`set_model`, and `model.stop_training` to end a run after the current epoch.

    model.fit(x, y, callbacks=[gc.callbacks.EarlyStopping(patience=2), gc.callbacks.ModelCheckpoint("best.gcnn")])
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from .errors import GraphcnnError


class Callback:
    """Base class: override any hook. `logs` are dicts of floats (loss, metrics, val_* at epoch end).
    `writes_files`: in data-parallel training only rank 0 runs such a callback (the others hold the same
    weights and logs)."""

    writes_files = False

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = dict(params)

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass


class History(Callback):
    """What fit returns: history.history['loss'], ['accuracy'], ['val_loss'], ...; history.epoch."""

    def __init__(self):
        super().__init__()
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.append(epoch, logs or {})

    def append(self, epoch, logs):
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))


def _mode(monitor, mode, who):
    """'min' or 'max' for a monitored quantity ('auto': max for accuracies, min otherwise, like Keras)."""
    if mode not in ("auto", "min", "max"):
        raise GraphcnnError(f"{who}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if ("acc" in monitor or monitor.startswith("fmeasure")) else "min"
    return mode


class _Monitor(Callback):
    """Shared by EarlyStopping and ModelCheckpoint: is `logs[monitor]` an improvement on the best so far?"""

    def __init__(self, monitor, mode, min_delta, who):
        super().__init__()
        if not isinstance(monitor, str):
            raise GraphcnnError(f"{who}: monitor must be a metric name such as 'val_loss', got {monitor!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta):
            raise GraphcnnError(f"{who}: min_delta must be a finite number, got {min_delta!r}")
        self.monitor, self.who = monitor, who
        self.mode = _mode(monitor, mode, who)
        self.min_delta = abs(float(min_delta))
        self.best = None

    def current(self, logs):
        if self.monitor not in (logs or {}):
            raise GraphcnnError(f"{self.who}: monitor {self.monitor!r} is not among the epoch's logs "
                                f"{sorted(logs or {})}; pass validation data for val_* or choose one of those")
        return float(logs[self.monitor])

    def improved(self, value):
        if self.best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs; optionally put
    back the weights of the best epoch when it stops early (restore_best_weights, as Keras)."""

    def __init__(self, monitor="val_loss", min_delta=0, patience=0, verbose=0, mode="auto", baseline=None,
                 restore_best_weights=False, start_from_epoch=0):
        super().__init__(monitor, mode, min_delta, "EarlyStopping")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise GraphcnnError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        if baseline is not None and not (isinstance(baseline, (int, float)) and math.isfinite(baseline)):
            raise GraphcnnError(f"EarlyStopping: baseline must be a finite number or None, got {baseline!r}")
        if not isinstance(start_from_epoch, int) or start_from_epoch < 0:
            raise GraphcnnError(f"EarlyStopping: start_from_epoch must be an int >= 0, got {start_from_epoch!r}")
        self.patience, self.verbose, self.baseline = patience, verbose, baseline
        self.restore_best_weights, self.start_from_epoch = bool(restore_best_weights), start_from_epoch
        self.stopped_epoch, self.best_epoch, self.wait, self.best_weights = 0, 0, 0, None

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_epoch, self.best_weights = 0, 0, 0, None
        self.best = None if self.baseline is None else float(self.baseline)

    def on_epoch_end(self, epoch, logs=None):
        value = self.current(logs)
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.model.get_weights()     # Keras: the first epoch's weights as a fallback
        self.wait += 1
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None and self.stopped_epoch > 0:
            self.model.set_weights(self.best_weights)
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping (best {self.monitor} {self.best:.4f} "
                  f"at epoch {self.best_epoch + 1})")


class ModelCheckpoint(_Monitor):
    """Save the model (atomically, with optimizer state) after each epoch, or only when `monitor`
    improved (save_best_only). `filepath` may use {epoch} and log names: 'ckpt-{epoch:02d}.gcnn'."""

    writes_files = True

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False, mode="auto"):
        super().__init__(monitor, mode, 0, "ModelCheckpoint")
        if not isinstance(filepath, (str, os.PathLike)):
            raise GraphcnnError(f"ModelCheckpoint: filepath must be a path, got {filepath!r}")
        self.filepath, self.verbose, self.save_best_only = os.fspath(filepath), verbose, bool(save_best_only)

    def on_train_begin(self, logs=None):
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as e:
            raise GraphcnnError(f"ModelCheckpoint: cannot fill in filepath {self.filepath!r}: {e}") from None
        if self.save_best_only:
            value = self.current(logs)
            if not self.improved(value):
                return
            self.best = value
        self.model.save(path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved {path}")


class LearningRateScheduler(Callback):
    """At each epoch's start set the learning rate to schedule(epoch, lr) (Keras; schedule(epoch) also
    accepted). The rate is a training-graph input, so this never recompiles."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise GraphcnnError(f"LearningRateScheduler: schedule must be callable, got {schedule!r}")
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = self.model.learning_rate
        try:
            new = self.schedule(epoch, lr)
        except TypeError:
            new = self.schedule(epoch)
        if isinstance(new, bool) or not isinstance(new, (int, float, np.floating)) or not math.isfinite(new) \
                or new <= 0:
            raise GraphcnnError(f"LearningRateScheduler: the schedule returned {new!r} for epoch {epoch}; "
                                f"it must return a positive finite number")
        self.model.learning_rate = float(new)
        if self.verbose:
            print(f"Epoch {epoch + 1}: learning rate {float(new):.6g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.learning_rate)


class CSVLogger(Callback):
    """Append one row per epoch (epoch, then the logs' keys sorted) to a CSV file."""

    writes_files = True

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename, self.separator, self.append = os.fspath(filename), separator, bool(append)
        self.keys, self._file, self._writer = None, None, None

    def on_train_begin(self, logs=None):
        exists = self.append and os.path.isfile(self.filename) and os.path.getsize(self.filename) > 0
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self.keys = None
        self._header_written = exists

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self.keys, delimiter=self.separator)
            if not self._header_written:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **{k: logs.get(k, "NA") for k in self.keys}})
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


class CallbackList:
    """The callbacks of one fit call, History last; refuses anything that is not a Callback. With
    writes_files=False (a data-parallel rank other than 0) the callbacks that write files are left out."""

    def __init__(self, callbacks, model, params, writes_files=True):
        if callbacks is None:
            callbacks = []
        if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
            raise GraphcnnError(f"fit: callbacks must be a list of gc.callbacks.Callback objects, got "
                                f"{type(callbacks).__name__}")
        for i, cb in enumerate(callbacks):
            if not isinstance(cb, Callback):
                raise GraphcnnError(f"fit: callbacks[{i}] is {cb!r} ({type(cb).__name__}), not a "
                                    f"gc.callbacks.Callback; subclass gc.callbacks.Callback or remove it")
        self.history = History()
        self.callbacks = [cb for cb in callbacks if writes_files or not cb.writes_files] + [self.history]
        for cb in self.callbacks:
            cb.set_model(model)
            cb.set_params(params)

    def call(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(*args)


__all__ = ["Callback", "History", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler", "CSVLogger"]
