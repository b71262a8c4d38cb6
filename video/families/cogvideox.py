"""CogVideoX (``CogVideoXPipeline``, ``CogVideoXImageToVideoPipeline``): joint text + video attention
with 3D RoPE on the video tokens, latents ``[B, F, C, h, w]``, a VAE that compresses time 4x.
Image-to-video checkpoints take the still's latents as extra channels (``in_channels`` = 2 x latent)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from seg_rt.families.base import Classes

from .base import ImageStart, VideoFamily, image_tensor


class CogVideoXFamily(VideoFamily):
    name = "cogvideox"
    classes = Classes("CogVideoXPipeline", "CogVideoXTransformer3DModel", "seg_rt.video.attention:COGVIDEOX")
    image_pipeline = "CogVideoXImageToVideoPipeline"
    frames_first = True
    preview_table = None  # no published table for its VAE (seg_rt.families.latent_rgb says why)

    def requires_image(self, pipe) -> bool:
        return self.net(pipe).config.in_channels == 2 * pipe.vae.config.latent_channels

    def image_support(self, pipe) -> str | None:
        config = self.net(pipe).config
        if not self.requires_image(pipe):
            return f"its transformer takes {config.in_channels} latent channels, a text-to-video checkpoint"
        if config.patch_size_t is not None or config.ofs_embed_dim is not None:
            return "CogVideoX 1.5 (temporal patches, ofs embedding) is not supported"
        return None

    def image_start(self, pipe, scheduler, image, generators, *, frames, height, width, dtype) -> ImageStart:
        """``CogVideoXImageToVideoPipeline.prepare_latents`` per row (its VAE sample and noise from the
        row's own generator, in that order; diffusers draws them for a batch of images, seg-rt for one
        row at a time so that video i equals its seed alone): the still's scaled latents as the first
        of ``frames`` latent frames (zeros after it), then the initial noise."""
        from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor

        pixels = image_tensor(pipe, image, height, width, dtype).unsqueeze(2)  # [1, C, 1, H, W]
        f = self.size_factor(pipe)
        channels = self.net(pipe).config.in_channels // 2
        scale = pipe.vae_scaling_factor_image
        scale = 1 / scale if pipe.vae.config.invert_scale_latents else scale
        rows, noise = [], []
        for g in generators:
            z = retrieve_latents(pipe.vae.encode(pixels), g).to(dtype).permute(0, 2, 1, 3, 4) * scale
            rows.append(torch.cat([z, z.new_zeros(1, frames - 1, *z.shape[2:])], dim=1))
            shape = (1, frames, channels, height // f, width // f)
            noise.append(randn_tensor(shape, generator=g, device=pipe._execution_device, dtype=dtype))
        image_latents = torch.cat(rows)
        latents = torch.cat(noise) * scheduler.init_noise_sigma
        return ImageStart(latents, {"image_latents": image_latents}, {"image_latents": image_latents})

    def shared_inputs(self, pipe, *, frames: int, height: int, width: int) -> dict:
        if not self.net(pipe).config.use_rotary_positional_embeddings:
            return {}
        rope = pipe._prepare_rotary_positional_embeddings(height, width, frames, pipe._execution_device)
        return {"image_rotary_emb": rope}

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        x = inputs["sample"]  # [B, F, C, h, w]
        if "image_latents" in inputs:  # image-to-video: the still's latents as extra channels
            x = torch.cat([x, inputs["image_latents"]], dim=2)
        return model(
            hidden_states=x,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"],
            image_rotary_emb=shared.get("image_rotary_emb"),
            return_dict=False,
        )[0]
