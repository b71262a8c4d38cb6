"""AnimateDiff (``AnimateDiffPipeline``, ``UNetMotionModel``): an SD1.5 UNet with motion modules;
spatial ``attn1`` per frame and temporal attention along frames. The bundled demo video model is one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from seg_rt.families import latent_rgb
from seg_rt.families.base import Classes, Prepared, named_scheduler
from seg_rt.families.unet import sd15_prompts
from seg_rt.params import GenerationParams

from .base import VideoFamily


class AnimateDiffFamily(VideoFamily):
    name = "animatediff"
    classes = Classes("AnimateDiffPipeline", "UNetMotionModel", "seg_rt.video.attention:ANIMATEDIFF")
    identity_perturbation = True
    preview_table = latent_rgb.SD15  # an SD1.5 VAE

    def net(self, pipe) -> nn.Module:
        return pipe.unet

    def preview_factors(self, pipe):
        """SD1.5's table; the pixel-space demo video model (no VAE component): its samples are the
        frames, shown as they are."""
        if pipe is not None and "vae" not in getattr(pipe, "components", {"vae": None}):
            return latent_rgb.PIXELS
        return self.preview_table

    def folder_factor(self, folder: Path) -> int:
        from seg_rt.demo.folders import demo_pipeline_class

        if demo_pipeline_class(folder) is not None:  # the pixel-space demo video model: no VAE
            return 1
        return super().folder_factor(folder)

    def latent_frames(self, pipe, frames: int) -> int:
        return frames

    def check_request(self, pipe, request: GenerationParams) -> None:
        """The motion modules' positional embeddings hold ``motion_max_seq_length`` frames: more
        would fail deep in sampling."""
        super().check_request(pipe, request)
        limit = getattr(pipe.unet.config, "motion_max_seq_length", None)
        frames = request.video.frames if request.video is not None else None
        if limit and frames and frames > limit:
            raise ValueError(
                f"frames must be <= {limit} for this model (its motion modules hold {limit} frames), got {frames}"
            )

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        return sd15_prompts(pipe, request, n)  # an SD1.5 text encoder

    def schedule(self, pipe, scheduler, steps: int, **shape: int):
        """Euler by default, as the paper samples."""
        sched = named_scheduler(pipe, scheduler)
        sched.set_timesteps(steps, device=pipe._execution_device)
        return sched

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        x = inputs["sample"]  # [B, C, F, h, w]; text per frame: [B·F, L, C]
        text = inputs["encoder_hidden_states"].repeat_interleave(x.shape[2], dim=0)
        return model(x, inputs["timestep"], encoder_hidden_states=text, return_dict=False)[0]
