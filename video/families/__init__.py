"""Video model families (``base.VideoFamily``), registered into the one family registry
(``seg_rt.families.REGISTRY``) when this package is imported.

Adding a video family = one new file with a ``VideoFamily`` subclass plus one line below.
"""

from __future__ import annotations

from seg_rt.families import REGISTRY

from .animatediff import AnimateDiffFamily
from .base import VideoFamily
from .cogvideox import CogVideoXFamily
from .ltx import LTXFamily
from .svd import SVDFamily
from .wan import WanFamily

for _family in (AnimateDiffFamily, CogVideoXFamily, WanFamily, LTXFamily, SVDFamily):
    REGISTRY.register(_family())

__all__ = ["VideoFamily", "video_family_of", "video_family_of_model"]


def video_family_of(pipe) -> VideoFamily:
    """The video family of a loaded pipeline, or a ``ValueError`` naming the supported ones."""
    return REGISTRY.of(pipe, "video")


def video_family_of_model(model) -> VideoFamily:
    """The video family whose network ``model`` is (a motion UNet or video transformer)."""
    return REGISTRY.for_model(model, "video")
