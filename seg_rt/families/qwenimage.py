"""Qwen-Image (``QwenImagePipeline``): double-stream joint attention over 2x2-packed tokens, a
Qwen2.5-VL text encoder, a video VAE decoding one frame with per-channel mean and std.

Differs from its pipeline in two documented ways: every prompt's embedding is padded to
``QWEN_TEXT_TOKENS`` with its mask (diffusers keeps each run's own length), so that a row's result
does not depend on the other prompts of its batch; and its CFG is seg-rt's shared formula, without
``QwenImagePipeline``'s per-token norm rescale of the CFG prediction. Not exportable yet (its padded
text and mask make a graph of their own).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.params import GenerationParams

from . import latent_rgb
from .base import Classes, Prepared, read_json
from .dit import ImageDiTFamily, pack, unpack
from .flux import packed_schedule_options

QWEN_TEXT_TOKENS = 512
"""Qwen-Image prompt embeddings are padded (masked) to this length: ``QwenImagePipeline``'s
``max_sequence_length`` default, so every row of every batch has the same text length."""


class QwenImageFamily(ImageDiTFamily):
    name = "qwenimage"
    classes = Classes("QwenImagePipeline", "QwenImageTransformer2DModel", "seg_rt.dit_attention:QWENIMAGE")
    packed = True
    tasks = ("txt2img", "img2img")
    preview_table = latent_rgb.WAN21  # its VAE is Wan 2.1's (as ComfyUI previews it)

    def encode_image(self, pipe, pixels: Tensor, generator) -> Tensor:
        """``QwenImageImg2ImgPipeline._encode_vae_image`` for one row: the video VAE on one frame,
        sampled with ``generator``, normalised by the per-channel mean and std."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = pipe.vae
        with torch.no_grad():
            latents = retrieve_latents(vae.encode(pixels.to(vae.dtype)[:, :, None]), generator=generator)
        c = latents.shape[1]
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents)
        return ((latents - mean) * (1.0 / std))[:, :, 0].to(pixels.dtype)

    def folder_factor(self, folder: Path) -> int:
        return 2 ** len(read_json(folder / "vae" / "config.json")["temperal_downsample"]) * 2

    def timestep_options(self, pipe, sched, steps: int, sequence_length: int) -> dict:
        return packed_schedule_options(self.name, sched, steps, sequence_length)

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        cond = self._embeds(pipe, request.prompt, n)
        uncond = self._embeds(pipe, request.negative_prompt or "", n) if request.cfg > 1.0 else None
        return Prepared(cond, uncond)

    @staticmethod
    def _embeds(pipe, prompt: str, n: int) -> dict:
        """``QwenImagePipeline.encode_prompt`` for n rows, padded with its mask to ``QWEN_TEXT_TOKENS``."""
        embeds, mask = pipe.encode_prompt(
            prompt,
            device=pipe._execution_device,
            num_images_per_prompt=n,
            max_sequence_length=QWEN_TEXT_TOKENS,
        )
        # embeds: [n, L, D]; mask: [n, L] or None (all valid)
        length = embeds.shape[1]
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        pad = QWEN_TEXT_TOKENS - length
        embeds = torch.cat([embeds, embeds.new_zeros(n, pad, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(n, pad)], dim=1)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def forward(self, transformer: nn.Module, inputs: Mapping[str, Tensor], cache: dict) -> Tensor:
        x = inputs["sample"]
        h, w = x.shape[-2:]
        out = transformer(
            hidden_states=pack(x),
            timestep=inputs["timestep"].to(x.dtype) / 1000,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_mask=inputs["encoder_hidden_states_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def decode(self, pipe, latents: Tensor, output_type: str):
        """A video VAE: one frame, per-channel mean and std."""
        if output_type == "latent":
            return latents
        vae = pipe.vae
        c = latents.shape[1]
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        latents = latents.to(vae.dtype)[:, :, None] * std + mean  # [B, C, 1, h, w]
        with torch.no_grad():
            image = torch.cat([vae.decode(x[None], return_dict=False)[0][:, :, 0] for x in latents])
        return pipe.image_processor.postprocess(image, output_type=output_type)
