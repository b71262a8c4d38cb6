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
    every:  cheap mode: inside the window the SEG branch runs on every ``every``-th step only; the
            steps between reuse the guidance delta ``eps_cond - eps_seg`` of the last step that ran
            it (cost ≈ (2 + 1/every)/2 of a CFG step). 1 (default): every step, exact SEG.
    placement: ``"batched"`` (default): the perturbed prediction is an extra row
            (``[uncond, cond, perturbed]``). ``"uncond"`` (cheap mode, needs cfg > 1): the blur is
            applied inside the unconditional row instead, ``eps = eps_u' + cfg(eps_c - eps_u')``
            with zero extra rows, the form some UIs use for skip-layer guidance on DiTs; ``scale``
            then only switches SEG on (> 0), the strength is the CFG scale.
    """

    scale: float = 3.0
    sigma: float = math.inf
    layers: tuple[str, ...] = field(default=("mid",))
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    placement: str = "batched"

    PLACEMENTS = ("batched", "uncond")

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
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"seg every must be an integer >= 1, got {self.every!r}")
        if self.placement not in self.PLACEMENTS:
            raise ValueError(
                f"seg placement must be one of {', '.join(self.PLACEMENTS)}, got {self.placement!r}"
            )
        if self.every > 1 and self.placement != "batched":
            raise ValueError(
                f"seg every {self.every} reuses the (cond - perturbed) delta, which placement "
                f"{self.placement!r} does not compute: use every=1 or placement 'batched'"
            )

    @property
    def enabled(self) -> bool:
        return self.scale > 0

    def active(self, step: int, num_steps: int) -> bool:
        """Whether the SEG branch runs at ``step`` (0-based) of ``num_steps``: start <= step/num < end."""
        if not self.enabled:
            return False
        frac = step / num_steps
        return self.start <= frac < self.end

    def check_cfg(self, cfg: float) -> None:
        """Placement ``"uncond"`` guides through the CFG term: it needs cfg > 1."""
        if self.enabled and self.placement == "uncond" and cfg <= 1.0:
            raise ValueError(
                f"seg placement 'uncond' blurs the unconditional row and needs cfg > 1, got cfg {cfg:g}"
            )

    def runs_branch(self, step: int, num_steps: int) -> bool:
        """Whether the SEG prediction is computed at ``step``: inside the window, on every
        ``every``-th step counted from the window's first step. Inside the window on the other
        steps the last computed guidance delta is reused (``seg_rt.sampler.seg_action``)."""
        if not self.active(step, num_steps):
            return False
        first = math.ceil(self.start * num_steps)  # first step with start <= step/num
        while first / num_steps < self.start:  # float rounding of start * num_steps
            first += 1
        return (step - first) % self.every == 0

    def cheap_fields(self) -> dict:
        """The cheap-mode fields that differ from their defaults (records carry only these, so
        records of default runs stay as they were)."""
        out: dict = {}
        if self.every != SEGConfig.every:
            out["every"] = self.every
        if self.placement != SEGConfig.placement:
            out["placement"] = self.placement
        return out

    def to_dict(self) -> dict:
        return {
            "scale": self.scale,
            "sigma": sigma_to_json(self.sigma),
            "layers": list(self.layers),
            "start": self.start,
            "end": self.end,
            **self.cheap_fields(),
        }
