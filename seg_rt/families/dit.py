"""What the image DiT families (SD3 / SD3.5, Flux.1, Qwen-Image) share: flow matching, the
SEG-patched transformer (``SEGDiT``), 2x2 packing, per-image decoding.

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

from seg_rt.attention import Adapter, SEGAttention, tracing
from seg_rt.denoiser import RowwiseLinear, swap_linears

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


class RowwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` run one sample at a time in eager mode: CPU Conv2d picks another algorithm for
    another batch size, so SD3's patch embedding gave batched rows results ~1e-7 off solo runs (as
    ``seg_rt.denoiser.RowwiseConv3d`` for Wan). Only the DiT's patchify conv uses it."""

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[0] > 1 and not tracing(input):
            return torch.cat(
                [super(RowwiseConv2d, self).forward(input[i : i + 1]) for i in range(input.shape[0])]
            )
        return super().forward(input)


def _patch_convs(transformer: nn.Module) -> list[nn.Module]:
    """The patchify convs of a DiT (SD3's ``pos_embed.proj``; Flux patchifies by packing)."""
    proj = getattr(getattr(transformer, "pos_embed", None), "proj", None)
    return [proj] if isinstance(proj, nn.Conv2d) else []


def batch_invariance(transformer: nn.Module, on: bool) -> None:
    """Per-sample linears and patchify conv (on) or the plain layers back (off)."""
    swap_linears([transformer], RowwiseLinear if on else nn.Linear)
    for conv in _patch_convs(transformer):
        conv.__class__ = RowwiseConv2d if on else nn.Conv2d


class SEGDiT(nn.Module):
    """An image-DiT transformer with SEG installed; ``forward(inputs)`` → the velocity prediction.

    Inputs: ``sample`` (unpacked latents ``[B, C, h, w]``), ``timestep`` (the scheduler's, 0-1000),
    ``encoder_hidden_states``, the family's extra inputs (``pooled_projections``, Flux-dev's
    ``guidance``, Qwen-Image's ``encoder_hidden_states_mask``), and ``seg_mask``. How the transformer
    is called is the family's (``ImageDiTFamily.forward``).
    """

    controlnet = None  # the export code asks every SEG denoiser for its ControlNet

    def __init__(
        self,
        transformer: nn.Module,
        family: ImageDiTFamily,
        *,
        sigma: float,
        layers: Sequence[str] = ("mid",),
        perturbation="blur",
    ) -> None:
        super().__init__()
        self.transformer, self.family = transformer, family
        self.seg = SEGAttention(transformer, sigma, layers, perturbation, adapter=family.adapter())
        self.seg.install()
        batch_invariance(transformer, True)  # per-sample results independent of the batch
        self.cache: dict[tuple, Tensor] = {}  # per-shape constant inputs (Flux's img_ids)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), getattr(inputs, "seg_rows", None))  # host layout: no sync
        try:
            out = self.family.forward(self.transformer, inputs, self.cache)
            self.seg.check()  # SEG active but no query perturbed: an error, never a CFG-only result
            return out
        finally:
            self.seg.set_mask(None)

    def grids(self) -> list[tuple[int, int]]:
        """The token grid of the last forward (for runtime-σ exports' blur-matrix inputs)."""
        return [] if self.seg.grid is None else [self.seg.grid[1:]]

    def remove(self) -> None:
        self.seg.remove()
        batch_invariance(self.transformer, False)


class ImageDiTFamily(Family):
    """An image DiT: transformer over latent tokens, flow-matching Euler, VAE ``scaling_factor`` /
    ``shift_factor``. Subclasses: ``SD3Family``, ``FluxFamily``, ``QwenImageFamily``."""

    packed: ClassVar[bool] = False  # 2x2-packed latent tokens (Flux, Qwen-Image) instead of a patchify conv

    def adapter(self) -> Adapter:
        raise NotImplementedError

    def net(self, pipe):
        return pipe.transformer

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
