"""Video sampling with SEG (+ CFG): the image sampler's loop over a video denoiser.

Batching, the SEG window and per-sample seeds work exactly as for images (``seg_rt.sampler``):
one forward of ``[uncond, cond, perturbed]`` videos per step, video i drawn from seed + i and equal
to that seed run alone (to float rounding; usually bit for bit on CPU, not guaranteed for video). diffusers does prompt encoding (CLIP for AnimateDiff, T5 / UMT5 for
CogVideoX / Wan), RoPE tables, VAE decoding and video post-processing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.denoiser import batch_invariant
from seg_rt.execution import BranchParallel
from seg_rt.guidance import Guidance
from seg_rt.params import GenerationParams, request_from_fields
from seg_rt.pipeline import branch_group, load_pipeline, seed_generators
from seg_rt.prefix import TransformerFork
from seg_rt.sampler import row_layout, sample

from .attention import VideoBlur, VideoSEG
from .families import video_family_of, video_family_of_model

VIDEO_OUTPUT_TYPES = ("np", "pil", "latent")


def check_engine_request(engine: str, parallel, perturbation: str, video) -> None:
    """What an exported video engine cannot run, refused in one line before anything loads."""
    from seg_rt.execution import parse_engine_spec

    kind, _ = parse_engine_spec(engine)
    if kind not in ("onnx", "trt"):
        raise ValueError(f"a video engine is an exported folder (onnx:DIR or trt:DIR), got {engine!r}")
    if parallel is not None:
        raise ValueError("engine and branch parallel do not go together for video; drop one")
    if perturbation != "blur":
        raise ValueError(f"an exported video engine runs SEG's blur only, not perturbation {perturbation!r}")
    if video.image is not None:
        raise ValueError("image-to-video does not run on an exported video engine; drop engine")


class VideoDenoiser:
    """A video model with ``VideoSEG`` installed, called with the sampler's named inputs.

    Raises ``SEGNotApplied`` after a forward with perturbed rows in which no query was perturbed.
    ``shared_prefix`` (opt-in, as ``DiTDenoiser``'s): the transformer blocks before the first SEG
    layer run on the unperturbed rows only and the perturbed rows fork off the cond rows there
    (``seg_rt.prefix.TransformerFork``; AnimateDiff's motion UNet never forks).
    """

    def __init__(
        self,
        model: nn.Module,
        blur: VideoBlur,
        layers: Sequence[str] | None = None,
        extra: dict | None = None,
        shared_prefix: bool = False,
        perturbation: str = "blur",
    ) -> None:
        self.model = model
        self.extra = extra or {}  # model inputs shared by every row (CogVideoX's RoPE tables)
        self.family = video_family_of_model(model)  # how the network is called
        self.seg = VideoSEG(model, blur, layers, perturbation).install()
        self.prefix = TransformerFork(model, self.seg.layer_names) if shared_prefix else None
        self.invariant = batch_invariant(model).acquire()  # per-sample results independent of the batch

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), row_layout(inputs).seg_rows)  # host layout: no sync
        try:
            out = (
                self.prefix.run(inputs, self._dispatch) if self.prefix is not None else self._dispatch(inputs)
            )
            self.seg.check()  # SEG active but no query perturbed: an error, never a CFG-only result
            return out
        finally:
            self.seg.set_mask(None)

    def _dispatch(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.family.forward(self.model, inputs, self.extra)

    def close(self) -> None:
        self.seg.remove()
        if self.prefix is not None:
            self.prefix.remove()
        self.invariant.release()


def generate_video(
    model,
    prompt: str = GenerationParams.prompt,
    *,
    negative_prompt: str | None = GenerationParams.negative_prompt,
    seed: int = GenerationParams.seed,
    num_videos: int = 1,
    scheduler=None,
    output_type: str = "np",
    device: str | torch.device | None = None,
    progress: bool = False,
    params: GenerationParams | None = None,
    parallel: BranchParallel | int | None = None,
    wrap_denoiser: Callable | None = None,
    perturbation: str = "blur",
    callback=None,
    engine: str | None = None,
    **fields,
):
    """Videos with SEG on video attention. ``model``: a folder, hub id or loaded diffusers pipeline
    (AnimateDiff, CogVideoX, Wan or LTX-Video). AnimateDiff samples with Euler by default (as the
    paper); the DiTs with a fresh copy of their own scheduler unless one is given.

    The request is ``params`` (a ``GenerationParams`` with ``video``: what the CLI and job workers
    pass) or, without it, the keyword arguments: the video request fields by wire name
    (``seg_rt.params``: ``frames``, ``height``, ``width``, ``steps``, ``cfg``, ``seg_scale``,
    ``seg_mode``, ``seg_sigma``, ``seg_sigma_time``, ``seg_layers`` (video layers, ``None`` = every
    video self-attention layer), ``seg_start`` / ``seg_end``, the cheap modes, ``guidance_rescale``,
    ``sequential``; defaults ``GenerationParams`` / ``VideoParams``). Every field is honoured; one the
    model cannot honour (distilled guidance) is refused.
    ``image`` (a path, image bytes, PIL image or ``seg_rt.tasks.InputImage``): image-to-video, the
    video starts from that still (CogVideoX / Wan 2.1 image-to-video checkpoints, LTX-Video, Stable
    Video Diffusion), as the family's diffusers image-to-video pipeline conditions on it.
    Returns ``[B, F, H, W, 3]`` floats in [0, 1] (``"np"``), lists of PIL frames (``"pil"``) or the
    final latents (``"latent"``). Video i uses seed ``seed + i``. ``frames`` counts output frames;
    CogVideoX and Wan compress time 4x in their VAE, so they decode ``4k + 1`` frames.

    ``parallel``: branch-parallel SEG over ranks that each load ``model`` (a folder or hub id), as in
    ``seg_rt.run_params``. ``wrap_denoiser``: applied to the video denoiser before sampling (a rank
    passes ``seg_rt.engines.parallel.BranchParallelDenoiser``). ``perturbation="identity"``: the
    perturbed row skips the selected layers' attention (output = V, STG-style) instead of blurring
    (``VideoSEG``; AnimateDiff only; the benchmark's baseline). ``callback``: the sampler's step
    callback (``seg_rt.sampler.StepCallback``: progress, dropped rows), as in ``run_params``.
    ``engine``: ``onnx:DIR`` or ``trt:DIR``, a video export (``seg_rt.video.export``) of this model at
    the request's frames, size, SEG mode, σ, σ_time and layers (checked before sampling, one line);
    text-to-video with SEG's blur only.
    """
    if params is None:
        if isinstance(scheduler, str):
            fields["scheduler"] = scheduler
        fields.update(prompt=prompt, negative_prompt=negative_prompt, seed=seed)
        params = request_from_fields(fields, "video", what="generate_video")
    elif params.video is None:
        raise ValueError("generate_video needs a video request: GenerationParams(video=VideoParams(...))")
    elif fields:
        raise ValueError(f"generate_video takes params or request fields, not both; got {', '.join(fields)}")
    elif (prompt, negative_prompt, seed, scheduler) != (
        GenerationParams.prompt,
        GenerationParams.negative_prompt,
        GenerationParams.seed,
        None,
    ):
        raise ValueError("generate_video takes the prompt, seed and scheduler from params when it is given")
    else:
        scheduler = params.scheduler
    v = params.video
    blur = VideoBlur(v.mode, params.seg.sigma, v.sigma_time)
    # the sampler reads scale, window and cheap modes from SEGConfig; the blur itself is `blur`
    seg = dataclasses.replace(params.seg, sigma=math.inf, layers=("video",))
    if output_type not in VIDEO_OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(VIDEO_OUTPUT_TYPES)}, got {output_type!r}")
    if isinstance(num_videos, bool) or not isinstance(num_videos, int) or num_videos < 1:
        raise ValueError(f"num_videos must be an integer >= 1, got {num_videos!r}")
    guidance = Guidance.parse(params.guidance)
    if guidance.perturbed is not None:  # the list's perturbed term perturbs the seg_mask rows its way
        if perturbation != "blur":
            raise ValueError(
                f"guidance {guidance.perturbed.NAME} sets the perturbation; give no perturbation {perturbation!r}"
            )
        perturbation = guidance.perturbation()
    parallel = BranchParallel.of(parallel)
    if engine is not None:
        check_engine_request(engine, parallel, perturbation, v)
    if parallel is not None:
        if perturbation != "blur":
            raise ValueError(f"branch parallel runs the blur only, not perturbation {perturbation!r}")
        if device is not None or (scheduler is not None and not isinstance(scheduler, str)):
            raise ValueError(
                "branch parallel takes no device or scheduler object: the ranks use BranchParallel.device "
                "and the request's scheduler name"
            )
        with branch_group(parallel, model) as group:
            return group.run("video", params, output_type, num_videos=num_videos)
    pipe = load_pipeline(model, device) if isinstance(model, (str, Path)) else model
    family = video_family_of(pipe)
    height, width = family.size(pipe, params.height, params.width)
    family.check_request(pipe, params)
    frames = family.latent_frames(pipe, v.frames)
    exported = None
    if engine is not None:  # loaded and checked against the request before any step
        from seg_rt.engines import load_engine

        from .export import check_video_engine

        exported = load_engine(engine, device=pipe._execution_device)
        try:
            check_video_engine(exported.info, family, blur, v.layers, frames, height, width)
        except BaseException:
            exported.close()
            raise
    prepared = family.encode(pipe, params, num_videos)
    generators = seed_generators(params.seed + i for i in range(num_videos))
    sched = family.schedule(pipe, scheduler, params.steps, frames=frames, height=height, width=width)
    dtype = prepared.cond["encoder_hidden_states"].dtype
    shared = family.shared_inputs(pipe, frames=frames, height=height, width=width)
    if v.image is None:
        latents = family.initial_latents(
            pipe, sched, generators, frames=frames, height=height, width=width, dtype=dtype
        )
    else:  # image-to-video: the same loop, with the family's image conditioning (ImageStart)
        start = family.image_start(
            pipe, sched, v.image, generators, frames=frames, height=height, width=width, dtype=dtype,
            **family.image_options(params),
        )  # fmt: skip
        latents, sched, shared = start.latents, start.scheduler or sched, {**shared, **start.shared}
        uncond = None if prepared.uncond is None else {**prepared.uncond, **start.uncond}
        prepared = dataclasses.replace(prepared, cond={**prepared.cond, **start.cond}, uncond=uncond)
    if exported is not None:
        denoiser = exported
    else:
        denoiser = VideoDenoiser(family.net(pipe), blur, v.layers, shared, perturbation=perturbation)
    if wrap_denoiser is not None:
        denoiser = wrap_denoiser(denoiser)
    try:
        latents = sample(
            denoiser,
            sched,
            latents,
            prepared.cond,
            prepared.uncond,
            cfg=params.cfg,
            cfg_scale=family.cfg_scale(pipe, params, latents) if params.cfg > 1.0 else None,
            seg=seg,
            guidance_rescale=params.guidance_rescale,
            sequential=params.sequential,
            generators=generators,
            progress=progress,
            guidance=guidance,
            callback=callback,
        )
    finally:
        denoiser.close()
    return family.decode(pipe, latents, output_type)
