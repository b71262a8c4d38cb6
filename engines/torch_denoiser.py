"""Eager (optionally ``torch.compile``d) PyTorch denoiser over a SEG-patched diffusers UNet."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.blur import blur_matrix
from seg_rt.denoiser import SEGUNet

from .base import PatchedDenoiser

logger = logging.getLogger(__name__)


class TorchDenoiser(PatchedDenoiser):
    """Calls ``unet`` (and ``controlnet`` when given) with SEG installed on the chosen layers.

    Rows with ``seg_mask`` False run the unmodified attention.
    ``perturbation="identity"`` perturbs the rows PAG's way instead (the quality benchmark's baseline).
    ``compile=True`` runs the SEG-patched model through ``torch.compile``; ``configure`` with other
    layers installs new processors and compiles the new model again (never silently eager). The
    compiled model reads its blur matrices as tensors (``SEGAttention.set_runtime_blur``, refilled in
    place when σ changes), never σ itself, so neither a new step nor a new σ recompiles it; a new
    latent size learns its token grids from one eager forward, then compiles once.
    ``shared_prefix`` (default on): the perturbed rows share the cond rows' computation up to the
    first SEG layer (``seg_rt.prefix``, ``seg_rt.denoiser.SharedPrefix``); the result equals the plain
    batch bit for bit on the CPU path, batch and solo alike (tests/test_shared_prefix.py), and every
    golden output is unchanged. ``False`` runs every row through the whole UNet.
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
        self.unet, self.controlnet, self.perturbation = unet, controlnet, perturbation
        self.shared_prefix, self.compile = shared_prefix, compile
        self._patch(sigma, layers)

    def _install(self, sigma: float, layers: tuple[str, ...]) -> None:
        """SEG on ``layers`` of the UNet (and ControlNet), compiled again when ``compile``."""
        self.model = SEGUNet(
            self.unet,
            sigma=sigma,
            layers=layers,
            controlnet=self.controlnet,
            perturbation=self.perturbation,
            shared_prefix=self.shared_prefix,
        )
        self._call = torch.compile(self.model) if self.compile else self.model
        self._grid_shape: tuple | None = None  # latent size whose grids runtime_matrices covers

    def _remove(self) -> None:
        self.model.remove()
        self._call = None

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use ``sigma`` and ``layers`` (``None``: the current ones) from the next call on; a compiled
        denoiser compiles again for new layers, and takes a new σ in its blur-matrix tensors."""
        if self.compile and layers is not None and tuple(layers) != self.layers:
            logger.info("SEG layers changed to %s: compiling the denoiser again", ",".join(layers))
        super().configure(sigma, layers)
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
        seg.clear_runtime_blur()
        self.model(inputs)  # eager: the SEG layers record their token grids for this size
        lengths = sorted({n for grid in self.model.grids() for n in grid})
        seg.set_runtime_blur(
            {n: torch.empty(n, n, dtype=sample.dtype, device=sample.device) for n in lengths}
        )
        self._fill_matrices()
        self._grid_shape = shape

    def _step_cache(self, view):
        """DeepCache (``seg_rt.step_cache``), installed on the first batch that asks for a cache and
        left in place (it passes everything through while no batch does)."""
        if view is None or self.model.step_cache is not None:
            return self.model.step_cache
        from seg_rt.step_cache import DeepCache

        if view.config.mode != DeepCache.mode:
            raise ValueError(f"cache {view.config.mode!r} is not available for UNets; use deepcache")
        if self.compile or self.controlnet is not None:
            what = "torch-compile" if self.compile else "a ControlNet"
            raise ValueError(f"cache 'deepcache' does not run with {what}")
        prefix = self.model.prefix
        self.model.step_cache = DeepCache(
            self.unet, self.model.seg, None if prefix is None else lambda: prefix.fork
        )
        return self.model.step_cache

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        view = getattr(inputs, "cache", None)
        cache = self._step_cache(view)
        if self.compile:
            self._runtime_sigma(inputs)
        if cache is None:
            return self._call(inputs)
        cache.begin(view)
        try:
            return self._call(inputs)
        finally:
            cache.end()
