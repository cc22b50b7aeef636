"""Model.fit: batches, shuffling, validation, sample/class weights, callbacks, metrics, progress, and
the guard that stops a diverging run. Also the optimizer resolution compile() uses and the metrics.

Determinism: epoch e is shuffled by default_rng([seed, e]), a function of (seed, epoch) only, so a run
resumed at initial_epoch=e (gc.load_model) sees exactly the batches an uninterrupted run would; dropout
masks hash (seed, step, element) and the step is saved with the optimizer state."""
from __future__ import annotations

import functools
import math
import sys
import time

import numpy as np

from backends.executable import run_keeping_state
import ir.training
from ir.training import OPTIMIZERS

from .callbacks import CallbackList
from .errors import GraphcnnError, TrainingError

LR_INPUT = getattr(ir.training, "LR", None)   # the learning rate as a training-graph input, fed every step
LR_IS_INPUT = LR_INPUT is not None
DIVERGENCE_FACTOR = 1e4   # a batch loss this many times the first batch's (at least 1) counts as diverged
SPARSE = "sparse_categorical_crossentropy"


# -- optimizers ---------------------------------------------------------------------------------------
def _optimizers_package():
    try:
        from . import optimizers
    except ImportError:
        return None
    return optimizers


class IROptimizer:
    """An optimizer known to ir.training by name ('adam', 'sgd') with a fixed learning rate; used when
    graphcnn.optimizers (objects, schedules) is not available."""

    def __init__(self, name, config):
        self.ir_name, self._config = name, dict(config)

    def ir_config(self) -> dict:
        return dict(self._config)

    def learning_rate_at(self, step: int) -> float:
        return float(self._config.get("lr", OPTIMIZERS[self.ir_name]["lr"]))

    def set_learning_rate(self, lr):
        self._config["lr"] = float(lr)

    def get_config(self) -> dict:
        return dict(self._config, name=self.ir_name)


def resolve_optimizer(optimizer, learning_rate=None):
    """compile(optimizer=...) -> an optimizer object (gc.optimizers.get when that package exists)."""
    if isinstance(optimizer, IROptimizer):
        return IROptimizer(optimizer.ir_name, dict(optimizer.ir_config(), **({"lr": learning_rate}
                                                                               if learning_rate else {})))
    package = _optimizers_package()
    if package is not None:
        return package.get(optimizer, learning_rate=learning_rate)
    return IROptimizer(*_parse_optimizer(optimizer, learning_rate))


def optimizer_config(opt) -> dict:
    """JSON-able description saved with the model; optimizer_from_config rebuilds the optimizer."""
    if isinstance(opt, IROptimizer):
        return opt.get_config()
    return {"class": type(opt).__name__, "config": opt.get_config()}


def optimizer_from_config(name, cfg):
    if isinstance(cfg, dict) and "class" in cfg:
        package = _optimizers_package()
        cls = getattr(package, str(cfg["class"]), None) if package is not None else None
        if cls is None or not isinstance(cfg.get("config"), dict):
            raise GraphcnnError(f"unknown optimizer class {str(cfg.get('class'))[:40]!r}")
        return cls.from_config(cfg["config"])
    cfg = dict(cfg or {})
    return dict(cfg, name=cfg.pop("name", name or "adam"))


def _parse_optimizer(opt, lr):
    if isinstance(opt, str):
        name, cfg = opt.lower(), {}
    elif isinstance(opt, dict):
        cfg = dict(opt)
        name = str(cfg.pop("name", "")).lower()
    else:
        raise GraphcnnError(f"compile: optimizer must be 'adam', 'sgd' or a dict, got {opt!r}")
    if name not in ("adam", "sgd"):
        raise GraphcnnError(f"compile: unknown optimizer {name!r}; choose 'adam' or 'sgd'")
    if "learning_rate" in cfg:
        cfg["lr"] = cfg.pop("learning_rate")
    if lr is not None:
        cfg["lr"] = lr
    allowed = {"adam": {"lr", "beta_1", "beta_2", "epsilon"}, "sgd": {"lr", "momentum", "nesterov"}}[name]
    bad = set(cfg) - allowed
    if bad:
        raise GraphcnnError(f"compile: optimizer {name} has no setting(s) {sorted(bad)}; known: {sorted(allowed)}")
    if "lr" in cfg and not (isinstance(cfg["lr"], (int, float)) and math.isfinite(cfg["lr"]) and cfg["lr"] > 0):
        raise GraphcnnError(f"compile: learning rate must be a positive finite number, got {cfg['lr']!r}")
    return name, cfg


# -- metrics ----------------------------------------------------------------------------------------------
def _labels(model, y):
    """Class ids from sparse labels or one-hot targets."""
    return y.astype(np.int64) if model.compiled["loss"] == SPARSE else y.argmax(-1)


def _class_hits(model, pred, y):
    return pred.argmax(-1) == _labels(model, y)


def _binary_hits(model, pred, y):
    threshold = 0.0 if model.compiled.get("loss_config", {}).get("from_logits") else 0.5
    return ((pred > threshold) == (y > 0.5)).mean(axis=tuple(range(1, pred.ndim)))


def _top_k_hits(model, pred, y, k=5):
    # in the top k when fewer than k classes score strictly higher (ties count as hits, as tf.math.in_top_k)
    target = pred[np.arange(len(pred)), _labels(model, y)]
    return ((pred > target[:, None]).sum(-1) < k) & np.isfinite(target)


def _accuracy_hits(model, pred, y):
    loss = model.compiled["loss"]
    if loss == SPARSE or loss == "categorical_crossentropy":
        return _class_hits(model, pred, y)
    if loss == "binary_crossentropy" or pred.ndim != 2 or pred.shape[1] == 1:
        return _binary_hits(model, pred, y)
    return _class_hits(model, pred, y)


METRICS = {"accuracy": _accuracy_hits, "acc": _accuracy_hits,
           "sparse_categorical_accuracy": _class_hits, "categorical_accuracy": _class_hits,
           "binary_accuracy": _binary_hits,
           "top_k_categorical_accuracy": _top_k_hits, "sparse_top_k_categorical_accuracy": _top_k_hits}


def check_metrics(metrics) -> list:
    if metrics is None:
        return []
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
        raise GraphcnnError(f"compile: metrics must be a list of names, got {metrics!r}")
    for m in metrics:
        if m not in METRICS:
            raise GraphcnnError(f"compile: unknown metric {m!r}; supported: {', '.join(METRICS)}")
    return list(metrics)


def metric_hits(model, pred, y) -> dict:
    """metric name -> number of hits in this batch (summed per sample)."""
    return {m: float(np.sum(METRICS[m](model, pred, y))) for m in model.compiled["metrics"]}


def metric_values(model, pred, y) -> dict:
    return {m: v / len(pred) for m, v in metric_hits(model, pred, y).items()}


# -- fit ----------------------------------------------------------------------------------------------------
def check_positive_int(v, what, allow_zero=False):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise GraphcnnError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")


def sample_weights(model, y, n, class_weight, sample_weight):
    """Per-sample loss weights (float32 (N,)) from sample_weight and class_weight, or None."""
    w = None
    if sample_weight is not None:
        a = np.asarray(sample_weight)
        if a.dtype.kind not in "fiub" or a.shape not in ((n,), (n, 1)):
            raise GraphcnnError(f"fit: sample_weight must be numbers of shape ({n},), got {a.dtype} {a.shape}")
        w = a.reshape(n).astype(np.float64)
    if class_weight is not None:
        if not isinstance(class_weight, dict) or not all(isinstance(k, (int, np.integer)) for k in class_weight):
            raise GraphcnnError(f"fit: class_weight must be a dict {{class id: weight}}, got {class_weight!r}")
        if model.compiled["loss"] == SPARSE or (y.ndim == 2 and y.shape[1] > 1):
            labels = _labels(model, y)
        else:
            labels = (y.reshape(n) > 0.5).astype(np.int64)      # binary targets
        table = np.ones(int(max(max(class_weight) + 1, labels.max() + 1)), np.float64)
        for k, v in class_weight.items():
            if k < 0:
                raise GraphcnnError(f"fit: class_weight has a negative class id {k}")
            table[k] = v if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else np.nan
        cw = table[labels]
        w = cw if w is None else w * cw
    if w is not None and not (np.isfinite(w).all() and (w >= 0).all()):
        raise GraphcnnError("fit: sample_weight/class_weight must be finite numbers >= 0")
    return None if w is None else w.astype(np.float32)


def _validation(model, validation_data, validation_split, feeds, y, weights):
    """(train feeds, y, weights, validation (feeds, y) or None) - validation_split takes the last samples,
    before shuffling, as Keras does."""
    if validation_split:
        if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)) or \
                not 0.0 <= validation_split < 1.0:
            raise GraphcnnError(f"fit: validation_split must be a number in [0, 1), got {validation_split!r}")
        if validation_data is not None:
            raise GraphcnnError("fit: give validation_data or validation_split, not both")
        n = len(y)
        split_at = int(math.floor(n * (1.0 - validation_split)))
        if split_at < 1 or split_at >= n:
            raise GraphcnnError(f"fit: validation_split={validation_split} of {n} samples leaves "
                                f"{split_at} to train on and {n - split_at} to validate")
        val = ({k: v[split_at:] for k, v in feeds.items()}, y[split_at:])
        return ({k: v[:split_at] for k, v in feeds.items()}, y[:split_at],
                None if weights is None else weights[:split_at], val)
    if validation_data is None:
        return feeds, y, weights, None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise GraphcnnError("fit: validation_data must be a tuple (x_val, y_val)")
    vfeeds = model._prepare_x(validation_data[0], "fit(validation_data)")
    vy = model._prepare_y(validation_data[1], next(iter(vfeeds.values())).shape[0], "fit(validation_data)")
    return feeds, y, weights, (vfeeds, vy)


def fit(model, x, y, epochs=1, batch_size=32, validation_data=None, seed=None, shuffle=True, verbose=1,
        callbacks=None, validation_split=0.0, initial_epoch=0, class_weight=None, sample_weight=None,
        distributed=None):
    """Model.fit (see there). distributed: None = data parallel when gc.distributed.init() joined a job of
    several ranks, True = join one now, False = this process alone (graphcnn/distributed.py)."""
    from . import distributed as dist
    parallel = dist.data_parallel(distributed)
    if parallel and not dist.is_root():
        verbose = 0         # rank 0 prints
    try:
        return _fit(model, x, y, epochs, batch_size, validation_data, seed, shuffle, verbose, callbacks,
                    validation_split, initial_epoch, class_weight, sample_weight, parallel)
    except (TrainingError, dist.ReplicaMismatch) as e:
        # both come from globally reduced values: every rank raises them alike. Rank 0 states the message
        # at once: when the first rank exits, mpiexec ends the others, which can cut a traceback short
        if parallel and dist.is_root():
            print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        if parallel:
            dist.abort(e)   # this rank failed alone: end the job instead of leaving the others waiting
        raise


def _acceptable(outputs, first_loss):
    """A training step's (prediction, loss) is kept when the loss is finite and not DIVERGENCE_FACTOR times
    the first batch's (at least 1; the first batch is measured against itself)."""
    loss = float(outputs[1])
    return math.isfinite(loss) and loss <= DIVERGENCE_FACTOR * max(loss if first_loss is None else first_loss, 1.0)


def _fit(model, x, y, epochs, batch_size, validation_data, seed, shuffle, verbose, callbacks, validation_split,
         initial_epoch, class_weight, sample_weight, parallel):
    from . import distributed as dist
    from .model import SAMPLE_WEIGHT
    model._require_compiled("fit")
    check_positive_int(epochs, "epochs", allow_zero=True)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(initial_epoch, "initial_epoch", allow_zero=True)
    if initial_epoch > epochs:
        raise GraphcnnError(f"fit: initial_epoch ({initial_epoch}) is past epochs ({epochs}); epochs is the index "
                            f"of the last epoch to reach, as in Keras")
    if verbose not in (0, 1, 2):
        raise GraphcnnError(f"fit: verbose must be 0, 1 or 2, got {verbose!r}")
    if seed is not None:
        check_positive_int(seed, "seed", allow_zero=True)
    feeds = model._prepare_x(x, "fit")
    n = next(iter(feeds.values())).shape[0]
    y = model._prepare_y(y, n, "fit")
    weights = sample_weights(model, y, n, class_weight, sample_weight)
    feeds, y, weights, val = _validation(model, validation_data, validation_split, feeds, y, weights)
    n = len(y)
    steps = math.ceil(n / batch_size)
    cbs = CallbackList(callbacks, model, {"epochs": epochs, "steps": steps, "verbose": verbose},
                       writes_files=not parallel or dist.is_root())
    if seed is not None and not model._trained and not model._user_weights:
        model.seed = int(seed)
        model._built = False
        model.weights.clear()
        model._cache.clear()
        model.build()
    shuffle_seed = model.seed if seed is None else int(seed)
    metrics = model.compiled["metrics"]
    model.stop_training = False
    model.history = cbs.history
    cbs.call("on_train_begin", {})
    first_loss, logs, step = None, {}, None
    for epoch in range(initial_epoch, epochs):
        cbs.call("on_epoch_begin", epoch, {})
        # fetched per epoch: without a learning-rate input, a LearningRateScheduler recompiles the step
        exe = model._executable("train", seed, weights is not None)
        feeds_lr = LR_IS_INPUT and any(name == LR_INPUT for name, _ in exe.inputs)
        order = np.random.default_rng([shuffle_seed, epoch]).permutation(n) if shuffle else np.arange(n)
        bar = _progress(steps, f"Epoch {epoch + 1}/{epochs}", verbose)
        t0 = time.perf_counter()
        loss_sum, hits, seen = 0.0, dict.fromkeys(metrics, 0.0), 0
        try:
            for b in range(steps):
                cbs.call("on_train_batch_begin", b, {})
                idx = order[b * batch_size:(b + 1) * batch_size]
                n_batch = len(idx)
                if parallel:        # this rank reads only its shard of the global batch
                    step = step if step is not None and step.exe is exe else dist.DataParallelStep(exe)
                    lo, hi = step.shard(n_batch)
                    idx = idx[lo:hi]
                batch = {k: v[idx] for k, v in feeds.items()}
                batch["y"] = y[idx]
                if weights is not None:
                    batch[SAMPLE_WEIGHT] = weights[idx]
                if feeds_lr:
                    batch[LR_INPUT] = np.float32(model.learning_rate)
                # the step's updates are kept only for an acceptable loss (outputs: prediction, loss)
                accept = functools.partial(_acceptable, first_loss=first_loss)
                if parallel:
                    (pred, loss), accepted = run_keeping_state(exe.state, lambda: step(batch, n_batch), accept)
                else:
                    (pred, loss), accepted = exe.train_step(accept, **batch)
                loss = float(loss)
                first_loss = loss if first_loss is None else first_loss
                if not accepted:
                    why = "" if not math.isfinite(loss) else \
                        f" (over {DIVERGENCE_FACTOR:g} x the first batch's {first_loss:.4g}: training diverged)"
                    raise TrainingError(f"fit: the loss became {loss} at epoch {epoch + 1}, batch {b + 1}{why}; "
                                        f"the weights from before that step are kept. Try a lower learning rate "
                                        f"or check the data for extreme values.")
                model._trained = True
                loss_sum += loss * n_batch
                seen += n_batch
                batch_hits = metric_hits(model, pred, batch["y"])
                if parallel:        # hit counts are whole numbers: their float64 sum is exact in any order
                    batch_hits = dict(zip(batch_hits, step.sum(list(batch_hits.values()))))
                for m, h in batch_hits.items():
                    hits[m] += h
                batch_logs = {"loss": loss_sum / seen, **{m: h / seen for m, h in hits.items()}}
                cbs.call("on_train_batch_end", b, batch_logs)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in batch_logs.items()}, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        logs = {"loss": loss_sum / seen, **{m: h / seen for m, h in hits.items()}}
        if val is not None:
            vals = model._evaluate_prepared(val[0], val[1], max(batch_size, 256))
            vals = vals if isinstance(vals, list) else [vals]
            logs["val_loss"] = vals[0]
            for m, v in zip(metrics, vals[1:]):
                logs["val_" + m] = v
        model.epochs_done = epoch + 1
        cbs.call("on_epoch_end", epoch, logs)
        if verbose and bar is None:
            items = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
            print(f"Epoch {epoch + 1}/{epochs} - {time.perf_counter() - t0:.1f}s - {items}", file=sys.stderr,
                  flush=True)
        if model.stop_training:
            break
    cbs.call("on_train_end", logs)
    return cbs.history


def _progress(total, desc, verbose):
    """A tqdm bar for verbose=1 on a terminal; None (one line per epoch instead) for verbose=2, when
    stderr is not a terminal (logs, CI: no carriage-return floods) or when silent."""
    if verbose != 1 or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=True, dynamic_ncols=True)


__all__ = ["fit", "resolve_optimizer", "check_metrics", "metric_values"]
