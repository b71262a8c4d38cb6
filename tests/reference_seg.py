"""An independent, direct implementation of the published SEG-SDXL reference math, for tests only.

Written from the paper / reference pipeline description (docs/design.md §1): a k×k depthwise conv2d blur
with reflect padding applied to the last batch chunk of the query in [B, heads, N, d] layout, and a
plain denoising loop with the reference guidance formula. Nothing from seg_rt is used here.
"""

import math

import torch
import torch.nn.functional as F


def gaussian_blur_2d(img, kernel_size, sigma):
    ks = [min(kernel_size, n - (n % 2 - 1)) for n in img.shape[-2:]]

    def taps(k):
        x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        return (pdf / pdf.sum()).to(img)

    kernel = torch.mm(taps(ks[0])[:, None], taps(ks[1])[None, :]).expand(img.shape[-3], 1, *ks)
    img = F.pad(img, [ks[1] // 2, ks[1] // 2, ks[0] // 2, ks[0] // 2], mode="reflect")
    return F.conv2d(img, kernel, groups=img.shape[-3])


class ReferenceSEGProcessor:
    """Blurs the query of the last `1/chunks` of the batch; grid = (h, w) given, or isqrt(N)."""

    def __init__(self, sigma, chunks, grid=None):
        self.sigma, self.chunks, self.grid = sigma, chunks, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        d = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, d).transpose(1, 2)
        key = key.view(b, -1, attn.heads, d).transpose(1, 2)
        value = value.view(b, -1, attn.heads, d).transpose(1, 2)
        h, w = self.grid or (math.isqrt(n), math.isqrt(n))
        parts = list(query.chunk(self.chunks))
        ptb = parts[-1].permute(0, 1, 3, 2).reshape(b // self.chunks, attn.heads * d, h, w)
        if self.sigma > 9999:
            ptb = ptb.mean(dim=(-2, -1), keepdim=True).expand_as(ptb)
        else:
            c6 = math.ceil(6 * self.sigma)
            ptb = gaussian_blur_2d(ptb, c6 + 1 - c6 % 2, self.sigma)
        parts[-1] = ptb.reshape(b // self.chunks, attn.heads, d, n).permute(0, 1, 3, 2)
        query = torch.cat(parts)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def reference_sdxl_latents(pipe, scheduler, prompt, *, seed, steps, cfg, seg_scale, sigma, height, width):
    """The reference pipeline's loop: [uncond, cond, cond] (or [cond, cond]) with SEG on every
    mid-block attn1, guidance eps_c + (cfg-1)(eps_c-eps_u) + s(eps_c-eps_ptb)."""
    do_cfg = cfg > 1.0
    pe, ne, pooled, npooled = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=do_cfg)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, height // 8, width // 8), generator=g)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
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
        for t in scheduler.timesteps:
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
    finally:
        for name, module in pipe.unet.named_modules():
            if name in saved:
                module.processor = saved[name]
    return latents
