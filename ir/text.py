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

A name made only of letters, digits and `_ . - /` prints bare (`%conv1.kernel`); any other name the
API accepts (ir.types.check_name) prints as a JSON string (`%"ｘ"`, `graph "my model" {`), so every
name survives the round trip. Non-finite attribute values print as JSON's NaN/Infinity.

Constants with more than INLINE_LIMIT elements print as `= @external`; parse them with `consts=`.

The parser is a hand-written scanner: one left-to-right pass per line (linear time, no backtracking
regular expressions), JSON nested at most MAX_JSON_DEPTH deep (no recursion limit to hit), and every
error is an IRError naming the line and column.
"""
from __future__ import annotations

import json
import re

import numpy as np

from .graph import Graph
from .serialize import MAX_JSON_DEPTH, json_too_deep_at
from .types import IRError, TensorType

INLINE_LIMIT = 16

_BARE_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")
_TYPE = re.compile(r"[a-z][a-z0-9_]*\[[^\]\n]*\]")
_WORD = re.compile(r"[a-z_][a-z0-9_]*")
_JSON = json.JSONDecoder()


def quote_name(name: str) -> str:
    """A name as the text form writes it: bare when it is made of [A-Za-z0-9_.-/], else a JSON string."""
    return name if _BARE_NAME.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _attrs_json(attrs) -> str:
    return json.dumps(attrs, sort_keys=True, separators=(", ", ": "))


def print_graph(g: Graph, inline_consts: bool = True) -> str:
    """The text form of a graph."""
    ref = lambda v: "%" + quote_name(v.name)  # noqa: E731
    lines = [f"graph {quote_name(g.name)} {{"]
    for v in g.inputs:
        lines.append(f"  input {ref(v)}: {v.type}")
    for v in g.params:
        lines.append(f"  param {ref(v)}: {v.type}")
    for v in g.const_values:
        arr = g.consts[v.name]
        data = json.dumps(arr.tolist()) if inline_consts and arr.size <= INLINE_LIMIT else "@external"
        lines.append(f"  const {ref(v)}: {v.type} = {data}")
    for n in g.nodes:
        outs = ", ".join(f"{ref(o)}: {o.type}" for o in n.outputs)
        ins = ", ".join(ref(i) for i in n.inputs)
        attrs = f" {_attrs_json(n.attrs)}" if n.attrs else ""
        lines.append(f"  {outs} = {n.op}({ins}){attrs}")
    for k, v in g.updates.items():
        lines.append(f"  update %{quote_name(k)} <- {ref(v)}")
    lines.append(f"  return {', '.join(ref(v) for v in g.outputs)}".rstrip())
    lines.append("}")
    return "\n".join(lines) + "\n"


class _Scanner:
    """A cursor over one line. Every method either consumes what it names or raises an IRError carrying
    the line and the column where the unexpected text starts."""

    def __init__(self, text: str, lineno: int):
        self.s, self.i, self.lineno = text, 0, lineno

    def error(self, msg: str, at: int | None = None) -> IRError:
        return IRError(f"line {self.lineno}, column {(self.i if at is None else at) + 1}: {msg}")

    def _found(self) -> str:
        rest = self.s[self.i:self.i + 40]
        return repr(rest) + ("..." if len(self.s) - self.i > 40 else "") if rest else "the end of the line"

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.i >= len(self.s)

    def peek(self, literal: str) -> bool:
        self.skip_space()
        return self.s.startswith(literal, self.i)

    def expect(self, literal: str) -> None:
        if not self.peek(literal):
            raise self.error(f"expected {literal!r}, found {self._found()}")
        self.i += len(literal)

    def end(self) -> None:
        if not self.at_end():
            raise self.error(f"unexpected {self._found()}")

    def word(self, what: str) -> str:
        self.skip_space()
        m = _WORD.match(self.s, self.i)
        if not m:
            raise self.error(f"expected {what}, found {self._found()}")
        self.i = m.end()
        return m.group()

    def name(self) -> str:
        """A bare or JSON-quoted name (its validity is Graph's to judge)."""
        self.skip_space()
        if self.s.startswith('"', self.i):
            try:
                text, end = json.decoder.scanstring(self.s, self.i + 1, True)
            except ValueError as e:
                raise self.error(f"bad quoted name: {getattr(e, 'msg', e)}") from None
            self.i = end
            return text
        m = _BARE_NAME.match(self.s, self.i)
        if not m:
            raise self.error(f"expected a name, found {self._found()}")
        self.i = m.end()
        return m.group()

    def ref(self) -> str:
        """`%name`."""
        self.expect("%")
        return self.name()

    def refs(self, close: str | None) -> list:
        """A comma-separated, possibly empty list of `%name`, up to `close` (None: the end of the line)."""
        names = []
        done = (lambda: self.at_end()) if close is None else (lambda: self.peek(close))
        if done():
            return names
        while True:
            names.append(self.ref())
            if done():
                return names
            self.expect(",")

    def type(self) -> TensorType:
        self.skip_space()
        start = self.i
        m = _TYPE.match(self.s, self.i)
        if not m:
            raise self.error(f"expected a type like f32[?,28,28,1], found {self._found()}")
        self.i = m.end()
        try:
            return TensorType.parse(m.group())
        except IRError as e:
            raise self.error(str(e), at=start) from None

    def json_value(self, what: str):
        """One JSON value (NaN and Infinity allowed: attributes may be non-finite)."""
        self.skip_space()
        start = self.i
        deep = json_too_deep_at(self.s, start)
        if deep >= 0:
            raise self.error(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", at=deep)
        try:
            value, self.i = _JSON.raw_decode(self.s, start)
        except ValueError as e:       # JSONDecodeError, and int() refusing thousands of digits
            pos = getattr(e, "pos", start)
            raise self.error(f"bad {what}: {getattr(e, 'msg', e)}", at=pos) from None
        return value


def _parse_leaf(sc: _Scanner, kind: str, g: Graph, consts) -> None:
    name = sc.ref()
    sc.expect(":")
    t = sc.type()
    if kind != "const":
        sc.end()
        (g.input if kind == "input" else g.param)(name, t.shape, t.dtype)
        return
    if not sc.peek("="):
        raise sc.error("a const needs '= value' or '= @external'")
    sc.expect("=")
    if sc.peek("@external"):
        sc.expect("@external")
        sc.end()
        if not consts or name not in consts:
            raise IRError(f"const %{name} is external but no data was supplied")
        arr = np.asarray(consts[name])
    else:
        data = sc.json_value(f"constant data for %{name}")
        sc.end()
        try:
            arr = np.asarray(data, dtype=t.np_dtype)
        except (ValueError, TypeError, OverflowError) as e:
            raise IRError(f"bad constant data for %{name}: {e}") from None
    if arr.shape != t.shape:
        raise IRError(f"const %{name}: data shape {arr.shape} != declared {t}")
    g.const(name, arr.astype(t.np_dtype))


def _parse_node(sc: _Scanner, g: Graph) -> None:
    outs = []
    while True:
        name = sc.ref()
        sc.expect(":")
        outs.append((name, sc.type()))
        if not sc.peek(","):
            break
        sc.expect(",")
    sc.expect("=")
    op = sc.word("an op name")
    sc.expect("(")
    ins = [g.value(n) for n in sc.refs(")")]
    sc.expect(")")
    attrs = {}
    if not sc.at_end():
        at = sc.i
        attrs = sc.json_value("attributes")
        if not isinstance(attrs, dict):
            raise sc.error("attributes must be a JSON object {...}", at=at)
    sc.end()
    made = g.add_node(op, ins, attrs, [n for n, _ in outs])
    for v, (n, t) in zip(made, outs):
        if v.type != t:
            raise IRError(f"%{n} is declared {t} but {op} gives {v.type}")


def parse_graph(text: str, consts: dict | None = None) -> Graph:
    """Parse the text form. Errors name the line and column. `consts` supplies external constants."""
    if not isinstance(text, str):
        raise IRError(f"line 1, column 1: IR text must be a str, got {type(text).__name__}")
    # only '\n' ends a line (str.splitlines would also split at U+2028 and friends inside a quoted name)
    body = []
    for i, raw in enumerate(text.split("\n")):
        raw = raw[:-1] if raw.endswith("\r") else raw
        if raw.strip(" \t") and not raw.lstrip(" \t").startswith("#"):
            body.append((i + 1, raw))
    if not body:
        raise IRError("line 1, column 1: empty IR text")
    lineno, first = body[0]
    sc = _Scanner(first, lineno)
    try:
        if sc.word("'graph NAME {'") != "graph":
            raise sc.error("expected 'graph NAME {'", at=0)
        name = sc.name()
        sc.expect("{")
        sc.end()
        g = Graph(name)
    except IRError as e:
        msg = str(e)
        raise (e if msg.startswith("line ") else IRError(f"line {lineno}, column 1: {msg}")) from None
    last_no, last = body[-1]
    if len(body) < 2 or last.strip(" \t") != "}":
        raise IRError(f"line {last_no}, column 1: expected closing '}}'")
    returned = False
    for lineno, raw in body[1:-1]:
        sc = _Scanner(raw, lineno)
        sc.skip_space()
        col = sc.i + 1
        try:
            if returned:
                raise sc.error("nothing may follow 'return'")
            if sc.peek("%"):
                _parse_node(sc, g)
                continue
            keyword = sc.word("a statement (input, param, const, update, return or %name = op(...))")
            if keyword in ("input", "param", "const"):
                _parse_leaf(sc, keyword, g, consts)
            elif keyword == "update":
                target = sc.ref()
                sc.expect("<-")
                source = sc.ref()
                sc.end()
                g.set_update(g.value(target), g.value(source))
            elif keyword == "return":
                g.output(*[g.value(n) for n in sc.refs(None)])
                returned = True
            else:
                raise sc.error(f"unknown statement {keyword!r}", at=col - 1)
        except IRError as e:
            msg = str(e)
            if not msg.startswith("line "):
                msg = f"line {lineno}, column {col}: {msg}"
            raise IRError(msg) from None
    return g
