"""Smoothed Energy Guidance (SEG, arXiv 2408.00760 eq. 10): the cond rows again with the chosen
self-attention layers' queries Gaussian-blurred (σ = ``seg_sigma``), ``+ s (c - c_blur)``.

SEG's options are request fields of their own (``seg_scale``, ``seg_sigma``, ``seg_layers``,
``seg_start`` / ``seg_end``, ``seg_every``, ``seg_placement``): records from before the guidance
list stay as they were. ``seg_guidance`` is the combine of CFG + SEG alone, as it always was.
NFE: 1 per active step (0 with ``seg_placement`` "uncond", 1/every on average with ``seg_every``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Term
from .combine import combine


@dataclass(frozen=True)
class SEG(Term):
    NAME = "seg"
    ROLE = "perturbed"
    PERTURBATION = "blur"
    NFE = 1
    SCALED = True
    PAPER = "arXiv 2408.00760"
    scale: float = 3.0


def seg_guidance(
    eps_cond: Tensor,
    *,
    eps_uncond: Tensor | None = None,
    eps_seg: Tensor | None = None,
    seg_delta: Tensor | None = None,
    cfg: float = 1.0,
    seg_scale: float = 0.0,
    rescale: float = 0.0,
) -> Tensor:
    """CFG + SEG: ``eps_c + (cfg - 1)(eps_c - eps_u) + s(eps_c - eps_seg)``; a missing branch
    contributes nothing (the reference SEG-SDXL pipeline's order of operations).

    ``seg_delta`` (``eps_cond - eps_seg`` of an earlier step, ``seg_every`` > 1) stands in for
    ``eps_seg``. Placement ``"uncond"`` passes the blurred unconditional prediction as ``eps_uncond``.
    Optional CFG rescale (Lin et al. 2023, arXiv 2305.08891 §3.4) is diffusers' own."""
    return combine(
        eps_cond, eps_uncond, eps_seg, seg_delta=seg_delta, cfg=cfg, scale=seg_scale, rescale=rescale
    )
