"""The SEG sampling loop: one plain loop over a denoiser callable and any diffusers scheduler.

Each step builds one batch ``[uncond, cond, perturbed]`` (``[cond, perturbed]`` without CFG) whose
perturbed rows are marked by ``seg_mask`` (DESIGN §1 "Batching"), calls the denoiser once (or once
per branch with ``sequential=True`` to save memory), and combines the predictions with
``seg_guidance``. Outside the SEG window the perturbed rows are simply not in the batch.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import SEGConfig
from .guidance import seg_guidance

logger = logging.getLogger(__name__)

Conditioning = Mapping[str, Tensor]  # per-row model inputs for one branch, batch n
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step, timestep, latents)


def branches_at(step: int, num_steps: int, cfg: float, seg: SEGConfig) -> list[str]:
    """Branch names computed at ``step``: a function of (step, num_steps, config) only."""
    names = ["uncond"] if cfg > 1.0 else []
    names.append("cond")
    if seg.active(step, num_steps):
        names.append("seg")
    return names


def build_batch(
    branches: Sequence[str], x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None
) -> dict[str, Tensor]:
    """Concatenate the branches' inputs along the batch; ``seg_mask`` marks the perturbed rows."""
    n = x.shape[0]
    per_branch = [uncond if b == "uncond" else cond for b in branches]
    inputs = {k: torch.cat([c[k] for c in per_branch]) for k in cond}
    inputs["sample"] = torch.cat([x] * len(branches))
    inputs["timestep"] = t.reshape(1).to(x.device).expand(n * len(branches))
    inputs["seg_mask"] = torch.cat(
        [torch.full((n,), b == "seg", dtype=torch.bool, device=x.device) for b in branches]
    )
    return inputs


def _step_kwargs(scheduler, generators: Sequence[torch.Generator] | None) -> dict:
    accepts = set(inspect.signature(scheduler.step).parameters)
    return {"generator": list(generators)} if generators and "generator" in accepts else {}


@torch.no_grad()
def sample(
    denoiser: Callable[[Mapping[str, Tensor]], Tensor],
    scheduler,
    latents: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    *,
    steps: int,
    cfg: float,
    seg: SEGConfig,
    guidance_rescale: float = 0.0,
    sequential: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run SEG(+CFG) sampling from initial ``latents`` (already scaled by ``init_noise_sigma``).

    ``cond`` / ``uncond`` hold the per-row model inputs of the conditional / unconditional branch
    (``encoder_hidden_states``, and for SDXL ``text_embeds``, ``time_ids``; for ControlNet
    ``controlnet_cond``, ``conditioning_scale``); the perturbed branch reuses ``cond``.
    ``generators`` (one per row) feed stochastic schedulers, so row i depends only on its own seed.
    """
    if cfg > 1.0 and uncond is None:
        raise ValueError(f"cfg {cfg:g} > 1 needs unconditional inputs")
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = scheduler.timesteps
    num = len(timesteps)
    extra = _step_kwargs(scheduler, generators)
    n = latents.shape[0]
    for i, t in enumerate(tqdm(timesteps, desc="seg-rt", disable=not progress, leave=False)):
        # flow-matching schedulers (Wan) have no input scaling
        x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        names = branches_at(i, num, cfg, seg)
        if sequential:
            preds = {b: denoiser(build_batch([b], x, t, cond, uncond)) for b in names}
        else:
            out = denoiser(build_batch(names, x, t, cond, uncond))
            preds = dict(zip(names, out.split(n), strict=True))
        eps = seg_guidance(
            preds["cond"],
            eps_uncond=preds.get("uncond"),
            eps_seg=preds.get("seg"),
            cfg=cfg,
            seg_scale=seg.scale,
            rescale=guidance_rescale,
        )
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        if callback is not None:
            callback(i, t, latents)
    return latents
