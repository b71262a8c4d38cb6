"""seg-rt: Smoothed Energy Guidance (SEG, arXiv 2408.00760) for diffusers models.

The core imports no optional heavy dependency (ONNX Runtime, TensorRT, Ray) at module level.
"""

from importlib.metadata import PackageNotFoundError, version

from .blur import QueryBlur, blur_matrix
from .config import SEGConfig
from .execution import BranchParallel
from .guidance import seg_guidance
from .params import GenerationParams, VideoParams
from .pipeline import generate, generate_batch, run_params

try:
    __version__ = version("seg-rt")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "BranchParallel",
    "GenerationParams",
    "QueryBlur",
    "SEGConfig",
    "VideoParams",
    "__version__",
    "blur_matrix",
    "generate",
    "generate_batch",
    "run_params",
    "seg_guidance",
]
