"""Preview images while a job samples: the family's cheap latent → RGB projection
(``Family.preview``, ComfyUI's latent2rgb tables, no VAE decode), as a PNG at the latents' size.

An image job's preview is its images side by side; a video job's is one strip per video (up to
``seg_rt.video.families.base.PREVIEW_FRAMES`` latent frames, evenly spaced, side by side), the
videos one under the other. Families without a table (CogVideoX) have no previews."""

import io
from collections.abc import Callable

import torch
from PIL import Image


def previewer(pipe) -> Callable | None:
    """``latents -> PNG bytes`` for the job's rows of a step's latents, or None when the model's
    family has no preview projection."""
    from seg_rt.families import family_of

    family = family_of(pipe)
    if family.preview_factors(pipe) is None:
        return None
    video = family.kind == "video"

    def png(latents) -> bytes | None:
        rgb = family.preview(pipe, latents)
        if rgb is None:
            return None
        if video:  # one strip per video, one under the other
            pixels = rgb.permute(0, 2, 3, 1).reshape(-1, rgb.shape[3], 3)
        else:  # the images side by side
            pixels = rgb.permute(2, 0, 3, 1).reshape(rgb.shape[2], -1, 3)
        buf = io.BytesIO()
        Image.fromarray((pixels * 255).round().to(torch.uint8).cpu().numpy(), "RGB").save(buf, format="PNG")
        return buf.getvalue()

    return png
