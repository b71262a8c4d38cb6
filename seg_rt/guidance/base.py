"""What every guidance term shares (``seg_rt.guidance``): its role in the one formula, its options
with the paper's defaults, its window, its forward passes per step.

The formula every request samples with (``seg_rt.guidance.combine``)::

    u'  = uncond adjusted by the modifiers (CFG-Zero*: α* u)
    Δ   = cond - u', transformed by the modifiers in registry order (FreSca, APG)
    eps = cond + (cfg - 1) Δ + s (cond - perturbed)      [+ CFG rescale, CFG-Zero*'s zero-init]

A term is one of three roles:

- ``cfg``: the unconditional rows (the ``cfg`` request field's scale; the term adds its window);
- ``perturbed``: perturbed copies of the cond rows (``seg_mask`` rows), perturbed the term's
  ``PERTURBATION`` way in the request's layers, guided with ``s (cond - perturbed)``;
- ``modifier``: no rows of its own; changes how the CFG delta combines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor


def _float(term: str, name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"guidance {term} option {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"guidance {term} option {name} must be a number, got {value!r}")
    return float(value)


def _int(term: str, name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"guidance {term} option {name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Term:
    """One guidance term. Subclasses set the class constants and their option fields (with the
    paper's defaults); ``start`` / ``end`` are every term's window, fractions of the schedule
    (the term acts at step i when ``start <= i / steps < end``, as SEG's ``seg_start`` / ``seg_end``)."""

    NAME: ClassVar[str]
    ROLE: ClassVar[str]  # "cfg", "perturbed" or "modifier"
    PERTURBATION: ClassVar[str | None] = None  # perturbed terms: the seg_rt.attention perturbation kind
    NFE: ClassVar[int] = 0  # forward passes (rows of the batch per image) the term adds per active step
    SCALED: ClassVar[bool] = False  # written ``name=scale``
    PAPER: ClassVar[str] = ""
    FLOW_ONLY: ClassVar[bool] = False  # defined for flow-matching (velocity) models only

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = int if f.type in ("int", int) else float
            value = _int(self.NAME, f.name, value) if kind is int else _float(self.NAME, f.name, value)
            object.__setattr__(self, f.name, value)
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(
                f"guidance {self.NAME} window must satisfy 0 <= start < end <= 1, "
                f"got start={self.start:g} end={self.end:g}"
            )
        self.check()

    def check(self) -> None:
        """The term's own option rules (one clear line each)."""

    def active(self, step: int, num_steps: int) -> bool:
        return self.start <= step / num_steps < self.end

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "scale")

    def spec(self) -> str:
        """The canonical spelling: ``name[=scale][:option=value...]``, options only where they differ
        from the paper's default."""
        out = self.NAME
        if self.SCALED:
            out += f"={self.scale:g}"
        default = type(self)() if not self.SCALED else type(self)(scale=self.scale)
        for name in self.option_names():
            value = getattr(self, name)
            if value != getattr(default, name):
                out += f":{name}={value:g}"
        return out

    # ---- the hooks of the one formula (identity unless a modifier overrides them) ----
    def adjust_uncond(self, cond: Tensor, uncond: Tensor) -> Tensor:
        return uncond

    def adjust_delta(self, delta: Tensor, cond: Tensor, memory: dict) -> Tensor:
        """The CFG delta ``cond - u'`` transformed; ``memory`` persists across the run's steps."""
        return delta

    def override(self, eps: Tensor, step: int, num_steps: int) -> Tensor:
        """The final prediction, replaced where the term says so (CFG-Zero*'s zero-init)."""
        return eps
