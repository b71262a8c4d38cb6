"""An independent, direct implementation of the published SEG-SDXL reference math, for tests only.

Written from the paper / reference pipeline description (docs/design.md §1): a k×k depthwise conv2d blur
with reflect padding applied to the last batch chunk of the query in [B, heads, N, d] layout, and a
plain denoising loop with the reference guidance formula. The blur and the reference processor are
``seg_rt.bench.reference`` (the blur bench's cost baseline is the same code): that module imports
nothing from seg_rt, which ``tests/test_boundaries.py`` checks, so this oracle shares no code with
what it tests. Nothing else from seg_rt is used here.
"""

import torch

from seg_rt.bench.reference import ReferenceSEGProcessor


@torch.no_grad()
def reference_sdxl_latents(
    pipe, scheduler, prompt, *, seed, steps, cfg, seg_scale, sigma, height, width, start=None, after_step=None
):
    """The reference pipeline's loop: [uncond, cond, cond] (or [cond, cond]) with SEG on every
    mid-block attn1, guidance eps_c + (cfg-1)(eps_c-eps_u) + s(eps_c-eps_ptb). ``start``: (latents,
    timesteps) of img2img / inpainting made by the caller (the scheduler set up by it);
    ``after_step(i, latents)``: inpainting's blend after each step."""
    do_cfg = cfg > 1.0
    pe, ne, pooled, npooled = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=do_cfg)
    if start is None:
        g = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn((1, 4, height // 8, width // 8), generator=g)
        scheduler.set_timesteps(steps)
        latents, timesteps = latents * scheduler.init_noise_sigma, scheduler.timesteps
    else:
        latents, timesteps = start
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pe.dtype)
    if do_cfg:
        enc, text, ids = torch.cat([ne, pe, pe]), torch.cat([npooled, pooled, pooled]), time_ids.repeat(3, 1)
    else:
        enc, text, ids = torch.cat([pe, pe]), torch.cat([pooled, pooled]), time_ids.repeat(2, 1)
    chunks = 3 if do_cfg else 2
    saved = {}
    for name, module in pipe.unet.named_modules():
        if "attn1" in name and "to" not in name and name.startswith("mid"):
            saved[name] = module.processor
            module.processor = ReferenceSEGProcessor(sigma, chunks)
    try:
        for i, t in enumerate(timesteps):
            x = scheduler.scale_model_input(torch.cat([latents] * chunks), t)
            eps = pipe.unet(
                x, t, encoder_hidden_states=enc, added_cond_kwargs={"text_embeds": text, "time_ids": ids}
            ).sample
            if do_cfg:
                u, c, p = eps.chunk(3)
                eps = c + (cfg - 1.0) * (c - u) + seg_scale * (c - p)
            else:
                c, p = eps.chunk(2)
                eps = c + seg_scale * (c - p)
            latents = scheduler.step(eps, t, latents).prev_sample
            if after_step is not None:
                latents = after_step(i, latents)
    finally:
        for name, module in pipe.unet.named_modules():
            if name in saved:
                module.processor = saved[name]
    return latents
