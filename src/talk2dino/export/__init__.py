"""Model export. `export_onnx` writes the image encoder, the text encoder and psi as ONNX graphs
(run them with `talk2dino.models.onnx_runtime.load_onnx_model`). Needs the ``onnx`` extra."""

from talk2dino.export.onnx import OnnxExportError, export_onnx

__all__ = ["OnnxExportError", "export_onnx"]
