"""The SEG-patched image-DiT transformer (``SEGDiT``), batch-invariant (``seg_rt.denoiser.batch_invariant``).

Apart from ``seg_rt.families.dit`` so that resolving a family imports no diffusers model code: this
module imports the attention processors (diffusers) and is loaded when a DiT denoiser is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from seg_rt.attention import SEGAttention
from seg_rt.denoiser import RowwiseConv2d, batch_invariant
from seg_rt.sampler import row_layout


def _patch_convs(transformer: nn.Module) -> list[nn.Module]:
    """The patchify convs of a DiT (SD3's ``pos_embed.proj``; Flux patchifies by packing)."""
    proj = getattr(getattr(transformer, "pos_embed", None), "proj", None)
    return [proj] if isinstance(proj, nn.Conv2d) else []


class SEGDiT(nn.Module):
    """An image-DiT transformer with SEG installed; ``forward(inputs)`` → the velocity prediction.

    Inputs: ``sample`` (unpacked latents ``[B, C, h, w]``), ``timestep`` (the scheduler's, 0-1000),
    ``encoder_hidden_states``, the family's extra inputs (``pooled_projections``, Flux-dev's
    ``guidance``, Qwen-Image's ``encoder_hidden_states_mask``), and ``seg_mask``. How the transformer
    is called is the family's (``ImageDiTFamily.forward``).
    """

    controlnet = None  # the export code asks every SEG denoiser for its ControlNet

    def __init__(
        self,
        transformer: nn.Module,
        family,
        *,
        sigma: float,
        layers: Sequence[str] = ("mid",),
        perturbation="blur",
    ) -> None:
        super().__init__()
        self.transformer, self.family = transformer, family
        self.seg = SEGAttention(transformer, sigma, layers, perturbation, adapter=family.adapter())
        self.seg.install()
        # per-sample results independent of the batch: linears and the patchify conv, held until remove()
        self.invariant = [
            batch_invariant(transformer).acquire(),
            batch_invariant(*_patch_convs(transformer), swaps={nn.Conv2d: RowwiseConv2d}).acquire(),
        ]
        self.cache: dict[tuple, Tensor] = {}  # per-shape constant inputs (Flux's img_ids)
        self.step_cache = None  # seg_rt.step_cache.FirstBlockCache, installed by the eager denoiser

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), row_layout(inputs).seg_rows)  # host layout: no sync
        try:
            out = self.family.forward(self.transformer, inputs, self.cache)
            # SEG active but no query perturbed: an error, never a CFG-only result; rows served from
            # the step cache count only when their entry came from a perturbed forward
            self.seg.check() if self.step_cache is None else self.seg.check(self.step_cache.report())
            return out
        finally:
            self.seg.set_mask(None)

    def grids(self) -> list[tuple[int, int]]:
        """The token grid of the last forward (for runtime-σ exports' blur-matrix inputs)."""
        return [] if self.seg.grid is None else [self.seg.grid[1:]]

    def remove(self) -> None:
        self.seg.remove()
        for holder in self.invariant:
            holder.release()
