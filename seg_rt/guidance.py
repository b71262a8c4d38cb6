"""SEG guidance: pure arithmetic over named predictions (docs/design.md, SEG arXiv 2408.00760 eq. 10).

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
    seg_delta: Tensor | None = None,
    cfg: float = 1.0,
    seg_scale: float = 0.0,
    rescale: float = 0.0,
) -> Tensor:
    """Combine the branch predictions; a missing branch contributes nothing.

    ``seg_delta`` (``eps_cond - eps_seg`` of an earlier step, SEGConfig ``every`` > 1) stands in for
    ``eps_seg``: ``eps += s * seg_delta``. Placement ``"uncond"`` passes the blurred unconditional
    prediction as ``eps_uncond``: ``eps_c + (cfg - 1)(eps_c - eps_u')`` = ``eps_u' + cfg(eps_c - eps_u')``.
    """
    if eps_seg is not None and seg_delta is not None:
        raise ValueError("give eps_seg or seg_delta, not both")
    eps = eps_cond
    if eps_uncond is not None:
        eps = eps + (cfg - 1.0) * (eps_cond - eps_uncond)
    if eps_seg is not None:
        eps = eps + seg_scale * (eps_cond - eps_seg)
    if seg_delta is not None:
        eps = eps + seg_scale * seg_delta
    if eps_uncond is not None and rescale > 0.0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale=rescale)
    return eps
