"""Graph passes and the pass manager. One pass, one module; every pass is Graph -> Graph (or an
analysis) and pure. `run_pipeline` runs a named pipeline, verifying after every pass, and can print
the IR after each one (`--print-ir-after-all`)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from ..graph import Graph
from ..types import IRError
from ..verify import verify_graph
from .cse import eliminate_common_subexpressions
from .dce import eliminate_dead_code
from .decompose_grouped_conv import decompose_grouped_conv
from .drop_dropout import drop_dropout
from .fold_batch_norm import fold_batch_norm
from .fold_constants import fold_constants
from .fold_relu_grad import fold_relu_grad
from .fold_softmax_cross_entropy import fold_softmax_cross_entropy
from .fuse_bias_activation import fuse_bias_activation
from .fuse_conv_pool import fuse_conv_pool
from .plan_memory import plan_memory

PASSES = {
    "verify": verify_graph,
    "dce": eliminate_dead_code,
    "drop_dropout": drop_dropout,
    "fold_constants": fold_constants,
    "cse": eliminate_common_subexpressions,
    "fuse_bias_activation": fuse_bias_activation,
    "fuse_conv_pool": fuse_conv_pool,
    "fold_softmax_cross_entropy": fold_softmax_cross_entropy,
    "plan_memory": plan_memory,
    "fold_batch_norm": fold_batch_norm,
    "fold_relu_grad": fold_relu_grad,
    "decompose_grouped_conv": decompose_grouped_conv,
}

PIPELINES = {
    "inference": ["verify", "drop_dropout", "fold_batch_norm", "decompose_grouped_conv", "fold_constants", "cse",
                  "fuse_bias_activation", "fuse_conv_pool", "dce", "plan_memory"],
    "training_forward": ["verify", "fold_softmax_cross_entropy", "dce"],
    "training": ["verify", "decompose_grouped_conv", "cse", "fuse_bias_activation", "fold_relu_grad", "dce",
                 "plan_memory"],
    "none": ["verify"],
}


def _carry_annotations(before: Graph, after: Graph) -> None:
    """Passes that rebuild a graph drop attributes set by earlier passes; keep `fused` (the names of
    fused nodes, for reports and tests) across them, minus nodes that no longer exist."""
    if hasattr(before, "fused") and not hasattr(after, "fused"):
        after.fused = [name for name in before.fused if after.has_value(name)]


def register_pass(name: str, fn) -> None:
    """Make a Graph -> Graph function available to pipelines under `name`."""
    PASSES[name] = fn


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    values_removed: int
    note: str = ""


@dataclass
class PipelineResult:
    graph: Graph
    records: list = field(default_factory=list)


def run_pipeline(g: Graph, pipeline="inference", print_ir_after_all: bool = False, out=None) -> PipelineResult:
    """Run passes (a pipeline name or a list of pass names) on g; verify after each pass."""
    names = PIPELINES.get(pipeline) if isinstance(pipeline, str) else list(pipeline)
    if names is None:
        raise IRError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise IRError(f"unknown pass(es) {unknown}; known passes: {', '.join(sorted(PASSES))}")
    out = out or sys.stdout
    result = PipelineResult(g)
    for name in names:
        before = result.graph
        nvals = sum(1 for _ in before.values())
        t0 = time.perf_counter()
        after = PASSES[name](before)
        dt = time.perf_counter() - t0
        if after is None or not isinstance(after, Graph):
            raise IRError(f"pass {name!r} did not return a Graph")
        verify_graph(after)
        _carry_annotations(before, after)
        rec = PassRecord(name, dt, len(before.nodes), len(after.nodes), nvals - sum(1 for _ in after.values()),
                         getattr(after, "pass_note", "") if after is not before else "")
        result.records.append(rec)
        result.graph = after
        if print_ir_after_all:
            print(f"// ----- IR after {name}: {rec.nodes_before} -> {rec.nodes_after} nodes, "
                  f"{rec.values_removed} values removed, {dt * 1e3:.2f} ms {rec.note}".rstrip(), file=out)
            print(after, file=out)
    return result
