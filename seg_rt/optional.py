"""Optional heavy dependencies, imported where used, with an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "tensorrt": "gpu",
    "ray": "cluster",
    "yaml": "cluster",
    "fastapi": "cluster",
    "cv2": "video",
    "av": "video",
    "imageio": "video",
    "matplotlib": "plot",
    "fsspec": "storage",
    "s3fs": "storage",
    "peft": "lora",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """``import module`` or raise ``ImportError`` naming the seg-rt extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], "")
        hint = f"pip install 'seg-rt[{extra}]'" if extra else f"pip install {module}"
        what = f" (needed for {purpose})" if purpose else ""
        raise ImportError(f"{module} is not installed{what}: {hint}") from exc
