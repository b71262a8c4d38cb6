"""AnimateDiff (``AnimateDiffPipeline``, ``UNetMotionModel``): an SD1.5 UNet with motion modules;
spatial ``attn1`` per frame and temporal attention along frames. The bundled demo video model is one."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from seg_rt.families.base import Prepared, named_scheduler
from seg_rt.params import GenerationParams

from .base import VideoFamily


class AnimateDiffFamily(VideoFamily):
    name = "animatediff"
    identity_perturbation = True

    def pipeline_classes(self) -> tuple[type, ...]:
        from diffusers import AnimateDiffPipeline

        return (AnimateDiffPipeline,)

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import UNetMotionModel

        return (UNetMotionModel,)

    def adapter(self):
        from seg_rt.video.attention import ANIMATEDIFF

        return ANIMATEDIFF

    def net(self, pipe) -> nn.Module:
        return pipe.unet

    def latent_frames(self, pipe, frames: int) -> int:
        return frames

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        do_cfg = request.cfg > 1
        pe, ne = pipe.encode_prompt(
            request.prompt, pipe._execution_device, n, do_cfg, request.negative_prompt
        )
        return Prepared({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if do_cfg else None)

    def schedule(self, pipe, scheduler, steps: int, **shape: int):
        """Euler by default, as the paper samples."""
        sched = named_scheduler(pipe, scheduler)
        sched.set_timesteps(steps, device=pipe._execution_device)
        return sched

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        x = inputs["sample"]  # [B, C, F, h, w]; text per frame: [B·F, L, C]
        text = inputs["encoder_hidden_states"].repeat_interleave(x.shape[2], dim=0)
        return model(x, inputs["timestep"], encoder_hidden_states=text, return_dict=False)[0]
