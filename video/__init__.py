"""SEG for video diffusion: spatial, temporal and spatio-temporal query blur (``seg_rt.video``)."""

from .attention import MODES, VideoBlur, VideoSEG

__all__ = ["MODES", "VideoBlur", "VideoSEG"]
