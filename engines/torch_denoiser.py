"""Eager (optionally ``torch.compile``d) PyTorch denoiser over a SEG-patched diffusers UNet."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.blur import blur_matrix
from seg_rt.denoiser import SEGUNet

from .base import Denoiser, ShapeSpec

logger = logging.getLogger(__name__)


class TorchDenoiser(Denoiser):
    """Calls ``unet`` (and ``controlnet`` when given) with SEG installed on the chosen layers.

    Accepts any shape. The SEG processors stay installed for the denoiser's lifetime; ``close()``
    (or ``with``) restores the model. Rows with ``seg_mask`` False run the unmodified attention.
    ``perturbation="identity"`` perturbs the rows PAG's way instead (the quality benchmark's baseline).
    ``compile=True`` runs the SEG-patched model through ``torch.compile``; ``configure`` with other
    layers installs new processors and compiles the new model again (never silently eager). The
    compiled model reads its blur matrices as tensors (``SEGAttention.runtime_matrices``, refilled in
    place when σ changes), never σ itself, so neither a new step nor a new σ recompiles it; a new
    latent size learns its token grids from one eager forward, then compiles once.
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
        self._install(unet, controlnet, sigma, layers, perturbation)

    def _install(self, unet, controlnet, sigma: float, layers: Sequence[str], perturbation: str) -> None:
        """SEG on ``layers`` of ``unet`` (and ``controlnet``), compiled again when ``compile``."""
        self.model = SEGUNet(
            unet,
            sigma=sigma,
            layers=layers,
            controlnet=controlnet,
            perturbation=perturbation,
            shared_prefix=self.shared_prefix,
        )
        self.layers = tuple(layers)
        self._call = torch.compile(self.model) if self.compile else self.model
        self._grid_shape: tuple | None = None  # latent size whose grids runtime_matrices covers

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use ``sigma`` and ``layers`` (``None``: the current ones) from the next call on."""
        self._check_open()
        if layers is not None and tuple(layers) != self.layers:
            old, perturbation = self.model, self.model.seg.perturbation
            old.remove()
            if self.compile:
                logger.info("SEG layers changed to %s: compiling the denoiser again", ",".join(layers))
            self._install(old.unet, old.controlnet, sigma, layers, perturbation)
        self.model.seg.sigma = float(sigma)
        if self.compile and self.model.seg.runtime_matrices is not None:
            self._fill_matrices()

    def _fill_matrices(self) -> None:
        """Write the current σ's blur matrices into the compiled graph's matrix tensors, in place."""
        for n, m in self.model.seg.runtime_matrices.items():
            m.copy_(blur_matrix(n, self.model.seg.sigma))

    def _runtime_sigma(self, inputs: Mapping[str, Tensor]) -> None:
        """Before a compiled call: blur matrices for every axis length of this input's SEG grids."""
        sample = inputs["sample"]
        shape = (tuple(sample.shape[2:]), sample.dtype, sample.device)  # the latent size, not the rows
        if shape == self._grid_shape:
            return
        seg = self.model.seg
        seg.runtime_matrices = None
        self.model(inputs)  # eager: the SEG layers record their token grids for this size
        lengths = sorted({n for grid in self.model.grids() for n in grid})
        seg.runtime_matrices = {
            n: torch.empty(n, n, dtype=sample.dtype, device=sample.device) for n in lengths
        }
        self._fill_matrices()
        self._grid_shape = shape

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        if self.compile:
            self._runtime_sigma(inputs)
        return self._call(inputs)

    def close(self) -> None:
        if not self.closed:
            self.model.remove()
            self._call = None
        self.closed = True
