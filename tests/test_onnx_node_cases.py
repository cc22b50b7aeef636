"""The ONNX backend node test cases (built by the generators the onnx wheel ships) for the ops the importer
covers, run on both backends with ONNX Runtime as the oracle.

Every collected case either imports and matches ONNX Runtime, or is in LEFT_OUT and must fail with one
OnnxImportError whose message contains the listed reason (never a wrong answer). Run with -s to print the
pass counts per backend (test_summary).
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import onnx  # noqa: E402  (the test extra installs onnx and onnxruntime: these tests run in CI)
import onnxruntime as ort  # noqa: E402

import graphcnn as gc  # noqa: E402
from graphcnn.onnx import OnnxImportError, import_graph  # noqa: E402

OPS = ("Conv ConvTranspose Relu MaxPool AveragePool GlobalAveragePool GlobalMaxPool BatchNormalization Gemm MatMul Add Sub Mul "
       "Div Flatten Reshape Transpose Concat Squeeze Unsqueeze Identity Dropout Constant Softmax LogSoftmax "
       "LeakyRelu Sigmoid Tanh Clip HardSigmoid HardSwish PRelu Pad ReduceMean SoftmaxCrossEntropyLoss "
       "NegativeLogLikelihoodLoss").split()

# case name -> why it is left out: a substring of the importer's one error for it. Reasons: integer
# element types (graphcnn computes float32); pooling dilations, 3-D windows, average pooling
# with ceil_mode and count_include_pad, MaxPool's Indices output and storage_order; ConvTranspose with
# groups, output_shape, SAME auto_pad or 1-D/3-D; Dropout's mask output and training
# mode, batch-norm training mode, N-D MatMul, empty tensors.
LEFT_OUT: dict[str, str] = {
    "test_add_int16": "element type",
    "test_add_int8": "element type",
    "test_add_uint16": "element type",
    "test_add_uint32": "element type",
    "test_add_uint64": "element type",
    "test_add_uint8": "element type",
    "test_averagepool_3d_default": "only 1-D and 2-D windows",
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False": "only 1-D and 2-D windows",
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True": "only 1-D and 2-D windows",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False": "only 1-D and 2-D windows",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True": "only 1-D and 2-D windows",
    "test_averagepool_3d_dilations_small": "only 1-D and 2-D windows",
    "test_clip_default_int8_inbounds": "element type",
    "test_clip_default_int8_max": "element type",
    "test_clip_default_int8_min": "element type",
    "test_convtranspose_3d": "only 2-D ConvTranspose",
    "test_div_int16": "element type",
    "test_div_int32_trunc": "element type",
    "test_div_int8": "element type",
    "test_div_uint16": "element type",
    "test_div_uint32": "element type",
    "test_div_uint64": "element type",
    "test_div_uint8": "element type",
    "test_dropout_default_mask": "output 1",
    "test_dropout_default_mask_ratio": "output 1",
    "test_edge_pad": "element type",
    "test_maxpool_2d_uint8": "element type",
    "test_maxpool_3d_default": "only 1-D and 2-D windows",
    "test_maxpool_3d_dilations": "only 1-D and 2-D windows",
    "test_maxpool_3d_dilations_use_ref_impl": "only 1-D and 2-D windows",
    "test_maxpool_3d_dilations_use_ref_impl_large": "only 1-D and 2-D windows",
    "test_maxpool_with_argmax_2d_precomputed_pads": "output 1",
    "test_maxpool_with_argmax_2d_precomputed_strides": "storage_order",
    "test_mul_int16": "element type",
    "test_mul_int8": "element type",
    "test_mul_uint16": "element type",
    "test_mul_uint32": "element type",
    "test_mul_uint64": "element type",
    "test_mul_uint8": "element type",
    "test_reflect_pad": "element type",
    "test_reshape_allowzero_reordered": "empty tensors",
    "test_sub_int16": "element type",
    "test_sub_int8": "element type",
    "test_sub_uint16": "element type",
    "test_sub_uint32": "element type",
    "test_sub_uint64": "element type",
    "test_sub_uint8": "element type",
    "test_training_dropout": "training_mode",
    "test_training_dropout_default": "training_mode",
    "test_training_dropout_default_mask": "training_mode",
    "test_training_dropout_mask": "training_mode",
    "test_training_dropout_zero_ratio": "training_mode",
    "test_training_dropout_zero_ratio_mask": "training_mode",
    "test_wrap_pad": "element type",
}


NOT_TENSORS: list = []


def _collect():
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = {}
        for c in collect_testcases():
            if c.kind != "node" or "_expanded" in c.name:
                continue    # an "expanded" case is the same test spelled with the op's function body
            if not (c.model.graph.node and all(n.op_type in OPS for n in c.model.graph.node)):
                continue
            if not all(vi.type.HasField("tensor_type") for vi in list(c.model.graph.input) + list(c.model.graph.output)):
                NOT_TENSORS.append(c.name)     # sequence / optional values: graphcnn graphs hold tensors only
                continue
            cases[c.name] = c
    return cases


CASES = _collect()
RESULTS: dict = {}


def _static_inputs(case, feeds):
    """Freeze the operands a graphcnn graph cannot take at run time: integer operands after the data
    (shapes, axes, pads) and the operands after the first of Clip and Pad (bounds and pad values). The
    integer targets of the loss ops stay run-time inputs (fed as numbers)."""
    g = case.model.graph
    init = {i.name for i in g.initializer}
    ops = {n.op_type for n in g.node}
    targets = {n.input[1] for n in g.node if n.op_type in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss")}
    static = {}
    for i, vi in enumerate(x for x in g.input if x.name not in init):
        a = feeds[vi.name]
        if i > 0 and vi.name not in targets and (a.dtype.kind != "f" or ops & {"Clip", "Pad"}):
            static[vi.name] = a
    return static


def _oracle(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_node_case(name, backend):
    case = CASES[name]
    g = case.model.graph
    init = {i.name for i in g.initializer}
    names = [vi.name for vi in g.input if vi.name not in init]
    inputs, expected = case.data_sets[0]
    feeds = {k: np.asarray(v) for k, v in zip(names, inputs)}
    static = _static_inputs(case, feeds)
    if name in LEFT_OUT:
        with pytest.raises(OnnxImportError, match=re.escape(LEFT_OUT[name])):
            import_graph(case.model.SerializeToString(), static_inputs=static)
        RESULTS[(name, backend)] = "left out"
        return
    graph = import_graph(case.model.SerializeToString(), static_inputs=static)
    try:
        want = _oracle(case.model, feeds)
    except Exception:                       # ORT lacks the op at this opset: the generator's own reference
        want = expected
    fn = gc.compile(graph, backend=backend)
    got = fn(**{k: v.astype(np.float32) for k, v in feeds.items() if k not in static})
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for gv, wv in zip(got, want):
        np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-6, equal_nan=True)
    RESULTS[(name, backend)] = "pass"


def test_summary():
    """Counts (printed with -s); asserts that every case ran and was either passed or left out as listed."""
    per = {}
    for (name, backend), r in RESULTS.items():
        per.setdefault(backend, {}).setdefault(r, 0)
        per[backend][r] += 1
    print(f"\nONNX node cases: {len(CASES)} collected for {len(OPS)} ops; per backend: {per}")
    print(f"  not collected (sequence/optional values, not tensors): {', '.join(NOT_TENSORS)}")
    for name, why in sorted(LEFT_OUT.items()):
        print(f"  left out {name}: {why}")
    assert set(LEFT_OUT) <= set(CASES), sorted(set(LEFT_OUT) - set(CASES))
