"""Eager PyTorch denoiser over a SEG-patched image DiT (SD3 / SD3.5, Flux.1, Qwen-Image; ``seg_rt.families.dit``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.families.segdit import SEGDiT
from seg_rt.prefix import TransformerFork

from .base import PatchedDenoiser


class DiTDenoiser(PatchedDenoiser):
    """Calls an image-DiT transformer with SEG installed on the chosen layers; any shape. ``family``
    (``seg_rt.families.dit.ImageDiTFamily``) says how the transformer is called.

    ``shared_prefix`` (opt-in): the transformer blocks before the first SEG layer run on the
    unperturbed rows only and the perturbed rows fork off the cond rows there
    (``seg_rt.prefix.TransformerFork``). Equal to the plain batch within 1e-5 of the values' scale,
    not bit for bit (token-major GEMMs and CPU attention round ~1e-7 differently for another batch
    size), so off by default: batch == solo stays exact.
    """

    def __init__(
        self,
        transformer: nn.Module,
        family,
        *,
        sigma: float = math.inf,
        layers: Sequence[str] = ("mid",),
        shared_prefix: bool = False,
    ) -> None:
        self.transformer, self.family, self.shared_prefix = transformer, family, shared_prefix
        self._patch(sigma, layers)

    def _install(self, sigma: float, layers: tuple[str, ...]) -> None:
        self.model = SEGDiT(self.transformer, self.family, sigma=sigma, layers=layers)
        self.prefix = (
            TransformerFork(self.transformer, self.model.seg.layer_names) if self.shared_prefix else None
        )

    def _remove(self) -> None:
        if self.model.step_cache is not None:
            self.model.step_cache.remove()
        self.model.remove()
        if self.prefix is not None:
            self.prefix.remove()

    def _step_cache(self, view):
        """The first-block cache (``seg_rt.step_cache``), installed on the first batch that asks for
        one and left in place (it passes everything through while no batch does)."""
        if view is not None and self.model.step_cache is None:
            from seg_rt.step_cache import FirstBlockCache

            if view.config.mode != FirstBlockCache.mode:
                raise ValueError(f"cache {view.config.mode!r} is not available for DiTs; use fbcache")
            fork = None
            if self.prefix is not None and self.prefix.hooks is not None:
                hooks = self.prefix.hooks
                fork = lambda: hooks.fork  # noqa: E731
            self.model.step_cache = FirstBlockCache(self.transformer, self.model.seg, fork)
        return self.model.step_cache

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        view = getattr(inputs, "cache", None)
        cache = self._step_cache(view)
        if cache is not None:
            cache.begin(view)
        try:
            if self.prefix is None:
                return self.model(inputs)
            return self.prefix.run(inputs, self.model)
        finally:
            if cache is not None:
                cache.end()
