"""Skip-Layer Guidance (SLG, Stability AI's SD3.5 reference; STG for video, Hyung et al. 2024,
arXiv 2411.18664): the cond rows again with the chosen layers' attention skipped (its output zero,
the residual carries the tokens past it), ``+ s (c - c_skip)``. Defaults: diffusers'
``SkipLayerGuidance`` (scale 2.8, window 0.01–0.2 of the schedule); the layers are the request's
(``seg_layers``; SD3.5's reference skips ``joint.7-9``). NFE: 1 per active step."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Term


@dataclass(frozen=True)
class SLG(Term):
    NAME = "slg"
    ROLE = "perturbed"
    PERTURBATION = "skip"
    NFE = 1
    SCALED = True
    PAPER = "SD3.5 reference; arXiv 2411.18664"
    scale: float = 2.8
    start: float = 0.01
    end: float = 0.2
