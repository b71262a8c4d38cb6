"""Wan 2.1 (``WanPipeline``, ``WanTransformer3DModel``): UMT5 prompts, 3D patches, a VAE with
per-channel latent mean and std that compresses time 4x."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from seg_rt.families.base import Classes, read_json

from .base import VideoFamily


class WanFamily(VideoFamily):
    name = "wan"
    classes = Classes("WanPipeline", "WanTransformer3DModel", "seg_rt.video.attention:WAN")

    def folder_factor(self, folder: Path) -> int:
        return int(read_json(folder / "vae" / "config.json")["scale_factor_spatial"])

    def decode_video(self, pipe, latents: Tensor) -> Tensor:
        """Undo the per-channel latent normalisation, then decode."""
        vae = pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        return vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
