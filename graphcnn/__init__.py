"""graphcnn: a small dataflow-graph compiler and runtime for convolutional networks.

DSL (layers, gc.Model / Sequential, gc.ops) -> ir.Graph -> passes -> backend (llvm | numpy) -> runtime.
"""
__version__ = "0.1.0"

from ir import Graph, IRError  # noqa: E402

from . import layers, ops, datasets, callbacks, optimizers, distributed  # noqa: E402
from . import onnx  # noqa: E402  (gc.onnx; the onnx package itself is imported on first use)
from .compiler import compile, grad  # noqa: E402,A001
from .errors import GraphcnnError, LayerError, TrainingError  # noqa: E402
from .model import Model, Sequential, load_model  # noqa: E402
from .callbacks import History  # noqa: E402
from .artifact import load, ArtifactError  # noqa: E402
from .quantize import quantize  # noqa: E402

__all__ = ["Graph", "IRError", "layers", "ops", "datasets", "callbacks", "optimizers", "distributed", "onnx", "compile", "grad",
           "Model", "Sequential", "History", "load", "load_model", "GraphcnnError", "LayerError", "TrainingError",
           "ArtifactError", "quantize", "__version__"]
