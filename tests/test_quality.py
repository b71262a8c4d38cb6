"""Quality metrics against known answers computed independently (closed forms, hand sums)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seg_rt.bench import metrics, quality
from seg_rt.config import SEGConfig


def _gaussian(n: int, d: int, seed: int, scale=1.0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_fid_of_a_set_with_itself_is_zero():
    a = _gaussian(500, 16, 0)
    assert abs(metrics.fid(a, a)) < 1e-8


def test_fid_of_a_shifted_set_is_the_squared_shift():
    # same covariance, mean moved by delta: FID = |delta|^2 exactly
    a = _gaussian(400, 8, 1)
    delta = torch.linspace(-1, 1, 8, dtype=torch.float64)
    assert metrics.fid(a, a + delta) == pytest.approx(float(delta.pow(2).sum()), rel=1e-9)
    assert metrics.fid(a, a + delta) > 0.5


def test_fid_matches_the_closed_form_for_diagonal_covariances():
    # independent formula: for diagonal covariances FID = |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
    expect = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    got = metrics.frechet_distance(
        torch.tensor(mu1), torch.diag(torch.tensor(v1)), torch.tensor(mu2), torch.diag(torch.tensor(v2))
    )
    assert got == pytest.approx(expect, rel=1e-9)


def test_fid_matches_scipy_free_reference_for_full_covariances():
    # reference: tr sqrt(S1 S2) from the eigenvalues of S1 S2 (real, non-negative for PSD S1, S2)
    a, b = (
        _gaussian(300, 6, 2),
        _gaussian(300, 6, 3, scale=1.5, shift=0.3)
        @ torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)),
    )
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.fid(a, b) == pytest.approx(float(expect), rel=1e-7)


def test_fid_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="fid needs"):
        metrics.fid(torch.zeros(5, 3), torch.zeros(5, 4))


def test_mean_pairwise_distance_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    # distances 1, 3, 2 → mean 2
    assert metrics.mean_pairwise_distance(x) == pytest.approx(2.0)


def test_precision_recall_known_cases():
    a = _gaussian(200, 4, 5)
    assert metrics.precision_recall(a, a.clone()) == (1.0, 1.0)
    far = a + 100.0
    assert metrics.precision_recall(a, far) == (0.0, 0.0)
    # fakes collapsed onto one real point: all inside the real manifold, covering almost none of it
    collapsed = a[:1].repeat(50, 1) + 1e-6 * _gaussian(50, 4, 6)
    p, r = metrics.precision_recall(a, collapsed)
    assert p == 1.0 and r < 0.1


def test_methods_cover_the_issue_rows():
    names = [m.name for m in quality.methods(3.0, 3.0, 3.0, quality.SIGMAS)]
    assert names == ["vanilla", "CFG 3", "PAG 3", "SEG σ=1", "SEG σ=2", "SEG σ=5", "SEG σ=10", "SEG σ=inf"]
    pag = quality.methods(3.0, 3.0, 2.0, [])[2]
    assert pag.perturbation == "identity" and pag.cfg == 1.0 and pag.scale == 2.0
    assert math.isinf(quality.methods(3.0, 3.0, 3.0, [math.inf])[-1].sigma)


def test_table_formats_rows():
    rows = [
        {"method": "vanilla", "fid": 1.5, "accuracy": None},
        {"method": "SEG", "fid": 0.25, "accuracy": 0.5},
    ]
    text = quality.table(rows)
    assert "| vanilla | 1.500 | – |" in text and "| SEG | 0.250 | 0.500 |" in text


def test_cheap_rows_follow_the_plain_rows():
    plain = quality.methods(3.0, 3.0, 3.0, [math.inf])
    cheap = quality.methods(3.0, 3.0, 3.0, [math.inf], cheap=True)
    assert cheap[: len(plain)] == plain
    every, uncond, window = cheap[len(plain) :]
    assert (every.name, every.every, every.cfg) == ("SEG σ=inf every 2", 2, 1.0)
    assert (uncond.name, uncond.placement, uncond.cfg) == ("SEG uncond-placement", "uncond", 3.0)
    assert (window.start, window.end) == quality.CHEAP_WINDOW and window.name == "SEG σ=inf window 0-0.5"
    for m in cheap:  # every row is a valid SEG config for its CFG scale
        seg = SEGConfig(m.scale, m.sigma, ("mid",), m.start, m.end, m.every, m.placement)
        seg.check_cfg(m.cfg)
