"""graphcnn's user-facing errors. All derive from ValueError or RuntimeError, so callers that catch
those keep working; the CLI maps them to exit codes."""
from ir.types import IRError


class GraphcnnError(ValueError):
    """Bad input from the user: a model definition, an argument, data or a file."""


class LayerError(GraphcnnError):
    """A layer cannot be built as written (shapes, arguments). The message names the layer."""


class TrainingError(RuntimeError):
    """Training could not continue (e.g. the loss became NaN)."""


__all__ = ["GraphcnnError", "LayerError", "TrainingError", "IRError"]
