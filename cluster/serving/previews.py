"""Preview images while a job samples: the family's cheap latent → RGB projection
(``Family.preview``, no VAE decode), the job's images side by side, as a PNG."""

import io
from collections.abc import Callable

import torch
from PIL import Image


def previewer(pipe) -> Callable | None:
    """``latents -> PNG bytes`` for the job's rows of a step's latents, or None when the model's
    family has no preview projection."""
    from seg_rt.families import family_of

    try:
        family = family_of(pipe, "image")
    except ValueError:  # not an image family (a video model): no image previews
        return None
    if family.preview_rgb is None:
        return None

    def png(latents) -> bytes | None:
        rgb = family.preview(pipe, latents)
        if rgb is None:
            return None
        row = rgb.permute(2, 0, 3, 1).reshape(rgb.shape[2], -1, 3)  # the images side by side
        pixels = (row * 255).round().to(torch.uint8).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        return buf.getvalue()

    return png
