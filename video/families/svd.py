"""Stable Video Diffusion (``StableVideoDiffusionPipeline``, ``UNetSpatioTemporalConditionModel``):
image-to-video only. A UNet with spatial attention per frame and temporal attention along frames
(SEG's ``spatial`` and ``temporal`` kinds, as AnimateDiff), conditioned on the still's CLIP image
embedding (no text) and on its VAE latents as extra channels; latents ``[B, F, C, h, w]``, no temporal
compression; the micro-conditioning ``added_time_ids`` = (fps - 1, motion bucket, noise augmentation).

The request's video fields are the pipeline's arguments: CFG ramps linearly over the frames from
``min_cfg`` (``min_guidance_scale``, default 1) at the first to ``cfg`` (``max_guidance_scale``) at
the last, as the pipeline does; ``motion_bucket_id`` and ``noise_aug_strength`` (defaults 127, 0.02)
are its micro-conditioning, the still noised by the latter before encoding; ``fps`` is the request's
(the written file's rate; the pipeline conditions on fps - 1). SEG's term is added on top of the
ramped CFG with its own (constant) scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from seg_rt.families import latent_rgb
from seg_rt.families.base import Classes, Prepared
from seg_rt.params import GenerationParams

from .base import ImageStart, VideoFamily, image_tensor


class SVDFamily(VideoFamily):
    name = "svd"
    classes = Classes(
        "StableVideoDiffusionPipeline", "UNetSpatioTemporalConditionModel", "seg_rt.video.attention:SVD"
    )
    frames_first = True
    svd_conditioning = True
    preview_table = latent_rgb.SD15  # its VAE is SD1.5's (ComfyUI previews SVD with latent_formats.SD15)

    def net(self, pipe) -> nn.Module:
        return pipe.unet

    def size_factor(self, pipe) -> int:
        return int(pipe.vae_scale_factor)

    def default_side(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * self.size_factor(pipe)

    def latent_frames(self, pipe, frames: int) -> int:
        return frames

    def image_support(self, pipe) -> str | None:
        return None

    def requires_image(self, pipe) -> bool:
        return True

    def check_request(self, pipe, request: GenerationParams) -> None:
        super().check_request(pipe, request)
        if request.prompt or request.negative_prompt:
            raise ValueError(
                "prompt: Stable Video Diffusion is conditioned on the image only; give no prompt or "
                "negative prompt"
            )

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        """The still's CLIP image embedding (``_encode_image``; zeros for the uncond rows) and the
        micro-conditioning ``added_time_ids`` (``_get_add_time_ids``), n rows each."""
        do_cfg = request.cfg > 1
        device = pipe._execution_device
        embeds = pipe._encode_image(request.video.image.pil(), device, n, False)
        v = request.video
        ids = pipe._get_add_time_ids(
            v.fps - 1,
            v.motion_bucket_id,
            v.noise_aug_strength,
            embeds.dtype,
            1,
            n,
            False,
        ).to(device)
        cond = {"encoder_hidden_states": embeds, "added_time_ids": ids}
        uncond = {"encoder_hidden_states": torch.zeros_like(embeds), "added_time_ids": ids}
        return Prepared(cond, uncond if do_cfg else None)

    def image_options(self, request: GenerationParams) -> dict:
        return {"noise_aug_strength": request.video.noise_aug_strength}

    def cfg_scale(self, pipe, request: GenerationParams, latents: Tensor) -> Tensor:
        """``torch.linspace(min_guidance_scale, max_guidance_scale, num_frames)`` over the frames
        (dimension 1), as the pipeline builds it, in the latents' dtype."""
        frames = latents.shape[1]
        ramp = torch.linspace(request.video.min_cfg, request.cfg, frames).to(latents.device, latents.dtype)
        return ramp.view(1, frames, *([1] * (latents.ndim - 2)))

    def image_start(
        self, pipe, scheduler, image, generators, *, frames, height, width, dtype, noise_aug_strength
    ) -> ImageStart:
        """``StableVideoDiffusionPipeline`` per row: the still plus ``noise_aug_strength`` x noise (row i's generator;
        diffusers draws one noise for a batch of videos, seg-rt one per row so that video i equals
        its seed alone), its VAE latents' mode repeated over the frames (zeros for uncond rows), then
        the row's initial noise (``prepare_latents``) from the same generator."""
        from diffusers.utils.torch_utils import randn_tensor

        vae, device = pipe.vae, pipe._execution_device
        f = self.size_factor(pipe)
        pixels = image_tensor(pipe, image, height, width, torch.float32)
        shape = (1, frames, self.net(pipe).config.in_channels // 2, height // f, width // f)
        rows, noise = [], []
        for g in generators:
            aug = randn_tensor(pixels.shape, generator=g, device=device, dtype=pixels.dtype)
            noisy = (pixels + noise_aug_strength * aug).to(vae.dtype)
            z = vae.encode(noisy).latent_dist.mode().to(dtype)
            rows.append(z.unsqueeze(1).repeat(1, frames, 1, 1, 1))
            noise.append(randn_tensor(shape, generator=g, device=device, dtype=dtype))
        image_latents = torch.cat(rows)
        latents = torch.cat(noise) * scheduler.init_noise_sigma
        return ImageStart(
            latents, {"image_latents": image_latents}, {"image_latents": torch.zeros_like(image_latents)}
        )

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        x = torch.cat([inputs["sample"], inputs["image_latents"]], dim=2)  # [B, F, 2C, h, w]
        return model(
            x,
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_time_ids=inputs["added_time_ids"],
            return_dict=False,
        )[0]

    def decode_video(self, pipe, latents: Tensor) -> Tensor:
        """``decode_latents`` over all frames at once (decode_chunk_size = frames, the pipeline's default)."""
        return pipe.decode_latents(latents, latents.shape[1], latents.shape[1])
