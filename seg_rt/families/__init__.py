"""Model families: one object per family (``base.Family``), resolved once per pipeline by class
from one registry (docs/design.md §4, "Model families").

Adding a family = one new file with a ``Family`` subclass plus one line below (video families:
``seg_rt.video.families``). No code outside this package and ``seg_rt.video.families`` asks which
family it has (``tests/test_boundaries.py`` checks it).
"""

from __future__ import annotations

from .base import Family, Prepared
from .flux import FluxFamily
from .qwenimage import QwenImageFamily
from .registry import REGISTRY, Registry
from .sd3 import SD3Family
from .unet import DemoFamily, SD15ControlNetFamily, SDXLControlNetFamily, SDXLFamily, UNetFamily

# most specific first: the first family whose pipeline classes a pipeline is an instance of wins
for _family in (
    DemoFamily,
    SDXLControlNetFamily,
    SD15ControlNetFamily,
    SDXLFamily,
    UNetFamily,
    SD3Family,
    FluxFamily,
    QwenImageFamily,
):
    REGISTRY.register(_family())

__all__ = ["REGISTRY", "Family", "Prepared", "Registry", "family_of", "register"]


def family_of(pipe, kind: str | None = None) -> Family:
    """The family of a loaded pipeline (``kind``: ``"image"`` or ``"video"`` only), or a
    ``ValueError`` naming the supported families."""
    return REGISTRY.of(pipe, kind)


def register(family: Family, *, first: bool = True) -> Family:
    """Register a family (by default before the built-in ones, so a subclass pipeline of a built-in
    family's class resolves to it)."""
    return REGISTRY.register(family, first=first)
