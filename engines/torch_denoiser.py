"""Eager (optionally ``torch.compile``d) PyTorch denoiser over a SEG-patched diffusers UNet."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.denoiser import SEGUNet

from .base import Denoiser, ShapeSpec

logger = logging.getLogger(__name__)


class TorchDenoiser(Denoiser):
    """Calls ``unet`` (and ``controlnet`` when given) with SEG installed on the chosen layers.

    Accepts any shape. The SEG processors stay installed for the denoiser's lifetime; ``close()``
    (or ``with``) restores the model. Rows with ``seg_mask`` False run the unmodified attention.
    ``perturbation="identity"`` perturbs the rows PAG's way instead (the quality benchmark's baseline).
    ``compile=True`` runs the SEG-patched model through ``torch.compile``; ``configure`` with other
    layers installs new processors and compiles the new model again (never silently eager).
    ``shared_prefix`` (default on): the perturbed rows share the cond rows' computation up to the
    first SEG layer (``seg_rt.prefix``, ``seg_rt.denoiser.SharedPrefix``); the result equals the plain
    batch bit for bit on the CPU path, batch and solo alike (tests/test_shared_prefix.py), and every
    golden output is unchanged. ``False`` runs every row through the whole UNet.
    """

    shapes = ShapeSpec()

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
        self.compile = compile
        self.model = SEGUNet(
            unet,
            sigma=sigma,
            layers=layers,
            controlnet=controlnet,
            perturbation=perturbation,
            shared_prefix=shared_prefix,
        )
        self.layers = tuple(layers)
        self._call = self._compiled()

    def _compiled(self):
        return torch.compile(self.model) if self.compile else self.model

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use ``sigma`` and ``layers`` (``None``: the current ones) from the next call on."""
        self._check_open()
        if layers is not None and tuple(layers) != self.layers:
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
            if self.compile:
                logger.info("SEG layers changed to %s: compiling the denoiser again", ",".join(layers))
            self._call = self._compiled()
        self.model.seg.sigma = float(sigma)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        return self._call(inputs)

    def close(self) -> None:
        if not self.closed:
            self.model.remove()
            self._call = None
        self.closed = True
