"""Video sampling with SEG (+ CFG): the image sampler's loop over a video denoiser.

Batching, the SEG window and per-sample seeds work exactly as for images (``seg_rt.sampler``):
one forward of ``[uncond, cond, perturbed]`` videos per step, video i drawn from seed + i and equal
to that seed run alone. diffusers does prompt encoding, VAE decoding and video post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.config import SEGConfig
from seg_rt.denoiser import RowwiseLinear, swap_linears
from seg_rt.pipeline import load_pipeline, make_scheduler, seed_generators
from seg_rt.sampler import sample

from .attention import VideoBlur, VideoSEG, family_of_model

VIDEO_OUTPUT_TYPES = ("np", "pil", "latent")


class VideoDenoiser:
    """A video model with ``VideoSEG`` installed, called with the sampler's named inputs."""

    def __init__(self, model: nn.Module, blur: VideoBlur, layers: Sequence[str] | None = None) -> None:
        self.model = model
        self.family = family_of_model(model)
        self.seg = VideoSEG(model, blur, layers).install()
        swap_linears([model], RowwiseLinear)  # per-sample results independent of the batch

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        x = inputs["sample"]  # [B, C, F, h, w]
        self.seg.set_mask(inputs.get("seg_mask"))
        try:
            if self.family == "animatediff":  # AnimateDiff wants the text per frame: [B·F, L, C]
                text = inputs["encoder_hidden_states"].repeat_interleave(x.shape[2], dim=0)
                return self.model(x, inputs["timestep"], encoder_hidden_states=text, return_dict=False)[0]
            raise ValueError(
                f"video sampling for {self.family} needs its pipeline's T5 prompt encoding (not yet)"
            )
        finally:
            self.seg.set_mask(None)

    def close(self) -> None:
        self.seg.remove()
        swap_linears([self.model], nn.Linear)


def generate_video(
    model,
    prompt: str = "",
    *,
    negative_prompt: str | None = None,
    frames: int = 16,
    height: int | None = None,
    width: int | None = None,
    steps: int = 25,
    cfg: float = 5.0,
    seg_scale: float = 3.0,
    seg_mode: str = "spatiotemporal",
    seg_sigma: float = math.inf,
    seg_sigma_time: float = 1.0,
    seg_layers: Sequence[str] | None = None,
    seg_start: float = 0.0,
    seg_end: float = 1.0,
    seed: int = 0,
    num_videos: int = 1,
    scheduler=None,
    output_type: str = "np",
    device: str | torch.device | None = None,
    progress: bool = False,
):
    """Videos with SEG on video attention. ``model``: a folder, hub id or loaded AnimateDiff pipeline.

    Returns ``[B, F, H, W, 3]`` floats in [0, 1] (``"np"``), lists of PIL frames (``"pil"``) or the
    final latents ``[B, C, F, h, w]`` (``"latent"``). Video i uses seed ``seed + i``.
    """
    blur = VideoBlur(seg_mode, seg_sigma, seg_sigma_time)
    # the sampler reads scale and window from SEGConfig; the blur itself is `blur`
    seg = SEGConfig(scale=seg_scale, sigma=math.inf, layers=("video",), start=seg_start, end=seg_end)
    if output_type not in VIDEO_OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(VIDEO_OUTPUT_TYPES)}, got {output_type!r}")
    if frames < 1 or num_videos < 1 or steps < 1:
        raise ValueError(f"frames, num_videos and steps must be >= 1, got {frames}, {num_videos}, {steps}")
    if math.isnan(cfg) or cfg < 1:
        raise ValueError(f"cfg must be >= 1, got {cfg:g}")
    pipe = load_pipeline(model, device) if isinstance(model, (str, Path)) else model
    f = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * f
    width = width or pipe.unet.config.sample_size * f
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % f:
            raise ValueError(f"{name} must be a positive multiple of {f}, got {v}")
    device = pipe._execution_device
    do_cfg = cfg > 1
    pe, ne = pipe.encode_prompt(prompt, device, num_videos, do_cfg, negative_prompt)
    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else None
    generators = seed_generators(seed + i for i in range(num_videos))
    sched = make_scheduler(pipe, scheduler)
    sched.set_timesteps(steps, device=device)
    from diffusers.utils.torch_utils import randn_tensor

    shape = (num_videos, pipe.unet.config.in_channels, frames, height // f, width // f)
    latents = (
        randn_tensor(shape, generator=generators, device=device, dtype=pe.dtype) * sched.init_noise_sigma
    )
    denoiser = VideoDenoiser(pipe.unet, blur, seg_layers)
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
        video = torch.cat([pipe.decode_latents(latent[None]) for latent in latents])
    return pipe.video_processor.postprocess_video(video=video, output_type=output_type)
