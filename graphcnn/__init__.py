"""graphcnn: a small dataflow-graph compiler and runtime for convolutional networks.

DSL (layers, Sequential, gc.ops) -> ir.Graph -> passes -> backend (llvm | numpy) -> runtime.
"""
__version__ = "0.1.0"

from ir import Graph, IRError  # noqa: E402

from . import layers, ops, datasets  # noqa: E402
from .compiler import compile, grad  # noqa: E402,A001
from .errors import GraphcnnError, LayerError, TrainingError  # noqa: E402
from .model import Sequential, History  # noqa: E402
from .artifact import load, ArtifactError  # noqa: E402

__all__ = ["Graph", "IRError", "layers", "ops", "datasets", "compile", "grad", "Sequential", "History",
           "load", "GraphcnnError", "LayerError", "TrainingError", "ArtifactError", "__version__"]
