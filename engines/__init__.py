"""Runtime denoisers behind one protocol: torch (here), ONNX Runtime and TensorRT (export issue)."""

from .base import Denoiser, ShapeSpec
from .torch_denoiser import TorchDenoiser

__all__ = ["Denoiser", "ShapeSpec", "TorchDenoiser"]
