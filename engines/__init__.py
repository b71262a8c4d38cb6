"""Runtime denoisers behind one protocol (``base.Denoiser``): torch, ONNX Runtime and TensorRT."""

from __future__ import annotations

from seg_rt.execution import ENGINE_KINDS, parse_engine_spec

from .base import Denoiser, FixedShapeDenoiser, ShapeSpec
from .torch_denoiser import TorchDenoiser

__all__ = ["ENGINE_KINDS", "Denoiser", "FixedShapeDenoiser", "ShapeSpec", "TorchDenoiser", "load_engine"]


def load_engine(spec: str, pipe=None, device=None) -> Denoiser:
    """``torch`` / ``torch-compile`` (needs ``pipe``), ``onnx:DIR`` or ``trt:DIR``.

    ``torch`` is the model family's eager denoiser (``Family.denoiser``: ``TorchDenoiser`` over a
    UNet, ``DiTDenoiser`` over an image DiT's transformer); exported engines take inputs by name for
    every family.

    The caller owns the result: close it (``with load_engine(...) as engine:``) when done.
    """
    import torch

    kind, path = parse_engine_spec(spec)
    device = torch.device(device) if device is not None else None
    if kind in ("torch", "torch-compile"):
        if pipe is None:
            raise ValueError(f"engine {spec!r} needs a loaded model")
        from seg_rt.families import family_of

        return family_of(pipe).denoiser(pipe, compile=kind == "torch-compile")
    if kind == "onnx":
        from .onnxruntime import OnnxRuntimeDenoiser

        cuda = device is not None and device.type == "cuda"
        return OnnxRuntimeDenoiser(
            path, providers=["CUDAExecutionProvider" if cuda else "CPUExecutionProvider"]
        )
    from .tensorrt import TensorRTDenoiser

    index = device.index if device is not None and device.type == "cuda" else None
    return TensorRTDenoiser(path, device=index or 0)
