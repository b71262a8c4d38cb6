"""LTX-Video (``LTXPipeline``, ``LTXVideoTransformer3DModel``): pre-patchified tokens with the latent
``num_frames`` / ``height`` / ``width``, T5 prompts with their attention mask, its own flow-matching
Euler schedule (``sigmas = linspace(1, 1/steps)`` and the sequence-length shift ``mu``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from seg_rt.families import latent_rgb
from seg_rt.families.base import Classes, Prepared, flow_shift, own_flow_scheduler, read_json
from seg_rt.params import GenerationParams

from .base import HoldFirstFrame, ImageStart, VideoFamily, image_tensor

LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate: sets RoPE's temporal interpolation scale
LTX_TEXT_TOKENS = 128  # LTXPipeline's max_sequence_length default


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


class LTXFamily(VideoFamily):
    name = "ltx"
    classes = Classes("LTXPipeline", "LTXVideoTransformer3DModel", "seg_rt.video.attention:LTX")
    image_pipeline = "LTXImageToVideoPipeline"  # the same checkpoints animate a still
    preview_table = latent_rgb.LTXV

    def image_support(self, pipe) -> str | None:
        return None

    def image_start(self, pipe, scheduler, image, generators, *, frames, height, width, dtype) -> ImageStart:
        """``LTXImageToVideoPipeline.prepare_latents`` per row: the still's VAE sample (row i's
        generator), normalised, as latent frame 0 and the row's noise after it (drawn next from the
        same generator); the conditioning mask (1 on frame 0's tokens) zeroes those tokens' timestep
        (``forward``) and the scheduler keeps frame 0 (``HoldFirstFrame``)."""
        from diffusers.pipelines.ltx.pipeline_ltx_image2video import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor

        vae, device = pipe.vae, pipe._execution_device
        f = self.size_factor(pipe)
        net = self.net(pipe).config
        pixels = image_tensor(pipe, image, height, width, dtype).unsqueeze(2)  # [1, C, 1, H, W]
        shape = (1, net.in_channels, frames, height // f, width // f)
        mask = torch.zeros((1, 1, *shape[2:]), device=device, dtype=torch.float32)
        mask[:, :, 0] = 1.0
        rows = []
        for g in generators:  # the pipeline's float32 latents
            z = retrieve_latents(vae.encode(pixels), g).to(torch.float32)
            z = pipe._normalize_latents(z, vae.latents_mean, vae.latents_std).repeat(1, 1, frames, 1, 1)
            noise = randn_tensor(shape, generator=g, device=device, dtype=torch.float32)
            rows.append(z * mask + noise * (1 - mask))
        packed_mask = ltx_pack(mask, net.patch_size, net.patch_size_t).squeeze(-1)  # [1, tokens]
        return ImageStart(
            torch.cat(rows), shared={"conditioning_mask": packed_mask}, scheduler=HoldFirstFrame(scheduler)
        )

    def size_factor(self, pipe) -> int:
        return int(pipe.vae_spatial_compression_ratio)

    def folder_factor(self, folder: Path) -> int:
        config = read_json(folder / "vae" / "config.json")  # as LTX-Video's VAE computes its ratio
        scaling = config["spatio_temporal_scaling"]
        return int(config.get("spatial_compression_ratio") or config["patch_size"] * 2 ** sum(scaling))

    def latent_frames(self, pipe, frames: int) -> int:
        return (frames - 1) // pipe.vae_temporal_compression_ratio + 1

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        """T5 embeddings with their attention masks."""
        do_cfg = request.cfg > 1
        pe, pm, ne, nm = pipe.encode_prompt(
            request.prompt,
            request.negative_prompt,
            do_cfg,
            n,
            max_sequence_length=LTX_TEXT_TOKENS,
            device=pipe._execution_device,
        )
        cond = {"encoder_hidden_states": pe, "encoder_attention_mask": pm}
        uncond = {"encoder_hidden_states": ne, "encoder_attention_mask": nm} if do_cfg else None
        return Prepared(cond, uncond)

    def schedule(self, pipe, scheduler, steps: int, *, frames: int, height: int, width: int):
        """``LTXPipeline``'s schedule on a fresh copy of its own flow-matching Euler scheduler."""
        sched = own_flow_scheduler(self.name, pipe, scheduler)
        f = self.size_factor(pipe)
        mu = flow_shift(sched.config, frames * (height // f) * (width // f))
        sched.set_timesteps(
            steps, device=pipe._execution_device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu
        )
        return sched

    def shared_inputs(self, pipe, *, frames: int, height: int, width: int) -> dict:
        ratio = pipe.vae_spatial_compression_ratio
        return {
            "rope_interpolation_scale": (pipe.vae_temporal_compression_ratio / LTX_FRAME_RATE, ratio, ratio)
        }

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        """Unpacked latents ``[B, C, F, h, w]`` packed into tokens, as ``LTXPipeline``."""
        x = inputs["sample"]
        _, _, f, h, w = x.shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        timestep = inputs["timestep"]
        if "conditioning_mask" in shared:  # image-to-video: the conditioning tokens at timestep 0
            timestep = timestep.unsqueeze(-1) * (1 - shared["conditioning_mask"])
        out = model(
            hidden_states=ltx_pack(x, p, p_t).to(inputs["encoder_hidden_states"].dtype),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=timestep,
            encoder_attention_mask=inputs["encoder_attention_mask"],
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=shared.get("rope_interpolation_scale"),
            return_dict=False,
        )[0]
        return ltx_unpack(out, f, h, w, p, p_t)

    def decode_video(self, pipe, latents: Tensor) -> Tensor:
        """Undo the latent normalisation; decode at timestep 0 without noise (the pipeline's defaults)."""
        vae = pipe.vae
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
        t = torch.zeros(latents.shape[0], device=latents.device) if vae.config.timestep_conditioning else None
        return vae.decode(latents.to(vae.dtype), t, return_dict=False)[0]
