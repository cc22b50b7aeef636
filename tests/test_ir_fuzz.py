"""Fuzzing the IR's two readers (issue 10, items 4 and 8): the text parser and the JSON loader.

Seeded mutation fuzzing (deterministic: the same cases on every run and host) of the printed forms of
three base graphs: a CNN with a loss, its training graph (params, updates, consts, optimizer ops) and a
graph of hostile names and non-finite attributes. Every mutant must either be refused with an IRError
(the text parser's naming the line and column) or be accepted, verify, and round-trip: printed and
re-read (text and JSON) it is the same graph. Any other exception, a RecursionError included, fails.

Plus the pathological inputs of the issue: long lines that a backtracking regular expression would
take quadratic time on, and nesting deep enough to exhaust Python's recursion limit.
"""
import json
import math
import re
import resource
import time

import numpy as np
import pytest

import ir
from ir.ops import emit
from ir.serialize import MAX_JSON_DEPTH
from ir.training import make_training_graph

SEED = 20261201
N_TEXT = 2400           # text mutants (on top of the pathological lines)
N_JSON = 2400           # JSON mutants: structural edits of the document and character edits of its text


def _cnn():
    g = ir.Graph("net")
    x = g.input("x", (None, 9, 9, 3))
    w = g.param("w", (3, 3, 3, 4))
    b = g.param("b", (4,))
    y = emit("relu", emit("bias_add", emit("conv2d", x, w, stride=2, padding="same"), b))
    y = emit("max_pool2d", y, pool=2, stride=1)
    f = emit("flatten", y)
    w2 = g.param("w2", (f.shape[1], 5))
    logits = emit("dense", f, w2)
    labels = g.input("y", (None,))
    loss = emit("sparse_categorical_crossentropy", logits, labels, from_logits=True)
    g.output(logits, loss)
    return g


def _hostile():
    g = ir.Graph("ｎｅｔ ½")
    x = g.input("x²", (None, 4))
    c = g.const("%c\"", np.array([1.5, -2.0, 0.0, 3.0], np.float32))
    big = g.const("big{}", np.arange(40, dtype=np.float32).reshape(10, 4))
    s = emit("scale", emit("add", x, c), factor=float("nan"))
    t = emit("scale", g.add_node("relu", [s], out_names=["a = relu(%x)"])[0], factor=-float("inf"))
    g.output(emit("add", t, emit("sum_to", big, shape=(4,))), s)
    return g


def _bases():
    cnn = _cnn()
    train = make_training_graph(cnn, cnn.outputs[1].name, "adam")
    return [cnn, train, _hostile()]


BASES = _bases()
CONSTS = [g.consts for g in BASES]


def _same(a, b) -> bool:
    return a == b and ir.print_graph(a) == ir.print_graph(b)


def _accepted_round_trips(g, consts):
    """An accepted graph verifies and comes back equal through text and JSON."""
    ir.verify_graph(g)
    text = ir.print_graph(g)
    assert _same(ir.parse_graph(text, consts=g.consts), g)
    doc = json.dumps(ir.graph_to_json(g))
    assert _same(ir.graph_from_json(doc, g.consts), g)


_POSITION = re.compile(r"^line \d+, column \d+: ")

# -- text mutants --------------------------------------------------------------------------------------

TOKENS = ["%", '"', "%x", '%"ｘ"', "%\"\\u0000\"", '%"\\ud800"', ":", ",", "=", "(", ")", "{", "}", "[", "]",
          "<-", "@external", "#", "?", "f32", "i32", "f64", "f32[?]", "f32[", "[?,", "NaN", "Infinity",
          "-Infinity", "1e999", "-1", "0", "4294967297", "9" * 30, "null", "true", "\\", "\t", " ", "\n", "\r",
          "\x00", "\u2028", "\x85", "\u202e", "ｘ", "½", "input", "param", "const", "update", "return",
          "graph", "relu", "conv2d", "add", '{"factor": NaN}', '{"stride": [0, 1]}', "[[[[", "]]]]",
          "[" * 70, "{" * 70, '"' * 7]


def _mutate_text(text: str, rng) -> str:
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 8))
        n = len(text)
        i = int(rng.integers(0, n + 1))
        j = min(n, i + int(rng.integers(0, 40)))
        if kind == 0:                                   # insert a grammar token
            text = text[:i] + TOKENS[int(rng.integers(len(TOKENS)))] + text[i:]
        elif kind == 1:                                 # delete a span
            text = text[:i] + text[j:]
        elif kind == 2:                                 # replace one character
            text = text[:i] + chr(int(rng.choice([rng.integers(32, 127), rng.integers(0, 0x3000)]))) + text[i + 1:]
        elif kind == 3:                                 # duplicate a span
            text = text[:j] + text[i:j] + text[j:]
        elif kind in (4, 5):                            # swap, drop or duplicate whole lines
            lines = text.split("\n")
            a, b = int(rng.integers(len(lines))), int(rng.integers(len(lines)))
            if kind == 4:
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(a, lines[b]) if rng.random() < 0.5 else lines.pop(a)
            text = "\n".join(lines)
        elif kind == 6:                                 # change a number
            nums = list(re.finditer(r"-?\d+(\.\d+)?", text))
            if nums:
                m = nums[int(rng.integers(len(nums)))]
                new = str(rng.choice([0, 1, -1, 2, 7, 1 << 31, 1 << 62, 10 ** 20]))
                text = text[:m.start()] + new + text[m.end():]
        else:                                           # rename one occurrence of a name
            refs = list(re.finditer(r"%[A-Za-z0-9_.\-/]+", text))
            if refs:
                m = refs[int(rng.integers(len(refs)))]
                other = refs[int(rng.integers(len(refs)))].group()
                text = text[:m.start()] + other + text[m.end():]
    return text


def test_text_parser_fuzz():
    rng = np.random.default_rng(SEED)
    counts = {"accepted": 0, "refused": 0}
    slowest = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(N_TEXT):
        k = case % len(BASES)
        mutant = _mutate_text(ir.print_graph(BASES[k]), rng)
        t0 = time.perf_counter()
        try:
            g = ir.parse_graph(mutant, consts=CONSTS[k])
        except ir.IRError as e:
            assert _POSITION.match(str(e)), f"case {case}: no line/column in {e!s:.200}\n{mutant[:2000]}"
            counts["refused"] += 1
        except Exception as e:       # noqa: BLE001 - any other exception is the bug this test looks for
            raise AssertionError(f"case {case}: {type(e).__name__}: {e!s:.300}\n--- mutant ---\n{mutant[:3000]}")
        else:
            _accepted_round_trips(g, CONSTS[k])
            counts["accepted"] += 1
        slowest = max(slowest, time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"text fuzz: {N_TEXT} cases, {counts['accepted']} accepted + round-tripped, {counts['refused']} refused "
          f"with IRError; slowest case {slowest * 1e3:.1f} ms; peak RSS grew {max(0, rss - rss0) / 1024:.1f} MB")
    assert sum(counts.values()) == N_TEXT >= 2000
    assert counts["accepted"] >= 50 and counts["refused"] >= 1000     # the fuzzer explores both sides


# -- JSON mutants --------------------------------------------------------------------------------------

def _deep(depth):
    v = 1
    for _ in range(depth):
        v = [v]
    return v


VALUES = [None, True, False, 0, -1, 1, 3, 1 << 31, 1 << 62, 1 << 80, 0.5, float("nan"), float("inf"), "", "x",
          "f32", "i64", "relu", "same", "\x00", "\ud800", "a\nb", "ｘ", "½", [], {}, [None], [1, 2], [[0, 1], [2, 3]],
          {"name": "x"}, _deep(MAX_JSON_DEPTH + 5), "y" * 5000]


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _mutate_doc(doc, rng):
    doc = json.loads(json.dumps(doc))
    for _ in range(int(rng.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = paths[int(rng.integers(len(paths)))]
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        kind = int(rng.integers(0, 5))
        if kind <= 1:                                   # replace by a hostile value
            parent[key] = json.loads(json.dumps(VALUES[int(rng.integers(len(VALUES)))]))
        elif kind == 2:                                 # delete
            del parent[key]
        elif kind == 3 and isinstance(parent, list):    # duplicate a list element
            parent.insert(key, json.loads(json.dumps(parent[key])))
        elif kind == 3:                                 # a name that exists elsewhere
            names = [v for p in _paths(doc) for v in [_get(doc, p)] if isinstance(v, str)]
            parent[key] = names[int(rng.integers(len(names)))] if names else None
        else:                                           # swap with a sibling
            keys = list(range(len(parent))) if isinstance(parent, list) else list(parent)
            other = keys[int(rng.integers(len(keys)))]
            parent[key], parent[other] = parent[other], parent[key]
    return doc


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _mutate_json_text(text, rng):
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(0, len(text) + 1))
        r = rng.random()
        if r < 0.4:
            text = text[:i] + text[i + int(rng.integers(1, 8)):]
        elif r < 0.8:
            text = text[:i] + rng.choice(list('{}[]",:0-9eE.\\ ntfNI')) + text[i:]
        else:
            text = text[:i] + "[" * int(rng.integers(60, 3000)) + text[i:]
    return text


def test_json_loader_fuzz():
    rng = np.random.default_rng(SEED + 1)
    docs = [ir.graph_to_json(g) for g in BASES]
    counts = {"accepted": 0, "refused": 0}
    for case in range(N_JSON):
        k = case % len(BASES)
        as_text = case % 4 == 3
        mutant = _mutate_json_text(json.dumps(docs[k]), rng) if as_text else _mutate_doc(docs[k], rng)
        try:
            g = ir.graph_from_json(mutant, CONSTS[k])
        except ir.IRError as e:
            assert str(e).startswith("IR JSON"), f"case {case}: {e}"
            counts["refused"] += 1
        except Exception as e:       # noqa: BLE001
            shown = mutant if as_text else json.dumps(mutant)
            raise AssertionError(f"case {case}: {type(e).__name__}: {e!s:.300}\n--- mutant ---\n{shown[:3000]}")
        else:
            _accepted_round_trips(g, CONSTS[k])
            counts["accepted"] += 1
    print(f"JSON fuzz: {N_JSON} cases, {counts['accepted']} accepted + round-tripped, "
          f"{counts['refused']} refused with IRError")
    assert sum(counts.values()) == N_JSON >= 2000
    assert counts["accepted"] >= 50 and counts["refused"] >= 1000


# -- pathological inputs ----------------------------------------------------------------------------

N = 1 << 18        # 256 kB lines: a quadratic parser takes hours on these, a linear one milliseconds
HEAD = "graph g {\n  input %x: f32[?,4]\n"
TAIL = "  return %x\n}\n"


@pytest.mark.parametrize("line", [
    "=" * N,
    "%a: f32[4] = relu(" * (N // 18),
    "  %y: f32[?,4] = relu(" + "%x, " * (N // 4) + ")",
    "  %y: f32[?,4] = add(%x, %x) " + "{" * 20 + '"a": ' * (N // 5),
    "  %y: f32[?,4] = relu(%x) {\"a\": \"" + "\\\\" * (N // 2) + "\"}",
    "  input %" + "a" * N + ": f32[?,4]",
    "  input %\"" + "ｘ" * N + "\": f32[?,4]",
    "  input %\"" + "\\\"" * (N // 2),
    "  const %c: f32[4] = " + "[" * N + "]" * N,
    "  const %c: f32[" + "1," * (N // 2) + "] = 1",
    "  %y: f32[?,4] = relu(%x) {\"p\": " + "[" * N,
    "  " + "%a: f32[4], " * (N // 12) + "= relu(%x)",
    "  const %c: f32[1] = [\"" + "\\\"" * (N // 2),            # escaped quotes in an unterminated string
    "  const %c: f32[1] = [\"" + "\\\"" * (N // 2) + "\\",
    "  %y: f32[?,4] = relu(%x) {\"" + "\\\"" * (N // 2),
    "(" * N, ")" * N, "%" * N, "\"" * N, "\\" * N, "[" * N, "{" * N, " " * N + "x",
])
def test_pathological_lines_are_refused_quickly(line):
    t0 = time.perf_counter()
    with pytest.raises(ir.IRError) as e:
        ir.parse_graph(HEAD + line + "\n" + TAIL)
    assert _POSITION.match(str(e.value)) and str(e.value).startswith("line 3, "), str(e.value)[:200]
    print(f"{len(line)}-char line refused in {time.perf_counter() - t0:.3f} s: {str(e.value)[:100]}")


def test_json_loader_is_linear_on_hostile_strings():
    for text in ['["' + '\\"' * N, '{"name": "' + '\\"' * N + "\\", '"' * N, '["a\\\\"' * (N // 6)]:
        with pytest.raises(ir.IRError, match="IR JSON"):
            ir.graph_from_json(text)


def test_deep_nesting_names_its_position():
    deep = "  const %c: f32[1] = " + "[" * 100000 + "1" + "]" * 100000
    with pytest.raises(ir.IRError, match=rf"line 3, column {22 + MAX_JSON_DEPTH}: .*nested more than"):
        ir.parse_graph(HEAD + deep + "\n" + TAIL)
    attrs = '  %y: f32[?,4] = relu(%x) ' + '{"a": ' * 50000 + "1" + "}" * 50000
    with pytest.raises(ir.IRError, match="line 3, .*nested more than"):
        ir.parse_graph(HEAD + attrs + "\n" + TAIL)
    doc = json.dumps(ir.graph_to_json(BASES[0]), indent=1)
    for text in ["[" * 200000, '{"a":' * 200000, doc.replace('"attrs": {', '"attrs": {"x": ' + "[" * 5000 + "]" * 5000 + ",", 1)]:
        with pytest.raises(ir.IRError, match=r"IR JSON: line \d+, column \d+: nested more than"):
            ir.graph_from_json(text)


def test_many_lines_parse_in_one_pass():
    # 20,000 nodes: the parse must stay linear in the number of lines too
    g = ir.Graph("long")
    v = g.input("x", (None, 4))
    for _ in range(20000):
        v = emit("relu", v)
    g.output(v)
    text = ir.print_graph(g)
    t0 = time.perf_counter()
    assert ir.parse_graph(text) == g
    print(f"{len(text)} chars, 20,000 nodes parsed in {time.perf_counter() - t0:.2f} s")


def test_non_finite_and_huge_numbers_in_text():
    text = HEAD + '  %y: f32[?,4] = scale(%x) {"factor": 1e999}\n  return %y\n}\n'
    g = ir.parse_graph(text)
    assert math.isinf(g.nodes[0].attrs["factor"])
    _accepted_round_trips(g, {})
    with pytest.raises(ir.IRError, match="line 3, column"):
        ir.parse_graph(HEAD + '  %y: f32[?,4] = scale(%x) {"factor": ' + "9" * 5000 + "}\n  return %y\n}\n")
    with pytest.raises(ir.IRError, match="line 2, column"):
        ir.parse_graph("graph g {\n  input %x: f32[?," + "9" * 5000 + "]\n  return %x\n}\n")
