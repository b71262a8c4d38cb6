"""The video-family contract: ``seg_rt.families.base.Family`` with ``kind = "video"`` plus what a
video run needs (latent frames, the latent layout, shared inputs such as RoPE tables, how the
network is called, per-video decoding). ``seg_rt.video.sampling.generate_video`` is the recipe over it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from seg_rt.families.base import Family, Prepared, named_scheduler, read_json, vae_factor
from seg_rt.params import GenerationParams


class VideoFamily(Family):
    kind = "video"
    identity_perturbation: ClassVar[bool] = False  # STG-style attention skip (the processor's output hook)
    frames_first: ClassVar[bool] = False  # latents [B, F, C, h, w] (CogVideoX) instead of [B, C, F, h, w]

    def net(self, pipe) -> nn.Module:
        return pipe.transformer

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
