"""The video-family contract: ``seg_rt.families.base.Family`` with ``kind = "video"`` plus what a
video run needs (latent frames, the latent layout, shared inputs such as RoPE tables, how the
network is called, per-video decoding). ``seg_rt.video.sampling.generate_video`` is the recipe over it.

Image-to-video is a property of the request (``VideoParams.image``) and the family, not another loop:
a family that animates a still says whether a loaded checkpoint can (``image_support``) or must
(``requires_image``), and ``image_start`` returns what the family's diffusers image-to-video
pipeline computes before its loop: the initial latents (drawn in that pipeline's order from each
row's generator), the per-row conditioning inputs (image latents, image embeddings, the first-frame
mask channels) for the cond and uncond rows, inputs shared by every row (LTX's conditioning mask) and,
where the pipeline holds the conditioning frame fixed, the scheduler that does so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from seg_rt.families.base import Family, Prepared, named_scheduler, read_json, vae_factor
from seg_rt.families.latent_rgb import project
from seg_rt.params import GenerationParams
from seg_rt.tasks import InputImage


@dataclass
class ImageStart:
    """What an image-to-video pipeline computes from the still before its loop (``image_start``).

    latents:   the initial latents, row i from generator i (scaled by ``init_noise_sigma``);
    cond / uncond: per-row model inputs added to the cond / uncond rows (the perturbed rows take cond's);
    shared:    model inputs shared by every row (added to ``shared_inputs``);
    scheduler: the scheduler to sample with when the pipeline changes its steps (LTX keeps the
               conditioning frame), else None (the family's ``schedule``).
    """

    latents: Tensor
    cond: dict[str, Tensor] = field(default_factory=dict)
    uncond: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None


def image_tensor(pipe, image: InputImage, height: int, width: int, dtype) -> Tensor:
    """The still as the pipelines feed their VAE: ``video_processor.preprocess`` (resized to the
    video's size, in [-1, 1]) on the pipeline's device, ``[1, 3, H, W]``."""
    pixels = pipe.video_processor.preprocess(image.pil(), height=height, width=width)
    return pixels.to(device=pipe._execution_device, dtype=dtype)


class HoldFirstFrame:
    """A scheduler whose steps leave the first latent frame as it is (the conditioning frame).

    ``LTXImageToVideoPipeline`` steps frames ``1:`` only and keeps frame 0; for the elementwise
    flow-matching Euler step LTX samples with, stepping every frame and putting frame 0 back is the
    same arithmetic on every element (written here because diffusers has no scheduler wrapper for it).
    Everything else is the wrapped scheduler's."""

    def __init__(self, scheduler, frame_dim: int = 2) -> None:
        self._scheduler = scheduler
        self._dim = frame_dim

    def __getattr__(self, name: str):
        return getattr(self._scheduler, name)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        import inspect

        kw = (
            {"generator": generator}
            if "generator" in inspect.signature(self._scheduler.step).parameters
            else {}
        )
        prev = self._scheduler.step(model_output, timestep, sample, **kw, return_dict=False)[0]
        prev = torch.cat(
            [
                sample.narrow(self._dim, 0, 1).to(prev.dtype),
                prev.narrow(self._dim, 1, prev.shape[self._dim] - 1),
            ],
            dim=self._dim,
        )
        return (prev,)


PREVIEW_FRAMES = 8
"""A video's preview: at most this many latent frames, evenly spaced from the first to the last
(``preview_frames``), side by side in one image per video."""


def preview_frames(frames: int, most: int = PREVIEW_FRAMES) -> list[int]:
    """The latent frames a preview shows: all of them up to ``most``, else ``most`` evenly spaced
    ones from the first to the last (rounded to the nearest frame)."""
    if frames <= most:
        return list(range(frames))
    return [round(i * (frames - 1) / (most - 1)) for i in range(most)]


class VideoFamily(Family):
    kind = "video"
    identity_perturbation: ClassVar[bool] = False  # STG-style attention skip (the processor's output hook)
    frames_first: ClassVar[bool] = False  # latents [B, F, C, h, w] (CogVideoX) instead of [B, C, F, h, w]
    image_pipeline: ClassVar[str | None] = None  # diffusers' image-to-video pipeline of the family
    svd_conditioning: ClassVar[bool] = False  # takes VideoParams' min_cfg / motion bucket / noise aug

    def pipeline_classes(self) -> tuple[type, ...]:
        """The text-to-video pipeline and, where the family has one, the image-to-video pipeline."""
        import diffusers

        extra = (getattr(diffusers, self.image_pipeline),) if self.image_pipeline else ()
        return super().pipeline_classes() + extra

    def net(self, pipe) -> nn.Module:
        return pipe.transformer

    def preview(self, pipe, latents: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        """Video latents ``[n, C, F, h, w]`` (``[n, F, C, h, w]`` when ``frames_first``) →
        ``(n, 3, h, k·w)`` RGB in [0, 1]: per video, ``k`` = up to ``PREVIEW_FRAMES`` latent frames
        (``preview_frames``) projected by the family's table, side by side, first frame left."""
        factors = self.preview_factors(pipe)
        if factors is None or latents.ndim != 5:
            return None
        frames = latents if self.frames_first else latents.transpose(1, 2)  # [n, F, C, h, w]
        n, f, c, h, w = frames.shape
        picked = frames[:, preview_frames(f)]
        rgb = project(picked.reshape(-1, c, h, w), factors)
        if rgb is None:  # not this family's latent channels
            return None
        k = picked.shape[1]
        return rgb.view(n, k, 3, h, w).permute(0, 2, 3, 1, 4).reshape(n, 3, h, k * w)

    # --- image-to-video -------------------------------------------------------------------------
    def image_support(self, pipe) -> str | None:
        """None when this loaded checkpoint animates a still; else why not (one line)."""
        return f"{self.name} has no image-to-video in seg-rt"

    def requires_image(self, pipe) -> bool:
        """An image-to-video-only checkpoint (its network takes the image's channels)."""
        return False

    def check_request(self, pipe, request: GenerationParams) -> None:
        super().check_request(pipe, request)
        given = request.video.svd_conditioning() if request.video is not None else {}
        if given and not self.svd_conditioning:
            name = next(iter(given))
            raise ValueError(
                f"{name}: Stable Video Diffusion's conditioning; {type(pipe).__name__} ({self.name}) "
                f"does not take it, got {given[name]:g}"
            )
        image = request.video.image if request.video is not None else None
        if image is not None:
            reason = self.image_support(pipe)
            if reason is not None:
                raise ValueError(f"image: {type(pipe).__name__} cannot animate an image: {reason}")
        elif self.requires_image(pipe):
            raise ValueError(
                f"image: {type(pipe).__name__} ({self.name}) is an image-to-video checkpoint: give the "
                "still to animate (image=, --image PATH, a job's video image)"
            )

    def image_start(
        self, pipe, scheduler, image: InputImage, generators, *, frames: int, height: int, width: int, dtype
    ) -> ImageStart:
        """The initial latents and conditioning inputs of ``image`` (see ``ImageStart``)."""
        raise ValueError(f"image: {self.image_support(pipe)}")

    def image_options(self, request: GenerationParams) -> dict[str, Any]:
        """Keyword arguments of ``image_start`` a request sets (SVD: its noise augmentation)."""
        return {}

    def cfg_scale(self, pipe, request: GenerationParams, latents: Tensor) -> Tensor | None:
        """The CFG scale per latent element where it is not one number (SVD: a per-frame ramp,
        broadcast over ``latents``); None: ``request.cfg`` everywhere."""
        return None

    def size_factor(self, pipe) -> int:
        return int(getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor)

    def default_side(self, pipe) -> int:
        # the pixel-space demo video model says its own size; else 8 latent pixels per side
        return getattr(pipe, "default_size", None) or 8 * self.size_factor(pipe)

    def folder_factor(self, folder: Path) -> int:
        return vae_factor(read_json(folder / "vae" / "config.json"))

    def select_layers(self, pipe, selectors: Sequence[str]) -> list[str]:
        from seg_rt.video.attention import VideoBlur, VideoSEG

        seg = VideoSEG(self.net(pipe), VideoBlur("spatiotemporal", 1.0, 1.0), selectors or None)
        return seg.layer_names

    def latent_frames(self, pipe, frames: int) -> int:
        """Latent frames for ``frames`` output frames (VAEs that compress time 4x decode 4k + 1)."""
        return (frames - 1) // pipe.vae_scale_factor_temporal + 1

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        """T5 / UMT5 prompts (CogVideoX, Wan) at the transformer's text length."""
        do_cfg = request.cfg > 1
        text_len = getattr(self.net(pipe).config, "max_text_seq_length", None) or 226
        pe, ne = pipe.encode_prompt(
            request.prompt,
            request.negative_prompt,
            do_cfg,
            n,
            max_sequence_length=text_len,
            device=pipe._execution_device,
        )
        return Prepared({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if do_cfg else None)

    def schedule(self, pipe, scheduler, steps: int, **shape: int):
        """A fresh copy of the pipeline's own scheduler when none is named; else the named one."""
        if scheduler is None:
            sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        else:
            sched = named_scheduler(pipe, scheduler)
        sched.set_timesteps(steps, device=pipe._execution_device)
        return sched

    def latent_shape(self, n: int, channels: int, frames: int, h: int, w: int) -> tuple[int, ...]:
        return (n, frames, channels, h, w) if self.frames_first else (n, channels, frames, h, w)

    def initial_latents(
        self, pipe, scheduler, generators, *, frames: int, height: int, width: int, dtype
    ) -> Tensor:
        """diffusers' noise for ``frames`` latent frames at ``height`` x ``width`` pixels, scaled by the
        scheduler's ``init_noise_sigma`` (flow matching starts at unit noise)."""
        from diffusers.utils.torch_utils import randn_tensor

        f = self.size_factor(pipe)
        shape = self.latent_shape(
            len(generators), self.net(pipe).config.in_channels, frames, height // f, width // f
        )
        latents = randn_tensor(shape, generator=list(generators), device=pipe._execution_device, dtype=dtype)
        return latents * getattr(scheduler, "init_noise_sigma", 1.0)

    def shared_inputs(self, pipe, *, frames: int, height: int, width: int) -> dict:
        """Model inputs shared by every row (RoPE tables, interpolation scales)."""
        return {}

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        """Call the network with the sampler's named inputs (``[B, C, F, h, w]`` latents, Wan's call)."""
        return model(
            hidden_states=inputs["sample"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            return_dict=False,
        )[0]

    def decode_video(self, pipe, latents: Tensor) -> Tensor:
        """One video's latents → ``[1, C, F, H, W]`` in the VAE's output range, as the pipeline does."""
        return pipe.decode_latents(latents)

    def decode(self, pipe, latents: Tensor, output_type: str):
        import torch

        if output_type == "latent":
            return latents
        with torch.no_grad():  # one video at a time: pixels independent of the batch
            video = torch.cat([self.decode_video(pipe, latent[None]) for latent in latents])
        return pipe.video_processor.postprocess_video(video=video, output_type=output_type)

    def generate(self, pipe, params: GenerationParams, output_type: str, **options):
        """Sample ``params`` (``seg_rt.video.sampling.generate_video``): what a branch-parallel rank
        runs for a video model."""
        from seg_rt.video.sampling import generate_video

        return generate_video(pipe, params=params, output_type=output_type, **options)
