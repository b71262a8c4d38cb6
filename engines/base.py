"""The denoiser protocol every engine implements (DESIGN §3).

A denoiser is called with the model inputs for one batch, by the ONNX / TensorRT-demo names
(``sample``, ``timestep``, ``encoder_hidden_states``, ``text_embeds``, ``time_ids``,
``controlnet_cond``, ``conditioning_scale``) plus ``seg_mask`` (``[B]`` bool: which rows get the
blurred query), and returns the model's prediction for the batch as a torch tensor. It states
which shapes it accepts; a request outside them is a ``ValueError`` naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class ShapeSpec:
    """Shapes an engine accepts; ``None`` means any. ``batch`` counts rows of one forward."""

    batch: int | None = None
    height: int | None = None  # latent height
    width: int | None = None  # latent width

    def check(self, batch: int, height: int, width: int) -> None:
        want = (self.batch, self.height, self.width)
        got = (batch, height, width)
        if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            fmt = lambda t: "x".join("any" if v is None else str(v) for v in t)  # noqa: E731
            raise ValueError(f"engine accepts batch x latent height x width = {fmt(want)}, got {fmt(got)}")

    def __str__(self) -> str:
        return "x".join("any" if v is None else str(v) for v in (self.batch, self.height, self.width))


@runtime_checkable
class Denoiser(Protocol):
    shapes: ShapeSpec

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor: ...
