"""Token Perturbation Guidance (TPG, Rajabi et al. 2025, arXiv 2506.10036): the cond rows again with
the tokens entering the chosen layers' transformer blocks shuffled (a permutation: norm-preserving),
``+ s (c - c_shuffled)``. Default scale 3 (the reference ComfyUI node's). The permutation is fixed
per (layer, token count), ``seg_rt.perturbations.token_permutation``. NFE: 1 per active step."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Term


@dataclass(frozen=True)
class TPG(Term):
    NAME = "tpg"
    ROLE = "perturbed"
    PERTURBATION = "shuffle"
    NFE = 1
    SCALED = True
    PAPER = "arXiv 2506.10036"
    scale: float = 3.0
