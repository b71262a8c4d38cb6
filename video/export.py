"""Export a SEG-patched video DiT (CogVideoX, Wan, LTX-Video) to a fixed-shape ONNX graph, and serve
video requests with it (``generate_video(engine="onnx:DIR")``).

The graph is the image export's (``seg_rt.export.onnx``): the sampler's named inputs for one batch
(``sample`` ``[B, C, F, h, w]`` — CogVideoX ``[B, F, C, h, w]`` —, ``timestep``, ``encoder_hidden_states``,
``seg_mask``) → ``out_sample``, traced from the family's own call (``VideoFamily.forward``) with the
inputs every row shares (RoPE tables, LTX's interpolation scales) baked in for the export's frames and
size. The export inputs are a batch the sampler itself builds (``build_batch`` over the family's
``encode`` / ``initial_latents``), so the graph takes exactly what a video run feeds it. The video blur
(``VideoSEG``: spatial, temporal or spatio-temporal, σ and σ_time baked) keeps ``seg_mask`` as data.
``fork`` puts the shared-prefix fork in the graph as for image DiTs (``export.fork``: the transformer
blocks before the first SEG block on the unperturbed rows, ``fork_source`` a runtime input) and writes
the unforked twin. Not exported: AnimateDiff's motion UNet and Stable Video Diffusion (UNets that fold
frames into the batch), image-to-video conditioning, a runtime σ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.artifacts import ArtifactInfo
from seg_rt.config import check_sigma
from seg_rt.export.onnx import (
    ONNX_FILE,
    OUTPUT_NAME,
    TWIN_FILE,
    ExportFeeds,
    ExportResult,
    fork_block_of,
    versions,
    write_export,
)
from seg_rt.sampler import build_batch, row_layout

from .attention import VideoBlur, VideoSEG
from .families import video_family_of, video_family_of_model

EXPORTABLE = ("cogvideox", "wan", "ltx")  # the video DiTs (the UNets fold frames into the batch)


class SEGVideoDiT(nn.Module):
    """A video DiT with ``VideoSEG`` installed, as the export traces it: ``forward(inputs)`` → the
    prediction, the rows' shared inputs (``shared``) fixed. The export code's SEG-model interface
    (``seg``, ``transformer``, ``grids``, ``remove``, ``controlnet``), as ``SEGDiT``'s."""

    controlnet = None

    def __init__(self, transformer: nn.Module, blur: VideoBlur, layers: Sequence[str] | None, shared) -> None:
        super().__init__()
        self.transformer = transformer
        self.family = video_family_of_model(transformer)
        self.shared = dict(shared)
        self.seg = VideoSEG(transformer, blur, layers).install()

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), row_layout(inputs).seg_rows)
        try:
            return self.family.forward(self.transformer, inputs, self.shared)
        finally:
            self.seg.set_mask(None)

    def grids(self) -> list:
        return []  # σ is baked (no runtime blur-matrix inputs)

    def remove(self) -> None:
        self.seg.remove()


def export_video_onnx(
    pipe,
    out_dir: str | Path,
    *,
    frames: int,
    height: int | None = None,
    width: int | None = None,
    with_cfg: bool = True,
    mode: str = "spatiotemporal",
    sigma: float = math.inf,
    sigma_time: float = 1.0,
    layers: Sequence[str] | None = None,
    opset: int = 18,
    validate: bool = True,
    overwrite: bool = False,
    model_name: str = "",
    fork: bool = False,
    twin: bool = True,
) -> ExportResult:
    """Export ``pipe``'s video transformer with video SEG (``mode``, ``sigma``, ``sigma_time`` baked, on
    ``layers``: ``None`` = every self-attention layer the mode uses) for one video per branch of
    ``frames`` output frames at ``height`` x ``width`` (default: the family's). ``fork`` / ``twin``: as
    ``seg_rt.export.export_onnx``. Written to a temp folder and renamed; validated against torch."""
    from seg_rt import __version__
    from seg_rt.params import request_from_fields
    from seg_rt.pipeline import seed_generators

    t0 = time.perf_counter()
    family = video_family_of(pipe)
    if family.name not in EXPORTABLE:
        raise ValueError(
            f"video ONNX export supports the families {', '.join(EXPORTABLE)}, got {family.name}"
        )
    check_sigma(sigma)
    blur = VideoBlur(mode, sigma, sigma_time)
    twin = fork and twin
    fields = {
        "prompt": "export",
        "frames": frames,
        "height": height,
        "width": width,
        "cfg": 5.0 if with_cfg else 1.0,
    }
    request = request_from_fields(
        {k: v for k, v in fields.items() if v is not None}, "video", what="video export"
    )
    height, width = family.size(pipe, request.height, request.width)
    latent_frames = family.latent_frames(pipe, request.video.frames)
    with torch.no_grad():
        prepared = family.encode(pipe, request, 1)
    sched = family.schedule(pipe, None, 2, frames=latent_frames, height=height, width=width)
    dtype = prepared.cond["encoder_hidden_states"].dtype
    x = family.initial_latents(
        pipe, sched, seed_generators([0]), frames=latent_frames, height=height, width=width, dtype=dtype
    )
    shared = family.shared_inputs(pipe, frames=latent_frames, height=height, width=width)
    branches = ("uncond", "cond", "seg") if with_cfg else ("cond", "seg")
    full = dict(build_batch(list(branches), x, sched.timesteps[0], prepared.cond, prepared.uncond))
    model = SEGVideoDiT(family.net(pipe), blur, layers, shared)
    try:
        prefix = len(branches) - 1
        fork_block = fork_block_of(model, prefix, 1) if fork else None
        feeds = ExportFeeds.of(full, prefix, 1, fork=fork, twin=twin, extra={})
        f = family.size_factor(pipe)
        info = ArtifactInfo(
            kind="onnx", family=family.name, model=model_name or str(getattr(pipe, "name_or_path", "") or ""),
            height=height, width=width, latent_height=height // f, latent_width=width // f, batch=1,
            branches=branches, input_names=tuple(feeds.inputs), output_names=(OUTPUT_NAME,),
            dtype=str(dtype).removeprefix("torch."), sigma=float(sigma), layers=tuple(layers or ()),
            layer_names=tuple(model.seg.layer_names), blur_lengths=(), opset=opset, file=ONNX_FILE,
            versions=versions(__version__), fork_block=fork_block, prefix_rows=prefix if fork else None,
            fork_rows=1 if fork else None, twin_file=TWIN_FILE if twin else None, frames=latent_frames,
            seg_mode=blur.mode, sigma_time=float(blur.sigma_time),
        )  # fmt: skip
        validation = write_export(out_dir, model, info, feeds, validate=validate, overwrite=overwrite)
    finally:
        model.remove()
    return ExportResult(Path(out_dir), info, validation, time.perf_counter() - t0)


def check_video_engine(
    info: ArtifactInfo, family, blur: VideoBlur, layers, frames: int, height: int, width: int
):
    """One line when a video export cannot serve this request (family, shapes, SEG mode, σ, σ_time,
    layers); before any step runs."""
    if info.frames is None:
        raise ValueError(
            f"engine is an image export ({info.family}); export the video model with seg-rt export video"
        )
    want = {
        "family": (info.family, family.name),
        "latent frames": (info.frames, frames),
        "height": (info.height, height),
        "width": (info.width, width),
        "seg mode": (info.seg_mode, blur.mode),
        "seg sigma": (float(info.sigma), float(blur.sigma)),
        "seg sigma time": (float(info.sigma_time), float(blur.sigma_time)),
    }
    for what, (have, got) in want.items():
        if have != got and not (isinstance(have, float) and math.isinf(have) and math.isinf(got)):
            raise ValueError(f"engine was exported for {what} {have}, got {got}; re-export for this request")
    if tuple(layers or ()) != info.layers:
        raise ValueError(
            f"engine was exported for seg layers {','.join(info.layers) or 'all'}, got {','.join(layers or ()) or 'all'}"
        )
