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

import torch
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


def check_artifact_config(info, sigma: float, layers) -> None:
    """An exported artifact serves the SEG layers it was exported for, and its baked σ only."""
    from seg_rt.blur import is_infinite

    if layers is not None and tuple(layers) not in (info.layers, info.layer_names):
        raise ValueError(
            f"engine was exported for seg layers {','.join(info.layers)}, got {','.join(layers)}; "
            "re-export with --seg-layers"
        )
    if not info.dynamic_sigma:
        baked = float(info.sigma)
        if not (sigma == baked or (is_infinite(sigma) and is_infinite(baked))):
            raise ValueError(
                f"engine was exported with seg sigma {baked:g} baked in, got {sigma:g}; "
                "re-export with --dynamic-sigma to change sigma at run time"
            )


def blur_inputs(info, sigma: float) -> dict[str, Tensor]:
    """The ``seg_blur_<n>`` inputs of a runtime-σ artifact for ``sigma`` (float32)."""
    from seg_rt.blur import blur_matrix

    return {f"seg_blur_{n}": blur_matrix(n, sigma) for n in info.blur_lengths} if info.dynamic_sigma else {}


def pad_rows(inputs: Mapping[str, Tensor], rows: int) -> dict[str, Tensor]:
    """Pad a request to a fixed engine batch: copies of the last row, never perturbed."""
    have = inputs["sample"].shape[0]
    if have >= rows:
        return dict(inputs)
    out = {k: torch.cat([v, v[-1:].expand(rows - have, *v.shape[1:])]) for k, v in inputs.items()}
    mask = inputs["seg_mask"]
    out["seg_mask"] = torch.cat([mask, torch.zeros(rows - have, dtype=torch.bool, device=mask.device)])
    return out
