"""Perturbed-Attention Guidance (PAG, Ahn et al. 2024, arXiv 2403.17377): the cond rows again with
the chosen self-attention layers' attention map replaced by the identity (output = V),
``+ s (c - c_identity)``. Defaults: scale 3 (diffusers' ``pag_scale``), the request's layers
(``seg_layers``; ``mid``, diffusers' ``pag_applied_layers`` default). NFE: 1 per active step."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Term


@dataclass(frozen=True)
class PAG(Term):
    NAME = "pag"
    ROLE = "perturbed"
    PERTURBATION = "identity"
    NFE = 1
    SCALED = True
    PAPER = "arXiv 2403.17377"
    scale: float = 3.0
