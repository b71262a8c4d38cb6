"""The reference SEG-SDXL query blur, written directly from the reference code (docs/design.md §1).

A k×k depthwise ``conv2d`` with reflect padding on the query laid out as an image ``[B, C, H, W]``,
the kernel capped per axis. Two users: the blur bench (its cost baseline against the separable op)
and the tests' oracle (``tests/reference_seg.py``, ``tests/test_blur.py``). So that it stays an
independent oracle of the code under test it imports nothing from seg_rt
(``tests/test_boundaries.py::test_reference_blur_imports_nothing_from_seg_rt``).
"""

import math

import torch
import torch.nn.functional as F


def kernel_size(sigma: float) -> int:
    """The reference's kernel size: ``ceil(6σ)`` made odd by adding 1 (``k = ceil(6σ) + 1 - ceil(6σ) % 2``)."""
    c6 = math.ceil(6 * sigma)
    return c6 + 1 - c6 % 2


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur ``img`` ``[B, C, H, W]`` by the outer product of two normalised Gaussian tap vectors,
    each axis' taps capped at the axis length (``n`` if odd, else ``n + 1``), reflect padding."""
    ks = [min(kernel_size, n - (n % 2 - 1)) for n in img.shape[-2:]]

    def taps(k):
        x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        return (pdf / pdf.sum()).to(img)

    kernel = torch.mm(taps(ks[0])[:, None], taps(ks[1])[None, :]).expand(img.shape[-3], 1, *ks)
    img = F.pad(img, [ks[1] // 2, ks[1] // 2, ks[0] // 2, ks[0] // 2], mode="reflect")
    return F.conv2d(img, kernel, groups=img.shape[-3])


class ReferenceSEGProcessor:
    """The reference code's attention processor: blurs the query of the last ``1/chunks`` of the
    batch (``chunks=1``: every row); grid = ``(h, w)`` given, or ``isqrt(N)`` as the reference does;
    σ > 9999 blurs to the mean query."""

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
            ptb = gaussian_blur_2d(ptb, kernel_size(self.sigma), self.sigma)
        parts[-1] = ptb.reshape(b // self.chunks, attn.heads, d, n).permute(0, 1, 3, 2)
        query = torch.cat(parts)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))
