"""Models with Keras semantics: gc.Model(inputs, outputs) over a layer graph (functional API) and
Sequential, the one-chain special case of the same class. compile / fit / evaluate / predict / save.

A model is turned into graphs on demand: an inference graph (no dropout, moving BN statistics), an
evaluation graph (inference + loss) and one training graph (forward + loss + backward + optimizer update +
state updates) that the backend compiles into one function per training step. The training loop lives
in training_loop.py, the symbolic tensors and layer-graph config in functional.py."""
from __future__ import annotations

import numpy as np

import ir
from ir.ops import emit, get_op
from ir.passes import run_pipeline
from ir.training import STEP, make_training_graph

from . import layers as L
from . import training_loop
from .callbacks import History  # noqa: F401  (re-exported: gc.model.History)
from .compiler import compile as compile_graph, default_backend
from .errors import GraphcnnError, LayerError
from .input_arrays import conform_input
from .functional import (SymbolicTensor, as_tensor, collect_nodes, layer_config, layer_from_config,
                         layer_graph_config, nodes_from_config)

LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mse")
LOSS_ALIASES = {"mean_squared_error": "mse", "sparse_categorical_cross_entropy": "sparse_categorical_crossentropy"}
SAMPLE_WEIGHT = "sample_weight"     # training-graph input: per-sample loss weights (sample/class_weight)


class _BuildContext:
    """What a layer's call() sees while the model emits its graph."""

    def __init__(self, model, graph, training):
        self.model, self.graph, self.training = model, graph, training
        self._step = None

    def weight(self, layer, suffix):
        return self.graph.value(f"{layer.name}/{suffix}")

    def step(self):
        if self._step is None:
            self._step = self.graph.param(STEP, ())
        return self._step

    def layer_seed(self, layer):
        return (self.model._dropout_seed * 1000003 + self.model.layers.index(layer)) & 0xFFFFFFFF

    def add_update(self, param, value):
        """After each training step `param` takes `value` (moving statistics); inference graphs keep none."""
        if self.training:
            self.graph.set_update(param, value)


def _check_model_name(name, what):
    if not isinstance(name, str) or not name or not name.replace("_", "a").isalnum():
        raise GraphcnnError(f"{what}: name must be letters, digits and '_', got {name!r}")


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Model:
    """A model over a layer graph: gc.Model(inputs, outputs, name=). `inputs`: layers.Input tensor(s);
    `outputs`: tensor(s) computed from them by calling layers."""

    def __init__(self, inputs=None, outputs=None, name="model", seed=0):
        self._init_state(name, seed, "Model")
        if inputs is None or outputs is None:
            raise GraphcnnError("Model: give inputs and outputs, e.g. gc.Model(inputs, outputs) with "
                                "inputs = layers.Input((28, 28, 1)); or use gc.Sequential([...])")
        who = f"model {name!r}"
        ins = [as_tensor(t, f"{who} inputs") for t in _as_list(inputs)]
        outs = [as_tensor(t, f"{who} outputs") for t in _as_list(outputs)]
        for t in ins:
            if t.node.inputs:
                raise GraphcnnError(f"{who}: inputs must be layers.Input(...) tensors, got the output of "
                                    f"{t.layer!r} with shape {t.shape}")
        if len({id(t) for t in ins}) != len(ins):
            raise GraphcnnError(f"{who}: the same Input is listed twice in inputs")
        for t in outs:
            if any(t is i for i in ins):
                raise GraphcnnError(f"{who}: output {t!r} is one of the inputs; call layers on the inputs to "
                                    f"compute the outputs")
        self._nodes = collect_nodes(ins, outs, name)
        self._inputs, self._outputs = ins, outs
        self.layers = []
        for node in self._nodes:
            if node.layer not in self.layers:
                self.layers.append(node.layer)
        self._name_layers()

    def _init_state(self, name, seed, what):
        _check_model_name(name, what)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise GraphcnnError(f"{what}: seed must be an int >= 0, got {seed!r}")
        self.name, self.seed = name, int(seed)
        self._dropout_seed = self.seed
        self.weights: dict[str, np.ndarray] = {}
        self.compiled = None
        self.optimizer = None
        self._trained = False
        self._user_weights = False
        self._built = False
        self._cache = {}
        self._opt_state = {}
        self._lr_override = None
        self.epochs_done = 0            # completed epochs (saved; graphcnn train FILE.gcnn resumes after them)
        self.stop_training = False
        self.history = None
        self.preprocess = None      # e.g. {"scale": 1/255} when trained on uint8 images by the CLI

    # -- structure ------------------------------------------------------------------------------
    def _name_layers(self):
        """Give unnamed layers Keras-style names (conv2d, conv2d_1, ...) unique in this model."""
        counts: dict[str, int] = {}
        names = set()
        taken = {layer.name for layer in self.layers if layer.name is not None}
        for layer in self.layers:
            if layer.name is None:
                while True:          # skip names the user gave to other layers
                    k = counts.get(layer.kind, 0)
                    counts[layer.kind] = k + 1
                    layer.name = layer.kind if k == 0 else f"{layer.kind}_{k}"
                    if layer.name not in taken:
                        break
            if layer.name in names:
                raise LayerError(f"model {self.name!r}: two layers are named {layer.name!r}")
            names.add(layer.name)

    def _structure(self):
        """(Sequential rebuilds its chain here.) The layer graph is fixed at construction for Model."""

    @property
    def inputs(self) -> list:
        """The model's input tensors (symbolic)."""
        self._structure()
        return self._inputs

    @property
    def outputs(self) -> list:
        """The model's output tensors (symbolic)."""
        self._structure()
        return self._outputs

    @property
    def input_shape(self):
        """Per-sample shape of the (first) input, without the batch."""
        self._structure()
        return tuple(self.inputs[0].shape[1:])

    @property
    def input_names(self) -> list:
        """Graph input names: 'x' for one input, else 'x/<Input layer name>'."""
        if len(self.inputs) == 1:
            return ["x"]
        return [f"x/{t.layer.name}" for t in self.inputs]

    def build(self):
        """Name layers, check every shape (errors name the layer) and initialize missing weights."""
        if self._built:
            return
        self._build_structure()
        rng = np.random.default_rng(self.seed)
        for layer in self.layers:
            for suffix, spec in self._specs.get(layer.name, {}).items():
                name = f"{layer.name}/{suffix}"
                w = spec.init(rng)
                if name not in self.weights or self.weights[name].shape != spec.shape:
                    self.weights[name] = np.ascontiguousarray(w, np.float32)
        self._built = True

    def _build_structure(self):
        """Layer graph, weight specs and the inference graph's shape check, without creating weights."""
        self._structure()
        self._specs = {layer.name: layer.weight_specs(layer._built_input_shape)
                       for layer in self.layers if not isinstance(layer, L.Input)}
        self._trainable = [f"{layer}/{k}" for layer, specs in self._specs.items() for k, s in specs.items()
                           if s.trainable]
        g = self._graph(training=False)        # raises a LayerError naming the first bad layer
        self._out_types = [v.type for v in g.outputs]
        self._out_type = self._out_types[0]

    def _graph(self, training, loss=None, weighted=False):
        """The model as an ir.Graph: outputs, then (with `loss`) the loss of output 0 vs input 'y'."""
        g = ir.Graph(self.name)
        values = {id(t): g.input(n, t.shape) for n, t in zip(self.input_names, self.inputs)}
        for layer in self.layers:
            for suffix, spec in self._specs.get(layer.name, {}).items():
                g.param(f"{layer.name}/{suffix}", spec.shape)
        ctx = _BuildContext(self, g, training)
        for node in self._nodes:
            if not node.inputs:
                continue
            xs = [values[id(t)] for t in node.inputs]
            try:
                values[id(node.output)] = node.layer.call(ctx, xs if node.is_list else xs[0])
            except ir.IRError as e:
                shapes = [tuple(v.shape) for v in xs]
                raise LayerError(f"layer {node.layer.name!r} ({type(node.layer).__name__}) with input shape "
                                 f"{shapes[0] if len(shapes) == 1 else shapes}: {e}") from None
        outputs = [values[id(t)] for t in self.outputs]
        if loss is not None:
            outputs.append(self._emit_loss(g, outputs[0], loss, weighted))
        g.output(*outputs)
        return g

    def _emit_loss(self, g, pred, loss, weighted):
        if len(self.outputs) != 1:
            raise GraphcnnError(f"model {self.name!r} has {len(self.outputs)} outputs; fit and evaluate support one "
                                f"output (predict works for any number)")
        labels = g.input("y", (None,) if loss == "sparse_categorical_crossentropy" else pred.shape)
        attrs = dict(self.compiled.get("loss_config") or {}) if self.compiled else {}
        extra = []
        if weighted:
            if len(get_op(loss).inputs) < 3:
                raise GraphcnnError(f"fit: sample_weight/class_weight need a {loss} op with a per-sample weight "
                                    f"input, which this graphcnn does not have yet")
            extra.append(g.input(SAMPLE_WEIGHT, (None,)))
        return emit(loss, pred, labels, *extra, **attrs)

    def summary(self, print_fn=print):
        """Print each layer call: name (type), output shape, parameter count, the layers it reads."""
        self.build()
        rows, counted = [], set()
        for node in self._nodes:
            layer = node.layer
            n = 0
            if layer.name not in counted:
                counted.add(layer.name)
                n = sum(int(np.prod(s.shape)) for s in self._specs.get(layer.name, {}).values())
            shape = "(" + ", ".join("None" if d is None else str(d) for d in node.output.shape) + ")"
            rows.append((f"{layer.name} ({type(layer).__name__})", shape, str(n),
                         ", ".join(t.layer.name for t in node.inputs)))
        if isinstance(self, Sequential) and not isinstance(self.layers[0], L.Input):
            rows = rows[1:]           # the implicit Input of a Sequential built from input_shape=
        head = ("Layer (type)", "Output Shape", "Param #", "Connected to")
        widths = [max(len(r[i]) for r in rows + [head]) + 2 for i in range(4)]
        line = lambda r: "".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        print_fn(f'Model: "{self.name}"')
        print_fn("=" * sum(widths))
        print_fn(line(head))
        print_fn("-" * sum(widths))
        for r in rows:
            print_fn(line(r))
        print_fn("=" * sum(widths))
        trainable = sum(int(np.prod(self.weights[n].shape)) for n in self._trainable)
        total = self.count_params()
        print_fn(f"Total params: {total}  Trainable params: {trainable}  Non-trainable params: {total - trainable}")

    def get_layer(self, name):
        """The layer called `name` (Keras's model.get_layer)."""
        self._structure()
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise GraphcnnError(f"model {self.name!r} has no layer {name!r}; layers: {[l.name for l in self.layers]}")

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
                learning_rate=None, threads=None, from_logits=None):
        """Choose optimizer (a name, a dict or a gc.optimizers object), loss (a name or a dict
        {'name': ..., 'from_logits': True}), metrics, backend ('llvm' | 'numpy') and thread count."""
        self.optimizer = training_loop.resolve_optimizer(optimizer, learning_rate)
        loss, loss_config = _parse_loss(loss, from_logits)
        metrics = training_loop.check_metrics(metrics)
        backend = backend or default_backend()
        if backend not in ("llvm", "numpy"):
            raise GraphcnnError(f"compile: unknown backend {backend!r}; choose 'llvm' or 'numpy'")
        self.build()
        if len(self.outputs) == 1 and loss != "mse" and (self._out_type.rank != 2):
            raise GraphcnnError(f"compile: {loss} needs a 2-D (batch, classes) model output, got {self._out_type}")
        self.compiled = {"optimizer": self.optimizer.ir_name, "optimizer_config": training_loop.optimizer_config(
            self.optimizer), "loss": loss, "loss_config": loss_config, "metrics": metrics, "backend": backend,
            "threads": threads}
        self._lr_override = None
        self._cache.clear()

    def _require_compiled(self, what):
        if self.compiled is None:
            raise GraphcnnError(f"{what}: call model.compile(...) first")

    @property
    def learning_rate(self) -> float:
        """The learning rate of the next step (a schedule's value unless a callback set one)."""
        self._require_compiled("learning_rate")
        if self._lr_override is not None:
            return self._lr_override
        return float(self.optimizer.learning_rate_at(self._step()))

    @learning_rate.setter
    def learning_rate(self, value):
        self._require_compiled("learning_rate")
        self._lr_override = float(value)
        if not training_loop.LR_IS_INPUT:      # the rate is baked into the step: compile it again
            self.optimizer.set_learning_rate(self._lr_override)
            for k in [k for k in self._cache if k[0] == "train"]:
                del self._cache[k]

    def _step(self) -> int:
        """Completed training steps (the training executable updates _opt_state's arrays in place)."""
        return int(self._opt_state[STEP]) if STEP in self._opt_state else 0

    def training_graph(self, weighted=False) -> ir.Graph:
        """forward + loss + backward + optimizer update + state updates, before the 'training' pipeline."""
        self._require_compiled("training_graph")
        self.build()
        fwd = run_pipeline(self._graph(True, self.compiled["loss"], weighted), "training_forward").graph
        return make_training_graph(fwd, fwd.outputs[1].name, self.optimizer.ir_name, self.optimizer.ir_config(),
                                   trainable=self._trainable)

    def _executable(self, kind, seed=None, weighted=False):
        key = (kind, seed, weighted) if kind == "train" else (kind,)
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
            tg = self.training_graph(weighted)
            params = dict(self.weights)
            for p in tg.params:
                if p.name not in params:
                    have = self._opt_state.get(p.name)
                    if have is not None and have.shape != p.shape:
                        raise GraphcnnError(f"model {self.name!r}: saved optimizer state {p.name!r} has shape "
                                            f"{have.shape}, the training step needs {p.shape}")
                    params[p.name] = self._opt_state.setdefault(p.name, np.zeros(p.shape, np.float32))
            # the executable owns the arrays it updates in place; share them with the model (and with the
            # other training executables: a fit with sample weights continues the same optimizer state)
            exe = compile_graph(tg, backend, params, passes="training", **opts)
            for k in self.weights:
                self.weights[k] = exe.state[k]
            for k in exe.state:
                if k not in self.weights:
                    self._opt_state[k] = exe.state[k]
            for k in list(self._cache):
                del self._cache[k]
        self._cache[key] = exe
        return exe

    # -- data ---------------------------------------------------------------------------------------
    def _prepare_x(self, x, what) -> dict:
        """Inputs by graph input name: one array, or a list / a dict by Input layer name for several."""
        if x is None:
            raise GraphcnnError(f"{what}: x is None")
        self._structure()
        names = self.input_names
        if len(names) == 1:
            arrays = [x[0] if isinstance(x, (list, tuple)) and len(x) == 1 else x]
        elif isinstance(x, dict):
            want = [t.layer.name for t in self.inputs]
            if sorted(x) != sorted(want):
                raise GraphcnnError(f"{what}: x has keys {sorted(x)}; model {self.name!r} has inputs {want}")
            arrays = [x[n] for n in want]
        elif isinstance(x, (list, tuple)) and len(x) == len(names):
            arrays = list(x)
        else:
            raise GraphcnnError(f"{what}: model {self.name!r} has {len(names)} inputs; pass a list of "
                                f"{len(names)} arrays or a dict by Input name")
        out, n = {}, None
        for name, t, a in zip(names, self.inputs, arrays):
            a = conform_input(a, tuple(t.shape[1:]), what, self.name)
            if n is not None and a.shape[0] != n:
                raise GraphcnnError(f"{what}: the inputs have different sample counts ({n} and {a.shape[0]})")
            n = a.shape[0]
            out[name] = a
        return out

    def _prepare_y(self, y, n, what):
        loss = self.compiled["loss"]
        k = self._out_type.shape[-1]
        a = np.asarray(y)
        if a.dtype.kind not in "fiub":
            example = f" (e.g. {str(a.flat[0])[:20]!r})" if a.size else ""
            raise GraphcnnError(f"{what}: y must be numbers, got dtype {a.dtype}{example}; map class names to integer "
                                f"ids first, e.g. names, y = np.unique(y, return_inverse=True)")
        if a.shape[0:1] != (n,):
            raise GraphcnnError(f"{what}: x has {n} samples but y has {a.shape[0] if a.ndim else 0}")
        if loss == "sparse_categorical_crossentropy":
            if a.ndim == 2 and a.shape[1] == 1:
                a = a[:, 0]
            if a.ndim != 1:
                raise GraphcnnError(f"{what}: sparse_categorical_crossentropy needs integer labels of shape (N,), "
                                    f"got {a.shape} (use categorical_crossentropy for one-hot targets)")
            if a.dtype.kind == "f" and not (np.isfinite(a).all() and np.array_equal(a, np.round(a))):
                raise GraphcnnError(f"{what}: labels must be whole numbers")
            if a.size and (a.min() < 0 or a.max() >= k):
                raise GraphcnnError(f"{what}: labels must be in [0, {k - 1}] for a {k}-unit output, "
                                    f"found {a.min()}..{a.max()}")
        else:
            want = (n,) + tuple(self._out_type.shape[1:])
            if a.shape != want and a.size == int(np.prod(want)) and a.ndim == 1 and len(want) == 2:
                a = a.reshape(want)            # (N,) targets for a (N, 1) output, as Keras accepts
            if a.shape != want:
                raise GraphcnnError(f"{what}: y has shape {a.shape}, expected {want}")
            if not np.isfinite(a.astype(np.float64)).all():
                raise GraphcnnError(f"{what}: y contains NaN or infinity")
        return np.ascontiguousarray(a, dtype=np.float32)

    # -- fit / evaluate / predict -------------------------------------------------------------------
    def fit(self, x, y, epochs=1, batch_size=32, validation_data=None, seed=None, shuffle=True, verbose=1,
            callbacks=None, validation_split=0.0, initial_epoch=0, class_weight=None, sample_weight=None,
            distributed=None):
        """Train (Keras semantics); returns a History. `seed` fixes shuffling (per epoch: a function of
        (seed, epoch)), dropout and augmentation, and the initial weights when the model has not been
        trained or given weights yet. `distributed`: data-parallel over MPI ranks (graphcnn.distributed;
        None = when gc.distributed.init() joined a job of several ranks)."""
        return training_loop.fit(self, x, y, epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                                 seed=seed, shuffle=shuffle, verbose=verbose, callbacks=callbacks,
                                 validation_split=validation_split, initial_epoch=initial_epoch,
                                 class_weight=class_weight, sample_weight=sample_weight, distributed=distributed)

    def evaluate(self, x, y, batch_size=256, verbose=0):
        """Mean loss (and metrics, if compiled with any) over the data: `loss` or `[loss, metric, ...]`."""
        self._require_compiled("evaluate")
        feeds = self._prepare_x(x, "evaluate")
        y = self._prepare_y(y, next(iter(feeds.values())).shape[0], "evaluate")
        training_loop.check_positive_int(batch_size, "batch_size")
        return self._evaluate_prepared(feeds, y, batch_size)

    def _evaluate_prepared(self, feeds, y, batch_size):
        exe = self._executable("evaluate")
        n = len(y)
        loss_sum, preds = 0.0, []
        for s in range(0, n, batch_size):
            pred, loss = exe(**{k: v[s:s + batch_size] for k, v in feeds.items()}, y=y[s:s + batch_size])
            loss_sum += float(loss) * pred.shape[0]
            preds.append(pred)
        metrics = training_loop.metric_values(self, np.concatenate(preds), y)
        return [loss_sum / n] + list(metrics.values()) if metrics else loss_sum / n

    def predict(self, x, batch_size=256, verbose=0):
        """Model outputs for x, as a float32 array (N, ...) (a list of arrays for several outputs)."""
        feeds = self._prepare_x(x, "predict")
        training_loop.check_positive_int(batch_size, "batch_size")
        exe = self._executable("predict")
        n = next(iter(feeds.values())).shape[0]
        if n <= batch_size:                  # one call: its results are already fresh arrays
            out = exe(**feeds)
            return list(out) if len(self.outputs) > 1 else out
        parts = [exe(**{k: v[s:s + batch_size] for k, v in feeds.items()}) for s in range(0, n, batch_size)]
        if len(self.outputs) == 1:
            return np.concatenate(parts)
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.outputs))]

    def __call__(self, x):
        if isinstance(x, (SymbolicTensor, L.Input)) or (isinstance(x, (list, tuple)) and x and
                                                       isinstance(x[0], (SymbolicTensor, L.Input))):
            raise GraphcnnError(f"model {self.name!r}: calling a model on symbolic tensors (nesting models) is not "
                                f"supported; call its layers, or build one gc.Model over the whole graph")
        return self.predict(x)

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path):
        """Write a .gcnn artifact (atomically): IR JSON + weights .npz + metadata, and when compiled the
        optimizer state and step counter, so gc.load_model continues training exactly."""
        from .artifact import save_model
        if len(self.inputs) != 1:
            raise GraphcnnError(f"save: model {self.name!r} has {len(self.inputs)} inputs; .gcnn files hold "
                                f"single-input models")
        save_model(self, path)

    def training_state(self) -> dict:
        """Optimizer slots and the step counter (name -> array) for save; empty before any training."""
        return {k: np.array(v, np.float32) for k, v in self._opt_state.items()} if self.compiled else {}

    def inference_graph(self) -> ir.Graph:
        self.build()
        return self._graph(False)

    def config(self) -> dict:
        """The JSON-able description saved in .gcnn files; model_from_config rebuilds the model from it."""
        self._structure()
        return {"class": "Functional", "name": self.name, "seed": self.seed, "preprocess": self.preprocess,
                **layer_graph_config(self.layers, self._nodes, self.inputs, self.outputs)}


class Sequential(Model):
    """A linear stack of layers, e.g. Sequential([layers.Input((28, 28, 1)), layers.Conv2D(...), ...]):
    the layer graph is the chain through them."""

    def __init__(self, layers=None, name="sequential", seed=0):
        self._init_state(name, seed, "Sequential")
        self.layers: list[L.Layer] = []
        self._chain_of = None
        for layer in layers or []:
            self.add(layer)

    def add(self, layer):
        """Append a layer (Keras-style)."""
        if not isinstance(layer, L.Layer):
            raise LayerError(f"Sequential.add: expected a graphcnn layer, got {type(layer).__name__}")
        if isinstance(layer, L.Input) and self.layers:
            raise LayerError("Input must be the first layer")
        self.layers.append(layer)
        self._built = False
        self._chain_of = None
        self._cache.clear()

    def _structure(self):
        """Call the layers in order on the Input (or on one made from the first layer's input_shape)."""
        if self._chain_of == len(self.layers):
            return
        first = self.layers[0] if self.layers else None
        if first is None or first.input_shape is None:
            raise LayerError(f"model {self.name!r}: the input shape is unknown; start with layers.Input((H, W, C)) "
                             f"or pass input_shape= to the first layer")
        self._name_layers()
        x = first.output if isinstance(first, L.Input) else L.Input(first.input_shape).output
        self._inputs = [x]
        for layer in self.layers:
            if not isinstance(layer, L.Input):
                layer._built_input_shape = None      # the chain defines this layer's input anew
                x = layer(x)
        self._outputs = [x]
        self._nodes = collect_nodes(self._inputs, self._outputs, self.name)
        self._chain_of = len(self.layers)

    def config(self) -> dict:
        return {"class": "Sequential", "name": self.name, "seed": self.seed, "preprocess": self.preprocess,
                "layers": [layer_config(layer) for layer in self.layers]}


def _parse_loss(loss, from_logits):
    """'name' or {'name': ..., 'from_logits': bool} -> (op name, op attributes)."""
    cfg = {}
    if isinstance(loss, dict):
        cfg = dict(loss)
        loss = cfg.pop("name", None)
    if not isinstance(loss, str):
        raise GraphcnnError(f"compile: loss must be a name such as 'sparse_categorical_crossentropy' or a dict "
                            f"{{'name': ..., 'from_logits': True}}, got {loss!r}")
    loss = LOSS_ALIASES.get(loss.lower(), loss.lower())
    available = [n for n in LOSSES if n in ir.ops.REGISTRY]
    if loss not in available:
        raise GraphcnnError(f"compile: unknown loss {loss!r}; choose one of {', '.join(available)}")
    if from_logits is not None:
        cfg["from_logits"] = from_logits
    unknown = set(cfg) - set(get_op(loss).attrs)
    if unknown:
        raise GraphcnnError(f"compile: loss {loss} has no setting(s) {sorted(unknown)}; known: "
                            f"{sorted(get_op(loss).attrs)}")
    if "from_logits" in cfg:
        if not isinstance(cfg["from_logits"], bool):
            raise GraphcnnError(f"compile: from_logits must be True or False, got {cfg['from_logits']!r}")
        if not cfg["from_logits"]:
            del cfg["from_logits"]
    return loss, cfg


def model_from_config(cfg, where="model config") -> Model:
    """Rebuild a Model or Sequential (layers re-created and re-called, so every shape is re-checked)."""
    if not isinstance(cfg, dict):
        raise GraphcnnError(f"{where}: no model configuration")
    name, seed = cfg.get("name"), cfg.get("seed", 0)
    if cfg.get("class", "Sequential") == "Functional":
        inputs, outputs = nodes_from_config(cfg, where)
        model = Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0],
                      name=name, seed=seed)
    elif cfg.get("class", "Sequential") == "Sequential":
        if not isinstance(cfg.get("layers"), list):
            raise GraphcnnError(f"{where}: no 'layers' list")
        model = Sequential([layer_from_config(d, where) for d in cfg["layers"]], name=name, seed=seed)
    else:
        raise GraphcnnError(f"{where}: unknown model class {str(cfg.get('class'))[:40]!r}")
    pre = cfg.get("preprocess")
    if pre is not None and not (isinstance(pre, dict) and set(pre) <= {"scale"} and
                                isinstance(pre.get("scale", 1.0), (int, float))):
        raise GraphcnnError(f"{where}: bad 'preprocess' entry {str(pre)[:60]}")
    model.preprocess = pre
    return model


def load_model(path, backend=None) -> Model:
    """A trainable model from a .gcnn file: its layer graph, weights and (when it was saved compiled) its
    compile settings, optimizer state and step, so fit continues exactly where the saved run stopped.
    The rebuilt model's inference graph must equal the stored one (else ArtifactError)."""
    from .artifact import ArtifactError, check_config_matches_graph, read_artifact
    graph, weights, meta, state = read_artifact(path, with_state=True)
    try:
        model = model_from_config(meta.get("model"), f"{path}: meta.json model config")
        model._build_structure()
    except GraphcnnError as e:
        raise ArtifactError(str(e)) from None
    check_config_matches_graph(model, graph, path)      # shapes only: no weight is built for a hostile config
    model.weights = {k: np.array(v, np.float32) for k, v in weights.items()}
    model._built = True
    model._user_weights = model._trained = True
    tr = meta.get("training") or {}
    if tr.get("loss"):
        try:
            model.compile(optimizer=training_loop.optimizer_from_config(tr.get("optimizer"),
                                                                        tr.get("optimizer_config")),
                          loss=dict(tr.get("loss_config") or {}, name=tr["loss"]), metrics=tr.get("metrics"),
                          backend=backend or tr.get("backend"), threads=tr.get("threads"))
        except GraphcnnError as e:
            raise ArtifactError(f"{path}: meta.json training config: {e}") from None
    model._opt_state = {k: np.array(v, np.float32) for k, v in state.items()}
    epochs = tr.get("epochs_done", 0)
    model.epochs_done = epochs if isinstance(epochs, int) and epochs >= 0 else 0
    return model


__all__ = ["Model", "Sequential", "History", "load_model", "model_from_config"]
