"""Runtime denoisers behind one protocol (``base.Denoiser``): torch, ONNX Runtime and TensorRT."""

from __future__ import annotations

from .base import Denoiser, FixedShapeDenoiser, ShapeSpec
from .torch_denoiser import TorchDenoiser

ENGINE_KINDS = ("torch", "torch-compile", "onnx:DIR", "trt:DIR")

__all__ = ["ENGINE_KINDS", "Denoiser", "FixedShapeDenoiser", "ShapeSpec", "TorchDenoiser", "load_engine"]


def load_engine(spec: str, pipe=None, device=None) -> Denoiser:
    """``torch`` / ``torch-compile`` (needs ``pipe``), ``onnx:DIR`` or ``trt:DIR``.

    The caller owns the result: close it (``with load_engine(...) as engine:``) when done.
    """
    import torch

    kind, _, path = spec.partition(":")
    device = torch.device(device) if device is not None else None
    if kind in ("torch", "torch-compile") and not path:
        if pipe is None:
            raise ValueError(f"engine {spec!r} needs a loaded model")
        return TorchDenoiser(
            pipe.unet, controlnet=getattr(pipe, "controlnet", None), compile=kind == "torch-compile"
        )
    if kind == "onnx" and path:
        from .onnxruntime import OnnxRuntimeDenoiser

        cuda = device is not None and device.type == "cuda"
        return OnnxRuntimeDenoiser(
            path, providers=["CUDAExecutionProvider" if cuda else "CPUExecutionProvider"]
        )
    if kind == "trt" and path:
        from .tensorrt import TensorRTDenoiser

        index = device.index if device is not None and device.type == "cuda" else None
        return TensorRTDenoiser(path, device=index or 0)
    raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {spec!r}")
