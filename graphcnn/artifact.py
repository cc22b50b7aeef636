"""The .gcnn artifact: a zip holding graph.json (the inference IR, versioned), weights.npz (read with
allow_pickle=False) and meta.json (graphcnn version, input/output specs, model and training config).

Loading never executes code from the file and validates everything before anything runs: entry names
and sizes (no zip bombs, no path tricks), JSON, the IR (every op, attribute and shape re-checked),
and every weight's dtype, shape and byte size.

Integrity: meta.json carries SHA-256 digests of graph.json, weights.npz and of meta.json's own
canonical form (sorted keys, no whitespace, digests left out). The zip's CRC-32 only covers the bytes as
stored, so without these a bit flip inside an entry that was re-zipped (or a flipped weight mantissa)
would load as a different, wrong model; with them a corrupted artifact is refused."""
from __future__ import annotations

import hashlib
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
MAX_VALUE_BYTES = 1 << 31  # per-sample size of any one graph value; keeps native index arithmetic far from overflow
MAX_NPY_HEADER = 10_000
INTEGRITY = "integrity"    # meta.json key holding the digests


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
    graph_bytes = json.dumps(graph_to_json(graph), indent=1).encode("utf-8")
    weight_bytes = wbuf.getvalue()
    meta.pop(INTEGRITY, None)
    meta[INTEGRITY] = integrity_digests(meta, graph_bytes, weight_bytes)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.json", json.dumps(meta, indent=1))
        z.writestr("graph.json", graph_bytes)
        z.writestr("weights.npz", weight_bytes)
    return out.getvalue()


def integrity_digests(meta: dict, graph_bytes: bytes, weight_bytes: bytes) -> dict:
    """The digests stored under meta.json's "integrity" key (meta's own is over its canonical JSON)."""
    return {"algorithm": "sha256",
            "meta.json": hashlib.sha256(_canonical_meta(meta)).hexdigest(),
            "graph.json": hashlib.sha256(graph_bytes).hexdigest(),
            "weights.npz": hashlib.sha256(weight_bytes).hexdigest()}


def _canonical_meta(meta: dict) -> bytes:
    # whitespace and key order do not change meaning, so they do not change the digest
    body = {k: v for k, v in meta.items() if k != INTEGRITY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def save_model(model, path):
    """Save a Sequential model's inference graph and weights as a .gcnn file (atomic)."""
    g = model.inference_graph()
    meta = {"model": model.config(), "training": model.compiled or {}}
    atomic_write_bytes(path, artifact_bytes(g, model.weights, meta))


def _read_entry(z, info, path, limit, inside=""):
    """One entry's bytes, refusing declared sizes over `limit` and zip-bomb ratios (`inside`: 'weights.npz ' for
    entries of the inner archive, so messages say where)."""
    if info.file_size > limit:
        raise ArtifactError(f"{path}: {inside}entry {info.filename!r} is {info.file_size} bytes, over the {limit}-byte limit")
    if info.file_size > 1 << 20 and info.file_size / max(info.compress_size, 1) > MAX_RATIO:
        raise ArtifactError(f"{path}: {inside}entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                            f"(looks like a zip bomb)")
    with z.open(info) as f:
        data = f.read(limit + 1)
    if len(data) != info.file_size:
        raise ArtifactError(f"{path}: {inside}entry {info.filename!r} size does not match its header")
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
            meta_bytes = _read_entry(z, by["meta.json"], path, MAX_JSON_BYTES)
            graph_bytes = _read_entry(z, by["graph.json"], path, MAX_JSON_BYTES)
            wdata = _read_entry(z, by["weights.npz"], path, MAX_WEIGHT_BYTES)
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path}: not a valid .gcnn (zip) file: {e}") from None
    except (OSError, EOFError, RuntimeError, NotImplementedError) as e:
        raise ArtifactError(f"{path}: cannot read: {e}") from None
    except Exception as e:  # zlib.error and friends on corrupt streams
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{path}: corrupt archive: {type(e).__name__}: {e}") from None
    meta = _json(meta_bytes, path, "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: meta.json is not a {FORMAT} description")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{path}: format version {meta.get('version')!r} is not supported (this graphcnn reads {VERSION})")
    _check_integrity(meta, graph_bytes, wdata, path)
    gdoc = _json(graph_bytes, path, "graph.json")
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
    except RecursionError:
        raise ArtifactError(f"{path}: graph.json is nested too deeply") from None
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError, ArithmeticError) as e:
        # an op's attribute check that assumed a well-typed value (e.g. softmax axis=null); still a bad file
        raise ArtifactError(f"{path}: graph.json has a malformed node or attribute "
                            f"({type(e).__name__}: {e})") from None
    # the name becomes file names (CLI `compile` writes NAME.ir, NAME.so): same rule as Sequential names
    if not graph.name.replace("_", "a").isalnum() or len(graph.name) > 200:
        raise ArtifactError(f"{path}: graph.json: graph name {graph.name[:80]!r} must be letters, digits and '_'")
    _check_value_sizes(graph, path)
    for key, vals in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        specs = [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in vals]
        if meta.get(key) != specs:
            raise ArtifactError(f"{path}: meta.json {key!r} do not match the graph's {key} {specs}")
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
    # Runtime.predict feeds one batched input and concatenates batched outputs (what save_model writes)
    if len(graph.inputs) != 1 or not all(v.type.batched for v in graph.inputs + graph.outputs):
        raise ArtifactError(f"{path}: graph.json must have exactly one input, and batched (None, ...) inputs "
                            f"and outputs; found inputs {[str(v.type) for v in graph.inputs]}, "
                            f"outputs {[str(v.type) for v in graph.outputs]}")
    return graph, weights, meta


def _check_integrity(meta, graph_bytes, weight_bytes, path):
    """Compare the stored SHA-256 digests with the entries' contents (see the module docstring)."""
    stored = meta.get(INTEGRITY)
    if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
        raise ArtifactError(f"{path}: meta.json has no {INTEGRITY!r} digests (sha256); the file is damaged "
                            f"or was not written by graphcnn")
    try:
        actual = integrity_digests(meta, graph_bytes, weight_bytes)
    except (TypeError, ValueError, RecursionError) as e:   # meta holds values JSON cannot re-encode
        raise ArtifactError(f"{path}: meta.json cannot be canonicalized: {e}") from None
    for entry in ("meta.json", "graph.json", "weights.npz"):
        if stored.get(entry) != actual[entry]:
            raise ArtifactError(f"{path}: {entry} does not match its sha256 digest in meta.json "
                                f"(the file is corrupted or was modified)")


def _check_value_sizes(graph, path):
    """Refuse values with a zero or absurdly large per-sample size before any memory is planned."""
    for v in graph.values():
        dims = [d for d in v.shape if d is not None]
        if any(d == 0 for d in dims):
            raise ArtifactError(f"{path}: graph.json: value %{v.name} has a zero-sized dimension {list(v.shape)}")
        size = np.dtype(v.type.np_dtype).itemsize
        for d in dims:
            size *= d            # Python ints: no overflow
        if size > MAX_VALUE_BYTES:
            raise ArtifactError(f"{path}: graph.json: value %{v.name} of shape {list(v.shape)} needs {size} bytes "
                                f"per sample, over the {MAX_VALUE_BYTES}-byte limit")


def _json(data, path, entry):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: {entry} is not valid JSON: {e}") from None
    except RecursionError:
        raise ArtifactError(f"{path}: {entry} is nested too deeply") from None


_NPY_DTYPES = (np.dtype("<f4"), np.dtype("<i4"))


def _read_npy(raw, path, key):
    """Parse one .npy entry without trusting its header: the declared shape must match the bytes present
    exactly before anything is allocated; no pickles, only little-endian float32/int32."""
    f = io.BytesIO(raw)
    try:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {major}.{minor}")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise ArtifactError(f"{path}: weights.npz entry {key} has a bad .npy header: {e}") from None
    if dtype.hasobject or dtype not in _NPY_DTYPES or dtype.byteorder == ">":
        raise ArtifactError(f"{path}: weights.npz entry {key} has unsupported dtype {dtype} "
                            f"(expected little-endian float32 or int32)")
    if not isinstance(shape, tuple) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise ArtifactError(f"{path}: weights.npz entry {key} has a bad shape {shape!r}")
    count = 1
    for d in shape:
        count *= d
    data_bytes = len(raw) - f.tell()
    if count * dtype.itemsize != data_bytes:
        raise ArtifactError(f"{path}: weights.npz entry {key} declares shape {list(shape)} ({count * dtype.itemsize} "
                            f"bytes) but holds {data_bytes} bytes of data")
    a = np.frombuffer(raw, dtype=dtype, count=count, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    return np.array(a, dtype=dtype.newbyteorder("="), order="C")   # own, writable, native-order copy


def _read_npz(data, path, expected):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            listed = z.infolist()
            infos = {i.filename: i for i in listed}
            if len(infos) != len(listed):    # readers disagree on which duplicate wins: refuse
                raise ArtifactError(f"{path}: weights.npz has duplicate entries")
            if sorted(infos) != sorted(f"{k}.npy" for k in expected):
                raise ArtifactError(f"{path}: weights.npz holds {sorted(infos)[:6]}, expected {len(expected)} arrays")
            out = {}
            for k in expected:
                out[k] = _read_npy(_read_entry(z, infos[f"{k}.npy"], path, MAX_WEIGHT_BYTES, "weights.npz "), path, k)
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
