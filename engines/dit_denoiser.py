"""Eager PyTorch denoiser over a SEG-patched image DiT (SD3 / SD3.5, Flux.1; ``seg_rt.dit``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.dit import SEGDiT

from .base import Denoiser, ShapeSpec


class DiTDenoiser(Denoiser):
    """Calls an SD3 / Flux transformer with SEG installed on the chosen layers; any shape.

    The SEG processors stay installed for the denoiser's lifetime; ``close()`` (or ``with``)
    restores the model, as ``TorchDenoiser`` does for UNets.
    """

    shapes = ShapeSpec()

    def __init__(self, transformer: nn.Module, *, sigma: float = math.inf, layers: Sequence[str] = ("mid",)):
        self.model = SEGDiT(transformer, sigma=sigma, layers=layers)
        self.layers = tuple(layers)

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use ``sigma`` and ``layers`` (``None``: the current ones) from the next call on."""
        self._check_open()
        if layers is not None and tuple(layers) != self.layers:
            transformer = self.model.transformer
            self.model.remove()
            self.model = SEGDiT(transformer, sigma=sigma, layers=layers)
            self.layers = tuple(layers)
        self.model.seg.sigma = float(sigma)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        return self.model(inputs)

    def close(self) -> None:
        if not self.closed:
            self.model.remove()
        self.closed = True
