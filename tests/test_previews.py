"""Previews: the family's latent → RGB projection, checked against independent arithmetic."""

import torch
from diffusers.image_processor import VaeImageProcessor

from seg_rt.families import REGISTRY

SDXL_FACTORS = [  # ComfyUI's latent_formats.SDXL, written out here
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]


def family(name):
    return next(f for f in REGISTRY.families("image") if f.name == name)


def test_demo_preview_is_the_image_the_model_decodes():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.2
    ours = family("demo").preview(None, x)
    theirs = VaeImageProcessor(do_normalize=True).postprocess(
        x, output_type="pt"
    )  # diffusers' [-1,1] → [0,1]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sdxl_preview_is_the_per_pixel_linear_map():
    x = torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    ours = family("sdxl").preview(None, x)
    for i in range(3):
        for j in range(2):
            for c in range(3):
                v = sum(float(x[0, k, i, j]) * SDXL_FACTORS[k][c] for k in range(4)) + SDXL_BIAS[c]
                assert abs(float(ours[0, c, i, j]) - min(1.0, max(0.0, (v + 1) / 2))) < 1e-5
    assert family("sdxl").preview(None, torch.zeros(1, 16, 3, 2)) is None  # not SDXL's latents: none
