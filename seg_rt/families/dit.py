"""What the image DiT families (SD3 / SD3.5, Flux.1, Qwen-Image) share: flow matching, the
SEG-patched transformer (``seg_rt.families.segdit.SEGDiT``), 2x2 packing, per-image decoding.

Each step reproduces the family's diffusers pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``,
``QwenImagePipeline``) so that seed s gives diffusers' noise for ``torch.Generator("cpu").manual_seed(s)``
and the same schedule: the family's own ``FlowMatchEulerDiscreteScheduler`` (Flux: ``sigmas =
linspace(1, 1/steps)`` and the resolution-dependent shift ``mu``), the pipelines' ``encode_prompt``,
and the VAE's ``scaling_factor`` / ``shift_factor``. SEG guidance combines the velocity predictions
with the same formula as noise predictions (docs/design.md §1).

Flux's and Qwen-Image's latents stay unpacked ``[B, C, 2H, 2W]`` in the sampler (their scheduler
step is elementwise, so packing, a permutation, commutes with it); ``SEGDiT`` packs them into 2x2
patches for the transformer and unpacks its output, exactly as the pipelines pack their noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import (
    Family,
    decode_per_image,
    flow_shift,
    own_flow_scheduler,
    perturbed_mask,
    read_json,
    vae_factor,
)


def pack(latents: Tensor) -> Tensor:
    """``[B, C, 2H, 2W]`` → Flux tokens ``[B, H·W, 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Flux tokens ``[B, H·W, 4C]`` → ``[B, C, 2H, 2W]`` (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


class ImageDiTFamily(Family):
    """An image DiT: transformer over latent tokens, flow-matching Euler, VAE ``scaling_factor`` /
    ``shift_factor``. Subclasses: ``SD3Family``, ``FluxFamily``, ``QwenImageFamily``."""

    packed: ClassVar[bool] = False  # 2x2-packed latent tokens (Flux, Qwen-Image) instead of a patchify conv
    flow = True
    tasks = ("txt2img", "img2img", "inpaint")
    cache_modes = ("fbcache",)  # seg_rt.step_cache.FirstBlockCache

    def net(self, pipe):
        return pipe.transformer

    def preview_latents(self, pipe, latents: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        """The sampler's unpacked ``[n, C, h, w]`` as they are; packed tokens ``[n, h/2·w/2, 4C]``
        (the transformer's input, Flux / Qwen-Image) unpacked first, which needs ``size`` = (h, w)."""
        if self.packed and latents.ndim == 3:
            return unpack(latents, *size) if size is not None else None
        return super().preview_latents(pipe, latents, size)

    def patch(self, pipe) -> int:
        """Latent pixels per token side: 2 when packed, else the transformer's ``patch_size``."""
        return 2 if self.packed else pipe.transformer.config.patch_size

    def size_factor(self, pipe) -> int:
        return pipe.vae_scale_factor * self.patch(pipe)

    def default_side(self, pipe) -> int:
        return 1024

    def folder_factor(self, folder: Path) -> int:
        return vae_factor(read_json(folder / "vae" / "config.json")) * self.folder_patch(folder)

    def folder_patch(self, folder: Path) -> int:
        return 2

    def select_layers(self, pipe, selectors: Sequence[str]) -> list[str]:
        return self.adapter().select(pipe.transformer, selectors)

    def forward(self, transformer: nn.Module, inputs: Mapping[str, Tensor], cache: dict) -> Tensor:
        """Call the transformer with the sampler's named inputs; returns ``[B, C, h, w]``."""
        raise NotImplementedError

    def latent_shape(self, pipe, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Unpacked latent shape ``[n, C, h, w]`` as the pipeline's ``prepare_latents`` draws its noise."""
        f = pipe.vae_scale_factor
        if self.packed:
            channels = pipe.transformer.config.in_channels // 4
            return n, channels, 2 * (height // (f * 2)), 2 * (width // (f * 2))
        return n, pipe.transformer.config.in_channels, height // f, width // f

    def initial_latents(self, pipe, scheduler, generators, *, height: int, width: int, dtype) -> Tensor:
        """diffusers' initial noise: row i from ``generators[i]``; flow matching starts at unit noise."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(pipe, len(generators), height, width)
        return randn_tensor(shape, generator=list(generators), device=pipe._execution_device, dtype=dtype)

    def encode_image(self, pipe, pixels: Tensor, generator) -> Tensor:
        """``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``'s ``_encode_vae_image`` for one
        row: the VAE samples with ``generator``, then ``(latents - shift_factor) * scaling_factor``."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = pipe.vae
        with torch.no_grad():
            latents = retrieve_latents(vae.encode(pixels.to(vae.dtype)), generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(pixels.dtype)

    def noise_shape(self, pipe, image_latents, height: int, width: int) -> tuple[int, ...]:
        return self.latent_shape(pipe, 1, height, width)

    def timestep_options(self, pipe, sched, steps: int, sequence_length: int) -> dict:
        """``set_timesteps`` options that give the pipeline's schedule (SD3's ``mu`` when it shifts
        dynamically)."""
        return (
            {"mu": flow_shift(sched.config, sequence_length)}
            if sched.config.get("use_dynamic_shifting")
            else {}
        )

    def schedule(self, pipe, scheduler, steps: int, *, height: int, width: int):
        """A fresh copy of the family's flow-matching scheduler, ``set_timesteps`` called as the
        pipeline calls it."""
        sched = own_flow_scheduler(self.name, pipe, scheduler)
        _, _, h, w = self.latent_shape(pipe, 1, height, width)
        p = self.patch(pipe)
        options = self.timestep_options(pipe, sched, steps, (h // p) * (w // p))
        sched.set_timesteps(steps, device=pipe._execution_device, **options)
        return sched

    def denoiser(self, pipe, *, compile: bool = False):
        if compile:
            raise ValueError(
                f"engine 'torch-compile' is not available for {type(pipe).__name__}; use torch, onnx:DIR or trt:DIR"
            )
        from seg_rt.engines.dit_denoiser import DiTDenoiser

        return DiTDenoiser(pipe.transformer, self)

    def decode(self, pipe, latents: Tensor, output_type: str):
        """``latents / scaling_factor + shift_factor`` through the VAE, one image at a time, then the
        pipeline's image processor."""
        if output_type == "latent":
            return latents
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return pipe.image_processor.postprocess(decode_per_image(vae, latents), output_type=output_type)

    # --- export (SD3, Flux) -----------------------------------------------------------------
    export_text_tokens: ClassVar[int] = 0  # the T5 length of an export (the pipeline's max_sequence_length)

    def export_model(self, pipe, *, sigma: float, layers: Sequence[str]):
        from .segdit import SEGDiT

        return SEGDiT(pipe.transformer, self, sigma=sigma, layers=layers)

    def export_inputs(
        self, pipe, model, rows: int, batch: int, height: int, width: int, dtype, seed: int = 0
    ):
        g = torch.Generator().manual_seed(seed)
        config = pipe.transformer.config
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
        inputs = {
            "sample": rnd(*self.latent_shape(pipe, rows, height, width)),
            "timestep": torch.full((rows,), 500.0),
            "encoder_hidden_states": rnd(rows, self.export_tokens(pipe), config.joint_attention_dim),
            "pooled_projections": rnd(rows, config.pooled_projection_dim),
        }
        inputs.update(self.export_extra(pipe, rows))
        inputs["seg_mask"] = perturbed_mask(rows, batch)
        return inputs

    def export_tokens(self, pipe) -> int:
        return self.export_text_tokens

    def export_extra(self, pipe, rows: int) -> dict:
        return {}
