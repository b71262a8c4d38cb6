"""Wan 2.1 (``WanPipeline``, ``WanImageToVideoPipeline``, ``WanTransformer3DModel``): UMT5 prompts,
3D patches, a VAE with per-channel latent mean and std that compresses time 4x. Image-to-video
checkpoints take the first-frame mask and the still's video latents as extra channels and the still's
CLIP image embedding (``image_encoder``) as extra cross-attention context."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.families import latent_rgb
from seg_rt.families.base import Classes, Prepared, read_json
from seg_rt.params import GenerationParams

from .base import ImageStart, VideoFamily, image_tensor

WAN_TEXT_TOKENS = 512  # WanImageToVideoPipeline's max_sequence_length; its attention splits at 512


class WanFamily(VideoFamily):
    name = "wan"
    classes = Classes("WanPipeline", "WanTransformer3DModel", "seg_rt.video.attention:WAN")
    image_pipeline = "WanImageToVideoPipeline"
    preview_table = latent_rgb.WAN21

    def folder_factor(self, folder: Path) -> int:
        return int(read_json(folder / "vae" / "config.json")["scale_factor_spatial"])

    def requires_image(self, pipe) -> bool:
        return self.net(pipe).config.in_channels != pipe.vae.config.z_dim

    def image_support(self, pipe) -> str | None:
        config = self.net(pipe).config
        if getattr(pipe, "transformer_2", None) is not None or getattr(
            pipe.config, "expand_timesteps", False
        ):
            return "Wan 2.2 image-to-video (two experts / expanded timesteps) is not supported"
        if not self.requires_image(pipe):
            return f"its transformer takes {config.in_channels} latent channels, a text-to-video checkpoint"
        if config.image_dim is not None and getattr(pipe, "image_encoder", None) is None:
            return "the checkpoint has no CLIP image encoder (image_encoder, image_processor)"
        return None

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        if request.video is None or request.video.image is None:
            return super().encode(pipe, request, n, **options)
        from diffusers import WanPipeline

        # WanPipeline's prompt encoding (of which WanImageToVideoPipeline's is a copy; diffusers 0.42's
        # copy calls ftfy even where it is not installed, the original skips it): encode_prompt's
        # steps (empty negative prompt by default) over WanPipeline._get_t5_prompt_embeds
        do_cfg = request.cfg > 1  # image-to-video: the pipeline's 512 text tokens (the attention's split)
        kw = {"num_videos_per_prompt": n, "max_sequence_length": WAN_TEXT_TOKENS}
        kw["device"] = pipe._execution_device
        pe = WanPipeline._get_t5_prompt_embeds(pipe, request.prompt, **kw)
        ne = WanPipeline._get_t5_prompt_embeds(pipe, request.negative_prompt or "", **kw) if do_cfg else None
        return Prepared({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if do_cfg else None)

    def image_start(self, pipe, scheduler, image, generators, *, frames, height, width, dtype) -> ImageStart:
        """``WanImageToVideoPipeline`` (Wan 2.1): the noise first (row i from generator i), then the
        condition (diffusers' ``prepare_latents``: the still followed by black frames through the VAE,
        its mode, normalised, behind the 4-channel first-frame mask) and the CLIP image embedding
        (``encode_image``), the same for every row."""
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor

        vae, device = pipe.vae, pipe._execution_device
        f, t = self.size_factor(pipe), pipe.vae_scale_factor_temporal
        h, w, z = height // f, width // f, vae.config.z_dim
        pixel_frames = (frames - 1) * t + 1
        shape = (len(generators), z, frames, h, w)
        latents = randn_tensor(shape, generator=list(generators), device=device, dtype=dtype)
        still = image_tensor(pipe, image, height, width, torch.float32).unsqueeze(2)
        video = torch.cat([still, still.new_zeros(1, 3, pixel_frames - 1, height, width)], dim=2)
        condition = retrieve_latents(vae.encode(video.to(vae.dtype)), sample_mode="argmax").to(device, dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(condition)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(condition)
        condition = (condition - mean) * inv_std  # as the pipeline rounds it
        # the first-frame mask as the pipeline lays it out: pixel frame 0 repeated t times, in
        # groups of t frames per latent frame -> [1, t, F, h, w]
        mask = torch.zeros(1, 1, pixel_frames, h, w, device=device, dtype=dtype)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(t, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, t, h, w).transpose(1, 2)
        rows = {"condition": torch.cat([mask, condition], dim=1).expand(len(generators), -1, -1, -1, -1)}
        if self.net(pipe).config.image_dim is not None:
            embeds = pipe.encode_image(image.pil(), device).to(dtype)
            rows["encoder_hidden_states_image"] = embeds.expand(len(generators), -1, -1)
        return ImageStart(latents, rows, dict(rows))

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        x = inputs["sample"]  # [B, C, F, h, w]
        if "condition" in inputs:  # image-to-video: mask + the still's latents as extra channels
            x = torch.cat([x, inputs["condition"]], dim=1)
        return model(
            hidden_states=x,
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_image=inputs.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]

    def decode_video(self, pipe, latents: Tensor) -> Tensor:
        """Undo the per-channel latent normalisation, then decode."""
        vae = pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        return vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
