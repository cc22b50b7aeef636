"""JSON form of a graph for artifacts (versioned). Constant data travels separately (an .npz)."""
from __future__ import annotations

import json
import re

import numpy as np

from .graph import Graph
from .types import IRError, TensorType

FORMAT = "graphcnn-ir"
VERSION = 1
# deepest JSON nesting read (attributes nest 3 deep, constant data as deep as its rank): deeper documents
# are refused before json.loads, whose recursive scanner would otherwise hit Python's recursion limit
MAX_JSON_DEPTH = 64


# a JSON string or one bracket. The string's two alternatives are disjoint, and an unterminated string
# runs to the end of the text: every character is scanned once, never re-scanned from a quote inside a
# string (an escaped one), which would be quadratic
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z)|[\[\]{}]')


def json_too_deep_at(text: str, start: int = 0, limit: int = MAX_JSON_DEPTH) -> int:
    """Index of the first bracket nested deeper than `limit` in the JSON value starting at text[start]
    (or in the whole document), -1 if there is none. One linear pass over brackets; strings are skipped."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, start):
        c = m.group()[0]
        if c in "[{":
            depth += 1
            if depth > limit:
                return m.start()
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                return -1
        elif depth == 0:
            return -1           # the value is a string
    return -1


def _position(text: str, index: int) -> str:
    """'line L, column C' (1-based) of text[index]."""
    line_start = text.rfind("\n", 0, index) + 1
    return f"line {text.count(chr(10), 0, index) + 1}, column {index - line_start + 1}"


def graph_to_json(g: Graph) -> dict:
    """A JSON-ready dict; constants are listed by name/type only (data goes in the weights file)."""
    spec = lambda v: {"name": v.name, "shape": list(v.shape), "dtype": v.dtype}  # noqa: E731
    return {
        "format": FORMAT, "version": VERSION, "name": g.name,
        "inputs": [spec(v) for v in g.inputs],
        "params": [spec(v) for v in g.params],
        "consts": [spec(v) for v in g.const_values],
        "nodes": [{"op": n.op, "inputs": [v.name for v in n.inputs],
                   "outputs": [spec(v) for v in n.outputs],
                   "attrs": json.loads(json.dumps(n.attrs))} for n in g.nodes],
        "outputs": [v.name for v in g.outputs],
        "updates": {k: v.name for k, v in g.updates.items()},
    }


def _get(d, key, typ, where):
    if not isinstance(d, dict) or key not in d:
        raise IRError(f"IR JSON: {where} is missing {key!r}")
    val = d[key]
    if not isinstance(val, typ):
        raise IRError(f"IR JSON: {where}.{key} must be {typ.__name__ if isinstance(typ, type) else typ}")
    return val


def _type(spec, where):
    shape = _get(spec, "shape", list, where)
    dtype = _get(spec, "dtype", str, where)
    if any(not (d is None or (isinstance(d, int) and not isinstance(d, bool))) for d in shape):
        raise IRError(f"IR JSON: {where}.shape must hold ints (or null for the batch)")
    try:
        return TensorType(tuple(shape), dtype)
    except IRError as e:
        raise IRError(f"IR JSON: {where}: {e}") from None


def graph_from_json(doc, consts: dict | None = None) -> Graph:
    """Rebuild (and fully re-validate) a graph from its JSON form. `doc` may be a dict or a str."""
    if isinstance(doc, (str, bytes)):
        if isinstance(doc, bytes):
            try:
                doc = doc.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IRError(f"IR JSON: not UTF-8 text (byte {e.start}: {e.reason})") from None
        deep = json_too_deep_at(doc)
        if deep >= 0:
            raise IRError(f"IR JSON: {_position(doc, deep)}: nested more than {MAX_JSON_DEPTH} levels deep")
        try:
            doc = json.loads(doc)
        except ValueError as e:
            raise IRError(f"IR JSON: line {getattr(e, 'lineno', '?')}, column {getattr(e, 'colno', '?')}: "
                          f"{getattr(e, 'msg', e)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise IRError(f"IR JSON: not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise IRError(f"IR JSON: format version {doc.get('version')!r} is not supported (this graphcnn reads {VERSION})")
    consts = consts or {}
    try:
        g = Graph(_get(doc, "name", str, "graph"))
        for i, s in enumerate(_get(doc, "inputs", list, "graph")):
            t = _type(s, f"inputs[{i}]")
            g.input(_get(s, "name", str, f"inputs[{i}]"), t.shape, t.dtype)
        for i, s in enumerate(_get(doc, "params", list, "graph")):
            t = _type(s, f"params[{i}]")
            g.param(_get(s, "name", str, f"params[{i}]"), t.shape, t.dtype)
        for i, s in enumerate(_get(doc, "consts", list, "graph")):
            t = _type(s, f"consts[{i}]")
            name = _get(s, "name", str, f"consts[{i}]")
            if name not in consts:
                raise IRError(f"IR JSON: constant {name!r} has no data")
            arr = np.asarray(consts[name])
            if arr.shape != t.shape or arr.dtype != t.np_dtype:
                raise IRError(f"IR JSON: constant {name!r} data is {arr.dtype}{list(arr.shape)}, declared {t}")
            g.const(name, arr)
        for i, n in enumerate(_get(doc, "nodes", list, "graph")):
            where = f"nodes[{i}]"
            op = _get(n, "op", str, where)
            ins = [g.value(x) if isinstance(x, str) else None for x in _get(n, "inputs", list, where)]
            if None in ins:
                raise IRError(f"IR JSON: {where}.inputs must be value names")
            outs = _get(n, "outputs", list, where)
            names = [_get(o, "name", str, f"{where}.outputs") for o in outs]
            made = g.add_node(op, ins, _get(n, "attrs", dict, where), names)
            for v, o in zip(made, outs):
                if v.type != _type(o, f"{where}.outputs"):
                    raise IRError(f"IR JSON: {where} ({op}) output %{v.name} declared {_type(o, where)}, inferred {v.type}")
        g.output(*[g.value(x) for x in _get(doc, "outputs", list, "graph")])
        for k, v in _get(doc, "updates", dict, "graph").items():
            g.set_update(g.value(k), g.value(v))
    except IRError as e:
        msg = str(e)
        raise IRError(msg if msg.startswith("IR JSON") else f"IR JSON: {msg}") from None
    return g
