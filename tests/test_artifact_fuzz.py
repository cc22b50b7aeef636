"""Fuzzing the .gcnn loader: mutants of valid artifacts must be refused with an ArtifactError naming the
file, or load as a model whose predictions are identical to the original's. Never a crash, a hang, another
exception type, or a model that silently computes something else.

Two kinds of mutant:
- plain: the bytes as damaged (truncation, bit flips, edited entries, zip tricks). The integrity digests
  in meta.json make any change of meaning detectable, so "accepted" must mean "identical predictions".
- re-signed: the same content edits, but with meta.json's digests recomputed, as a buggy or hostile
  writer would. This reaches the structural validation (IR, shapes, dtypes, npy headers). An accepted
  re-signed mutant is a different but well-formed model: it must predict finite outputs of its declared
  shape, and the LLVM backend (native code, run in a subprocess so a segfault is seen) must agree with
  the NumPy backend.
"""
from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest

import graphcnn as gc
from graphcnn import layers as L
from graphcnn.artifact import INTEGRITY, ArtifactError, integrity_digests, read_artifact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20240611
N_RANDOM = 1100          # random mutants on top of the targeted ones
CASE_SECONDS = 5.0       # a single load+predict taking longer than this counts as a hang
LLVM_SAMPLE = 20         # accepted mutants re-checked on the LLVM backend in a subprocess


# ---------------------------------------------------------------------------------------------------------
# base artifacts

def _tiny_conv():
    return gc.Sequential([L.Input((8, 8, 2)), L.Conv2D(3, (3, 3), activation="relu"), L.MaxPool2D((2, 2)),
                          L.Flatten(), L.Dense(4, activation="softmax")], name="tinyconv", seed=3)


def _seed_dense():
    # examples/seed_dense.py, built here so the test does not depend on the example file
    return gc.Sequential([L.Dense(10, input_shape=(784,), activation="sigmoid")], name="seed_dense", seed=5)


def _entries(blob: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _zip(entries, method=zipfile.ZIP_DEFLATED) -> bytes:
    """entries: dict or list of (name, bytes) pairs (a list allows duplicate names)."""
    out = io.BytesIO()
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(out, "w", method) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "Duplicate name": intended here
        for name, data in items:
            z.writestr(name, data)
    return out.getvalue()


def _resign(entries: dict) -> dict:
    """Recompute meta.json's digests over the (edited) entries, as a writer would."""
    entries = dict(entries)
    meta = json.loads(entries["meta.json"])
    meta[INTEGRITY] = integrity_digests(meta, entries["graph.json"], entries["weights.npz"])
    entries["meta.json"] = json.dumps(meta, indent=1).encode()
    return entries


class Base:
    def __init__(self, model, path, rng):
        model.save(path)
        self.blob = open(path, "rb").read()
        self.entries = _entries(self.blob)
        self.meta = json.loads(self.entries["meta.json"])
        self.graph = json.loads(self.entries["graph.json"])
        self.arrays = dict(np.load(io.BytesIO(self.entries["weights.npz"]), allow_pickle=False))
        self.input_shape = tuple(self.graph["inputs"][0]["shape"][1:])
        self.x = rng.standard_normal((3,) + self.input_shape).astype(np.float32)
        self.expected = gc.load(path, backend="numpy").predict(self.x)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    rng = np.random.default_rng(SEED)
    return [Base(_tiny_conv(), str(d / "tinyconv.gcnn"), rng), Base(_seed_dense(), str(d / "seed_dense.gcnn"), rng)]


# ---------------------------------------------------------------------------------------------------------
# mutators: each returns (label, {entry: bytes} or raw zip bytes, resigned?)

def _flip_bits(data: bytes, rng, max_flips=8) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(b)
    for _ in range(int(rng.integers(1, max_flips + 1))):
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))
    return bytes(b)


def _npz(arrays: dict, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    if allow_pickle:
        with zipfile.ZipFile(buf, "w") as z:
            for k, a in arrays.items():
                inner = io.BytesIO()
                np.lib.format.write_array(inner, np.asanyarray(a), allow_pickle=True)
                z.writestr(f"{k}.npy", inner.getvalue())
    else:
        np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_with_header(header: dict, data: bytes, version=(1, 0)) -> bytes:
    """A .npy file written by hand, so the header can say anything (the .npy layout: magic, version,
    little-endian header length (2 bytes for 1.0, 4 after), the header dict's repr padded to 64 bytes)."""
    text = repr({k: header[k] for k in ("descr", "fortran_order", "shape")})
    size_bytes = 2 if version == (1, 0) else 4
    pad = -(6 + 2 + size_bytes + len(text) + 1) % 64
    text = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY" + bytes(version) + len(text).to_bytes(size_bytes, "little") + text + data


HUGE = [1 << 62, 1 << 40, 2 ** 31, 2 ** 31 - 1, 10 ** 30, -1, -(1 << 40), 0]
WEIRD = [None, True, False, 0, -1, 1 << 70, 3.5, float("nan"), float("inf"), "", "x", "f64", "linear", [], {},
         [1, 2], [[0, 0], [0, 0]], {"a": 1}, "../../etc/passwd", "\u0000", "relu", "i32", [None], [1 << 40]]


def _json_paths(doc, prefix=()):
    """Every (path) into a JSON document, containers included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _json_paths(v, prefix + (i,))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _mutate_json(doc, rng):
    """One random structural edit of a JSON document; returns (description, new doc)."""
    doc = copy.deepcopy(doc)
    paths = list(_json_paths(doc))[1:]
    path = paths[int(rng.integers(len(paths)))]
    parent, key = _get(doc, path[:-1]), path[-1]
    kind = int(rng.integers(9))
    if kind == 0:                          # replace with a weird value
        parent[key] = copy.deepcopy(WEIRD[int(rng.integers(len(WEIRD)))])
        what = "weird"
    elif kind == 1:                        # replace ints with huge/negative/zero sizes
        if isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] = HUGE[int(rng.integers(len(HUGE)))]
        else:
            parent[key] = int(rng.integers(-3, 100))
        what = "number"
    elif kind == 2:                        # delete
        del parent[key]
        what = "delete"
    elif kind == 3 and isinstance(parent[key], dict):   # extra key
        parent[key]["extra_" + str(int(rng.integers(100)))] = int(rng.integers(10))
        what = "extra key"
    elif kind == 4 and isinstance(parent, list):     # duplicate an element (duplicate names / nodes)
        parent.insert(key, copy.deepcopy(parent[key]))
        what = "duplicate"
    elif kind == 5 and isinstance(parent, list) and len(parent) > 1:   # swap order (cycles, use-before-def)
        j = int(rng.integers(len(parent)))
        parent[key], parent[j] = parent[j], parent[key]
        what = "swap"
    elif kind == 6 and isinstance(parent[key], str):  # rename: unknown ops, undefined references
        parent[key] = parent[key] + rng.choice(["_x", "", "2", "/"]) if rng.random() < 0.7 else "conv3d"
        what = "rename"
    elif kind == 7:                         # wrap in deep nesting
        parent[key] = _deep(int(rng.choice([3, 50, 5000, 100000])))
        what = "nest"
    else:                                   # type confusion: number <-> string, list <-> dict
        v = parent[key]
        parent[key] = str(v) if not isinstance(v, str) else ([v] if rng.random() < 0.5 else {"v": v})
        what = "retype"
    return f"{what} at {'/'.join(map(str, path))}", doc


def _targeted_graph_mutations(base):
    """Hand-picked IR attacks on graph.json (each a (label, doc))."""
    g = base.graph
    out = []

    def edit(label, fn):
        d = copy.deepcopy(g)
        fn(d)
        out.append((label, d))

    nodes = g["nodes"]
    last = len(nodes) - 1
    edit("version 2", lambda d: d.__setitem__("version", 2))
    edit("version '1'", lambda d: d.__setitem__("version", "1"))
    edit("format other", lambda d: d.__setitem__("format", "onnx"))
    edit("unknown op", lambda d: d["nodes"][0].__setitem__("op", "exec"))
    edit("undefined input ref", lambda d: d["nodes"][0]["inputs"].__setitem__(0, "nope"))
    edit("cycle: first node reads last output", lambda d: d["nodes"][0]["inputs"].__setitem__(
        0, d["nodes"][last]["outputs"][0]["name"]))
    edit("self loop", lambda d: d["nodes"][last]["inputs"].__setitem__(0, d["nodes"][last]["outputs"][0]["name"]))
    edit("reversed nodes", lambda d: d["nodes"].reverse())
    edit("duplicate node", lambda d: d["nodes"].append(copy.deepcopy(d["nodes"][0])))
    edit("duplicate param name", lambda d: d["params"].append(copy.deepcopy(d["params"][0])))
    edit("output name = input name", lambda d: d["nodes"][0]["outputs"][0].__setitem__("name", "x"))
    edit("no outputs", lambda d: d.__setitem__("outputs", []))
    edit("undefined output", lambda d: d.__setitem__("outputs", ["ghost"]))
    edit("output is param", lambda d: d.__setitem__("outputs", [d["params"][0]["name"]]))
    edit("update on inference graph", lambda d: d.__setitem__("updates", {d["params"][0]["name"]: d["outputs"][0]}))
    edit("input dtype f64", lambda d: d["inputs"][0].__setitem__("dtype", "f64"))
    edit("input dtype i32", lambda d: d["inputs"][0].__setitem__("dtype", "i32"))
    edit("input dtype object", lambda d: d["inputs"][0].__setitem__("dtype", "O"))
    edit("input without batch", lambda d: d["inputs"][0]["shape"].__setitem__(0, 3))
    edit("huge input dim", lambda d: d["inputs"][0]["shape"].__setitem__(1, 1 << 40))
    edit("negative input dim", lambda d: d["inputs"][0]["shape"].__setitem__(1, -8))
    edit("zero input dim", lambda d: d["inputs"][0]["shape"].__setitem__(1, 0))
    edit("float dim", lambda d: d["inputs"][0]["shape"].__setitem__(1, 8.0))
    edit("bool dim", lambda d: d["inputs"][0]["shape"].__setitem__(1, True))
    edit("string dim", lambda d: d["inputs"][0]["shape"].__setitem__(1, "8"))
    edit("rank 0 input", lambda d: d["inputs"][0].__setitem__("shape", []))
    edit("huge param shape", lambda d: d["params"][0].__setitem__("shape", [1 << 31, 1 << 31]))
    edit("attrs missing", lambda d: d["nodes"][0].pop("attrs"))
    edit("attrs list", lambda d: d["nodes"][0].__setitem__("attrs", []))
    edit("extra attr", lambda d: d["nodes"][0]["attrs"].__setitem__("shell", "rm -rf /"))
    edit("extra node key", lambda d: d["nodes"][0].__setitem__("comment", "harmless?"))
    edit("node outputs two", lambda d: d["nodes"][0]["outputs"].append(copy.deepcopy(d["nodes"][0]["outputs"][0])))
    edit("node outputs none", lambda d: d["nodes"][0].__setitem__("outputs", []))
    edit("node inputs none", lambda d: d["nodes"][0].__setitem__("inputs", []))
    edit("node inputs extra", lambda d: d["nodes"][0]["inputs"].append("x"))
    edit("node inputs int", lambda d: d["nodes"][0]["inputs"].__setitem__(0, 0))
    edit("declared output shape wrong", lambda d: d["nodes"][0]["outputs"][0]["shape"].__setitem__(-1, 999))
    edit("activation unknown", lambda d: [n["attrs"].__setitem__("activation", "eval") for n in d["nodes"]
                                          if "activation" in n["attrs"]])
    edit("activation int", lambda d: [n["attrs"].__setitem__("activation", 1) for n in d["nodes"]
                                      if "activation" in n["attrs"]])
    for attr, vals in (("stride", [[0, 0], [-1, 1], [1 << 40, 1], [1], 1, "1", [1.5, 1], [True, True]]),
                       ("dilation", [[0, 1], [1 << 31, 1], [1, 1, 1]]),
                       ("padding", [[[-5, 0], [0, 0]], [[1 << 40, 0], [0, 0]], [0, 0], "same", [[0], [0]]]),
                       ("pool", [[0, 0], [100, 100], [-2, 2], [1 << 62, 2]]),
                       ("axis", [5, -5, 1.0, None, "1"])):
        for v in vals:
            edit(f"{attr}={v!r}", lambda d, attr=attr, v=v: [n["attrs"].__setitem__(attr, copy.deepcopy(v))
                                                               for n in d["nodes"] if attr in n["attrs"]])
    edit("deeply nested attrs", lambda d: d["nodes"][0]["attrs"].__setitem__("activation", _deep(100000)))
    edit("graph name weird", lambda d: d.__setitem__("name", "../../x\n"))
    edit("value name with %", lambda d: d["params"][0].__setitem__("name", "%w"))
    edit("consts declared without data", lambda d: d["consts"].append({"name": "c9", "shape": [2], "dtype": "f32"}))
    return out


def _deep(n):
    """A placeholder that _dumps replaces by n nested lists (json.dumps itself cannot write that deep)."""
    return f"__DEEP_{n}__"


def _dumps(doc) -> bytes:
    text = json.dumps(doc)
    while "\"__DEEP_" in text:
        i = text.index("\"__DEEP_")
        j = text.index("__\"", i + 7)
        n = int(text[i + 8:j])
        text = text[:i] + "[" * n + "0" + "]" * n + text[j + 3:]
    return text.encode()


def _deep_text(n):
    return ("[" * n + "]" * n).encode()


def _targeted_weight_mutations(base):
    """weights.npz attacks: each a (label, npz bytes)."""
    a = base.arrays
    k0 = "p0"
    out = []

    def with_(label, **changes):
        d = dict(a)
        for k, v in changes.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
        out.append((label, _npz(d)))

    with_("float64 weight", p0=a[k0].astype(np.float64))
    with_("float16 weight", p0=a[k0].astype(np.float16))
    with_("int32 weight", p0=a[k0].astype(np.int32))
    with_("complex weight", p0=a[k0].astype(np.complex64))
    with_("bool weight", p0=a[k0] > 0)
    with_("big-endian weight", p0=a[k0].astype(">f4"))
    with_("fortran-order weight", p0=np.asfortranarray(a[k0]))
    with_("transposed shape", p0=np.ascontiguousarray(a[k0].T))
    with_("flattened shape", p0=a[k0].reshape(-1))
    with_("extra dim", p0=a[k0][None])
    with_("empty weight", p0=np.zeros((0,), np.float32))
    with_("scalar weight", p0=np.float32(1.0))
    with_("NaN weight", p0=np.where(np.arange(a[k0].size).reshape(a[k0].shape) == 0, np.nan, a[k0]).astype(np.float32))
    with_("inf weight", p0=np.full_like(a[k0], np.inf))
    with_("missing array", p0=None)
    with_("extra array", p9=np.zeros(3, np.float32))
    with_("structured dtype", p0=np.zeros(a[k0].shape, dtype=[("a", "<f4")]))
    with_("string dtype", p0=np.full(a[k0].shape, "x"))
    d = dict(a)
    d[k0] = np.empty(a[k0].shape, dtype=object)
    d[k0][...] = 1.0
    out.append(("object array (pickle)", _npz(d, allow_pickle=True)))
    # a pickle that would run code if unpickled
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    hdr = {"descr": "|O", "fortran_order": False, "shape": (1,)}
    out.append(("raw pickle payload", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()},
                                            f"{k0}.npy": _npy_with_header(hdr, evil)})))
    for shape in [(1 << 40,), (1 << 31, 1 << 31), (2 ** 62,), (-1,), (3, -3), (10 ** 20,)]:
        hdr = {"descr": "<f4", "fortran_order": False, "shape": shape}
        out.append((f"npy header shape {shape} with tiny data",
                    _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()}, f"{k0}.npy": _npy_with_header(hdr, b"\0" * 16)})))
    hdr = {"descr": "<f4", "fortran_order": False, "shape": a[k0].shape}
    raw = a[k0].tobytes()
    out.append(("npy data short", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()},
                                       f"{k0}.npy": _npy_with_header(hdr, raw[:-4])})))
    out.append(("npy trailing bytes", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()},
                                           f"{k0}.npy": _npy_with_header(hdr, raw + b"\0\0\0\0")})))
    out.append(("npy version 3", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()},
                                      f"{k0}.npy": _npy_with_header(hdr, raw, (3, 0))})))
    out.append(("npy version 2 (valid)", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()},
                                              f"{k0}.npy": _npy_with_header(hdr, raw, (2, 0))})))
    bad_hdr = _npy(a[k0]).replace(b"'descr'", b"'descr' ", 1)
    out.append(("npy header edited", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()}, f"{k0}.npy": bad_hdr})))
    evil_hdr = b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + \
        b"{'descr': __import__('os').system('echo pwned'), 'fortran_order': False, 'shape': (1,)}".ljust(117) + b"\n"
    out.append(("npy header code", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()}, f"{k0}.npy": evil_hdr})))
    out.append(("npz bomb entry", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items()},
                                       f"{k0}.npy": _npy_with_header({"descr": "<f4", "fortran_order": False,
                                                                      "shape": (1 << 22,)}, bytes(1 << 24))})))
    out.append(("npz traversal name", _zip({**{f"{k}.npy": _npy(v) for k, v in a.items() if k != k0},
                                           f"../{k0}.npy": _npy(a[k0])})))
    out.append(("npz duplicate entry", _zip([(f"{k}.npy", _npy(v)) for k, v in a.items()] +
                                            [(f"{k0}.npy", _npy(np.zeros_like(a[k0])))])))
    out.append(("npz nested zip", _zip({f"{k}.npy": _npz(a) for k in a})))
    out.append(("npz not a zip", b"\x93NUMPY" + bytes(100)))
    out.append(("npz empty", b""))
    return out


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def _zip_attacks(base):
    """Archive-level attacks on the outer file: each a (label, raw .gcnn bytes)."""
    e = base.entries
    out = [
        ("empty file", b""),
        ("not a zip", b"hello world" * 10),
        ("only the zip magic", b"PK\x03\x04"),
        ("stored instead of deflated (valid)", _zip(e, zipfile.ZIP_STORED)),
        ("lzma compressed (valid)", _zip(e, zipfile.ZIP_LZMA)),
        ("bzip2 compressed (valid)", _zip(e, zipfile.ZIP_BZIP2)),
        ("reordered entries (valid)", _zip(dict(reversed(list(e.items()))))),
        ("missing weights", _zip({k: v for k, v in e.items() if k != "weights.npz"})),
        ("missing meta", _zip({k: v for k, v in e.items() if k != "meta.json"})),
        ("extra entry", _zip({**e, "run.py": b"import os; os.system('echo pwned')"})),
        ("traversal name", _zip({**{k: v for k, v in e.items() if k != "graph.json"}, "../../graph.json": e["graph.json"]})),
        ("absolute name", _zip({**{k: v for k, v in e.items() if k != "graph.json"}, "/graph.json": e["graph.json"]})),
        ("directory name", _zip({**{k: v for k, v in e.items() if k != "graph.json"}, "x/graph.json": e["graph.json"]})),
        ("duplicate entry", _zip(list(e.items()) + [("graph.json", b"{}")])),
        ("duplicate entry same bytes", _zip(list(e.items()) + [("weights.npz", e["weights.npz"])])),
        ("nested zip as graph.json", _zip({**e, "graph.json": base.blob})),
        ("nested zip as meta.json", _zip({**e, "meta.json": base.blob})),
        ("whole file as weights.npz", _zip({**e, "weights.npz": base.blob})),
        ("zip bomb graph.json", _zip({**e, "graph.json": b" " * (40 << 20)})),
        ("zip bomb weights.npz", _zip({**e, "weights.npz": bytes(64 << 20)})),
        ("zip bomb extra entry", _zip({**e, "pad": bytes(64 << 20)})),
        ("deeply nested meta text", _zip({**e, "meta.json": _deep_text(200000)})),
        ("deeply nested graph text", _zip({**e, "graph.json": _deep_text(200000)})),
        ("meta not utf-8", _zip({**e, "meta.json": b"\xff\xfe" + e["meta.json"]})),
        ("meta utf-16", _zip({**e, "meta.json": e["meta.json"].decode().encode("utf-16")})),
        ("meta is a list", _zip({**e, "meta.json": b"[]"})),
        ("meta is null", _zip({**e, "meta.json": b"null"})),
        ("prepended junk (valid zip)", b"#!/bin/sh\n" + base.blob),
        ("appended junk", base.blob + b"\0" * 100),
        ("encrypted flag", _set_encrypted(base.blob)),
    ]
    return out


def _set_encrypted(blob: bytes) -> bytes:
    b = bytearray(blob)
    i = b.find(b"PK\x01\x02")       # central directory: flag bits at offset 8
    while i != -1:
        b[i + 8] |= 1
        i = b.find(b"PK\x01\x02", i + 4)
    return bytes(b)


def _targeted_meta_mutations(base):
    m = base.meta
    out = []

    def edit(label, fn):
        d = copy.deepcopy(m)
        fn(d)
        out.append((label, d))

    edit("meta version 2", lambda d: d.__setitem__("version", 2))
    edit("meta version 0", lambda d: d.__setitem__("version", 0))
    edit("meta format", lambda d: d.__setitem__("format", "keras"))
    edit("meta params reversed", lambda d: d["params"].reverse())
    edit("meta params missing", lambda d: d.pop("params"))
    edit("meta params not list", lambda d: d.__setitem__("params", "p0"))
    edit("meta params ints", lambda d: d.__setitem__("params", [0, 1]))
    edit("meta params extra", lambda d: d["params"].append("ghost"))
    edit("meta consts extra", lambda d: d["consts"].append("ghost"))
    edit("meta consts huge list", lambda d: d.__setitem__("consts", ["c"] * 100000))
    edit("meta inputs lie", lambda d: d["inputs"][0]["shape"].__setitem__(1, 99))
    edit("meta outputs lie", lambda d: d["outputs"][0].__setitem__("name", "other"))
    edit("meta integrity missing", lambda d: d.pop(INTEGRITY))
    edit("meta integrity algorithm md5", lambda d: d[INTEGRITY].__setitem__("algorithm", "md5"))
    edit("meta integrity not dict", lambda d: d.__setitem__(INTEGRITY, "ok"))
    edit("meta graphcnn_version", lambda d: d.__setitem__("graphcnn_version", "99.0"))
    edit("meta training changed", lambda d: d.__setitem__("training", {"loss": "mse"}))
    edit("meta deep nesting", lambda d: d.__setitem__("training", _deep(50000)))
    edit("meta extra key", lambda d: d.__setitem__("note", "hi"))
    return out


# ---------------------------------------------------------------------------------------------------------
# mutant generation

def _mutants(bases, rng):
    """Yield (base index, label, zip bytes, resigned)."""
    for bi, base in enumerate(bases):
        e = base.entries
        for label, doc in _targeted_graph_mutations(base):
            g = _dumps(doc)
            yield bi, "graph: " + label, _zip({**e, "graph.json": g}), False
            yield bi, "graph (re-signed): " + label, _zip(_resign({**e, "graph.json": g})), True
        for label, npz in _targeted_weight_mutations(base):
            yield bi, "weights: " + label, _zip({**e, "weights.npz": npz}), False
            yield bi, "weights (re-signed): " + label, _zip(_resign({**e, "weights.npz": npz})), True
        for label, doc in _targeted_meta_mutations(base):
            mj = _dumps(doc)
            yield bi, "meta: " + label, _zip({**e, "meta.json": mj}), False
            if INTEGRITY in doc and isinstance(doc[INTEGRITY], dict) and doc[INTEGRITY].get("algorithm") == "sha256":
                try:
                    resigned = _resign({**e, "meta.json": mj})
                except RecursionError:
                    continue
                yield bi, "meta (re-signed): " + label, _zip(resigned), True
        for label, blob in _zip_attacks(base):
            yield bi, "zip: " + label, blob, False
        # meaning-preserving edits that must load identically
        yield bi, "meta compact whitespace", _zip({**e, "meta.json": json.dumps(base.meta).encode()}), False
        yield bi, "meta sorted keys", _zip({**e, "meta.json": json.dumps(base.meta, sort_keys=True).encode()}), False
        yield bi, "graph compact (re-signed)", _zip(_resign({**e, "graph.json": json.dumps(base.graph).encode()})), True

    kinds = ["truncate", "zip bitflip", "entry bitflip", "entry bitflip re-signed", "npy bitflip",
             "npy bitflip re-signed", "graph json", "graph json re-signed", "meta json", "meta json re-signed"]
    for i in range(N_RANDOM):
        bi = i % len(bases)
        base = bases[bi]
        e = base.entries
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "truncate":
            n = int(rng.integers(len(base.blob)))
            yield bi, f"truncate at {n}", base.blob[:n], False
        elif kind == "zip bitflip":
            yield bi, kind, _flip_bits(base.blob, rng), False
        elif kind.startswith("entry bitflip"):
            name = ["meta.json", "graph.json", "weights.npz"][int(rng.integers(3))]
            new = {**e, name: _flip_bits(e[name], rng, 3)}
            resigned = kind.endswith("re-signed") and name != "meta.json"
            yield bi, f"{kind} {name}", _zip(_resign(new) if resigned else new), resigned
        elif kind.startswith("npy bitflip"):
            inner = _entries(e["weights.npz"])
            k = sorted(inner)[int(rng.integers(len(inner)))]
            inner[k] = _flip_bits(inner[k], rng, 3)
            new = {**e, "weights.npz": _zip(inner)}
            resigned = kind.endswith("re-signed")
            yield bi, f"{kind} {k}", _zip(_resign(new) if resigned else new), resigned
        elif kind.startswith("graph json"):
            label, doc = _mutate_json(base.graph, rng)
            new = {**e, "graph.json": _dumps(doc)}
            resigned = kind.endswith("re-signed")
            yield bi, f"{kind}: {label}", _zip(_resign(new) if resigned else new), resigned
        else:
            label, doc = _mutate_json(base.meta, rng)
            new = {**e, "meta.json": _dumps(doc)}
            resigned = kind.endswith("re-signed") and isinstance(doc.get(INTEGRITY), dict)
            if resigned:
                try:
                    new = _resign(new)
                except (TypeError, ValueError, AttributeError, RecursionError):
                    resigned = False
            yield bi, f"{kind}: {label}", _zip(new), resigned


# ---------------------------------------------------------------------------------------------------------
# the oracle

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _check_one(path, base, resigned):
    """'refused' | 'identical' | 'valid-different'; raises AssertionError on a violation."""
    try:
        rt = gc.load(path, backend="numpy")
    except ArtifactError as err:
        assert path in str(err), f"ArtifactError does not name the file: {err}"
        return "refused"
    # accepted: it must be a well-formed model
    if rt.input_shape == base.input_shape:
        x = base.x
    else:
        x = np.random.default_rng(0).standard_normal((3,) + rt.input_shape).astype(np.float32)
    y = rt.predict(x)
    if rt.input_shape == base.input_shape and y.shape == base.expected.shape and np.array_equal(y, base.expected):
        return "identical"
    assert resigned, (f"accepted a changed model without re-signing: predictions differ "
                      f"(max diff {np.max(np.abs(y - base.expected)) if y.shape == base.expected.shape else y.shape})")
    want = tuple(rt.graph.outputs[0].type.concrete(x.shape[0]))
    assert y.shape == want and y.dtype == np.float32, f"output {y.dtype}{y.shape}, declared {want}"
    return "valid-different"


LLVM_CHILD = r"""
import sys, json
import numpy as np
sys.path.insert(0, sys.argv[1])
import graphcnn as gc
jobs = json.loads(sys.argv[2])
for path, xpath in jobs:
    x = np.load(xpath)
    print("START", path, flush=True)
    try:
        rt = gc.load(path, backend="llvm")
    except gc.ArtifactError:
        print("REFUSED", path, flush=True)
        continue
    y = rt.predict(x)
    ref = gc.load(path, backend="numpy").predict(x)
    ok = y.shape == ref.shape and bool(np.allclose(y, ref, rtol=1e-5, atol=1e-6, equal_nan=True))
    print("OK" if ok else "MISMATCH", path, float(np.nanmax(np.abs(y - ref))) if y.shape == ref.shape else -1, flush=True)
"""


def test_fuzz_artifact_loader(bases, tmp_path):
    rng = np.random.default_rng(SEED)
    counts = {"cases": 0, "refused": 0, "identical": 0, "valid-different": 0}
    failures, accepted_paths = [], []
    old = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    try:
        for n, (bi, label, blob, resigned) in enumerate(_mutants(bases, rng)):
            path = str(tmp_path / f"m{n}.gcnn")
            with open(path, "wb") as f:
                f.write(blob)
            counts["cases"] += 1
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                outcome = _check_one(path, bases[bi], resigned)
            except Hang:
                failures.append(f"{label}: hang (> {CASE_SECONDS} s)")
                continue
            except AssertionError as err:
                failures.append(f"{label}: {err}")
                continue
            except BaseException as err:  # noqa: BLE001 - any other exception type is a finding
                failures.append(f"{label}: {type(err).__name__}: {str(err)[:200]}")
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[outcome] += 1
            if outcome == "refused":
                os.remove(path)
            else:
                accepted_paths.append((path, bi, outcome, label))
    finally:
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - t0

    # native code only ever sees validated graphs; run a sample of the accepted ones on LLVM in a child
    # process so that a segfault shows up as a failure here instead of killing pytest
    different = [a for a in accepted_paths if a[2] == "valid-different"]
    same = [a for a in accepted_paths if a[2] == "identical"]
    pick = np.random.default_rng(SEED)
    sample = different[:LLVM_SAMPLE // 2] + [same[i] for i in pick.permutation(len(same))[:LLVM_SAMPLE - min(
        len(different), LLVM_SAMPLE // 2)]]
    jobs = []
    for path, bi, _, _ in sample:
        shape = gc.load(path, backend="numpy").input_shape
        xpath = path + ".x.npy"
        np.save(xpath, np.random.default_rng(1).standard_normal((5,) + shape).astype(np.float32))
        jobs.append((path, xpath))
    llvm_crashes = 0
    if jobs:
        proc = subprocess.run([sys.executable, "-c", LLVM_CHILD, ROOT, json.dumps(jobs)], capture_output=True,
                              text=True, timeout=120)
        lines = proc.stdout.splitlines()
        if proc.returncode != 0:
            llvm_crashes = 1
            started = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("START")]
            failures.append(f"llvm child died with code {proc.returncode} on {started[-1:]}: {proc.stderr[-500:]}")
        failures += [f"llvm disagrees with numpy: {ln}" for ln in lines if ln.startswith("MISMATCH")]
        assert sum(ln.startswith(("OK", "REFUSED")) for ln in lines) == len(jobs) or failures
    print(f"\nartifact fuzz: {counts['cases']} cases in {elapsed:.1f} s: {counts['refused']} refused, "
          f"{counts['identical']} accepted-identical, {counts['valid-different']} accepted re-signed valid models, "
          f"{len(failures)} failures; llvm subprocess sample {len(jobs)}, crashes {llvm_crashes}")
    assert counts["cases"] >= 1000
    assert not failures, f"{len(failures)} loader failures:\n" + "\n".join(failures[:40])


def test_plain_corruption_is_refused_not_misread(bases, tmp_path):
    """Spot checks with exact expectations: a flipped weight mantissa is caught by the digest; re-signing
    the same change yields a model that predicts exactly what the changed weights say."""
    base = bases[1]
    arrays = dict(base.arrays)
    w = arrays["p0"].copy()
    w[0, 0] = np.float32(w[0, 0] + 0.5)
    arrays["p0"] = w
    npz = _npz(arrays)
    p1 = str(tmp_path / "flip.gcnn")
    open(p1, "wb").write(_zip({**base.entries, "weights.npz": npz}))
    with pytest.raises(ArtifactError, match="weights.npz does not match its sha256"):
        read_artifact(p1)
    p2 = str(tmp_path / "resigned.gcnn")
    open(p2, "wb").write(_zip(_resign({**base.entries, "weights.npz": npz})))
    y = gc.load(p2, backend="numpy").predict(base.x)
    xf = base.x.reshape(len(base.x), -1).astype(np.float64)
    ref = 1 / (1 + np.exp(-(xf @ w.astype(np.float64) + arrays["p1"])))   # Dense(10, sigmoid) by hand
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, base.expected, atol=1e-7)
