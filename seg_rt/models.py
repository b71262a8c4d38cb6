"""Opening a model for sampling: one ``open_model`` for the CLI, job workers, the serving core and
branch-parallel ranks (resolve a model URL, fix the thread count, load the pipeline, choose and load
the engine; close both together)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import lora
from .execution import parse_engine_spec
from .families import Family, family_of
from .lora import LoRA
from .model_refs import check_model_url, is_url  # the model URL rule (is_url re-exported)


@dataclass
class OpenModel:
    """A loaded pipeline, its family and its denoiser (``None`` for video models: a video run builds
    its denoiser per request). Close it (or use it as a context manager) to close the engine. While
    it is open its torch engine owns SEG on the pipeline: sample that pipeline through this engine
    (``run_params(pipe, ..., engine=opened.engine)``); another SEG install on it is refused
    (``SEGAlreadyInstalled``)."""

    pipe: Any
    family: Family
    engine: Any

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> OpenModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_model(model: str) -> str:
    """``model`` as ``load_pipeline`` takes it: an object-storage URL (``s3://...``) fetched into the
    local model cache once per machine, anything else as it is. A URL carrying credentials or a
    query is refused (``check_model_url``) before anything is fetched."""
    if not is_url(check_model_url(model)):
        return model
    # object storage (the [storage] extra) is fetched by seg_rt.cluster.storage: a lazy import
    # listed in tests/test_boundaries.py
    from seg_rt.cluster.storage import resolve_model as fetch

    return fetch(model)


def open_model(
    model: str | Path | Any,
    engine: str | None = "torch",
    device: str | torch.device | None = None,
    threads: int | None = None,
    loras: Sequence[LoRA] = (),
    model_config: str | Path | None = None,
) -> OpenModel:
    """Open ``model`` (a folder, hub id, model URL or loaded pipeline) with ``engine`` (a spec:
            ``torch``, ``torch-compile``, ``onnx:DIR``, ``trt:DIR``; ``None``: no engine, e.g. for an
            export that patches the model itself) on ``device`` (default: CUDA when present). ``threads``: torch's CPU thread count, set before loading (CPU results depend on it,
            so whoever needs reproducible numbers fixes it). ``loras``: LoRA files loaded into the pipeline
        as adapters (``seg_rt.lora``; a server's preloaded set), each request then picks its own. A bad engine
        spec fails before anything loads. ``model_config``: for a single-file checkpoint, the diffusers folder
    whose component configs it takes (``seg_rt.singlefile``)."""
    from .pipeline import load_pipeline

    kind = parse_engine_spec(engine)[0] if engine is not None else None
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    lora.check_engine(kind == "torch", loras, engine)
    if isinstance(model, str | Path):
        pipe = load_pipeline(resolve_model(str(model)), device, model_config=model_config)
    else:
        pipe = model
    family = family_of(pipe)
    lora.load(pipe, loras)
    if engine is None:
        return OpenModel(pipe, family, None)
    if family.kind == "video":
        if kind != "torch":
            raise ValueError(
                f"engine {engine!r} is not available for video models ({family.name}); use torch"
            )
        return OpenModel(pipe, family, None)
    from seg_rt.engines import load_engine

    return OpenModel(pipe, family, load_engine(engine, pipe, pipe._execution_device))
