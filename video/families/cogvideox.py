"""CogVideoX (``CogVideoXPipeline``): joint text + video attention with 3D RoPE on the video tokens,
latents ``[B, F, C, h, w]``, a VAE that compresses time 4x."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from seg_rt.families.base import Classes

from .base import VideoFamily


class CogVideoXFamily(VideoFamily):
    name = "cogvideox"
    classes = Classes("CogVideoXPipeline", "CogVideoXTransformer3DModel", "seg_rt.video.attention:COGVIDEOX")
    frames_first = True

    def shared_inputs(self, pipe, *, frames: int, height: int, width: int) -> dict:
        if not self.net(pipe).config.use_rotary_positional_embeddings:
            return {}
        rope = pipe._prepare_rotary_positional_embeddings(height, width, frames, pipe._execution_device)
        return {"image_rotary_emb": rope}

    def forward(self, model: nn.Module, inputs: Mapping[str, Tensor], shared: Mapping) -> Tensor:
        return model(
            hidden_states=inputs["sample"],  # [B, F, C, h, w]
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"],
            image_rotary_emb=shared.get("image_rotary_emb"),
            return_dict=False,
        )[0]
