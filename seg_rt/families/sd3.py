"""SD3 / SD3.5 (``StableDiffusion3Pipeline``): joint attention over [image, text] streams, a
patchify conv, CLIP x2 + T5 prompts with pooled projections, true CFG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from seg_rt.params import GenerationParams

from . import latent_rgb
from .base import Classes, Prepared, read_json
from .dit import ImageDiTFamily


class SD3Family(ImageDiTFamily):
    name = "sd3"
    classes = Classes("StableDiffusion3Pipeline", "SD3Transformer2DModel", "seg_rt.dit_attention:SD3")
    exportable = True
    export_text_tokens = 256  # StableDiffusion3Pipeline.encode_prompt's max_sequence_length default
    preview_table = latent_rgb.SD3

    def default_side(self, pipe) -> int:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor

    def folder_patch(self, folder: Path) -> int:
        return int(read_json(folder / "transformer" / "config.json")["patch_size"])

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        do_cfg = request.cfg > 1.0
        pe, ne, pooled, npooled = pipe.encode_prompt(
            request.prompt,
            None,
            None,
            device=pipe._execution_device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=request.negative_prompt,
        )
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": ne, "pooled_projections": npooled} if do_cfg else None
        return Prepared(cond, uncond)

    def forward(self, transformer: nn.Module, inputs: Mapping[str, Tensor], cache: dict) -> Tensor:
        return transformer(
            hidden_states=inputs["sample"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    def export_tokens(self, pipe) -> int:
        clip_tokens = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77)
        return self.export_text_tokens + clip_tokens  # [CLIP, T5] joined
