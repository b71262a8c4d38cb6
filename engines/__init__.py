"""Runtime denoisers behind one protocol: torch, ONNX Runtime and TensorRT (DESIGN §3)."""

from __future__ import annotations

from .base import Denoiser, ShapeSpec
from .torch_denoiser import TorchDenoiser

ENGINE_KINDS = ("torch", "torch-compile", "onnx:DIR", "trt:DIR")

__all__ = ["ENGINE_KINDS", "Denoiser", "ShapeSpec", "TorchDenoiser", "load_engine"]


def load_engine(spec: str, pipe=None, device=None) -> Denoiser:
    """``torch`` / ``torch-compile`` (needs ``pipe``), ``onnx:DIR`` or ``trt:DIR``."""
    import torch

    kind, _, path = spec.partition(":")
    if kind in ("torch", "torch-compile") and not path:
        if pipe is None:
            raise ValueError(f"engine {spec!r} needs a loaded model")
        return TorchDenoiser(
            pipe.unet, controlnet=getattr(pipe, "controlnet", None), compile=kind == "torch-compile"
        )
    if kind == "onnx" and path:
        from .onnxruntime import OnnxRuntimeDenoiser

        cuda = torch.device(device).type == "cuda" if device is not None else False
        return OnnxRuntimeDenoiser(
            path, providers=["CUDAExecutionProvider" if cuda else "CPUExecutionProvider"]
        )
    if kind == "trt" and path:
        from .tensorrt import TensorRTDenoiser

        return TensorRTDenoiser(path)
    raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {spec!r}")
