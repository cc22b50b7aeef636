"""`graphcnn bench MODEL --int8`: int8 inference, graphcnn against ONNX Runtime's and TFLite's own static
int8 quantization, every system calibrated on the same first N bundled training images.

Rows: graphcnn-runtime (the fp32 reference), graphcnn-int8 (gc.quantize, saved as .gcnn, run by gc.load:
float in and out), graphcnn-int8-so (that int8 graph as a .so through ctypes), onnxruntime-int8
(quantize_static of graphcnn's own fp32 ONNX export: QDQ, per-channel, u8 activations, s8 weights) and
tflite-int8 (the Keras twin carrying graphcnn's trained weights, converted with a representative dataset
to int8 builtins, float input and output). Every system calibrates with min/max ranges (each tool's
default). The agreement report: per int8 system, the % of the bundled test images classified as the fp32
graphcnn model classifies them, and its test accuracy against the fp32 one."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from .bench import (DEFAULT_CALIBRATION_IMAGES, PEERS, TRAIN_BATCH, GraphcnnRuntime, GraphcnnSharedLibrary, OnnxRuntime,
                    TFLite, _tensorflow, bench_data, keras_twin, nchw, write_shared_files, write_shared_library)
from .errors import GraphcnnError

INT8_PEERS = {"onnxruntime": "onnxruntime-int8", "tflite": "tflite-int8"}      # --vs name -> its int8 row
CHUNK = 256                       # batch of the agreement pass over the test split
QUANTIZE_METHOD = "minmax"        # ONNX Runtime's and TFLite's default calibration too


class GraphcnnInt8(GraphcnnRuntime):
    """gc.load(the int8 .gcnn).predict: the way a user deploys gc.quantize's result."""
    name, file = "graphcnn-int8", "int8.gcnn"

    def outputs(self, x):
        return self.runtime.predict(x, batch_size=CHUNK)


class GraphcnnInt8SharedLibrary(GraphcnnSharedLibrary):
    """The int8 graph compiled to a .so (as `graphcnn compile --quantize int8 --emit so,h` does)."""
    name, info_file = "graphcnn-int8-so", "int8-so.json"

    def outputs(self, x):
        return np.concatenate([self.run(np.ascontiguousarray(x[s:s + CHUNK])) for s in range(0, len(x), CHUNK)])


class OnnxRuntimeInt8(OnnxRuntime):
    name, file = "onnxruntime-int8", "model.int8.onnx"

    def outputs(self, x):
        return self.run(x)


class TFLiteInt8(TFLite):
    name, file = "tflite-int8", "model.int8.tflite"

    def outputs(self, x):
        it, inp, out = self._interpreter(CHUNK)
        res = []
        for s in range(0, len(x), CHUNK):
            xb = x[s:s + CHUNK]
            pad = np.zeros((CHUNK - len(xb),) + xb.shape[1:], np.float32)    # the interpreter's batch is fixed
            it.set_tensor(inp, np.concatenate([xb, pad]) if len(pad) else xb)
            it.invoke()
            res.append(it.get_tensor(out)[:len(xb)].copy())
        return np.concatenate(res)


INT8_CLASSES = {c.name: c for c in (GraphcnnInt8, GraphcnnInt8SharedLibrary, OnnxRuntimeInt8, TFLiteInt8)}


def trained_model(ctx, train):
    """ctx's model, compiled and (unless train is False) trained on ctx's training images as `graphcnn
    train` would (the module's TRAIN epochs, batch size and optimizer; else 3 epochs, batch 128, Adam), so
    that the agreement report is about a model that has learned something. -> (model, description)."""
    m = ctx.model
    cfg = getattr(m, "train_config", None) or {}
    m.compile(optimizer=m.optimizer or cfg.get("optimizer") or "adam", loss="sparse_categorical_crossentropy",
              metrics=["accuracy"], backend="llvm")
    if not train:
        return m, "untrained (--no-train)"
    epochs, batch = cfg.get("epochs", 3), cfg.get("batch_size", TRAIN_BATCH)
    m.fit(ctx.x, ctx.y, epochs=epochs, batch_size=batch, verbose=0, seed=0)
    return m, f"trained {epochs} epoch{'s' if epochs != 1 else ''} of {len(ctx.x)} images at batch {batch} (untimed)"


def write_onnxruntime_int8(ctx, calib):
    """model.int8.onnx: ONNX Runtime's static QDQ quantization of graphcnn's fp32 export (model.onnx)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = ctx.path("model.pre.onnx")
    # shape inference and folding, as ORT advises; its symbolic pass (for dynamic dims) needs sympy, which
    # ONNX Runtime does not require: without it, ONNX's own shape inference serves (the dims are static)
    import importlib.util
    quant_pre_process(ctx.path("model.onnx"), pre, skip_symbolic_shape=importlib.util.find_spec("sympy") is None)
    name = onnx.load(pre).graph.input[0].name
    feeds = [{name: nchw(calib[s:s + CHUNK])} for s in range(0, len(calib), CHUNK)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, ctx.path(OnnxRuntimeInt8.file), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def keras_twin_with_weights(ctx, model):
    """The Keras twin holding graphcnn's trained weights (by layer and variable name), checked to give
    graphcnn's outputs: TFLite must quantize the same network, or agreement would mean nothing."""
    import keras
    keras.backend.clear_session()          # layer names restart (conv2d, conv2d_1, ...): graphcnn's names
    twin = keras_twin(ctx)
    weights, used = model.get_weights(), set()
    for layer in twin.layers:
        for v in layer.weights:
            key = f"{layer.name}/{v.name}"
            if key not in weights or tuple(weights[key].shape) != tuple(v.shape):
                raise GraphcnnError(f"bench: the Keras twin's weight {key} {tuple(v.shape)} has no graphcnn "
                                    f"counterpart")
            v.assign(weights[key])
            used.add(key)
    if used != set(weights):
        raise GraphcnnError(f"bench: graphcnn weights with no Keras twin: {', '.join(sorted(set(weights) - used))}")
    xb = ctx.x[:8]
    got, want = np.asarray(twin(xb, training=False)), model.predict(xb)
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise GraphcnnError(f"bench: the Keras twin with graphcnn's weights differs from it by up to "
                            f"{float(np.max(np.abs(got - want))):.3g}")
    return twin


def write_tflite_int8(ctx, model, calib):
    """model.int8.tflite: full-integer TFLite of the Keras twin, float input and output kept (the same
    float images go into every system)."""
    tf = _tensorflow(ctx.threads)
    conv = tf.lite.TFLiteConverter.from_keras_model(keras_twin_with_weights(ctx, model))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # the converter prints its SavedModel's signature, and warns that the float input has no
        # quantization statistics: it is meant to stay float
        warnings.filterwarnings("ignore", "Statistics for quantized inputs")
        content = conv.convert()
    with open(ctx.path(TFLiteInt8.file), "wb") as f:
        f.write(content)


def build_systems(ctx, a, peers, skipped, say=print):
    """Train (unless --no-train), quantize with every installed int8 peer, load the rows. -> (systems in
    the table's order, the int8 report: calibration, training, agreement on the test split)."""
    from .quantize import quantize
    n = a.calibration_images or DEFAULT_CALIBRATION_IMAGES
    calib, _ = bench_data(ctx.model.input_shape, n, flag="--calibration-images")
    model, trained = trained_model(ctx, not a.no_train)
    say(f"int8: model {trained}")
    write_shared_files(ctx, ["graphcnn-runtime"] + [p for p in peers if p == "onnxruntime"], model)
    q = quantize(model, calib, method=QUANTIZE_METHOD, calibration_images=n, backend="numpy")
    q.save(ctx.path(GraphcnnInt8.file))
    # a subfolder: the int8 library has the fp32 one's file name (both are named after the model)
    write_shared_library(ctx, q.graph, q.weights, GraphcnnInt8SharedLibrary.info_file, subfolder="int8")
    built = {"graphcnn-runtime": GraphcnnRuntime(ctx), "graphcnn-int8": GraphcnnInt8(ctx),
             "graphcnn-int8-so": GraphcnnInt8SharedLibrary(ctx)}
    writers = {"onnxruntime": lambda: write_onnxruntime_int8(ctx, calib),
               "tflite": lambda: write_tflite_int8(ctx, model, calib)}
    for p in [p for p in PEERS if p in peers]:            # the table's order, whatever --vs's
        if p not in INT8_PEERS:
            skipped[p] = f"no int8 row (--int8 compares {', '.join(INT8_PEERS.values())})"
            continue
        row = INT8_PEERS[p]
        try:
            writers[p]()
            built[row] = INT8_CLASSES[row](ctx)
        except Exception as e:      # a peer's quantizer that fails on this model: listed with why, not fatal
            skipped[row] = f"{type(e).__name__}: {e}".splitlines()[0]
    x, y = bench_data(ctx.model.input_shape, split="test")
    report = {"calibration_images": n, "calibration": QUANTIZE_METHOD, "trained": trained,
              **agreement(built, x, y)}
    return built, report


def agreement(built, x, y):
    """{test_images, fp32_test_accuracy, systems: {name: {agreement_pct, test_accuracy,
    accuracy_loss_points, max_abs_diff}}}: each int8 system's classes of the test images against fp32
    graphcnn's; max_abs_diff (the largest output difference from fp32) tells systems apart whose classes
    coincide."""
    want = built["graphcnn-runtime"].runtime.predict(x, batch_size=CHUNK)
    ref = want.argmax(1)
    fp32 = float(np.mean(ref == y))
    rows = {}
    for name, s in built.items():
        if name == "graphcnn-runtime":
            continue
        got = np.asarray(s.outputs(x)).reshape(want.shape)
        cls = got.argmax(1)
        acc = float(np.mean(cls == y))
        rows[name] = {"agreement_pct": 100.0 * float(np.mean(cls == ref)), "test_accuracy": acc,
                      "accuracy_loss_points": 100.0 * (fp32 - acc),
                      "max_abs_diff": float(np.max(np.abs(got - want)))}
    return {"test_images": len(x), "fp32_test_accuracy": fp32, "systems": rows}


def format_agreement(report):
    lines = [f"agreement on the {report['test_images']} bundled test images (fp32 graphcnn test accuracy "
             f"{100 * report['fp32_test_accuracy']:.2f}%):"]
    for name, r in report["systems"].items():
        lines.append(f"  {name}: same class as fp32 for {r['agreement_pct']:.2f}%, test accuracy "
                     f"{100 * r['test_accuracy']:.2f}% ({round(-r['accuracy_loss_points'], 2) + 0.0:+.2f} points), "
                     f"outputs within {r['max_abs_diff']:.2g} of fp32")
    return "\n".join(lines)
