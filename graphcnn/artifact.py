"""The .gcnn artifact: a zip holding graph.json (the inference IR, versioned), weights.npz (read with
allow_pickle=False) and meta.json (graphcnn version, input/output specs, model and training config).

Loading never executes code from the file and validates everything before anything runs: entry names
and sizes (no zip bombs, no path tricks), JSON, the IR (every op, attribute and shape re-checked),
and every weight's dtype, shape and byte size."""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

import ir
from ir.serialize import graph_from_json, graph_to_json

from .atomic_file import write_file_atomically
from .errors import GraphcnnError

FORMAT = "graphcnn-model"
VERSION = 1
ENTRIES = ("meta.json", "graph.json", "weights.npz")
MAX_JSON_BYTES = 16 << 20
MAX_WEIGHT_BYTES = 2 << 30
MAX_RATIO = 200            # uncompressed / compressed, beyond which an entry is treated as a zip bomb


class ArtifactError(GraphcnnError):
    """A .gcnn file is missing, malformed or unsafe. The message names the file and the problem."""


atomic_write_bytes = write_file_atomically


def artifact_bytes(graph: ir.Graph, weights: dict, meta: dict) -> bytes:
    """Serialize a graph + weights + metadata into .gcnn bytes."""
    names = [p.name for p in graph.params]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ArtifactError(f"save: no values for params {missing}")
    wbuf = io.BytesIO()
    arrays = {f"p{i}": np.ascontiguousarray(weights[n], np.float32) for i, n in enumerate(names)}
    arrays.update({f"c{i}": np.asarray(np.require(graph.consts[v.name], requirements="C")) for i, v in enumerate(graph.const_values)})
    np.savez(wbuf, **arrays)
    from . import __version__
    meta = dict(meta, format=FORMAT, version=VERSION, graphcnn_version=__version__,
                params=names, consts=[v.name for v in graph.const_values],
                inputs=[{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.inputs],
                outputs=[{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.outputs])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.json", json.dumps(meta, indent=1))
        z.writestr("graph.json", json.dumps(graph_to_json(graph), indent=1))
        z.writestr("weights.npz", wbuf.getvalue())
    return out.getvalue()


def save_model(model, path):
    """Save a Sequential model's inference graph and weights as a .gcnn file (atomic)."""
    g = model.inference_graph()
    meta = {"model": model.config(), "training": model.compiled or {}}
    atomic_write_bytes(path, artifact_bytes(g, model.weights, meta))


def _read_entry(z, info, path, limit):
    if info.file_size > limit:
        raise ArtifactError(f"{path}: entry {info.filename!r} is {info.file_size} bytes, over the {limit}-byte limit")
    if info.compress_size and info.file_size / max(info.compress_size, 1) > MAX_RATIO and info.file_size > 1 << 20:
        raise ArtifactError(f"{path}: entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                            f"(looks like a zip bomb)")
    with z.open(info) as f:
        data = f.read(limit + 1)
    if len(data) != info.file_size:
        raise ArtifactError(f"{path}: entry {info.filename!r} size does not match its header")
    return data


def read_artifact(path):
    """Validate and read a .gcnn file -> (graph, weights dict, meta). Raises ArtifactError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if sorted(names) != sorted(ENTRIES):
                raise ArtifactError(f"{path}: expected exactly the entries {list(ENTRIES)}, found {names[:10]}")
            by = {i.filename: i for i in infos}
            meta = _json(_read_entry(z, by["meta.json"], path, MAX_JSON_BYTES), path, "meta.json")
            gdoc = _json(_read_entry(z, by["graph.json"], path, MAX_JSON_BYTES), path, "graph.json")
            wdata = _read_entry(z, by["weights.npz"], path, MAX_WEIGHT_BYTES)
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path}: not a valid .gcnn (zip) file: {e}") from None
    except (OSError, EOFError, RuntimeError, NotImplementedError) as e:
        raise ArtifactError(f"{path}: cannot read: {e}") from None
    except Exception as e:  # zlib.error and friends on corrupt streams
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{path}: corrupt archive: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: meta.json is not a {FORMAT} description")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{path}: format version {meta.get('version')!r} is not supported (this graphcnn reads {VERSION})")
    pnames, cnames = meta.get("params"), meta.get("consts", [])
    if not isinstance(pnames, list) or not all(isinstance(n, str) for n in pnames) or \
            not isinstance(cnames, list) or not all(isinstance(n, str) for n in cnames):
        raise ArtifactError(f"{path}: meta.json 'params'/'consts' must be lists of names")
    arrays = _read_npz(wdata, path, [f"p{i}" for i in range(len(pnames))] + [f"c{i}" for i in range(len(cnames))])
    consts = {n: arrays[f"c{i}"] for i, n in enumerate(cnames)}
    try:
        graph = graph_from_json(gdoc, consts)
    except ir.IRError as e:
        raise ArtifactError(f"{path}: graph.json: {e}") from None
    want = [p.name for p in graph.params]
    if want != pnames:
        raise ArtifactError(f"{path}: meta.json params {pnames[:5]}... do not match the graph's {want[:5]}...")
    weights = {}
    for i, p in enumerate(graph.params):
        a = arrays[f"p{i}"]
        if a.dtype != np.float32 or a.shape != p.shape:
            raise ArtifactError(f"{path}: weight {p.name!r} is {a.dtype}{list(a.shape)}, the graph needs float32{list(p.shape)}")
        if not np.isfinite(a).all():
            raise ArtifactError(f"{path}: weight {p.name!r} contains NaN or infinity")
        weights[p.name] = a
    if not graph.outputs:
        raise ArtifactError(f"{path}: the graph has no outputs")
    return graph, weights, meta


def _json(data, path, entry):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: {entry} is not valid JSON: {e}") from None


def _read_npz(data, path, expected):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = {i.filename: i for i in z.infolist()}
            if sorted(infos) != sorted(f"{k}.npy" for k in expected):
                raise ArtifactError(f"{path}: weights.npz holds {sorted(infos)[:6]}, expected {len(expected)} arrays")
            out = {}
            for k in expected:
                raw = _read_entry(z, infos[f"{k}.npy"], path, MAX_WEIGHT_BYTES)
                f = io.BytesIO(raw)
                try:
                    a = np.lib.format.read_array(f, allow_pickle=False)
                except ValueError as e:
                    raise ArtifactError(f"{path}: weights.npz entry {k}: {e}") from None
                if f.tell() != len(raw):
                    raise ArtifactError(f"{path}: weights.npz entry {k} has trailing bytes")
                if a.dtype.kind not in "fi" or a.dtype.byteorder not in "=<|":
                    raise ArtifactError(f"{path}: weights.npz entry {k} has unsupported dtype {a.dtype}")
                out[k] = np.asarray(np.require(a, requirements="C"))
            return out
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path}: weights.npz is not a valid npz: {e}") from None
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{path}: weights.npz is corrupt: {type(e).__name__}: {e}") from None


class Runtime:
    """An inference-only model loaded from a .gcnn file. `predict(x)` is safe to call from many threads."""

    def __init__(self, graph, weights, meta, backend=None):
        from .compiler import compile as compile_graph
        self.graph, self.meta = graph, meta
        self.name = graph.name
        self.input_shape = tuple(graph.inputs[0].shape[1:])
        self.executable = compile_graph(graph, backend, weights, passes="inference")
        self.backend = self.executable.backend

    def predict(self, x, batch_size=256):
        """Outputs for x (N, ...) as float32; accepts (N,28,28)/(N,784)-style reshapes like Sequential."""
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise GraphcnnError(f"predict: x must be numeric, got {a.dtype}")
        if a.ndim == 0 or a.shape[0] == 0:
            raise GraphcnnError(f"predict: x is empty (shape {a.shape})")
        want = self.input_shape
        if a.shape[1:] != want:
            if int(np.prod(a.shape[1:])) != int(np.prod(want)):
                raise GraphcnnError(f"predict: x has shape {a.shape}; {self.name!r} expects (N, {', '.join(map(str, want))})")
            a = a.reshape((a.shape[0],) + want)
        a = np.ascontiguousarray(a, np.float32)
        return np.concatenate([self.executable(a[s:s + batch_size]) for s in range(0, a.shape[0], batch_size)])

    __call__ = predict


def load(path, backend=None) -> Runtime:
    """Load a .gcnn artifact as an inference runtime (validated; never executes code from the file)."""
    graph, weights, meta = read_artifact(path)
    return Runtime(graph, weights, meta, backend)


def model_from_artifact(path):
    """Rebuild a trainable Sequential from a .gcnn file's model config and weights."""
    from . import layers as L
    from .model import Sequential
    graph, weights, meta = read_artifact(path)
    cfg = meta.get("model")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        raise ArtifactError(f"{path}: no model configuration to train from (only inference is possible)")
    layers = []
    for i, lc in enumerate(cfg["layers"]):
        cls = L.LAYER_TYPES.get(lc.get("class")) if isinstance(lc, dict) else None
        if cls is None:
            raise ArtifactError(f"{path}: layer {i} has an unknown class {lc.get('class') if isinstance(lc, dict) else lc!r}")
        kwargs = dict(lc.get("config") or {})
        try:
            if cls is L.Input:
                layer = L.Input(lc["input_shape"], name=lc.get("name"))
            else:
                if "activation" in kwargs and cls in (L.ReLU, L.Softmax):
                    kwargs.pop("activation")
                layer = cls(**kwargs, name=lc.get("name"),
                            **({"input_shape": lc["input_shape"]} if lc.get("input_shape") else {}))
        except (TypeError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path}: layer {i} ({lc.get('class')}) has a bad configuration: {e}") from None
        layers.append(layer)
    model = Sequential(layers, name=graph.name, seed=int(cfg.get("seed", 0)))
    model.set_weights(weights)
    tr = meta.get("training") or {}
    if tr.get("loss"):
        model.compile(optimizer=dict(tr.get("optimizer_config", {}), name=tr.get("optimizer", "adam")),
                      loss=tr["loss"], metrics=tr.get("metrics"), backend=tr.get("backend"))
    return model
