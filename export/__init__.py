"""Export SEG-patched denoisers: ONNX (fixed shapes, baked or runtime σ) and TensorRT engines."""

from .onnx import ExportResult, ExportValidationError, export_onnx

__all__ = ["ExportResult", "ExportValidationError", "export_onnx"]
