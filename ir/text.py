"""The IR's text form: one line per value, types on every value; prints and parses back to an equal
graph.

    graph lenet {
      input %x: f32[?,28,28,1]
      param %conv1.kernel: f32[5,5,1,6]
      const %one: f32[] = 1.0
      %conv1: f32[?,24,24,6] = conv2d(%x, %conv1.kernel) {"activation": "linear", ...}
      update %conv1.kernel <- %w_new
      return %probs
    }

Constants with more than INLINE_LIMIT elements print as `= @external`; parse them with `consts=`.
"""
from __future__ import annotations

import json
import re

import numpy as np

from .graph import Graph
from .types import IRError, TensorType

INLINE_LIMIT = 16


def _attrs_json(attrs) -> str:
    return json.dumps(attrs, sort_keys=True, separators=(", ", ": "))


def print_graph(g: Graph, inline_consts: bool = True) -> str:
    """The text form of a graph."""
    lines = [f"graph {g.name} {{"]
    for v in g.inputs:
        lines.append(f"  input %{v.name}: {v.type}")
    for v in g.params:
        lines.append(f"  param %{v.name}: {v.type}")
    for v in g.const_values:
        arr = g.consts[v.name]
        data = json.dumps(arr.tolist()) if inline_consts and arr.size <= INLINE_LIMIT else "@external"
        lines.append(f"  const %{v.name}: {v.type} = {data}")
    for n in g.nodes:
        outs = ", ".join(f"%{o.name}: {o.type}" for o in n.outputs)
        ins = ", ".join(f"%{i.name}" for i in n.inputs)
        attrs = f" {_attrs_json(n.attrs)}" if n.attrs else ""
        lines.append(f"  {outs} = {n.op}({ins}){attrs}")
    for k, v in g.updates.items():
        lines.append(f"  update %{k} <- %{v.name}")
    lines.append(f"  return {', '.join('%' + v.name for v in g.outputs)}".rstrip())
    lines.append("}")
    return "\n".join(lines) + "\n"


_NAME = r"[A-Za-z0-9_.\-/]+"
_TYPE = r"[a-z]\w*\[[^\]]*\]"
_HEADER = re.compile(rf"^graph\s+({_NAME})\s*\{{\s*$")
_LEAF = re.compile(rf"^(input|param|const)\s+%({_NAME})\s*:\s*({_TYPE})\s*(?:=\s*(.+))?$")
_OUT = re.compile(rf"%({_NAME})\s*:\s*({_TYPE})")
_NODE = re.compile(r"^(.+?)=\s*([a-z_0-9]+)\((.*?)\)\s*(\{.*\})?\s*$")
_UPDATE = re.compile(rf"^update\s+%({_NAME})\s*<-\s*%({_NAME})\s*$")
_RETURN = re.compile(r"^return\b(.*)$")


def _refs(text, lineno, col):
    text = text.strip()
    if not text:
        return []
    names = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(rf"%{_NAME}", part):
            raise IRError(f"line {lineno}, column {col}: expected a value reference like %x, got {part!r}")
        names.append(part[1:])
    return names


def parse_graph(text: str, consts: dict | None = None) -> Graph:
    """Parse the text form. Errors name the line and column. `consts` supplies external constants."""
    lines = text.splitlines()
    body = [(i + 1, l) for i, l in enumerate(lines) if l.strip() and not l.strip().startswith("#")]
    if not body:
        raise IRError("line 1, column 1: empty IR text")
    lineno, first = body[0]
    m = _HEADER.match(first.strip())
    if not m:
        raise IRError(f"line {lineno}, column 1: expected 'graph NAME {{', got {first.strip()!r}")
    g = Graph(m.group(1))
    if body[-1][1].strip() != "}":
        raise IRError(f"line {body[-1][0]}, column 1: expected closing '}}'")
    returned = False
    for lineno, raw in body[1:-1]:
        line = raw.strip()
        col = len(raw) - len(raw.lstrip()) + 1
        try:
            if returned:
                raise IRError("nothing may follow 'return'")
            if m := _LEAF.match(line):
                kind, name, typ, data = m.groups()
                t = TensorType.parse(typ)
                if kind == "input":
                    g.input(name, t.shape, t.dtype)
                elif kind == "param":
                    g.param(name, t.shape, t.dtype)
                else:
                    if data is None:
                        raise IRError("a const needs '= value' or '= @external'")
                    if data.strip() == "@external":
                        if not consts or name not in consts:
                            raise IRError(f"const %{name} is external but no data was supplied")
                        arr = np.asarray(consts[name])
                    else:
                        try:
                            arr = np.asarray(json.loads(data), dtype=t.np_dtype)
                        except (ValueError, TypeError) as e:
                            raise IRError(f"bad constant data for %{name}: {e}") from None
                    if arr.shape != t.shape:
                        raise IRError(f"const %{name}: data shape {arr.shape} != declared {t}")
                    g.const(name, arr.astype(t.np_dtype))
            elif m := _UPDATE.match(line):
                g.set_update(g.value(m.group(1)), g.value(m.group(2)))
            elif m := _RETURN.match(line):
                g.output(*[g.value(n) for n in _refs(m.group(1), lineno, col + 6)])
                returned = True
            elif m := _NODE.match(line):
                outs_text, op, ins_text, attrs_text = m.groups()
                outs = _OUT.findall(outs_text)
                if not outs or len(outs) != outs_text.count("%"):
                    raise IRError(f"bad result list {outs_text.strip()!r}")
                ins = [g.value(n) for n in _refs(ins_text, lineno, col + line.index("(") + 1)]
                try:
                    attrs = json.loads(attrs_text) if attrs_text else {}
                except ValueError as e:
                    raise IRError(f"bad attributes {attrs_text!r}: {e}") from None
                made = g.add_node(op, ins, attrs, [n for n, _ in outs])
                for v, (n, typ) in zip(made, outs):
                    if v.type != TensorType.parse(typ):
                        raise IRError(f"%{n} is declared {typ} but {op} gives {v.type}")
            else:
                raise IRError(f"cannot parse {line!r}")
        except IRError as e:
            msg = str(e)
            if not msg.startswith("line "):
                msg = f"line {lineno}, column {col}: {msg}"
            raise IRError(msg) from None
    return g
