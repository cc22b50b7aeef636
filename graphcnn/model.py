"""Sequential models with Keras semantics: compile / fit / evaluate / predict / save.

A model is turned into graphs on demand: an inference graph (no dropout), an evaluation graph
(inference + loss) and one training graph (forward + loss + backward + optimizer update) that the
backend compiles into one function per training step."""
from __future__ import annotations

import math
import sys

import numpy as np

import ir
from ir.ops import emit
from ir.passes import run_pipeline
from ir.training import STEP, make_training_graph

from . import layers as L
from .compiler import compile as compile_graph, default_backend
from .errors import GraphcnnError, LayerError, TrainingError

LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "mse")
LOSS_ALIASES = {"mean_squared_error": "mse", "sparse_categorical_cross_entropy": "sparse_categorical_crossentropy"}
METRICS = ("accuracy", "acc")


class History:
    """What fit returns: history.history['loss'], ['accuracy'], ['val_loss'], ['val_accuracy']."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def append(self, epoch, logs):
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))


class _BuildContext:
    def __init__(self, model, graph, training):
        self.model, self.graph, self.training = model, graph, training
        self._step = None

    def weight(self, layer, suffix):
        name = f"{layer.name}/{suffix}"
        return self.graph.value(name)

    def step(self):
        if self._step is None:
            self._step = self.graph.param(STEP, ())
        return self._step

    def layer_seed(self, layer):
        return (self.model._dropout_seed * 1000003 + self.model.layers.index(layer)) & 0xFFFFFFFF


class Sequential:
    """A linear stack of layers, e.g. Sequential([layers.Input((28, 28, 1)), layers.Conv2D(...), ...])."""

    def __init__(self, layers=None, name="sequential", seed=0):
        if not isinstance(name, str) or not name.replace("_", "a").isalnum():
            raise GraphcnnError(f"Sequential: name must be letters, digits and '_', got {name!r}")
        self.name = name
        self.layers: list[L.Layer] = []
        self.seed = seed
        self._dropout_seed = seed
        self.weights: dict[str, np.ndarray] = {}
        self.compiled = None
        self._trained = False
        self._user_weights = False
        self._cache = {}
        self._opt_state = {}
        self.preprocess = None      # e.g. {"scale": 1/255} when trained on uint8 images by the CLI
        for layer in layers or []:
            self.add(layer)

    # -- structure ------------------------------------------------------------------------------
    def add(self, layer):
        """Append a layer (Keras-style)."""
        if not isinstance(layer, L.Layer):
            raise LayerError(f"Sequential.add: expected a graphcnn layer, got {type(layer).__name__}")
        if isinstance(layer, L.Input) and self.layers:
            raise LayerError("Input must be the first layer")
        self.layers.append(layer)
        self._built = False
        self._cache.clear()

    @property
    def input_shape(self):
        """Per-sample input shape (without the batch)."""
        first = self.layers[0] if self.layers else None
        if first is None or first.input_shape is None:
            raise LayerError(f"model {self.name!r}: the input shape is unknown; start with layers.Input((H, W, C)) "
                             f"or pass input_shape= to the first layer")
        return first.input_shape

    def build(self):
        """Name layers, check every shape (errors name the layer) and initialize missing weights."""
        if getattr(self, "_built", False):
            return
        counts: dict[str, int] = {}
        names = set()
        for layer in self.layers:
            if layer.name is None:
                k = counts.get(layer.kind, 0)
                counts[layer.kind] = k + 1
                layer.name = layer.kind if k == 0 else f"{layer.kind}_{k}"
            if layer.name in names:
                raise LayerError(f"model {self.name!r}: two layers are named {layer.name!r}")
            names.add(layer.name)
        self._shapes = {}
        g = self._graph(training=False)        # raises a LayerError naming the first bad layer
        self._out_type = g.outputs[0].type
        rng = np.random.default_rng(self.seed)
        for layer in self.layers:
            for suffix, (shape, init) in self._specs.get(layer.name, {}).items():
                name = f"{layer.name}/{suffix}"
                w = init(rng)
                if name not in self.weights or self.weights[name].shape != shape:
                    self.weights[name] = np.ascontiguousarray(w, np.float32)
        self._built = True

    def _graph(self, training, loss=None):
        g = ir.Graph(self.name)
        x = g.input("x", (None,) + tuple(self.input_shape))
        ctx = _BuildContext(self, g, training)
        self._specs = {}
        for layer in self.layers:
            if isinstance(layer, L.Input):
                continue
            shape = x.shape[1:]
            specs = layer.weight_specs(shape)
            self._specs[layer.name] = specs
            for suffix, (wshape, _) in specs.items():
                g.param(f"{layer.name}/{suffix}", wshape)
            try:
                x = layer.call(ctx, x)
            except ir.IRError as e:
                raise LayerError(f"layer {layer.name!r} ({type(layer).__name__}) with input shape "
                                 f"{(None,) + tuple(shape)}: {e}") from None
        outputs = [x]
        if loss is not None:
            labels = g.input("y", self._target_shape(x, loss))
            outputs.append(emit(loss, x, labels))
        g.output(*outputs)
        return g

    @staticmethod
    def _target_shape(pred, loss):
        return (None,) if loss == "sparse_categorical_crossentropy" else pred.shape

    def summary(self, print_fn=print):
        """Print layers, output shapes and parameter counts."""
        self.build()
        g = self._graph(False)
        print_fn(f'Model: "{self.name}"')
        total = 0
        shape = (None,) + tuple(self.input_shape)
        for layer in self.layers:
            n = sum(int(np.prod(s)) for s, _ in self._specs.get(layer.name, {}).values())
            total += n
            print_fn(f"  {layer.name:<24} {type(layer).__name__:<20} params {n}")
        print_fn(f"Output: {g.outputs[0].type}   Total params: {total}")
        _ = shape

    def count_params(self) -> int:
        self.build()
        return int(sum(w.size for w in self.weights.values()))

    def get_weights(self) -> dict:
        self.build()
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights: dict):
        """Replace weights by name; shapes must match."""
        self.build()
        for k, v in weights.items():
            if k not in self.weights:
                raise GraphcnnError(f"set_weights: model {self.name!r} has no weight {k!r}")
            a = np.asarray(v, np.float32)
            if a.shape != self.weights[k].shape:
                raise GraphcnnError(f"set_weights: {k!r} has shape {self.weights[k].shape}, got {a.shape}")
            self.weights[k][...] = a
        self._user_weights = True

    # -- compile ----------------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None, backend=None,
                learning_rate=None, threads=None):
        """Choose optimizer ('adam', 'sgd' or a dict {'name':..., 'lr':...}), loss, metrics, backend."""
        opt_name, opt_cfg = _parse_optimizer(optimizer, learning_rate)
        loss = LOSS_ALIASES.get(loss, loss)
        if loss not in LOSSES:
            raise GraphcnnError(f"compile: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        metrics = list(metrics or [])
        for m in metrics:
            if m not in METRICS:
                raise GraphcnnError(f"compile: unknown metric {m!r}; supported: accuracy")
        backend = backend or default_backend()
        if backend not in ("llvm", "numpy"):
            raise GraphcnnError(f"compile: unknown backend {backend!r}; choose 'llvm' or 'numpy'")
        self.build()
        if loss != "mse" and (self._out_type.rank != 2):
            raise GraphcnnError(f"compile: {loss} needs a 2-D (batch, classes) model output, got {self._out_type}")
        self.compiled = {"optimizer": opt_name, "optimizer_config": opt_cfg, "loss": loss,
                         "metrics": metrics, "backend": backend, "threads": threads}
        self._cache.clear()

    def _require_compiled(self, what):
        if self.compiled is None:
            raise GraphcnnError(f"{what}: call model.compile(...) first")

    def _executable(self, kind, seed=None):
        key = (kind, seed)
        if key in self._cache:
            return self._cache[key]
        self.build()
        backend = self.compiled["backend"] if self.compiled else default_backend()
        opts = {"threads": self.compiled.get("threads")} if self.compiled and self.compiled.get("threads") else {}
        if kind == "predict":
            exe = compile_graph(self._graph(False), backend, self.weights, passes="inference", **opts)
        elif kind == "evaluate":
            exe = compile_graph(self._graph(False, self.compiled["loss"]), backend, self.weights,
                                passes="inference", **opts)
        else:
            self._dropout_seed = self.seed if seed is None else seed
            fwd = self._graph(True, self.compiled["loss"])
            fwd = run_pipeline(fwd, "training_forward").graph
            tg = make_training_graph(fwd, fwd.outputs[1].name, self.compiled["optimizer"],
                                     self.compiled["optimizer_config"])
            params = dict(self.weights)
            for p in tg.params:
                if p.name not in params:
                    params[p.name] = self._opt_state.setdefault(p.name, np.zeros(p.shape, np.float32))
            exe = compile_graph(tg, backend, params, passes="training", **opts)
            # the executable owns the arrays it updates in place; share them with the model
            for k in self.weights:
                self.weights[k] = exe.state[k]
            for k in exe.state:
                if k not in self.weights:
                    self._opt_state[k] = exe.state[k]
            for k in list(self._cache):
                if k[0] in ("predict", "evaluate"):
                    del self._cache[k]
        self._cache[key] = exe
        return exe

    # -- data ---------------------------------------------------------------------------------------
    def _prepare_x(self, x, what):
        if x is None:
            raise GraphcnnError(f"{what}: x is None")
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise GraphcnnError(f"{what}: x must be numeric, got dtype {a.dtype}")
        want = tuple(self.input_shape)
        if a.ndim == 0 or a.shape[0] == 0:
            raise GraphcnnError(f"{what}: x is empty (shape {a.shape})")
        if a.shape[1:] != want:
            if int(np.prod(a.shape[1:])) == int(np.prod(want)) and (a.ndim == 2 or len(want) == 1 or
                                                                    a.shape[1:] == want[:-1] or want[-1] == 1):
                a = a.reshape((a.shape[0],) + want)
            else:
                raise GraphcnnError(f"{what}: x has shape {a.shape}; model {self.name!r} expects "
                                    f"(N, {', '.join(map(str, want))})")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise GraphcnnError(f"{what}: x contains NaN or infinity")
        return a

    def _prepare_y(self, y, n, what):
        loss = self.compiled["loss"]
        k = self._out_type.shape[-1]
        a = np.asarray(y)
        if a.shape[0:1] != (n,):
            raise GraphcnnError(f"{what}: x has {n} samples but y has {a.shape[0] if a.ndim else 0}")
        if loss == "sparse_categorical_crossentropy":
            if a.ndim == 2 and a.shape[1] == 1:
                a = a[:, 0]
            if a.ndim != 1:
                raise GraphcnnError(f"{what}: sparse_categorical_crossentropy needs integer labels of shape (N,), "
                                    f"got {a.shape} (use categorical_crossentropy for one-hot targets)")
            if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
                raise GraphcnnError(f"{what}: labels must be whole numbers")
            if a.size and (a.min() < 0 or a.max() >= k):
                raise GraphcnnError(f"{what}: labels must be in [0, {k - 1}] for a {k}-unit output, "
                                    f"found {a.min()}..{a.max()}")
        elif a.shape != (n,) + tuple(self._out_type.shape[1:]):
            raise GraphcnnError(f"{what}: y has shape {a.shape}, expected {(n,) + tuple(self._out_type.shape[1:])}")
        return np.ascontiguousarray(a, dtype=np.float32)

    def _accuracy_hits(self, pred, y):
        if self.compiled["loss"] == "sparse_categorical_crossentropy":
            return int((pred.argmax(-1) == y).sum())
        if pred.ndim == 2 and pred.shape[1] > 1:
            return int((pred.argmax(-1) == y.argmax(-1)).sum())
        return int(((pred > 0.5) == (y > 0.5)).sum())

    # -- fit / evaluate / predict -------------------------------------------------------------------
    def fit(self, x, y, epochs=1, batch_size=32, validation_data=None, seed=None, shuffle=True, verbose=1,
            callbacks=None):
        """Train; returns a History. `seed` fixes shuffling and dropout (and the initial weights, when the
        model has not been trained or given weights yet)."""
        self._require_compiled("fit")
        _check_positive_int(epochs, "epochs", allow_zero=True)
        _check_positive_int(batch_size, "batch_size")
        x = self._prepare_x(x, "fit")
        y = self._prepare_y(y, x.shape[0], "fit")
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise GraphcnnError("fit: validation_data must be a tuple (x_val, y_val)")
            vx = self._prepare_x(validation_data[0], "fit(validation_data)")
            vy = self._prepare_y(validation_data[1], vx.shape[0], "fit(validation_data)")
        if seed is not None and not self._trained and not self._user_weights:
            self.seed = int(seed)
            self._built = False
            self.weights.clear()
            self._cache.clear()
            self.build()
        exe = self._executable("train", seed)
        rng = np.random.default_rng(self.seed if seed is None else seed)
        metrics = self.compiled["metrics"]
        history = History()
        n = x.shape[0]
        steps = math.ceil(n / batch_size)
        for epoch in range(epochs):
            order = rng.permutation(n) if shuffle else np.arange(n)
            bar = _progress(steps, f"Epoch {epoch + 1}/{epochs}", verbose)
            loss_sum, hits, seen = 0.0, 0, 0
            for b in range(steps):
                idx = order[b * batch_size:(b + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                backup = {k: v.copy() for k, v in exe.state.items()}
                pred, loss = exe(x=xb, y=yb)
                loss = float(loss)
                if not math.isfinite(loss):
                    for k, v in backup.items():
                        exe.state[k][...] = v
                    if bar is not None:
                        bar.close()
                    raise TrainingError(f"fit: the loss became {loss} at epoch {epoch + 1}, batch {b + 1}; "
                                        f"the weights from before that step are kept. Try a lower learning rate "
                                        f"or check the data for extreme values.")
                self._trained = True
                loss_sum += loss * len(idx)
                seen += len(idx)
                if metrics:
                    hits += self._accuracy_hits(pred, yb)
                if bar is not None:
                    post = {"loss": f"{loss_sum / seen:.4f}"}
                    if metrics:
                        post["accuracy"] = f"{hits / seen:.4f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
            logs = {"loss": loss_sum / seen}
            if metrics:
                logs["accuracy"] = hits / seen
            if validation_data is not None:
                vals = self.evaluate(vx, vy, batch_size=max(batch_size, 256), verbose=0)
                vals = vals if isinstance(vals, list) else [vals]
                logs["val_loss"] = vals[0]
                if metrics:
                    logs["val_accuracy"] = vals[1]
            history.append(epoch, logs)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
                bar.close()
        self.history = history
        return history

    def evaluate(self, x, y, batch_size=256, verbose=0):
        """Mean loss (and accuracy, if compiled with metrics) over the data: `loss` or `[loss, acc]`."""
        self._require_compiled("evaluate")
        x = self._prepare_x(x, "evaluate")
        y = self._prepare_y(y, x.shape[0], "evaluate")
        _check_positive_int(batch_size, "batch_size")
        exe = self._executable("evaluate")
        loss_sum, hits = 0.0, 0
        for s in range(0, x.shape[0], batch_size):
            pred, loss = exe(x=x[s:s + batch_size], y=y[s:s + batch_size])
            loss_sum += float(loss) * pred.shape[0]
            hits += self._accuracy_hits(pred, y[s:s + batch_size])
        n = x.shape[0]
        return [loss_sum / n, hits / n] if self.compiled["metrics"] else loss_sum / n

    def predict(self, x, batch_size=256, verbose=0):
        """Model outputs for x, as a float32 array (N, ...)."""
        x = self._prepare_x(x, "predict")
        _check_positive_int(batch_size, "batch_size")
        exe = self._executable("predict")
        return np.concatenate([exe(x=x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)])

    def __call__(self, x):
        return self.predict(x)

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path):
        """Write a .gcnn artifact (atomically): IR JSON + weights .npz + metadata."""
        from .artifact import save_model
        save_model(self, path)

    def inference_graph(self) -> ir.Graph:
        self.build()
        return self._graph(False)

    def config(self) -> dict:
        return {"name": self.name, "seed": self.seed, "preprocess": self.preprocess,
                "layers": [{"class": type(l).__name__, "name": l.name, "input_shape": l.input_shape,
                            "config": l.config()} for l in self.layers]}


def _parse_optimizer(opt, lr):
    if isinstance(opt, str):
        name, cfg = opt.lower(), {}
    elif isinstance(opt, dict):
        cfg = dict(opt)
        name = str(cfg.pop("name", "")).lower()
    elif hasattr(opt, "name") and hasattr(opt, "config"):
        name, cfg = opt.name, dict(opt.config)
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
    if "lr" in cfg and not (isinstance(cfg["lr"], (int, float)) and cfg["lr"] > 0):
        raise GraphcnnError(f"compile: learning rate must be a positive number, got {cfg['lr']!r}")
    return name, cfg


def _check_positive_int(v, what, allow_zero=False):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise GraphcnnError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")


def _progress(total, desc, verbose):
    if not verbose:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=True, dynamic_ncols=True)


__all__ = ["Sequential", "History"]
