"""A diffusers UNet (and optional ControlNet) with SEG installed, called with named denoiser inputs.

This is the computation every engine runs: ``seg_rt.engines.TorchDenoiser`` calls it eagerly and
``seg_rt.export`` traces it into ONNX. Inputs follow docs/design.md ("The contracts") / the TensorRT-demo names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SEGAttention, tracing

BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states")
SDXL_INPUTS = ("text_embeds", "time_ids")
CONTROLNET_INPUTS = ("controlnet_cond", "conditioning_scale")


class RowwiseLinear(nn.Linear):
    """``nn.Linear`` that multiplies a 2D input ``[B, C]`` one row at a time in eager mode.

    CPU GEMM picks different kernels for small row counts, so the UNet's per-sample vector
    linears (time / text-time embeddings, resnet time projections) gave row i of a batch of 6 a
    result ~1e-7 off the same row in a batch of 3, which grows to changed PNG bytes. Row by row
    (M = 1 always) makes every sample's result independent of the batch it is in, so batched
    serving and fused job batches equal solo runs bit for bit. These layers are a negligible
    share of the compute; 3D (token) inputs keep one GEMM.
    """

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if x.ndim == 2 and x.shape[0] > 1 and not tracing(x):
            return torch.cat([F.linear(x[i : i + 1], self.weight, self.bias) for i in range(x.shape[0])])
        return F.linear(x, self.weight, self.bias)


class RowwiseConv3d(nn.Conv3d):
    """``nn.Conv3d`` run one sample at a time in eager mode: CPU Conv3d picks another algorithm
    for another batch size (seen in Wan's patch embedding), so batched rows drifted ~1e-7 from
    solo runs. Video DiTs use it only to patchify, a small share of their compute."""

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[0] > 1 and not tracing(input):
            return torch.cat(
                [super(RowwiseConv3d, self).forward(input[i : i + 1]) for i in range(input.shape[0])]
            )
        return super().forward(input)


_BATCH_INVARIANT = {nn.Linear: RowwiseLinear, nn.Conv3d: RowwiseConv3d}


def swap_linears(modules: Sequence[nn.Module | None], cls: type) -> None:
    """Batch invariance on (``cls=RowwiseLinear``) or off (``cls=nn.Linear``): every ``nn.Linear`` and
    ``nn.Conv3d`` under ``modules`` becomes its per-sample variant, or back."""
    on = cls is RowwiseLinear
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            for plain, rowwise in _BATCH_INVARIANT.items():
                if type(m) in (plain, rowwise):
                    m.__class__ = rowwise if on else plain


class SEGUNet(nn.Module):
    """``forward(inputs)`` → the model's prediction; ``inputs["seg_mask"]`` marks perturbed rows."""

    def __init__(
        self,
        unet: nn.Module,
        *,
        sigma: float,
        layers: Sequence[str] = ("mid",),
        controlnet: nn.Module | None = None,
        perturbation: str = "blur",
    ) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.seg = SEGAttention(unet, sigma, layers, perturbation).install()
        swap_linears([unet, controlnet], RowwiseLinear)

    @property
    def input_names(self) -> tuple[str, ...]:
        names = BASE_INPUTS
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            names += SDXL_INPUTS
        if self.controlnet is not None:
            names += CONTROLNET_INPUTS
        return (*names, "seg_mask")

    def grids(self) -> list[tuple[int, int]]:
        """Token grids of the SEG layers seen in the last forward (distinct, sorted)."""
        return sorted({p.grid for p in self.seg.processors.values() if p.grid is not None})

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        sample = inputs["sample"]
        missing = [n for n in self.input_names if n not in inputs and n != "seg_mask"]
        if missing:
            raise ValueError(f"denoiser inputs missing {', '.join(missing)}")
        added = None
        if "text_embeds" in self.input_names:
            added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        extra = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(
                sample,
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                controlnet_cond=inputs["controlnet_cond"],
                conditioning_scale=1.0,
                added_cond_kwargs=added,
                return_dict=False,
            )
            # per-row scale, so one graph serves every scale: [B] -> [B, 1, 1, 1]
            scale = inputs["conditioning_scale"].to(sample.dtype).view(-1, 1, 1, 1)
            extra = {
                "down_block_additional_residuals": [d * scale for d in down],
                "mid_block_additional_residual": mid * scale,
            }
        self.seg.set_mask(inputs.get("seg_mask"))
        try:
            out = self.unet(
                sample,
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=added,
                return_dict=False,
                **extra,
            )[0]
            self.seg.check()  # SEG active but no query perturbed: an error, never a CFG-only result
            return out
        finally:
            self.seg.set_mask(None)

    def remove(self) -> None:
        """Restore the UNet's own attention processors and linear layers."""
        self.seg.remove()
        swap_linears([self.unet, self.controlnet], nn.Linear)
