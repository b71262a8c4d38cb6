"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886), for flow-matching models: the unconditional
velocity is scaled by the optimized ``α* = <v_c, v_u> / ||v_u||²`` (per sample, over every element)
before CFG, ``v = α* v_u + w (v_c - α* v_u)``, and the first ``zero_steps`` steps predict zero velocity
(zero-init). Defaults: ``zero_steps`` 1 (the paper's and diffusers' ``zero_init_steps``).
Needs CFG (cfg > 1). NFE: 0 (it reuses the CFG rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Term

EPS = 1e-8  # the paper's denominator guard


@dataclass(frozen=True)
class CFGZeroStar(Term):
    NAME = "cfgzero"
    ROLE = "modifier"
    PAPER = "arXiv 2503.18886"
    FLOW_ONLY = True
    zero_steps: int = 1

    def check(self) -> None:
        if self.zero_steps < 0:
            raise ValueError(f"guidance cfgzero option zero_steps must be >= 0, got {self.zero_steps}")

    def adjust_uncond(self, cond: Tensor, uncond: Tensor) -> Tensor:
        c, u = cond.flatten(1).float(), uncond.flatten(1).float()
        alpha = (c * u).sum(1, keepdim=True) / ((u * u).sum(1, keepdim=True) + EPS)
        return uncond * alpha.to(uncond.dtype).view(-1, *[1] * (uncond.ndim - 1))

    def override(self, eps: Tensor, step: int, num_steps: int) -> Tensor:
        return torch.zeros_like(eps) if step < self.zero_steps else eps
