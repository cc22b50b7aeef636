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
from .dce import eliminate_dead_code

PASSES = {
    "verify": verify_graph,
    "dce": eliminate_dead_code,
}

PIPELINES = {
    "inference": ["verify", "dce"],
    "training_forward": ["verify", "dce"],
    "training": ["verify", "dce"],
    "none": ["verify"],
}


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
        rec = PassRecord(name, dt, len(before.nodes), len(after.nodes), nvals - sum(1 for _ in after.values()),
                         getattr(after, "pass_note", ""))
        result.records.append(rec)
        result.graph = after
        if print_ir_after_all:
            print(f"// ----- IR after {name}: {rec.nodes_before} -> {rec.nodes_after} nodes, "
                  f"{rec.values_removed} values removed, {dt * 1e3:.2f} ms {rec.note}".rstrip(), file=out)
            print(after, file=out)
    return result
