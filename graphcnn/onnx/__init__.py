"""ONNX in and out (needs the `onnx` extra: pip install ".[onnx]").

    g = gc.onnx.import_graph("model.onnx")       # gc.Graph with the file's names and NCHW layout
    m = gc.onnx.import_model("model.onnx")       # gc.Model: predict, compile + fit, save, compile to .so
    outs = gc.compile(g)(**feeds)                # like onnxruntime's session.run(None, feeds)
    gc.onnx.export(model_or_graph, "m.onnx")     # NCHW at the boundary; ONNX Runtime gives the same outputs

The `onnx` package is imported on first use, so `import graphcnn` works without it.
"""
from .importer import OnnxImportError, import_graph
from .exporter import OnnxExportError, export
from .model import OnnxGraph, import_model

__all__ = ["import_graph", "import_model", "export", "OnnxGraph", "OnnxImportError", "OnnxExportError"]
