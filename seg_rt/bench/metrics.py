"""Sample-quality metrics on feature vectors (rows of a ``[n, d]`` tensor), the way FID uses
Inception features; seg-rt's benches compute them on the demo classifier's features
(``seg_rt.demo.classifier``):

- ``fid``: Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).
- ``precision_recall``: k-NN manifold precision / recall (Kynkäänniemi et al. 2019).
- ``mean_pairwise_distance``: a diversity measure (mean L2 distance between distinct samples).

Written here rather than taken from torchmetrics / clean-fid: those bind FID to Inception-v3
weights (a download) and to ImageNet-sized inputs; the formulas are a few lines in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    x = feats.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(1, x.shape[0] - 1)


def _sqrt_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    """``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½)``; the last trace via the symmetric
    form, whose eigenvalues are those of ``S1 S2``, so no non-symmetric matrix square root is needed."""
    r1 = _sqrt_psd(s1.double())
    inner = _sqrt_psd(r1 @ s2.double() @ r1)
    d = (mu1.double() - mu2.double()).pow(2).sum() + torch.trace(s1.double()) + torch.trace(s2.double())
    return float(d - 2 * torch.trace(inner))


def fid(a: Tensor, b: Tensor) -> float:
    """FID between feature sets ``a`` and ``b`` (``[n, d]`` each)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"fid needs two [n>=2, d] feature sets of equal d, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return frechet_distance(*_stats(a), *_stats(b))


def mean_pairwise_distance(feats: Tensor) -> float:
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    d = torch.cdist(feats.double(), feats.double())
    return float(d.sum() / (n * (n - 1)))


def _radii(feats: Tensor, k: int) -> Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: each point's distance to itself is 0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: share of ``fake`` inside the real k-NN manifold; recall: share of ``real`` inside
    the fake one (fidelity and coverage)."""
    real, fake = real.double(), fake.double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = torch.cdist(fake, real)  # [n_fake, n_real]
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (r_fake[None] >= d.T).any(1).double().mean()
    return float(precision), float(recall)
