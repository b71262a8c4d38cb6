"""Eager (optionally ``torch.compile``d) PyTorch denoiser over a SEG-patched diffusers UNet."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.attention import SEGAttention

from .base import ShapeSpec

logger = logging.getLogger(__name__)


class TorchDenoiser:
    """Calls ``unet`` (and ``controlnet`` when given) with SEG installed on the chosen layers.

    The SEG processors stay installed for the denoiser's lifetime; ``close()`` (or ``with``)
    restores the model. Rows with ``seg_mask`` False run the unmodified attention.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        sigma: float,
        layers: Sequence[str] = ("mid",),
        controlnet: nn.Module | None = None,
        compile: bool = False,
    ) -> None:
        self.unet = unet
        self.controlnet = controlnet
        self.seg = SEGAttention(unet, sigma, layers).install()
        self.shapes = ShapeSpec()
        self._unet_call = torch.compile(unet) if compile else unet

    @property
    def sigma(self) -> float:
        return self.seg.sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self.seg.sigma = float(value)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        sample = inputs["sample"]
        self.shapes.check(sample.shape[0], sample.shape[-2], sample.shape[-1])
        added = None
        if "text_embeds" in inputs:
            added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        self.seg.set_mask(inputs.get("seg_mask"))
        kwargs = {}
        if self.controlnet is not None:
            if "controlnet_cond" not in inputs:
                raise ValueError("this model has a ControlNet: pass a control image")
            scale = inputs["conditioning_scale"].to(sample.dtype).view(-1, 1, 1, 1)
            down, mid = self.controlnet(
                sample,
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                controlnet_cond=inputs["controlnet_cond"],
                conditioning_scale=1.0,
                added_cond_kwargs=added,
                return_dict=False,
            )
            kwargs = {
                "down_block_additional_residuals": [d * scale for d in down],
                "mid_block_additional_residual": mid * scale,
            }
        try:
            return self._unet_call(
                sample,
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=added,
                return_dict=False,
                **kwargs,
            )[0]
        finally:
            self.seg.set_mask(None)

    def close(self) -> None:
        self.seg.remove()

    def __enter__(self) -> TorchDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
