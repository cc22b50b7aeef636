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
from .input_arrays import conform_input

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


def artifact_bytes(graph: ir.Graph, weights: dict, meta: dict, state: dict | None = None) -> bytes:
    """Serialize a graph + weights + metadata (+ training `state`: optimizer slots and step, by name) into
    .gcnn bytes. State arrays travel in weights.npz as s0, s1, ... named by meta.json's "state" list."""
    names = [p.name for p in graph.params]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ArtifactError(f"save: no values for params {missing}")
    state = state or {}
    wbuf = io.BytesIO()
    # each weight in its declared dtype: float32, or int8/int32 for quantized graphs
    arrays = {f"p{i}": np.ascontiguousarray(weights[p.name], p.type.np_dtype) for i, p in enumerate(graph.params)}
    arrays.update({f"c{i}": np.asarray(np.require(graph.consts[v.name], requirements="C")) for i, v in enumerate(graph.const_values)})
    arrays.update({f"s{i}": np.asarray(np.require(state[n], np.float32, "C")) for i, n in enumerate(state)})
    np.savez(wbuf, **arrays)
    from . import __version__
    meta = dict(meta, format=FORMAT, version=VERSION, graphcnn_version=__version__,
                params=names, consts=[v.name for v in graph.const_values],
                inputs=[{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.inputs],
                outputs=[{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in graph.outputs])
    if state:
        meta["state"] = list(state)
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
    """Save a model's inference graph, weights, layer-graph config and (when compiled) compile settings,
    optimizer state and step as a .gcnn file (atomic)."""
    g = model.inference_graph()
    training = dict(model.compiled, epochs_done=model.epochs_done) if model.compiled else {}
    meta = {"model": model.config(), "training": training}
    atomic_write_bytes(path, artifact_bytes(g, model.weights, meta, model.training_state()))


def _read_entry(z, info, path, limit, inside="", limit_reason=""):
    """One entry's bytes, refusing declared sizes over `limit` and zip-bomb ratios (`inside`: 'weights.npz ' for
    entries of the inner archive, so messages say where; `limit_reason` says where the limit comes from)."""
    _check_entry_size(info, path, limit, inside, limit_reason)
    pieces, got = [], 0
    with z.open(info) as f:
        # 1 MiB pieces joined once: peak memory is twice the entry, not the many copies one big read makes
        while got <= info.file_size:
            piece = f.read(min(1 << 20, info.file_size + 1 - got))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    data = b"".join(pieces)
    del pieces
    if len(data) != info.file_size:
        raise ArtifactError(f"{path}: {inside}entry {info.filename!r} size does not match its header")
    return data


def _check_entry_size(info, path, limit, inside, limit_reason):
    if info.file_size > limit:
        raise ArtifactError(f"{path}: {inside}entry {info.filename!r} is {info.file_size} bytes, over the "
                            f"{limit}-byte limit{limit_reason}")
    if info.file_size > 1 << 20 and info.file_size / max(info.compress_size, 1) > MAX_RATIO:
        raise ArtifactError(f"{path}: {inside}entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                            f"(looks like a zip bomb)")


def _read_entries(path, limits: dict) -> list:
    """The bytes of the named top-level entries (name -> byte limit, or (limit, reason)), after checking
    that the archive holds exactly ENTRIES."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if sorted(names) != sorted(ENTRIES):
                raise ArtifactError(f"{path}: expected exactly the entries {list(ENTRIES)}, found {names[:10]}")
            by = {i.filename: i for i in infos}
            out = []
            for name, limit in limits.items():
                limit, reason = limit if isinstance(limit, tuple) else (limit, "")
                out.append(_read_entry(z, by[name], path, limit, limit_reason=reason))
            return out
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path}: not a valid .gcnn (zip) file: {e}") from None
    except (OSError, EOFError, RuntimeError, NotImplementedError) as e:
        raise ArtifactError(f"{path}: cannot read: {e}") from None
    except ArtifactError:
        raise
    except Exception as e:  # zlib.error and friends on corrupt streams
        raise ArtifactError(f"{path}: corrupt archive: {type(e).__name__}: {e}") from None


MAX_STATE_PER_PARAM = 4                      # optimizer slots per weight (RMSprop keeps 3) and `step`
NPY_ENTRY_OVERHEAD = MAX_NPY_HEADER + 1024   # an .npy header plus its zip local header and directory record


def _declared_entry_bytes(gdoc, pnames, cnames) -> dict:
    """weights.npz key (p0, c0, ...) -> (bytes graph.json declares for it, 'param NAME f32[...]').

    Read from the untrusted JSON before it is validated, so anything malformed counts as 0 bytes (the
    entry is then refused, and a malformed graph would be refused anyway)."""
    specs = {}
    for kind in ("params", "consts"):
        for spec in (gdoc.get(kind) if isinstance(gdoc, dict) and isinstance(gdoc.get(kind), list) else []):
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                specs[(kind, spec["name"])] = spec
    out = {}
    for prefix, kind, names in (("p", "params", pnames), ("c", "consts", cnames)):
        for i, name in enumerate(names):
            spec = specs.get((kind, name), {})
            size, shape = 0, spec.get("shape")
            try:
                if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
                    size = int(np.prod(shape, dtype=object)) * ir.TensorType(tuple(shape), spec.get("dtype")).np_dtype.itemsize
            except (ir.IRError, TypeError, ValueError, KeyError, AttributeError):
                size = 0
            out[f"{prefix}{i}"] = (size, f"{kind[:-1]} {name[:80]!r} {spec.get('dtype')}{shape}"[:200])
    return out


def _npz_cap(declared: dict):
    """(limit, reason) for weights.npz: what np.savez writes for the declared arrays, at most MAX_WEIGHT_BYTES."""
    need = sum(b for b, _ in declared.values()) + len(declared) * NPY_ENTRY_OVERHEAD + 1024
    if need >= MAX_WEIGHT_BYTES:
        return MAX_WEIGHT_BYTES, ""
    return need, f" (graph.json declares {need - len(declared) * NPY_ENTRY_OVERHEAD - 1024} bytes of params and constants)"


def read_artifact(path, with_state=False):
    """Validate and read a .gcnn file -> (graph, weights dict, meta), and with_state the training state
    (name -> float32 array: optimizer slots, step; empty if saved uncompiled). Raises ArtifactError.

    meta.json and graph.json (small, capped) are read first; weights.npz is then read with a cap derived
    from the sizes graph.json declares for its params and constants, so a weights bomb is refused after
    reading at most what a valid file of that graph holds."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: no such file")
    meta_bytes, graph_bytes = _read_entries(path, {"meta.json": MAX_JSON_BYTES, "graph.json": MAX_JSON_BYTES})
    meta = _json(meta_bytes, path, "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: meta.json is not a {FORMAT} description")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{path}: format version {meta.get('version')!r} is not supported (this graphcnn reads {VERSION})")
    gdoc = _json(graph_bytes, path, "graph.json")
    pnames, cnames, snames = meta.get("params"), meta.get("consts", []), meta.get("state", [])
    if not all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in (pnames, cnames, snames)):
        raise ArtifactError(f"{path}: meta.json 'params'/'consts'/'state' must be lists of names")
    if len(set(snames)) != len(snames) or set(snames) & set(pnames):
        raise ArtifactError(f"{path}: meta.json 'state' names repeat or collide with params")
    if len(snames) > MAX_STATE_PER_PARAM * len(pnames) + 1:
        raise ArtifactError(f"{path}: meta.json lists {len(snames)} training state arrays for {len(pnames)} params")
    declared = _declared_entry_bytes(gdoc, pnames, cnames)
    # optimizer slots are shaped like a param and `step` is a scalar: none is larger than the largest param
    largest = max((b for k, (b, _) in declared.items() if k.startswith("p")), default=4)
    declared.update({f"s{i}": (max(largest, 4), f"training state {n[:80]!r}") for i, n in enumerate(snames)})
    (wdata,) = _read_entries(path, {"weights.npz": _npz_cap(declared)})
    _check_integrity(meta, graph_bytes, wdata, path)
    arrays = _read_npz(wdata, path, declared)
    del wdata
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
        if a.dtype != p.type.np_dtype or a.shape != p.shape:
            raise ArtifactError(f"{path}: weight {p.name!r} is {a.dtype}{list(a.shape)}, the graph needs "
                                f"{p.type.np_dtype}{list(p.shape)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ArtifactError(f"{path}: weight {p.name!r} contains NaN or infinity")
        weights[p.name] = a
    if not graph.outputs:
        raise ArtifactError(f"{path}: the graph has no outputs")
    # Runtime.predict feeds one batched input and concatenates batched outputs (what save_model writes)
    if len(graph.inputs) != 1 or not all(v.type.batched for v in graph.inputs + graph.outputs):
        raise ArtifactError(f"{path}: graph.json must have exactly one input, and batched (None, ...) inputs "
                            f"and outputs; found inputs {[str(v.type) for v in graph.inputs]}, "
                            f"outputs {[str(v.type) for v in graph.outputs]}")
    if not with_state:
        return graph, weights, meta
    state = {}
    for i, n in enumerate(snames):
        a = arrays[f"s{i}"]
        if a.dtype != np.float32 or not np.isfinite(a).all():
            raise ArtifactError(f"{path}: training state {n!r} must be finite float32 values")
        state[n] = a
    return graph, weights, meta, state


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


_NPY_DTYPES = (np.dtype("<f4"), np.dtype("<i4"), np.dtype("i1"), np.dtype("u1"))


def _read_npy(f, size, path, key):
    """Parse one .npy entry (stream `f` of `size` bytes) without trusting its header: the declared shape must
    match the bytes present exactly before anything is allocated; no pickles, only little-endian
    float32/int32. The data is read in 1 MiB pieces straight into the result (no second copy)."""
    try:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {major}.{minor}")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, EOFError) as e:
        raise ArtifactError(f"{path}: weights.npz entry {key} has a bad .npy header: {e}") from None
    if dtype.hasobject or dtype not in _NPY_DTYPES or dtype.byteorder == ">":
        raise ArtifactError(f"{path}: weights.npz entry {key} has unsupported dtype {dtype} "
                            f"(expected little-endian float32 or int32, or int8/uint8)")
    if not isinstance(shape, tuple) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise ArtifactError(f"{path}: weights.npz entry {key} has a bad shape {shape!r}")
    count = 1
    for d in shape:
        count *= d
    data_bytes = size - f.tell()
    if count * dtype.itemsize != data_bytes:
        raise ArtifactError(f"{path}: weights.npz entry {key} declares shape {list(shape)} ({count * dtype.itemsize} "
                            f"bytes) but holds {data_bytes} bytes of data")
    a = np.empty(shape, dtype, order="F" if fortran else "C")
    flat = memoryview(a.reshape(-1, order="A")).cast("B")
    pos = 0
    while pos < data_bytes:
        piece = f.read(min(1 << 20, data_bytes - pos))
        if not piece:
            raise ArtifactError(f"{path}: weights.npz entry {key} ends after {pos} of {data_bytes} data bytes")
        flat[pos:pos + len(piece)] = piece
        pos += len(piece)
    # C order and native byte order (no-ops for what np.save writes on little-endian hosts); np.asarray keeps a
    # 0-d array 0-d (np.ascontiguousarray would make it (1,): the saved `step` scalar)
    return np.asarray(a, dtype.newbyteorder("="), order="C")


def _read_npz(data, path, declared: dict):
    """The arrays of weights.npz by key; each entry is capped by what graph.json declares for it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            listed = z.infolist()
            infos = {i.filename: i for i in listed}
            if len(infos) != len(listed):    # readers disagree on which duplicate wins: refuse
                raise ArtifactError(f"{path}: weights.npz has duplicate entries")
            if sorted(infos) != sorted(f"{k}.npy" for k in declared):
                raise ArtifactError(f"{path}: weights.npz holds {sorted(infos)[:6]}, expected {len(declared)} arrays")
            out = {}
            for k, (nbytes, what) in declared.items():
                info = infos[f"{k}.npy"]
                _check_entry_size(info, path, nbytes + MAX_NPY_HEADER + 128, "weights.npz ",
                                  f" (graph.json declares {nbytes} bytes for {what})")
                with z.open(info) as f:
                    out[k] = _read_npy(f, info.file_size, path, k)
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
        # the runtime's weights never change: packed once for the GEMM kernels (frozen_params)
        self.executable = compile_graph(graph, backend, weights, passes="inference", frozen_params=True)
        self.backend = self.executable.backend

    def predict(self, x, batch_size=256):
        """Outputs for x (N, ...) as float32. x must have one of the shapes `conform_input` accepts (the
        model's input shape, or the forms DESIGN.md lists) and finite values."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise GraphcnnError(f"predict: batch_size must be a positive int, got {batch_size!r}")
        a = conform_input(x, self.input_shape, "predict", self.name)
        if a.shape[0] <= batch_size:         # one call: its result is already a fresh array
            return self.executable(a)
        return np.concatenate([self.executable(a[s:s + batch_size]) for s in range(0, a.shape[0], batch_size)])

    __call__ = predict


def load(path, backend=None) -> Runtime:
    """Load a .gcnn artifact as an inference runtime (validated; never executes code from the file)."""
    graph, weights, meta = read_artifact(path)
    return Runtime(graph, weights, meta, backend)


def model_from_artifact(path):
    """A trainable model from a .gcnn file (gc.load_model)."""
    from .model import load_model
    return load_model(path)


def check_config_matches_graph(model, graph, path):
    """Refuse a model (built from meta.json's config) whose inference graph differs from graph.json.

    Only the graph is built (types and shapes, no weight arrays), so a hostile config costs no memory;
    the error quotes the first line where the two graphs' text forms differ."""
    from ir.text import print_graph
    try:
        derived = model._graph(training=False)
    except (GraphcnnError, ir.IRError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: meta.json's model config does not build: {e}") from None
    if derived == graph:
        return
    ours = print_graph(derived, inline_consts=False).splitlines()
    theirs = print_graph(graph, inline_consts=False).splitlines()
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    line = lambda lines: lines[i].strip()[:160] if i < len(lines) else "(end of graph)"  # noqa: E731
    raise ArtifactError(f"{path}: meta.json's model config describes a different model than graph.json "
                        f"(line {i + 1}: config gives {line(ours)!r}, graph.json holds {line(theirs)!r})")
