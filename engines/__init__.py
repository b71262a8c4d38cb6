"""Runtime denoisers behind one protocol: torch, ONNX Runtime and TensorRT (DESIGN §3)."""

from __future__ import annotations

from seg_rt.params import ENGINE_KINDS, parse_engine_spec

from .base import Denoiser, ShapeSpec
from .torch_denoiser import TorchDenoiser

__all__ = ["ENGINE_KINDS", "Denoiser", "ShapeSpec", "TorchDenoiser", "load_engine"]


def load_engine(spec: str, pipe=None, device=None) -> Denoiser:
    """``torch`` / ``torch-compile`` (needs ``pipe``), ``onnx:DIR`` or ``trt:DIR``."""
    import torch

    kind, path = parse_engine_spec(spec)
    if kind in ("torch", "torch-compile"):
        if pipe is None:
            raise ValueError(f"engine {spec!r} needs a loaded model")
        return TorchDenoiser(
            pipe.unet, controlnet=getattr(pipe, "controlnet", None), compile=kind == "torch-compile"
        )
    if kind == "onnx":
        from .onnxruntime import OnnxRuntimeDenoiser

        cuda = torch.device(device).type == "cuda" if device is not None else False
        return OnnxRuntimeDenoiser(
            path, providers=["CUDAExecutionProvider" if cuda else "CPUExecutionProvider"]
        )
    from .tensorrt import TensorRTDenoiser

    return TensorRTDenoiser(path)
