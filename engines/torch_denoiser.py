"""Eager (optionally ``torch.compile``d) PyTorch denoiser over a SEG-patched diffusers UNet."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.denoiser import SEGUNet

from .base import ShapeSpec


class TorchDenoiser:
    """Calls ``unet`` (and ``controlnet`` when given) with SEG installed on the chosen layers.

    Accepts any shape. The SEG processors stay installed for the denoiser's lifetime; ``close()``
    (or ``with``) restores the model. Rows with ``seg_mask`` False run the unmodified attention.
    ``perturbation="identity"`` perturbs the rows PAG's way instead (the quality benchmark's baseline).
    ``shared_prefix`` (default on): the perturbed rows share the cond rows' computation up to the
    first SEG layer (``seg_rt.denoiser.SharedPrefix``); bit-identical to the plain batch on the CPU
    path (tests/test_shared_prefix.py), so it is the default; ``False`` runs every row through.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        sigma: float = math.inf,
        layers: Sequence[str] = ("mid",),
        controlnet: nn.Module | None = None,
        compile: bool = False,
        perturbation: str = "blur",
        shared_prefix: bool = True,
    ) -> None:
        self.shared_prefix = shared_prefix
        self.model = SEGUNet(
            unet,
            sigma=sigma,
            layers=layers,
            controlnet=controlnet,
            perturbation=perturbation,
            shared_prefix=shared_prefix,
        )
        self.layers = tuple(layers)
        self.shapes = ShapeSpec()
        self._call = torch.compile(self.model) if compile else self.model

    def configure(self, sigma: float, layers: Sequence[str]) -> None:
        """Use ``sigma`` and ``layers`` from the next call on."""
        if tuple(layers) != self.layers:
            unet, controlnet = self.model.unet, self.model.controlnet
            perturbation = self.model.seg.perturbation
            self.model.remove()
            self.model = SEGUNet(
                unet,
                sigma=sigma,
                layers=layers,
                controlnet=controlnet,
                perturbation=perturbation,
                shared_prefix=self.shared_prefix,
            )
            self.layers = tuple(layers)
            self._call = self.model
        self.model.seg.sigma = float(sigma)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self._call(inputs)

    def close(self) -> None:
        self.model.remove()

    def __enter__(self) -> TorchDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
