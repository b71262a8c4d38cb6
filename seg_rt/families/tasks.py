"""img2img and inpainting as a property of the request and the family (docs/design.md §4a): the
schedule truncated by ``strength``, the initial latents from the encoded init image, the mask and
masked-image latents of dedicated inpainting checkpoints and the per-step known-region blend of the
"any model" form. One recipe (``task_start``) over the family's few image facts (``encode_image``,
``noised``, ``start_step``), so every family's img2img / inpainting is the same code.

Semantics are diffusers' img2img / inpaint pipelines' (``StableDiffusion(XL)Img2ImgPipeline``,
``StableDiffusion(XL)InpaintPipeline``, ``StableDiffusion3Img2ImgPipeline``, ``FluxImg2ImgPipeline``,
``FluxInpaintPipeline``); their methods are reimplemented here (not called) because they take one
generator list for a batch of *one* init image, where seg-rt rows each have their own image and
seed, and because they are methods of pipeline classes a loaded txt2img pipeline is not:

- ``truncated_schedule``: ``get_timesteps`` (``int(steps * strength)`` for the UNet pipelines, the
  float form for the flow-matching ones: ``Family.start_step``), then ``set_begin_index``;
- the latents: ``prepare_latents`` per row: row i's image encoded with ``retrieve_latents(...,
  generator=g_i)`` (VAE sampling, which draws from g_i), then the noise from g_i, then
  ``add_noise`` / ``scale_noise`` at the first kept timestep (strength 1 of the inpaint pipelines:
  the noise itself, times ``init_noise_sigma``);
- the mask: ``mask_processor.preprocess`` (binarised, grayscale) at the request size, nearest-resized
  to the latents; ``masked image = image * (mask < 0.5)``; ``mask_blur`` is diffusers'
  ``VaeImageProcessor.blur`` applied to the mask first, as diffusers' docs do before the pipeline;
- dedicated inpainting checkpoints (9 input channels): ``[latents, mask, masked image latents]``
  along channels at every step (``inpaint_cond``, concatenated by the SEG UNet after the scheduler's
  input scaling, as the pipelines do);
- the "any model" form: after each scheduler step the known region is replaced by the init image's
  latents noised to the next timestep (``KnownRegion``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Start:
    """Where sampling starts: the initial latents, the timesteps to run (``None``: the scheduler's
    whole schedule), a per-step blend after ``scheduler.step`` (``None``: none) and extra per-row
    denoiser inputs for both branches (a 9-channel inpainting UNet's ``inpaint_cond``)."""

    latents: Tensor
    timesteps: Tensor | None = None
    blend: KnownRegion | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)


def start_step(steps: int, strength: float, *, flow: bool) -> int:
    """diffusers' ``get_timesteps``: the index of the first step run. The UNet pipelines round the
    re-run steps down (``int(steps * strength)``); the flow-matching ones (SD3, Flux, Qwen-Image)
    round the skipped steps down (``int(steps - steps * strength)``)."""
    if flow:
        return int(max(steps - min(steps * strength, steps), 0))
    return max(steps - min(int(steps * strength), steps), 0)


def truncated_schedule(scheduler, t_start: int) -> Tensor:
    """The timesteps from step ``t_start`` on; the scheduler starts there (``set_begin_index``)."""
    order = scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return scheduler.timesteps[t_start * order :]


def mask_processor(pipe):
    """The inpaint pipelines' mask processor: no normalisation, binarised, grayscale."""
    from diffusers.image_processor import VaeImageProcessor

    return getattr(pipe, "mask_processor", None) or VaeImageProcessor(
        vae_scale_factor=pipe.vae_scale_factor,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )


def preprocess_image(pipe, image, height: int, width: int) -> Tensor:
    """An ``InputImage`` → ``[1, 3, H, W]`` float32 in [-1, 1] (the pipeline's image processor)."""
    return pipe.image_processor.preprocess(image.pil(), height=height, width=width).to(torch.float32)


def preprocess_mask(pipe, mask, height: int, width: int, blur: int) -> Tensor:
    """An ``InputImage`` mask → ``[1, 1, H, W]`` in {0, 1} (1 = repaint), blurred first by ``blur``."""
    processor = mask_processor(pipe)
    pil = mask.pil()
    if blur:
        pil = processor.blur(pil, blur_factor=blur)
    return processor.preprocess(pil, height=height, width=width)


class KnownRegion:
    """The "any model" inpainting blend after each scheduler step (diffusers' inpaint pipelines for
    4-channel checkpoints): ``(1 - mask) * init_latents_noised_to_t[i + 1] + mask * latents``; after
    the last step the init latents themselves."""

    def __init__(self, family, scheduler, image_latents: Tensor, noise: Tensor, mask: Tensor, timesteps):
        self.family, self.scheduler = family, scheduler
        self.image_latents, self.noise, self.mask, self.timesteps = image_latents, noise, mask, timesteps

    def __call__(self, i: int, latents: Tensor) -> Tensor:
        proper = self.image_latents
        if i < len(self.timesteps) - 1:
            t = self.timesteps[i + 1 : i + 2]
            proper = self.family.noised(self.scheduler, self.image_latents, self.noise, t)
        return (1 - self.mask) * proper + self.mask * latents

    def rows(self, keep: list[int]) -> KnownRegion:
        """The blend of the ``keep`` rows only (the sampler drops a cancelled job's rows)."""
        image, noise, mask = (v[keep] for v in (self.image_latents, self.noise, self.mask))
        return KnownRegion(self.family, self.scheduler, image, noise, mask, self.timesteps)


def _noise(shape, generator, device, dtype) -> Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def task_start(
    family, pipe, scheduler, generators: Sequence[torch.Generator], params, *, height: int, width: int, dtype
) -> Start:
    """The ``Start`` of one sampling run of ``params`` (rows sharing ``batch_key``; row i's init image
    and mask are its own, drawn from ``generators[i]``)."""
    first = params[0]
    if first.task == "txt2img":
        return Start(
            family.initial_latents(pipe, scheduler, generators, height=height, width=width, dtype=dtype)
        )
    device = pipe._execution_device
    timesteps = truncated_schedule(scheduler, family.start_step(first.steps, first.strength))
    t0 = timesteps[:1]
    strength_max = first.strength == 1.0
    inpaint = first.task == "inpaint"
    dedicated = inpaint and family.inpaint_channels(pipe) is not None
    rows = []
    for q, g in zip(params, generators, strict=True):
        image = preprocess_image(pipe, q.init_image, height, width).to(device, dtype)
        # the inpaint pipelines of dedicated checkpoints encode the image only when they need it
        image_latents = None if dedicated and strength_max else family.encode_image(pipe, image, g)
        shape = family.noise_shape(pipe, image_latents, height, width)
        noise = _noise(shape, g, device, dtype)
        if inpaint and strength_max:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = family.noised(scheduler, image_latents, noise, t0)
        row = {"latents": latents, "noise": noise, "image_latents": image_latents}
        if inpaint:
            mask = preprocess_mask(pipe, q.mask, height, width, q.mask_blur).to(device, dtype)
            masked = image * (mask < 0.5)
            small = F.interpolate(mask, size=latents.shape[-2:])
            if dedicated:
                row["inpaint_cond"] = torch.cat([small, family.encode_image(pipe, masked, g)], dim=1)
            else:
                # the pipelines encode the masked image here too (unused by a 4-channel model): draw
                # what that VAE sampling draws, so a stochastic scheduler's noise stream stays theirs
                _noise(latents.shape, g, device, dtype)
            row["mask"] = small
        rows.append(row)
    cat = lambda key: torch.cat([r[key] for r in rows])  # noqa: E731
    start = Start(cat("latents"), timesteps)
    if dedicated:
        start.inputs["inpaint_cond"] = cat("inpaint_cond")
    elif inpaint:
        start.blend = KnownRegion(
            family, scheduler, cat("image_latents"), cat("noise"), cat("mask"), timesteps
        )
    return start
