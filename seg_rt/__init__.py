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


def generate_video(model, prompt: str = GenerationParams.prompt, **kwargs):
    """Videos with SEG: ``seg_rt.video.sampling.generate_video`` (text-to-video, or image-to-video
    with ``image=``), imported when called so that ``import seg_rt`` loads no video code."""
    from seg_rt.video.sampling import generate_video as run

    return run(model, prompt, **kwargs)


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
    "generate_video",
    "run_params",
    "seg_guidance",
]
