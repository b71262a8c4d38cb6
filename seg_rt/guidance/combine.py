"""The one combine of every guidance term (``seg_rt.guidance.base`` states the formula)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import Term


def combine(
    cond: Tensor,
    uncond: Tensor | None = None,
    perturbed: Tensor | None = None,
    *,
    seg_delta: Tensor | None = None,
    cfg: float = 1.0,
    scale: float = 0.0,
    rescale: float = 0.0,
    modifiers: Sequence[Term] = (),
    step: int = 0,
    num_steps: int = 1,
    memory: dict | None = None,
) -> Tensor:
    """The one formula (``seg_rt.guidance.base``): ``cond + (cfg - 1) Δ + scale (cond - perturbed)``
    with ``Δ = cond - u'`` through the active ``modifiers``; a missing prediction contributes nothing.
    ``seg_delta`` (a reused ``cond - perturbed``) stands in for ``perturbed``. ``memory`` holds the
    modifiers' state across steps (APG's momentum), one dict per term name."""
    if perturbed is not None and seg_delta is not None:
        raise ValueError("give the perturbed prediction or its delta, not both")
    memory = {} if memory is None else memory
    active = [m for m in modifiers if m.active(step, num_steps)]
    eps = cond
    if uncond is not None:
        if active:
            for m in active:
                uncond = m.adjust_uncond(cond, uncond)
            delta = cond - uncond
            for m in active:
                delta = m.adjust_delta(delta, cond, memory.setdefault(m.NAME, {}))
            eps = eps + (cfg - 1.0) * delta
        else:
            eps = eps + (cfg - 1.0) * (cond - uncond)
    if perturbed is not None:
        eps = eps + scale * (cond - perturbed)
    if seg_delta is not None:
        eps = eps + scale * seg_delta
    if uncond is not None and rescale > 0.0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        eps = rescale_noise_cfg(eps, cond, guidance_rescale=rescale)
    for m in active:
        eps = m.override(eps, step, num_steps)
    return eps
