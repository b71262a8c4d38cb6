"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): ``eps = c + (w - 1)(c - u)``.
The scale is the request's ``cfg`` field (one place); the guidance list's ``cfg`` entry gives CFG a
window (guidance interval, Kynkäänniemi et al. 2024, arXiv 2404.07724): outside it the unconditional
rows are not in the batch. NFE: 1 per active step (the unconditional row)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Term


@dataclass(frozen=True)
class CFG(Term):
    NAME = "cfg"
    ROLE = "cfg"
    NFE = 1
    PAPER = "arXiv 2207.12598; interval arXiv 2404.07724"
