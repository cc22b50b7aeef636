"""Graphs whose leading axis is a fixed size (an ONNX file exported with batch 3, a param-only graph)
give the same numbers as the same graph with a dynamic batch fed that many samples: every op family of
the differential tests, forward and gradients, both backends. (The LLVM kernels of per-sample ops loop
over a count: for a node without the batch axis it is the static leading dimension, not the call's n.)"""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import graphcnn as gc
from ir.text import parse_graph, print_graph
from op_cases import FAMILIES, Packed, op_case
from test_differential import SETTINGS

BATCH = 3


def fix_batch(g, n):
    """The same graph with every batch axis (`?`) fixed to n, through the text form."""
    text = print_graph(g)
    text = re.sub(r"\[\?", f"[{n}", text)
    text = re.sub(r'"shape": \[null', f'"shape": [{n}', text)        # reshape targets keep their batch
    return parse_graph(text)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fixed_leading_axis_equals_the_dynamic_batch(family):
    @settings(max_examples=2, **SETTINGS)
    @given(cases=st.lists(op_case((family,)), min_size=4, max_size=4), seed=st.integers(0, 2 ** 31))
    def check(cases, seed):
        pk = Packed(cases, name=f"static_{family}")
        dyn = pk.grad_graph()
        static = fix_batch(dyn, BATCH)
        assert not any(v.type.batched for v in static.inputs)
        feeds = pk.feeds(np.random.default_rng(seed), BATCH)
        for backend in ("numpy", "llvm"):
            a = gc.compile(dyn, backend=backend)
            b = gc.compile(static, backend=backend)
            ra = a(**{k: feeds[k] for k, _ in a.inputs})
            rb = b(**{k: feeds[k] for k, _ in b.inputs})
            for k, (x, y) in enumerate(zip(ra, rb)):
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, equal_nan=True,
                                           err_msg=f"{backend} output {k} ({dyn.outputs[k].name})")
    check()
