"""Guidance methods as terms of one formula (``seg_rt.guidance.base``), composed in one batched
forward per step (``seg_rt.sampler.sample``) and one combine (``combine``).

A request's guidance is its ``cfg`` and ``seg_*`` fields plus the ``guidance`` list
(``GenerationParams.guidance``): comma-separated terms ``name[=scale][:option=value...]``, e.g.
``apg``, ``pag=3``, ``cfg:start=0.2:end=0.8,apg:eta=0.1,fresca:high=1.5``, ``slg=2.8:start=0:end=0.3``.
Every term takes ``start`` / ``end`` (its window, fractions of the schedule). CFG's and SEG's scales
are their own fields (``cfg``, ``seg_scale``): the list's ``cfg`` entry gives CFG only a window, and
SEG's options are the ``seg_*`` fields. One perturbed term per request (the ``seg_mask`` rows):
SEG (``seg_scale`` > 0) or one of ``pag``, ``tpg``, ``slg``, perturbed in the request's layers.

Adding a method: one module with its ``Term`` subclass, and its line in ``REGISTRY``.

Forward passes per image and step (``seg_rt.sampler.nfe_at``): 1 (cond) + 1 for CFG + 1 for the perturbed
term, each only inside its window; modifiers (APG, CFG-Zero*, FreSca) add none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..config import SEGConfig
from .apg import APG
from .base import Term
from .cfg import CFG
from .cfgzero import CFGZeroStar
from .combine import combine
from .fresca import FreSca
from .pag import PAG
from .seg import SEG, seg_guidance
from .slg import SLG
from .tpg import TPG

# name -> term type; registry order is the modifiers' order in the combine
REGISTRY: dict[str, type[Term]] = {t.NAME: t for t in (CFG, SEG, PAG, TPG, SLG, CFGZeroStar, FreSca, APG)}
LISTED = tuple(n for n in REGISTRY if n != "seg")  # SEG is set by its own request fields


def _parse_term(item: str) -> Term:
    head, *opts = item.strip().split(":")
    name, eq, scale = head.partition("=")
    name = name.strip()
    if name == "seg":
        raise ValueError(
            "guidance 'seg' is set by its own fields (seg_scale, seg_sigma, seg_layers, seg_start, "
            "seg_end); the guidance list takes " + ", ".join(LISTED)
        )
    if name not in REGISTRY:
        raise ValueError(f"unknown guidance {name!r}; the guidance list takes {', '.join(LISTED)}")
    cls = REGISTRY[name]
    kwargs: dict = {}
    if eq:
        if not cls.SCALED:
            what = "the cfg field (--cfg)" if name == "cfg" else "no scale"
            raise ValueError(f"guidance {name} takes {what}, not {head!r}")
        kwargs["scale"] = scale
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = key.strip()
        if not eq or key not in cls.option_names():
            raise ValueError(
                f"guidance {name} option {opt!r} is not one of "
                + ", ".join(f"{k}=VALUE" for k in cls.option_names())
            )
        if key in kwargs:
            raise ValueError(f"guidance {name} gives option {key} twice")
        kwargs[key] = value.strip()
    return cls(**kwargs)


@dataclass(frozen=True)
class Guidance:
    """The terms of the ``guidance`` list (SEG and CFG's scale live in their own fields)."""

    terms: tuple[Term, ...] = ()

    @classmethod
    def parse(cls, spec: str | Iterable[str]) -> Guidance:
        """``"apg:eta=0,pag=3"`` (or a list of items) -> the terms in registry order; a bad item is
        one line naming it and what is allowed."""
        if isinstance(spec, str):
            items = [s for s in spec.split(",") if s.strip()]
        elif isinstance(spec, Iterable):
            items = [str(s) for s in spec]
        else:
            raise ValueError(
                f"guidance must be a list of guidance terms such as 'apg,pag=3', got {spec!r} "
                "(the CFG scale is cfg, alias guidance_scale)"
            )
        terms = [_parse_term(i) for i in items]
        names = [t.NAME for t in terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"guidance names {', '.join(dup)} twice")
        perturbed = [t.NAME for t in terms if t.ROLE == "perturbed"]
        if len(perturbed) > 1:
            raise ValueError(
                f"guidance gives {' and '.join(perturbed)}: one perturbed term per request "
                "(its rows are the batch's seg_mask rows)"
            )
        order = list(REGISTRY)
        return cls(tuple(sorted(terms, key=lambda t: order.index(t.NAME))))

    def spec(self) -> str:
        """The canonical string (the record's ``guidance``); ``""`` for no terms."""
        return ",".join(t.spec() for t in self.terms)

    def get(self, name: str) -> Term | None:
        return next((t for t in self.terms if name == t.NAME), None)

    @property
    def perturbed(self) -> Term | None:
        return next((t for t in self.terms if t.ROLE == "perturbed"), None)

    @property
    def modifiers(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.ROLE == "modifier")

    def check(self, cfg: float, seg: SEGConfig) -> None:
        """The rules between the list and the ``cfg`` / ``seg_*`` fields."""
        p = self.perturbed
        if p is not None and seg.enabled:
            raise ValueError(
                f"guidance {p.NAME} and SEG (seg_scale {seg.scale:g}) both perturb the cond rows: one "
                f"perturbed term per request; give seg_scale 0 with {p.NAME}"
            )
        if p is not None and seg.placement != "batched":
            raise ValueError(f"guidance {p.NAME} runs in the batched placement only, not {seg.placement!r}")
        if self.get("cfg") is not None and seg.enabled and seg.placement == "uncond":
            raise ValueError(
                "a cfg window does not combine with seg placement 'uncond' (SEG rides in the CFG row)"
            )
        needs_cfg = [t.NAME for t in self.terms if t.ROLE in ("cfg", "modifier")]
        if needs_cfg and cfg <= 1.0:
            raise ValueError(
                f"guidance {', '.join(needs_cfg)} acts on the CFG delta and needs cfg > 1, got {cfg:g}"
            )

    def rows_config(self, seg: SEGConfig) -> SEGConfig:
        """The config of the perturbed rows (``seg_rt.sampler.branches_at``): SEG's own, or the
        perturbed term's scale and window with the request's layers."""
        p = self.perturbed
        if p is None:
            return seg
        return replace(seg, scale=p.scale, start=p.start, end=p.end)

    def perturbation(self) -> str:
        p = self.perturbed
        return "blur" if p is None else p.PERTURBATION

    def cfg_active(self, step: int, num_steps: int) -> bool:
        t = self.get("cfg")
        return t is None or t.active(step, num_steps)

    def check_model(self, flow: bool, latent_ndim: int = 4) -> None:
        """The rules between the terms and the model: flow-only terms, FreSca's spatial latent."""
        if self.get("fresca") is not None and latent_ndim < 4:
            raise ValueError(
                "guidance fresca scales a spatial latent [..., H, W]; this model's latents are packed "
                "tokens: leave fresca out"
            )
        flow_only = [t.NAME for t in self.terms if t.FLOW_ONLY]
        if flow_only and not flow:
            raise ValueError(
                f"guidance {', '.join(flow_only)} is defined for flow-matching models (velocity); this "
                "model's scheduler is not a flow-matching one"
            )


NO_GUIDANCE = Guidance()


__all__ = [
    "APG",
    "CFG",
    "NO_GUIDANCE",
    "PAG",
    "REGISTRY",
    "SEG",
    "SLG",
    "TPG",
    "CFGZeroStar",
    "FreSca",
    "Guidance",
    "Term",
    "combine",
    "seg_guidance",
]  # fmt: skip
