"""Video sampling with SEG (+ CFG): the image sampler's loop over a video denoiser.

Batching, the SEG window and per-sample seeds work exactly as for images (``seg_rt.sampler``):
one forward of ``[uncond, cond, perturbed]`` videos per step, video i drawn from seed + i and equal
to that seed run alone (to float rounding; usually bit for bit on CPU, not guaranteed for video). diffusers does prompt encoding (CLIP for AnimateDiff, T5 / UMT5 for
CogVideoX / Wan), RoPE tables, VAE decoding and video post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.config import SEGConfig
from seg_rt.denoiser import RowwiseLinear, swap_linears
from seg_rt.params import GenerationParams, VideoParams
from seg_rt.pipeline import check_size, load_pipeline, make_scheduler, seed_generators
from seg_rt.sampler import sample

from .attention import VideoBlur, VideoSEG, family_of_model

VIDEO_OUTPUT_TYPES = ("np", "pil", "latent")
PIPELINES = {"AnimateDiffPipeline": "animatediff", "CogVideoXPipeline": "cogvideox", "WanPipeline": "wan"}


class VideoDenoiser:
    """A video model with ``VideoSEG`` installed, called with the sampler's named inputs.

    Raises ``SEGNotApplied`` after a forward with perturbed rows in which no query was perturbed.
    """

    def __init__(
        self,
        model: nn.Module,
        blur: VideoBlur,
        layers: Sequence[str] | None = None,
        extra: dict | None = None,
    ) -> None:
        self.model = model
        self.extra = extra or {}  # model inputs shared by every row (CogVideoX's RoPE tables)
        self.family = family_of_model(model)
        self.seg = VideoSEG(model, blur, layers).install()
        swap_linears([model], RowwiseLinear)  # per-sample results independent of the batch

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), getattr(inputs, "seg_rows", None))  # host layout: no sync
        try:
            out = self._forward(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
            self.seg.check()  # SEG active but no query perturbed: an error, never a CFG-only result
            return out
        finally:
            self.seg.set_mask(None)

    def _forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        if self.family == "animatediff":  # x: [B, C, F, h, w]; text per frame: [B·F, L, C]
            text = text.repeat_interleave(x.shape[2], dim=0)
            return self.model(x, t, encoder_hidden_states=text, return_dict=False)[0]
        if self.family == "cogvideox":  # x: [B, F, C, h, w]
            rope = self.extra.get("image_rotary_emb")
            out = self.model(
                hidden_states=x,
                encoder_hidden_states=text,
                timestep=t,
                image_rotary_emb=rope,
                return_dict=False,
            )
            return out[0]
        # wan: x: [B, C, F, h, w]
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def close(self) -> None:
        self.seg.remove()
        swap_linears([self.model], nn.Linear)


def pipeline_family(pipe) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINES:
            return PIPELINES[cls.__name__]
    raise ValueError(f"unsupported video pipeline {type(pipe).__name__}; supported: {', '.join(PIPELINES)}")


def generate_video(
    model,
    prompt: str = GenerationParams.prompt,
    *,
    negative_prompt: str | None = GenerationParams.negative_prompt,
    frames: int = VideoParams.frames,
    height: int | None = GenerationParams.height,
    width: int | None = GenerationParams.width,
    steps: int = GenerationParams.steps,
    cfg: float = GenerationParams.cfg,
    seg_scale: float = SEGConfig.scale,
    seg_mode: str = VideoParams.mode,
    seg_sigma: float = SEGConfig.sigma,
    seg_sigma_time: float = VideoParams.sigma_time,
    seg_layers: Sequence[str] | None = VideoParams.layers,
    seg_start: float = SEGConfig.start,
    seg_end: float = SEGConfig.end,
    seed: int = GenerationParams.seed,
    num_videos: int = 1,
    scheduler=None,
    output_type: str = "np",
    device: str | torch.device | None = None,
    progress: bool = False,
    params: GenerationParams | None = None,
):
    """Videos with SEG on video attention. ``model``: a folder, hub id or loaded diffusers pipeline
    (AnimateDiff, CogVideoX or Wan). AnimateDiff samples with Euler by default (as the paper);
    the DiTs with a fresh copy of their own scheduler unless one is given.

    The request is ``params`` (a ``GenerationParams`` with ``video``: what the CLI and job workers
    pass) or, without it, the keyword arguments (defaults: ``GenerationParams`` / ``VideoParams``;
    ``seg_layers`` are ``VideoParams.layers``, ``None`` = every video self-attention layer).
    Returns ``[B, F, H, W, 3]`` floats in [0, 1] (``"np"``), lists of PIL frames (``"pil"``) or the
    final latents (``"latent"``). Video i uses seed ``seed + i``. ``frames`` counts output frames;
    CogVideoX and Wan compress time 4x in their VAE, so they decode ``4k + 1`` frames.
    """
    if params is None:
        video = VideoParams(frames=frames, mode=seg_mode, sigma_time=seg_sigma_time, layers=seg_layers)
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            cfg=cfg,
            seg=SEGConfig(scale=seg_scale, sigma=seg_sigma, start=seg_start, end=seg_end),
            height=height,
            width=width,
            scheduler=scheduler if isinstance(scheduler, str) else GenerationParams.scheduler,
            video=video,
        )
    elif params.video is None:
        raise ValueError("generate_video needs a video request: GenerationParams(video=VideoParams(...))")
    else:
        scheduler = params.scheduler
    prompt, negative_prompt, seed, steps, cfg = (
        params.prompt,
        params.negative_prompt,
        params.seed,
        params.steps,
        params.cfg,
    )
    height, width, v, s = params.height, params.width, params.video, params.seg
    frames, seg_mode, seg_sigma_time, seg_layers = v.frames, v.mode, v.sigma_time, v.layers
    seg_scale, seg_sigma, seg_start, seg_end = s.scale, s.sigma, s.start, s.end
    blur = VideoBlur(seg_mode, seg_sigma, seg_sigma_time)
    # the sampler reads scale and window from SEGConfig; the blur itself is `blur`
    seg = SEGConfig(scale=seg_scale, sigma=math.inf, layers=("video",), start=seg_start, end=seg_end)
    if output_type not in VIDEO_OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(VIDEO_OUTPUT_TYPES)}, got {output_type!r}")
    if isinstance(num_videos, bool) or not isinstance(num_videos, int) or num_videos < 1:
        raise ValueError(f"num_videos must be an integer >= 1, got {num_videos!r}")
    pipe = load_pipeline(model, device) if isinstance(model, (str, Path)) else model
    family = pipeline_family(pipe)
    net = pipe.unet if family == "animatediff" else pipe.transformer
    f = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    height, width = check_size(height or 8 * f, width or 8 * f, f)
    device = pipe._execution_device
    do_cfg = cfg > 1

    if family == "animatediff":
        pe, ne = pipe.encode_prompt(prompt, device, num_videos, do_cfg, negative_prompt)
        latent_frames = frames
    else:
        text_len = getattr(net.config, "max_text_seq_length", None) or 226
        pe, ne = pipe.encode_prompt(
            prompt, negative_prompt, do_cfg, num_videos, max_sequence_length=text_len, device=device
        )
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else None

    generators = seed_generators(seed + i for i in range(num_videos))
    if scheduler is None and family != "animatediff":
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    else:
        sched = make_scheduler(pipe, scheduler)
    sched.set_timesteps(steps, device=device)
    from diffusers.utils.torch_utils import randn_tensor

    c, h, w = net.config.in_channels, height // f, width // f
    shape = (
        (num_videos, latent_frames, c, h, w)
        if family == "cogvideox"
        else (num_videos, c, latent_frames, h, w)
    )
    latents = randn_tensor(shape, generator=generators, device=device, dtype=pe.dtype)
    latents = latents * getattr(sched, "init_noise_sigma", 1.0)  # flow matching starts at unit noise

    extra = {}
    if family == "cogvideox" and net.config.use_rotary_positional_embeddings:
        extra["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(
            height, width, latent_frames, device
        )
    denoiser = VideoDenoiser(net, blur, seg_layers, extra)
    try:
        latents = sample(
            denoiser, sched, latents, cond, uncond, steps=steps, cfg=cfg, seg=seg, generators=generators,
            progress=progress,
        )  # fmt: skip
    finally:
        denoiser.close()
    if output_type == "latent":
        return latents
    with torch.no_grad():  # one video at a time: pixels independent of the batch
        video = torch.cat([_decode(pipe, family, latent[None]) for latent in latents])
    return pipe.video_processor.postprocess_video(video=video, output_type=output_type)


def _decode(pipe, family: str, latents: Tensor) -> Tensor:
    """One video's latents → ``[1, C, F, H, W]`` in the VAE's output range, as each pipeline does."""
    if family in ("animatediff", "cogvideox"):
        return pipe.decode_latents(latents)
    vae = pipe.vae  # Wan: undo the per-channel latent normalisation, then decode
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    return vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
