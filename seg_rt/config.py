"""SEG configuration (docs/design.md, "Contracts"): a frozen dataclass validated when built."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .blur import is_infinite


def parse_sigma(value: str | float) -> float:
    """Parse a σ given on the command line or in a file: a number or ``inf``; validated by SEGConfig."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError(f"seg sigma must be a number > 0 or 'inf', got {value!r}") from None


def sigma_to_json(sigma: float) -> float | str:
    """σ in JSON records: a number, or ``"inf"`` (JSON has no infinity)."""
    return "inf" if math.isinf(sigma) else sigma


def sigma_label(sigma: float) -> str:
    """σ for people (grid labels, tables): ``inf`` for every σ the blur treats as infinite, else ``%g``."""
    return "inf" if is_infinite(sigma) else f"{sigma:g}"


def check_sigma(sigma: float) -> float:
    """The σ rule of SEG's query blur: a number > 0, or ``inf`` (``seg_rt.blur.is_infinite``)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"seg sigma must be a number, got {sigma!r}")
    if math.isnan(sigma) or sigma <= 0:
        raise ValueError(f"seg sigma must be > 0 or inf, got {sigma:g}")
    return float(sigma)


def parse_layers(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"mid,up.0"`` or ``["mid", "up.0"]`` → ``("mid", "up.0")``."""
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    return tuple(p.strip() for p in items if p.strip())


@dataclass(frozen=True)
class SEGConfig:
    """Smoothed Energy Guidance settings.

    scale:  SEG guidance scale ``s`` (0 disables the SEG branch).
    sigma:  Gaussian σ of the query blur, in tokens; ``inf`` (or > 9999) blurs to the mean query.
    layers: self-attention layers to perturb (see ``seg_rt.layers``); default the UNet mid block.
    start, end: the step window ``[start, end)`` as fractions of the schedule; outside it the SEG
            branch is not computed.
    """

    scale: float = 3.0
    sigma: float = math.inf
    layers: tuple[str, ...] = field(default=("mid",))
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))
        for name in ("scale", "sigma", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"seg {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        check_sigma(self.sigma)
        if math.isnan(self.scale) or math.isinf(self.scale) or self.scale < 0:
            raise ValueError(f"seg scale must be a finite number >= 0, got {self.scale:g}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0) or self.start >= self.end:
            raise ValueError(
                f"seg window must satisfy 0 <= start < end <= 1, got start={self.start:g} end={self.end:g}"
            )
        if not self.layers:
            raise ValueError("seg layers must name at least one layer, got none")

    @property
    def enabled(self) -> bool:
        return self.scale > 0

    def active(self, step: int, num_steps: int) -> bool:
        """Whether the SEG branch runs at ``step`` (0-based) of ``num_steps``: start <= step/num < end."""
        if not self.enabled:
            return False
        frac = step / num_steps
        return self.start <= frac < self.end

    def to_dict(self) -> dict:
        return {
            "scale": self.scale,
            "sigma": sigma_to_json(self.sigma),
            "layers": list(self.layers),
            "start": self.start,
            "end": self.end,
        }
