"""SEG guidance: pure arithmetic over named predictions (DESIGN §1, SEG arXiv 2408.00760 eq. 10).

- with CFG (cfg > 1): ``eps = eps_c + (cfg - 1)(eps_c - eps_u) + s(eps_c - eps_seg)``
- without CFG:        ``eps = eps_c + s(eps_c - eps_seg)``

The order of operations is the reference SEG-SDXL pipeline's. v-prediction models combine the
same way. Optional CFG rescale (Lin et al. 2023, arXiv 2305.08891 §3.4) is diffusers' own.
"""

from __future__ import annotations

from torch import Tensor


def seg_guidance(
    eps_cond: Tensor,
    *,
    eps_uncond: Tensor | None = None,
    eps_seg: Tensor | None = None,
    cfg: float = 1.0,
    seg_scale: float = 0.0,
    rescale: float = 0.0,
) -> Tensor:
    """Combine the branch predictions; a missing branch contributes nothing."""
    eps = eps_cond
    if eps_uncond is not None:
        eps = eps + (cfg - 1.0) * (eps_cond - eps_uncond)
    if eps_seg is not None:
        eps = eps + seg_scale * (eps_cond - eps_seg)
    if eps_uncond is not None and rescale > 0.0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale=rescale)
    return eps
