"""Which pipeline classes seg-rt samples, and which family (prompt encoding, inputs) each one is.

Decided by ``isinstance`` against the classes themselves (a subclass of a diffusers pipeline
belongs to its family), never by class names. It lives apart from ``seg_rt.pipeline`` so that the model definitions
it names (diffusers' and the demo's) never have to import the sampling code back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

FAMILIES = ("demo", "sdxl-controlnet", "sdxl", "sd15", "sd3", "flux", "qwenimage")


def _family_classes() -> Iterator[tuple[type, str]]:
    """(class, family), most specific first. Each class is imported only when the ones before it
    did not match: diffusers' SD pipelines pull in transformers' image processors (and their
    warnings), which the pixel-space demo model never needs."""
    from seg_rt.demo.model import SEGDemoPipeline

    yield SEGDemoPipeline, "demo"
    from diffusers import StableDiffusionXLControlNetPipeline

    yield StableDiffusionXLControlNetPipeline, "sdxl-controlnet"
    from diffusers import StableDiffusionXLPipeline

    yield StableDiffusionXLPipeline, "sdxl"
    from diffusers import StableDiffusionPipeline

    yield StableDiffusionPipeline, "sd15"
    from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline

    yield StableDiffusion3Pipeline, "sd3"  # the image DiTs (seg_rt.dit)
    yield FluxPipeline, "flux"
    yield QwenImagePipeline, "qwenimage"


def family_of(pipe) -> str:
    """The family of a loaded pipeline (one of ``FAMILIES``), or a ``ValueError`` naming what is supported."""
    for cls, family in _family_classes():
        if isinstance(pipe, cls):
            return family
    raise ValueError(
        f"unsupported pipeline {type(pipe).__name__}; seg-rt generate supports SD1.5, SDXL, SDXL+ControlNet, "
        "SD3 / SD3.5, Flux.1, Qwen-Image and the bundled demo model"
    )


def pipeline_class(folder: str | Path | None):
    """The class that loads a model folder: the demo's own class for a demo (image or video) folder
    (diffusers cannot look it up by name), else diffusers' ``DiffusionPipeline`` (which reads
    ``model_index.json``)."""
    from diffusers import DiffusionPipeline

    if folder is not None:
        from seg_rt.demo.folders import demo_pipeline_class

        return demo_pipeline_class(folder) or DiffusionPipeline
    return DiffusionPipeline
