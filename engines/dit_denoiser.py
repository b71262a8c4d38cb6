"""Eager PyTorch denoiser over a SEG-patched image DiT (SD3 / SD3.5, Flux.1; ``seg_rt.dit``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.dit import SEGDiT
from seg_rt.prefix import TransformerFork

from .base import Denoiser, ShapeSpec


class DiTDenoiser(Denoiser):
    """Calls an SD3 / Flux transformer with SEG installed on the chosen layers; any shape.

    The SEG processors stay installed for the denoiser's lifetime; ``close()`` (or ``with``)
    restores the model, as ``TorchDenoiser`` does for UNets. ``shared_prefix`` (opt-in): the
    transformer blocks before the first SEG layer run on the unperturbed rows only and the perturbed
    rows fork off the cond rows there (``seg_rt.prefix.TransformerFork``). Equal to the plain batch
    within 1e-5 of the values' scale, not bit for bit (token-major GEMMs and CPU attention round
    ~1e-7 differently for another batch size), so off by default: batch == solo stays exact.
    """

    shapes = ShapeSpec()

    def __init__(
        self,
        transformer: nn.Module,
        *,
        sigma: float = math.inf,
        layers: Sequence[str] = ("mid",),
        shared_prefix: bool = False,
    ):
        self.shared_prefix = shared_prefix
        self._install(transformer, sigma, layers)

    def _install(self, transformer: nn.Module, sigma: float, layers: Sequence[str]) -> None:
        self.model = SEGDiT(transformer, sigma=sigma, layers=layers)
        self.layers = tuple(layers)
        self.prefix = TransformerFork(transformer, self.model.seg.layer_names) if self.shared_prefix else None

    def _remove(self) -> None:
        self.model.remove()
        if self.prefix is not None:
            self.prefix.remove()

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use ``sigma`` and ``layers`` (``None``: the current ones) from the next call on."""
        self._check_open()
        if layers is not None and tuple(layers) != self.layers:
            transformer = self.model.transformer
            self._remove()
            self._install(transformer, sigma, layers)
        self.model.seg.sigma = float(sigma)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        if self.prefix is None:
            return self.model(inputs)
        return self.prefix.run(inputs, self.model)

    def close(self) -> None:
        if not self.closed:
            self._remove()
        self.closed = True
