"""IR: types, text and JSON round trips, verifier, error messages, networkx view."""
import json

import numpy as np
import pytest

import ir
from ir.ops import emit
from ir.training import make_training_graph
from conftest import load_example


def small_net():
    g = ir.Graph("net")
    x = g.input("x", (None, 12, 12, 3))
    w = g.param("w", (3, 3, 3, 4))
    b = g.param("b", (4,))
    y = emit("relu", emit("bias_add", emit("conv2d", x, w, stride=2, padding="same", dilation=1), b))
    y = emit("avg_pool2d", y, pool=2, stride=1, padding=((0, 1), (0, 1)))
    f = emit("flatten", y)
    w2 = g.param("w2", (f.shape[1], 5))
    logits = emit("dense", f, w2)
    labels = g.input("y", (None,))
    loss = emit("sparse_categorical_crossentropy", logits, labels, from_logits=True)
    g.output(logits, loss)
    return g


def test_types_print_and_shapes():
    g = small_net()
    conv = g.nodes[0]
    assert conv.attrs["padding"] == ((0, 1), (0, 1))        # TF SAME: extra pad at bottom/right
    assert conv.outputs[0].type == ir.TensorType((None, 6, 6, 4))
    assert str(conv.outputs[0].type) == "f32[?,6,6,4]"
    assert ir.TensorType.parse("f32[?,6,6,4]") == conv.outputs[0].type


@pytest.mark.parametrize("build", [small_net, lambda: load_example("mnist_cnn").inference_graph(),
                                   lambda: load_example("lenet5").inference_graph()])
def test_text_round_trip(build):
    g = build()
    text = ir.print_graph(g)
    g2 = ir.parse_graph(text)
    assert g2 == g
    assert ir.print_graph(g2) == text


def test_training_graph_round_trips_text_and_json():
    g = small_net()
    tg = make_training_graph(g, g.outputs[1].name, "adam")
    ir.verify_graph(tg)
    assert ir.parse_graph(str(tg), consts=tg.consts) == tg
    doc = json.loads(json.dumps(ir.graph_to_json(tg)))
    assert ir.graph_from_json(doc, tg.consts) == tg
    ops = [n.op for n in tg.nodes]
    assert ops.count("adam_update") == 3 and "conv2d_grad_filter" in ops
    assert "conv2d_grad_input" not in ops          # the input x needs no gradient
    assert set(tg.updates) == {"w", "b", "w2", "w/m", "w/v", "b/m", "b/v", "w2/m", "w2/v", "step"}


def test_graph_inequality_detects_changes():
    g = small_net()
    text = ir.print_graph(g).replace('"stride": [2, 2]', '"stride": [1, 1]', 1)
    with pytest.raises(ir.IRError):            # the declared type no longer matches the op's shape rule
        ir.parse_graph(text)
    g2 = ir.parse_graph(ir.print_graph(g).replace("%logits", "%logits"))
    g2.nodes[-1].attrs["from_logits"] = False
    assert g2 != g


@pytest.mark.parametrize("text,where", [
    ("graph g {\n  input %x: f32[?,4]\n  %y: f32[?,4] = relu(%z)\n  return %y\n}\n", "line 3"),
    ("graph g {\n  input %x: f32[?,4]\n  %y: f32[?,4] = frobnicate(%x)\n  return %y\n}\n", "unknown op"),
    ("graph g {\n  input %x: f32[?,4\n  return %x\n}\n", "line 2, column 13"),   # where the type starts
    ("graph g {\n  input %x: f32[?,4]\n  %y: f32[?,5] = relu(%x)\n  return %y\n}\n", "declared"),
    ("graph g {\n  input %x: f32[?,4]\n  %y: f32[?,4] = relu(%x) {\"bogus\": 1}\n  return %y\n}\n", "unknown attribute"),
    ("grph g {\n}\n", "line 1"),
    ("graph g {\n  input %x: f32[?,4]\n  return %x\n", "closing"),
])
def test_parse_errors_name_line_and_problem(text, where):
    with pytest.raises(ir.IRError) as e:
        ir.parse_graph(text)
    assert where in str(e.value)


def test_json_errors_are_clear():
    g = small_net()
    doc = ir.graph_to_json(g)
    with pytest.raises(ir.IRError, match="version"):
        ir.graph_from_json(dict(doc, version=99))
    bad = json.loads(json.dumps(doc))
    bad["nodes"][0]["attrs"]["stride"] = [0, 1]
    with pytest.raises(ir.IRError, match="stride"):
        ir.graph_from_json(bad)
    with pytest.raises(ir.IRError, match="line 1"):
        ir.graph_from_json("{not json")


@pytest.mark.parametrize("make,msg", [
    (lambda g, x: emit("dense", x, g.param("w", (3, 4))), "Flatten"),
    (lambda g, x: emit("conv2d", x, g.param("w", (9, 9, 3, 4))), "larger than the padded input"),
    (lambda g, x: emit("conv2d", x, g.param("w", (3, 3, 2, 4))), "channels"),
    (lambda g, x: emit("conv2d", x, g.param("w", (3, 3, 3, 4)), padding="middle"), "unknown padding"),
    (lambda g, x: emit("conv2d", x, g.param("w", (3, 3, 3, 4)), activation="swish"), "unknown activation"),
    (lambda g, x: emit("max_pool2d", x, pool=0), "pool size"),
    (lambda g, x: emit("add", x, g.param("w", (5,))), "broadcast"),
])
def test_shape_errors(make, msg):
    g = ir.Graph("bad")
    x = g.input("x", (None, 8, 8, 3))
    with pytest.raises(ir.IRError, match=msg):
        make(g, x)


def test_verifier_catches_corruption():
    g = small_net()
    g.nodes[0].outputs[0].type = ir.TensorType((None, 7, 7, 4))
    with pytest.raises(ir.IRError, match="inferred"):
        ir.verify_graph(g)
    g = small_net()
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(ir.IRError, match="before it is defined"):
        ir.verify_graph(g)


def test_networkx_view():
    import networkx as nx
    g = small_net()
    G = g.to_networkx()
    assert nx.is_directed_acyclic_graph(G)
    assert G.nodes["node:" + g.nodes[0].name]["op"] == "conv2d"
    order = [n for n in nx.topological_sort(G) if str(n).startswith("node:")]
    assert len(order) == len(g.nodes)


def test_flops_of_conv():
    g = small_net()
    conv = g.nodes[0]
    assert conv.opdef.flops(conv, 2) == 2 * 3 * 3 * 3 * (2 * 6 * 6 * 4)


def test_const_round_trip_inline_and_external():
    g = ir.Graph("c")
    x = g.input("x", (None, 3))
    small = g.const("small", np.array([1.5, -2.0, 3.25], np.float32))
    big = g.const("big", np.arange(60, dtype=np.float32).reshape(20, 3))
    g.output(emit("add", emit("add", x, small), emit("sum_to", big, shape=(3,))))
    text = ir.print_graph(g)
    assert "@external" in text and "[1.5, -2.0, 3.25]" in text
    with pytest.raises(ir.IRError, match="external"):
        ir.parse_graph(text)
    assert ir.parse_graph(text, consts={"big": g.consts["big"]}) == g
