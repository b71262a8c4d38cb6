"""Random-weight UNets with SD1.5's and SDXL's layouts at a fraction of their width, and their
step inputs: what the speed benches time (no weights, no network)."""

from __future__ import annotations

import torch
from torch import nn


def sd15_shaped_pipeline(width_scale: int = 5):
    """A tiny SD1.5 pipeline whose UNet has SD1.5's layout (4 levels, 2 layers per block, 8 heads,
    cross-attention in the first three) at 1/``width_scale`` of its channels (320 -> 64)."""
    from diffusers import UNet2DConditionModel

    from seg_rt.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    c = 320 // width_scale
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(c, 2 * c, 4 * c, 4 * c),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,
        cross_attention_dim=768 // width_scale,
        norm_num_groups=32,
    ).eval()
    pipe.register_modules(unet=unet)
    return pipe


def sdxl_shaped_unet(width_scale: int = 5):
    """A random-weight UNet with SDXL's layout (3 levels, no attention in the first, 2 / 10
    transformer layers in the second / third, text-time embedding, linear projections) at
    1/``width_scale`` of its channels (320 -> 64) and text width (2048 -> 2048/``width_scale``)."""
    from diffusers import UNet2DConditionModel

    c = 320 // width_scale
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(c, 2 * c, 4 * c),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),  # heads per level (diffusers' name), 32 channels per head
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256 // width_scale,
        projection_class_embeddings_input_dim=6 * (256 // width_scale) + 1280 // width_scale,
        cross_attention_dim=2048 // width_scale,
        norm_num_groups=32,
    ).eval()


def step_inputs(unet: nn.Module, latent: int, n: int = 1, seed: int = 0):
    """(latents ``[n, 4, latent, latent]``, cond inputs, uncond inputs) of random values for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim

    def branch() -> dict[str, torch.Tensor]:
        d = {"encoder_hidden_states": torch.randn(n, 77, c, generator=g)}
        if unet.config.addition_embed_type == "text_time":
            pooled = (
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            )
            d["text_embeds"] = torch.randn(n, pooled, generator=g)
            d["time_ids"] = torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]] * n)
        return d

    return torch.randn(n, 4, latent, latent, generator=g), branch(), branch()


def move_inputs(inputs: tuple, device: torch.device | str, dtype: torch.dtype) -> tuple:
    """``step_inputs`` on ``device``, floating tensors in ``dtype``."""

    def move(v: torch.Tensor) -> torch.Tensor:
        return v.to(device, dtype if v.is_floating_point() else v.dtype)

    x, cond, uncond = inputs
    return move(x), {k: move(v) for k, v in cond.items()}, {k: move(v) for k, v in uncond.items()}
