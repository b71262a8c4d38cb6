"""Flux.1 (``FluxPipeline``): double- and single-stream blocks over 2x2-packed latent tokens with
RoPE positions (``img_ids``), CLIP pooled + T5 prompts, the distilled guidance Flux.1-dev embeds,
``sigmas = linspace(1, 1/steps)`` with the resolution-dependent shift ``mu``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from seg_rt.params import GenerationParams

from . import latent_rgb
from .base import Classes, Prepared, flow_shift
from .dit import ImageDiTFamily, pack, unpack


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Flux's token positions ``[H·W, 3]``: (0, row, column), row-major (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def packed_schedule_options(family: str, sched, steps: int, sequence_length: int) -> dict:
    """The options ``FluxPipeline`` (and ``QwenImagePipeline``) pass to ``set_timesteps``:
    ``mu`` and, unless the scheduler makes its own flow sigmas, ``sigmas = linspace(1, 1/steps)``."""
    config = sched.config
    if config.get("shift_terminal") and steps < 2:
        # sigmas = linspace(1, 1/steps) is [1.0]: stretching it to shift_terminal divides by zero
        raise ValueError(f"{family} with a terminal shift (shift_terminal) needs steps >= 2, got {steps}")
    options = {"mu": flow_shift(config, sequence_length)}
    if not config.get("use_flow_sigmas", False):
        options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    return options


class FluxFamily(ImageDiTFamily):
    name = "flux"
    classes = Classes("FluxPipeline", "FluxTransformer2DModel", "seg_rt.dit_attention:FLUX")
    packed = True
    exportable = True
    export_text_tokens = 512  # FluxPipeline.encode_prompt's max_sequence_length default (T5 only)
    preview_table = latent_rgb.FLUX

    def takes_distilled_guidance(self, pipe) -> bool:
        """Flux.1-dev embeds a distilled guidance value; schnell does not."""
        return bool(pipe.transformer.config.guidance_embeds)

    def timestep_options(self, pipe, sched, steps: int, sequence_length: int) -> dict:
        return packed_schedule_options(self.name, sched, steps, sequence_length)

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        """``request.cfg`` is true CFG with the negative prompt ("" when none; off at 1);
        ``request.distilled_guidance`` is the value Flux.1-dev embeds."""
        device = pipe._execution_device
        pe, pooled, _ = pipe.encode_prompt(request.prompt, None, device=device, num_images_per_prompt=n)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = None
        if request.cfg > 1.0:  # true CFG: the negative prompt, encoded the same way
            ne, npooled, _ = pipe.encode_prompt(
                request.negative_prompt or "", None, device=device, num_images_per_prompt=n
            )
            uncond = {"encoder_hidden_states": ne, "pooled_projections": npooled}
        if self.takes_distilled_guidance(pipe):
            guidance = torch.full((n,), float(request.distilled_guidance), device=device, dtype=torch.float32)
            cond["guidance"] = guidance
            if uncond is not None:
                uncond["guidance"] = guidance
        return Prepared(cond, uncond)

    def forward(self, transformer: nn.Module, inputs: Mapping[str, Tensor], cache: dict) -> Tensor:
        x, text = inputs["sample"], inputs["encoder_hidden_states"]
        h, w = x.shape[-2:]
        out = transformer(
            hidden_states=pack(x),
            timestep=inputs["timestep"].to(x.dtype) / 1000,
            guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
            img_ids=self._ids(cache, h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    @staticmethod
    def _ids(cache: dict, h: int, w: int, device, dtype) -> Tensor:
        """``img_ids`` for an (h, w) token grid, built once per shape as a concrete tensor: the SEG
        grid is read from their values, which an exporter's trace can read only from a tensor made
        before it (``export_onnx`` runs the model eagerly first)."""
        key = ("img_ids", h, w, str(device), dtype)
        if key not in cache:
            cache[key] = image_ids(h, w, device, dtype)
        return cache[key]

    def export_extra(self, pipe, rows: int) -> dict:
        # Flux-dev's guidance input (a runtime value per row)
        return {"guidance": torch.full((rows,), 3.5)} if self.takes_distilled_guidance(pipe) else {}
