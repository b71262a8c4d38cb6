"""FreSca (Huang et al. 2025, arXiv 2504.02154): the CFG delta ``c - u`` scaled in frequency space,
its low frequencies by ``low`` and the rest by ``high``: a 2D FFT over the latent's last two axes,
the centred square of half-width ``cutoff`` frequencies is low. Defaults (the paper's / its ComfyUI
node's): ``low`` 1, ``high`` 1.25, ``cutoff`` 20. The square is clamped to the latent (the
reference's slice wraps around for ``cutoff`` > size / 2). Needs CFG and a spatial latent
``[..., H, W]`` (not a packed token sequence). NFE: 0 (it reuses the CFG rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Term


def frequency_scale(x: Tensor, low: float, high: float, cutoff: int) -> Tensor:
    """``x`` with its centred ``2·cutoff`` square of frequencies (last two axes) times ``low`` and
    the rest times ``high``."""
    h, w = x.shape[-2:]
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.full((h, w), high, device=x.device)
    ch, cw = h // 2, w // 2
    mask[max(ch - cutoff, 0) : ch + cutoff, max(cw - cutoff, 0) : cw + cutoff] = low
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


@dataclass(frozen=True)
class FreSca(Term):
    NAME = "fresca"
    ROLE = "modifier"
    PAPER = "arXiv 2504.02154"
    low: float = 1.0
    high: float = 1.25
    cutoff: int = 20

    def check(self) -> None:
        if self.cutoff < 0:
            raise ValueError(f"guidance fresca option cutoff must be >= 0, got {self.cutoff}")

    def adjust_delta(self, delta: Tensor, cond: Tensor, memory: dict) -> Tensor:
        if delta.ndim < 4:
            raise ValueError(
                f"guidance fresca scales a spatial latent [..., H, W]; this model's latent is "
                f"{list(delta.shape)} (packed tokens)"
            )
        return frequency_scale(delta, self.low, self.high, self.cutoff)
