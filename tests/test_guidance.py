"""Guidance arithmetic on hand-made tensors, and SEGConfig validation."""

import math

import pytest
import torch

from seg_rt import SEGConfig, seg_guidance
from seg_rt.sampler import branches_at


def test_cfg_and_seg():
    u, c, p = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([2.0, 7.0])
    out = seg_guidance(c, eps_uncond=u, eps_seg=p, cfg=5.0, seg_scale=3.0)
    # c + 4(c - u) + 3(c - p) = [3 + 8 + 3, 5 + 12 - 6]
    assert torch.equal(out, torch.tensor([14.0, 11.0]))


def test_seg_without_cfg_and_plain():
    c, p = torch.tensor([3.0]), torch.tensor([1.0])
    assert torch.equal(seg_guidance(c, eps_seg=p, seg_scale=2.0), torch.tensor([7.0]))
    assert torch.equal(seg_guidance(c), c)
    u = torch.tensor([2.0])
    assert torch.equal(seg_guidance(c, eps_uncond=u, cfg=3.0), torch.tensor([5.0]))  # = u + 3(c - u)


def test_cfg_rescale_matches_formula():
    torch.manual_seed(0)
    u, c, p = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    plain = c + 4.0 * (c - u) + 3.0 * (c - p)
    phi = 0.7
    std = lambda x: x.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    expected = phi * plain * (std(c) / std(plain)) + (1 - phi) * plain
    out = seg_guidance(c, eps_uncond=u, eps_seg=p, cfg=5.0, seg_scale=3.0, rescale=phi)
    assert torch.allclose(out, expected, atol=1e-6)


def test_config_defaults_and_window():
    cfg = SEGConfig()
    assert (cfg.scale, cfg.sigma, cfg.layers, cfg.start, cfg.end) == (3.0, math.inf, ("mid",), 0.0, 1.0)
    win = SEGConfig(start=0.2, end=0.6)
    assert [win.active(i, 10) for i in range(10)] == [i in (2, 3, 4, 5) for i in range(10)]
    assert branches_at(0, 10, 5.0, win) == ["uncond", "cond"]
    assert branches_at(3, 10, 5.0, win) == ["uncond", "cond", "seg"]
    assert branches_at(3, 10, 1.0, win) == ["cond", "seg"]
    assert branches_at(3, 10, 1.0, SEGConfig(scale=0)) == ["cond"]
    assert SEGConfig(layers="mid, up.0").layers == ("mid", "up.0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": -1}, "seg sigma must be > 0 or inf, got -1"),
        ({"sigma": 0}, "seg sigma must be > 0 or inf, got 0"),
        ({"sigma": float("nan")}, "seg sigma must be > 0 or inf, got nan"),
        ({"scale": -0.5}, "seg scale must be a finite number >= 0, got -0.5"),
        ({"start": 0.5, "end": 0.5}, "seg window must satisfy 0 <= start < end <= 1"),
        ({"end": 1.5}, "seg window"),
        ({"layers": ()}, "seg layers"),
        ({"sigma": "2"}, "seg sigma must be a number"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SEGConfig(**kwargs)
