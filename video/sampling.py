"""Video sampling with SEG (+ CFG): the image sampler's loop over a video denoiser.

Batching, the SEG window and per-sample seeds work exactly as for images (``seg_rt.sampler``):
one forward of ``[uncond, cond, perturbed]`` videos per step, video i drawn from seed + i and equal
to that seed run alone (to float rounding; usually bit for bit on CPU, not guaranteed for video). diffusers does prompt encoding (CLIP for AnimateDiff, T5 / UMT5 for
CogVideoX / Wan), RoPE tables, VAE decoding and video post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.config import SEGConfig
from seg_rt.denoiser import RowwiseLinear, swap_linears
from seg_rt.params import BranchParallel, GenerationParams, VideoParams
from seg_rt.pipeline import branch_group, check_size, load_pipeline, make_scheduler, seed_generators
from seg_rt.prefix import TransformerFork
from seg_rt.sampler import sample

from .attention import VideoBlur, VideoSEG, family_of_model

VIDEO_OUTPUT_TYPES = ("np", "pil", "latent")
PIPELINES = {
    "AnimateDiffPipeline": "animatediff",
    "CogVideoXPipeline": "cogvideox",
    "WanPipeline": "wan",
    "LTXPipeline": "ltx",
}
LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate: sets RoPE's temporal interpolation scale


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
        self.family = family_of_model(model)
        self.seg = VideoSEG(model, blur, layers, perturbation).install()
        self.prefix = TransformerFork(model, self.seg.layer_names) if shared_prefix else None
        swap_linears([model], RowwiseLinear)  # per-sample results independent of the batch

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), getattr(inputs, "seg_rows", None))  # host layout: no sync
        try:
            out = (
                self.prefix.run(inputs, self._dispatch) if self.prefix is not None else self._dispatch(inputs)
            )
            self.seg.check()  # SEG active but no query perturbed: an error, never a CFG-only result
            return out
        finally:
            self.seg.set_mask(None)

    def _dispatch(self, inputs: Mapping[str, Tensor]) -> Tensor:
        if self.family == "ltx":
            return self._forward_ltx(inputs)
        return self._forward(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

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

    def _forward_ltx(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """LTX-Video: unpacked latents ``[B, C, F, h, w]`` packed into tokens, as ``LTXPipeline``."""
        x = inputs["sample"]
        _, _, f, h, w = x.shape
        p, p_t = self.model.config.patch_size, self.model.config.patch_size_t
        out = self.model(
            hidden_states=ltx_pack(x, p, p_t),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=self.extra.get("rope_interpolation_scale"),
            return_dict=False,
        )[0]
        return ltx_unpack(out, f, h, w, p, p_t)

    def close(self) -> None:
        self.seg.remove()
        if self.prefix is not None:
            self.prefix.remove()
        swap_linears([self.model], nn.Linear)


def ltx_pack(latents: Tensor, p: int, p_t: int) -> Tensor:
    """``[B, C, F, H, W]`` → tokens ``[B, F/p_t·H/p·W/p, C·p_t·p·p]``, frame-major (``LTXPipeline._pack_latents``)."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // p_t, p_t, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def ltx_unpack(tokens: Tensor, f: int, h: int, w: int, p: int, p_t: int) -> Tensor:
    """Tokens → ``[B, C, F, H, W]`` (``LTXPipeline._unpack_latents``)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, f // p_t, h // p, w // p, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


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
    parallel: BranchParallel | int | None = None,
    wrap_denoiser: Callable | None = None,
    perturbation: str = "blur",
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

    ``parallel``: branch-parallel SEG over ranks that each load ``model`` (a folder or hub id), as in
    ``seg_rt.run_params``. ``wrap_denoiser``: applied to the video denoiser before sampling (a rank
    passes ``seg_rt.engines.parallel.BranchParallelDenoiser``). ``perturbation="identity"``: the
    perturbed row skips the selected layers' attention (output = V, STG-style) instead of blurring
    (``VideoSEG``; AnimateDiff only; the benchmark's baseline).
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
    parallel = BranchParallel.of(parallel)
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
    family = pipeline_family(pipe)
    net = pipe.unet if family == "animatediff" else pipe.transformer
    f = (
        pipe.vae_spatial_compression_ratio
        if family == "ltx"
        else getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    )
    size = getattr(pipe, "default_size", None) or 8 * f  # the pixel-space demo model: its 32x32
    height, width = check_size(height or size, width or size, f)
    device = pipe._execution_device
    do_cfg = cfg > 1

    cond_extra: dict = {}
    uncond_extra: dict = {}
    if family == "animatediff":
        pe, ne = pipe.encode_prompt(prompt, device, num_videos, do_cfg, negative_prompt)
        latent_frames = frames
    elif family == "ltx":  # T5 embeddings with their attention mask (max_sequence_length 128)
        pe, pm, ne, nm = pipe.encode_prompt(
            prompt, negative_prompt, do_cfg, num_videos, max_sequence_length=128, device=device
        )
        cond_extra, uncond_extra = {"encoder_attention_mask": pm}, {"encoder_attention_mask": nm}
        latent_frames = (frames - 1) // pipe.vae_temporal_compression_ratio + 1
    else:
        text_len = getattr(net.config, "max_text_seq_length", None) or 226
        pe, ne = pipe.encode_prompt(
            prompt, negative_prompt, do_cfg, num_videos, max_sequence_length=text_len, device=device
        )
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    cond = {"encoder_hidden_states": pe, **cond_extra}
    uncond = {"encoder_hidden_states": ne, **uncond_extra} if do_cfg else None

    generators = seed_generators(seed + i for i in range(num_videos))
    c, h, w = net.config.in_channels, height // f, width // f
    if family == "ltx":  # its own flow-matching Euler (what "euler", the CLI default, means for it)
        if scheduler not in (None, "euler"):
            raise ValueError(
                f"ltx samples with its own flow-matching Euler scheduler; got scheduler {scheduler!r}"
            )
        sched = ltx_schedule(
            type(pipe.scheduler).from_config(pipe.scheduler.config), steps, latent_frames * h * w
        )
    elif scheduler is None and family != "animatediff":
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    else:
        sched = make_scheduler(pipe, scheduler)
    sched.set_timesteps(steps, device=device)
    from diffusers.utils.torch_utils import randn_tensor

    shape = (
        (num_videos, latent_frames, c, h, w)
        if family == "cogvideox"
        else (num_videos, c, latent_frames, h, w)
    )
    latents = randn_tensor(shape, generator=generators, device=device, dtype=pe.dtype)
    latents = latents * getattr(sched, "init_noise_sigma", 1.0)  # flow matching starts at unit noise

    extra = {}
    if family == "ltx":
        ratio = pipe.vae_spatial_compression_ratio
        extra["rope_interpolation_scale"] = (
            pipe.vae_temporal_compression_ratio / LTX_FRAME_RATE,
            ratio,
            ratio,
        )
    if family == "cogvideox" and net.config.use_rotary_positional_embeddings:
        extra["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(
            height, width, latent_frames, device
        )
    denoiser = VideoDenoiser(net, blur, seg_layers, extra, perturbation=perturbation)
    if wrap_denoiser is not None:
        denoiser = wrap_denoiser(denoiser)
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


def ltx_schedule(sched, steps: int, sequence_length: int):
    """``LTXPipeline``'s schedule: ``sigmas = linspace(1, 1/steps)`` and the sequence-length shift
    ``mu``, bound on this (fresh) scheduler because the sampler calls ``set_timesteps(steps)`` itself."""
    import functools

    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = sched.config
    mu = calculate_shift(
        sequence_length,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    sched.set_timesteps = functools.partial(
        sched.set_timesteps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu
    )
    return sched


def _decode(pipe, family: str, latents: Tensor) -> Tensor:
    """One video's latents → ``[1, C, F, H, W]`` in the VAE's output range, as each pipeline does."""
    if family in ("animatediff", "cogvideox"):
        return pipe.decode_latents(latents)
    if family == "ltx":  # undo the latent normalisation; decode at timestep 0 without noise (the defaults)
        vae = pipe.vae
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
        t = torch.zeros(latents.shape[0], device=latents.device) if vae.config.timestep_conditioning else None
        return vae.decode(latents.to(vae.dtype), t, return_dict=False)[0]
    vae = pipe.vae  # Wan: undo the per-channel latent normalisation, then decode
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    return vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
