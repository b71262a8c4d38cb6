"""Adaptive Projected Guidance (APG, Sadat et al. 2024, arXiv 2410.02416 Alg. 1): the CFG delta
``Δ = c - u`` gets momentum (``Δ ← Δ + β Δ_prev``), is scaled down to norm ``threshold`` when above
it, and split into its components parallel and orthogonal to ``c``; the parallel one (the
oversaturating one) is weighted by ``eta``: ``eps = c + (w - 1)(Δ⊥ + η Δ∥)``. Norms and the
projection run per sample over all its elements, the projection in float64 (as diffusers').
Defaults (the paper's): ``eta`` 0, ``momentum`` -0.5, ``threshold`` 15 (0 = none).
Needs CFG (cfg > 1). NFE: 0 (it reuses the CFG rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Term


@dataclass(frozen=True)
class APG(Term):
    NAME = "apg"
    ROLE = "modifier"
    PAPER = "arXiv 2410.02416"
    eta: float = 0.0
    momentum: float = -0.5
    threshold: float = 15.0

    def check(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"guidance apg option threshold must be >= 0, got {self.threshold:g}")

    def adjust_delta(self, delta: Tensor, cond: Tensor, memory: dict) -> Tensor:
        dims = tuple(range(1, delta.ndim))
        if self.momentum != 0.0:
            if "running" in memory:
                delta = delta + self.momentum * memory["running"]
            memory["running"] = delta
        if self.threshold > 0:
            norm = delta.norm(p=2, dim=dims, keepdim=True)
            delta = delta * torch.minimum(torch.ones_like(norm), self.threshold / norm)
        d, c = delta.double(), torch.nn.functional.normalize(cond.double(), dim=dims)
        parallel = (d * c).sum(dim=dims, keepdim=True) * c
        return ((d - parallel) + self.eta * parallel).to(delta.dtype)
