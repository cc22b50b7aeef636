"""graphcnn's graph IR: typed values, nodes, graphs, the op registry, text/JSON forms and passes.

Knows nothing of layers, datasets or backends.
"""
from .types import TensorType, IRError
from .graph import Graph, Node, Value
from . import ops
from .text import print_graph, parse_graph
from .serialize import graph_to_json, graph_from_json
from .verify import verify_graph
from .autodiff import grad

__all__ = ["TensorType", "IRError", "Graph", "Node", "Value", "ops", "print_graph", "parse_graph",
           "graph_to_json", "graph_from_json", "verify_graph", "grad"]
