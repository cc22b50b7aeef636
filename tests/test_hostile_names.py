"""Names are data, never code (issue 10, items 1, 2 and 5).

Every injection payload below would run a command or write outside its folder if a name reached
generated Python, C or a path unquoted; each test asserts the command did NOT run (its marker file does
not exist) and that the graph either works, checked against a NumPy reference, or is refused with an
IRError/ArtifactError. Also: names that alias after NFKC normalisation, names Python cannot spell as
identifiers (½, ², ｘ), non-printable names through every entry point, non-finite attributes.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import graphcnn as gc
import ir
from graphcnn import layers as L
from graphcnn.artifact import INTEGRITY, ArtifactError, integrity_digests
from ir.ops import emit
from ir.types import MAX_NAME_LEN, ascii_identifier, check_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]], np.float32)


def _python_payload(marker) -> str:
    return f'""";__import__("os").system("touch {marker}");"""'


def _payloads(marker):
    """Names that break out of a Python docstring, string, comment or a C comment."""
    touch = f'__import__("os").system("touch {marker}")'
    return [_python_payload(marker),
            f"''';{touch};'''",
            f"'+{touch}+'",
            f'"+{touch}+"',
            f"x) or {touch} or (x",
            f"*/ int injected(void) {{ return 1; }} /* {touch}",
            f"{{{touch}}}",                           # str.format / f-string braces
            "\\",                                       # a trailing backslash continues a line
            f"\\'; {touch}; '"]


def _relu_graph(graph_name="net", x="x", y=None):
    g = gc.Graph(graph_name)
    xv = g.input(x, (None, 5))
    out = g.add_node("relu", [xv], out_names=[y] if y else None)[0]
    g.output(out)
    return g


def _check_relu(fn, **feed):
    np.testing.assert_array_equal(np.asarray(fn(**feed)), np.maximum(X, 0))


# -- injection through names: NumPy codegen, JSON, standalone module, C header, paths --------------

@pytest.mark.parametrize("where", ["graph", "input", "node"])
def test_names_never_run_as_python(tmp_path, where):
    marker = tmp_path / "pwned"
    for k, payload in enumerate(_payloads(marker)):
        names = {"graph_name": payload} if where == "graph" else {"x": payload} if where == "input" \
            else {"y": payload}
        g = _relu_graph(**names)
        for g2 in (g, ir.graph_from_json(json.dumps(ir.graph_to_json(g))), ir.parse_graph(str(g))):
            assert g2 == g
            fn = gc.compile(g2, backend="numpy")
            _check_relu(fn, **{g2.inputs[0].name: X})
        assert not marker.exists(), f"payload {k} ran: {payload!r}"


def test_graph_from_json_validates_names(tmp_path):
    marker = tmp_path / "pwned"
    doc = ir.graph_to_json(_relu_graph())
    for bad in ["", "a\nb", "a\x00b", "\ud800", "x\u202e", "a\rb", " x", "x" * (MAX_NAME_LEN + 1)]:
        for field in ("graph", "input", "node"):
            d = json.loads(json.dumps(doc))
            if field == "graph":
                d["name"] = bad
            elif field == "input":
                d["inputs"][0]["name"] = bad
                d["nodes"][0]["inputs"] = [bad]
            else:
                d["nodes"][0]["outputs"][0]["name"] = bad
                d["outputs"] = [bad]
            with pytest.raises(ir.IRError, match="name"):
                ir.graph_from_json(d)
            with pytest.raises(ir.IRError, match="name"):
                ir.graph_from_json(json.dumps(d))
    assert not marker.exists()


def test_standalone_module_name_is_not_code_or_a_path(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    from graphcnn.export import write_numpy_module
    for k, name in enumerate(_payloads(marker) + ["../escaped", "/tmp/abs", "..", "a/../../b", "con.py"]):
        g = _relu_graph(graph_name=name)
        files = write_numpy_module(g, {}, str(out))
        for f in files:
            assert os.path.dirname(os.path.abspath(f)) == str(out), f
        stem = os.path.basename(files[0])[:-3]
        assert stem == ascii_identifier(name)
        code = (f"import sys, numpy as np; sys.path.insert(0, {str(out)!r}); import {stem} as m; "
                f"x = np.array({X.tolist()!r}, np.float32); "
                f"assert (m.predict(x) == np.maximum(x, 0)).all(); assert m.GRAPH_NAME == {name!r}")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=""))
        assert res.returncode == 0, res.stderr
        assert not marker.exists(), f"payload {k} ran: {name!r}"
    assert sorted(os.listdir(tmp_path)) == ["out"]       # nothing escaped the output folder


def test_c_header_comment_cannot_be_escaped(tmp_path):
    pytest.importorskip("llvmlite")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to preprocess the header")
    from backends.llvm.export import build_module, render_header, write_native
    marker = tmp_path / "pwned"

    def preprocessed(path):
        res = subprocess.run([cc, "-E", "-P", "-x", "c", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout

    for k, name in enumerate(_payloads(marker) + ["a */ #define injected 1 /* b", "*/", "/*", "**//**"]):
        out = tmp_path / f"h{k}"
        g = _relu_graph(graph_name=name)
        (header,) = write_native(g, {}, str(out), ["h"])
        assert os.path.dirname(header) == str(out)
        # the graph's name lives only in comments: with a harmless name the C tokens are identical
        _, cname, shape = build_module(g, {})
        benign = tmp_path / f"benign{k}.h"
        benign.write_text(render_header(cname, "benign", shape))
        assert preprocessed(header) == preprocessed(benign), name
        res = subprocess.run([cc, "-fsyntax-only", "-Wall", "-Werror", "-x", "c", header],
                             capture_output=True, text=True)
        assert res.returncode == 0, (name, res.stderr)
    assert not marker.exists()


def test_cli_compile_writes_only_inside_output_folder(tmp_path):
    # a model file whose model is named like a path: every artifact stays in -o OUT
    model_py = tmp_path / "m.py"
    model_py.write_text("import graphcnn as gc\nfrom graphcnn import layers as L\n"
                        "model = gc.Sequential([L.Dense(3, input_shape=(4,))], seed=0)\n"
                        "model.name = '../escaped'\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "graphcnn.cli", "compile", f"{model_py}:model", "-o", str(out),
                          "--target", "numpy", "--emit", "ir,py"], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    if res.returncode == 2:          # the DSL refused the name: also fine, as long as nothing was written
        assert "name" in res.stderr and not out.exists()
    else:
        assert res.returncode == 0, res.stderr
        written = res.stdout.split()
        assert written and all(os.path.dirname(os.path.abspath(p)) == str(out) for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["m.py", "out"], ["m.py"])


# -- names that alias or that Python cannot spell ----------------------------------------------------

@pytest.mark.parametrize("a,b", [("relu7", "relu７"), ("x", "ｘ"), ("fi", "ﬁ"), ("x2", "x²")])
def test_nfkc_look_alikes_are_refused_everywhere(a, b):
    g = gc.Graph("g")
    g.input(a, (None, 5))
    with pytest.raises(ir.IRError, match="NFKC"):
        g.input(b, (None, 5))
    # the same graph spelled as JSON and as text is refused the same way
    doc = {"format": "graphcnn-ir", "version": 1, "name": "g", "params": [], "consts": [], "nodes": [],
           "inputs": [{"name": a, "shape": [None, 5], "dtype": "f32"}, {"name": b, "shape": [None, 5], "dtype": "f32"}],
           "outputs": [a], "updates": {}}
    with pytest.raises(ir.IRError, match="NFKC"):
        ir.graph_from_json(doc)
    text = f'graph g {{\n  input %"{a}": f32[?,5]\n  input %"{b}": f32[?,5]\n  return %"{a}"\n}}\n'
    with pytest.raises(ir.IRError, match="line 3.*NFKC"):
        ir.parse_graph(text)


def test_fresh_names_avoid_look_alikes_of_user_names():
    g = gc.Graph("g")
    x = g.input("x", (None, 5))
    user = g.add_node("relu", [x], out_names=["relu１"])[0]     # NFKC: relu1, the name fresh_name would pick
    y = emit("relu", user)                                       # must not collide
    assert ir.types.name_key(y.name) != ir.types.name_key(user.name)
    g.output(y)
    _check_relu(gc.compile(g, backend="numpy"), x=X)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_unicode_names_give_the_right_answer(backend):
    # names that are not Python identifiers, or that NFKC would merge with another spelling
    g = gc.Graph("½²")
    x = g.input("ｘ", (None, 5))
    w = g.param("w²", (5,))
    c = g.const("½", np.float32(0.5))
    r = g.add_node("relu", [x], out_names=["relu７"])[0]
    m = g.add_node("mul", [r, w], out_names=["x²"])[0]
    s = g.add_node("add", [m, c], out_names=["résumé/ü·"])[0]
    g.output(s)
    wv = np.array([1, 2, 3, 4, 5], np.float32)
    fn = gc.compile(g, backend=backend, params={"w²": wv})
    np.testing.assert_allclose(fn(**{"ｘ": X}), np.maximum(X, 0) * wv + 0.5, rtol=0, atol=0)
    assert ir.parse_graph(str(g), consts=g.consts) == g
    assert ir.graph_from_json(json.loads(json.dumps(ir.graph_to_json(g))), g.consts) == g


# -- gc.load with hostile value names (graph.json edited and re-signed, as a hostile writer would) ---

def _tiny_model():
    return gc.Sequential([L.Input((4,)), L.Dense(3, activation="relu"), L.Dense(2)], name="tiny", seed=1)


def _rename_and_resign(blob: bytes, old: str, new: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    doc = json.loads(entries["graph.json"])

    def swap(v):
        if isinstance(v, np.generic):
            assert back == v.item() and type(back) is type(v.item())
        elif isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return new if v == old else v
    doc["nodes"] = swap(doc["nodes"])
    entries["graph.json"] = json.dumps(doc, ensure_ascii=True).encode()
    meta = json.loads(entries["meta.json"])
    meta.pop(INTEGRITY)
    meta[INTEGRITY] = integrity_digests(meta, entries["graph.json"], entries["weights.npz"])
    entries["meta.json"] = json.dumps(meta).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for k, v in entries.items():
            z.writestr(k, v)
    return out.getvalue()


def _intermediate(path):
    with zipfile.ZipFile(path) as z:
        doc = json.loads(z.read("graph.json"))
    outs = set(doc["outputs"])
    return next(o["name"] for n in doc["nodes"] for o in n["outputs"] if o["name"] not in outs)


@pytest.mark.parametrize("new", ["½", "²", "ｙ", "x²", "relu７", '""";__import__("os").system("touch M");"""',
                                 "a b", "%(){}=:[],\""])
def test_load_accepts_printable_value_names(tmp_path, new):
    m = _tiny_model()
    path = tmp_path / "m.gcnn"
    m.save(str(path))
    old = _intermediate(path)
    bad = tmp_path / "renamed.gcnn"
    bad.write_bytes(_rename_and_resign(path.read_bytes(), old, new.replace("M", str(tmp_path / "pwned"))))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for backend in ("numpy", "llvm"):
        np.testing.assert_allclose(gc.load(str(bad), backend=backend).predict(x), m.predict(x), rtol=1e-6, atol=1e-6)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("new", ["a\x00b", "\ud800", "a\nb", "x\u202e", "\x85", "a\u2028b", " x", "",
                                 "ｘ"])      # the last: the model's input is "x", the same name after NFKC
def test_load_refuses_unprintable_value_names(tmp_path, new):
    m = _tiny_model()
    path = tmp_path / "m.gcnn"
    m.save(str(path))
    bad = tmp_path / "renamed.gcnn"
    bad.write_bytes(_rename_and_resign(path.read_bytes(), _intermediate(path), new))
    with pytest.raises(ArtifactError, match="name"):
        gc.load(str(bad))


# -- one rule at every entry point, and every accepted name round-trips ----------------------------

def _accepted(name) -> bool:
    try:
        check_name(name)
        return True
    except ir.IRError:
        return False


def _via_graph(name):
    return _relu_graph(graph_name=name, x=name)


def _via_json(name):
    doc = ir.graph_to_json(_relu_graph())
    doc["name"] = name
    doc["inputs"][0]["name"] = name
    doc["nodes"][0]["inputs"] = [name]
    return ir.graph_from_json(json.dumps(doc))


def _via_text(name):
    q = json.dumps(name)
    return ir.parse_graph(f"graph {q} {{\n  input %{q}: f32[?,5]\n  %relu1: f32[?,5] = relu(%{q})\n"
                          f"  return %relu1\n}}\n")


NAMES = st.one_of(st.text(min_size=0, max_size=12),
                  st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=6),
                  st.sampled_from(["x", "½", "²", "ｘ", "a\x00", "\udc80", "a\u2028", "%x", "a b", "\\", '"',
                                   "x" * MAX_NAME_LEN, "x" * (MAX_NAME_LEN + 1)]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(NAMES)
def test_every_entry_point_agrees_and_round_trips(name):
    expect = _accepted(name)
    graphs = []
    for build in (_via_graph, _via_json, _via_text):
        try:
            graphs.append(build(name))
            ok = True
        except ir.IRError:
            ok = False
        assert ok == expect, (build.__name__, name)
    for g in graphs:
        assert g == graphs[0]
        text = ir.print_graph(g)
        assert ir.parse_graph(text) == g and ir.print_graph(ir.parse_graph(text)) == text
        assert ir.graph_from_json(json.dumps(ir.graph_to_json(g))) == g
        assert g.inputs[0].name == name and g.name == name


# -- non-finite attributes ----------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -float("inf"), 1e-45, -0.0])
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_non_finite_attributes_compile_and_round_trip(factor, backend):
    g = gc.Graph("f")
    x = g.input("x", (None, 5))
    g.output(emit("scale", x, factor=factor))
    for g2 in (g, ir.parse_graph(str(g)), ir.graph_from_json(json.dumps(ir.graph_to_json(g)))):
        assert g2 == g
        ir.verify_graph(g2)
        with np.errstate(invalid="ignore"):
            got = gc.compile(g2, backend=backend)(x=X)
            # the f32 factor times f32 inputs, exact in f64, rounded once: what a f32 multiply gives
            want = X.astype(np.float64) * np.float64(np.float32(factor))
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_py_literal_is_a_literal_for_every_attribute_value():
    import ast
    import math
    from backends.numpy.codegen import py_literal
    values = [None, True, False, 0, -7, 2 ** 70, 1.5, -0.0, float("nan"), float("inf"), -float("inf"),
              "same", '"""', "'''", "\\", "a\nb", "\ud800", (), (1,), ((0, 1), (2, 3)), [1, "x"],
              {"k": (1.0, float("nan"))}, np.float32(0.25), np.int64(-3), np.bool_(True)]
    for v in values:
        src = py_literal(v)
        tree = ast.parse(src, mode="eval")
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert names <= {"float"} and calls <= {"float"}, src
        back = eval(compile(tree, "<literal>", "eval"), {"__builtins__": {"float": float}})
        same = (lambda a, b: (isinstance(a, float) and math.isnan(a) and math.isnan(b))
                or (a == b and type(a) is type(b)))
        if isinstance(v, np.generic):
            assert back == v.item() and type(back) is type(v.item())
        elif isinstance(v, dict):
            assert back.keys() == v.keys()
        elif isinstance(v, (tuple, list)):
            assert type(back) is type(v) and len(back) == len(v)
        else:
            assert same(back, v), (v, back)
    for bad in (object(), np.zeros(2), b"bytes", {1, 2}, np.datetime64("2020-01-01")):
        with pytest.raises(ValueError, match="cannot emit"):
            py_literal(bad)


def test_dot_output_quotes_every_name(tmp_path):
    # `graphcnn show --format dot|svg`: with hostile names, the DOT text outside quoted strings is exactly
    # that of the same graph with harmless names (no attribute such as URL="javascript:..." can be added)
    from graphcnn.cli import to_dot
    quoted = __import__("re").compile(r'"(?:[^"\\]|\\.)*"')
    skeleton = lambda g: quoted.sub("Q", to_dot(g))  # noqa: E731
    benign = skeleton(_relu_graph("g", "x", "y"))
    for payload in _payloads(tmp_path / "pwned") + ['x" URL="javascript:alert(1)', "a\\", "\\N", '\\"']:
        assert skeleton(_relu_graph(payload, payload + "1", payload + "2")) == benign, payload
