"""Which of seg-rt's own demo pipelines (image or video) a model folder names: the one place that
knows both classes (``model`` and ``video_model`` import each other's folder rules from nowhere else)."""

from __future__ import annotations

from pathlib import Path

from .model import SEGDemoPipeline, index_class
from .video_model import SEGDemoVideoPipeline

_CLASSES = {cls.__name__: cls for cls in (SEGDemoPipeline, SEGDemoVideoPipeline)}
DEMO_PIPELINES = tuple(_CLASSES)  # the class names a folder may name


def demo_pipeline_class(path: str | Path | None):
    """The demo class (image or video) a folder names, or None for any other folder."""
    return _CLASSES.get(index_class(path)) if path is not None else None
