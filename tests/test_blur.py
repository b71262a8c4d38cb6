"""The separable blur against an independent direct implementation of the reference formula."""

import math

import pytest
import torch

from seg_rt.bench.reference import gaussian_blur_2d
from seg_rt.bench.reference import kernel_size as reference_kernel_size
from seg_rt.blur import QueryBlur, blur_matrix, kernel_size

from .tolerance import assert_close


def direct_blur_2d(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Reference SEG-SDXL math, generalised per axis: outer-product k×k kernel, reflect pad,
    depthwise conv2d (``seg_rt.bench.reference``, which imports nothing from seg_rt). img: [B, C, H, W]."""
    return gaussian_blur_2d(img, reference_kernel_size(sigma), sigma)


def tokens_to_map(q, h, w):  # [B, H*W, C] -> [B, C, H, W]
    return q.transpose(1, 2).reshape(q.shape[0], q.shape[2], h, w)


def map_to_tokens(x):
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("n", [4, 8, 9, 16, 32])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 3.0, 10.0])
def test_square_matches_reference_conv(n, sigma):
    torch.manual_seed(0)
    q = torch.randn(2, n * n, 16)
    ours = QueryBlur(n, n, sigma)(q)
    ref = map_to_tokens(direct_blur_2d(tokens_to_map(q, n, n), sigma))
    assert_close(ours, ref, rel=1e-5, what="blur vs conv reference")


@pytest.mark.parametrize(("h", "w"), [(6, 10), (7, 12), (26, 38), (3, 5), (1, 7)])
@pytest.mark.parametrize("sigma", [1.0, 2.0, 10.0])
def test_non_square_matches_direct_conv(h, w, sigma):
    torch.manual_seed(1)
    q = torch.randn(3, h * w, 8)
    ours = QueryBlur(h, w, sigma)(q)
    ref = map_to_tokens(direct_blur_2d(tokens_to_map(q, h, w), sigma))
    assert_close(ours, ref, rel=1e-5, what="blur vs conv reference")


@pytest.mark.parametrize("sigma", [math.inf, 10000.0, 1e9])
def test_infinite_sigma_is_the_mean(sigma):
    q = torch.randn(2, 6 * 10, 4)
    out = QueryBlur(6, 10, sigma)(q)
    assert_close(out, q.mean(dim=1, keepdim=True).expand_as(q), rel=1e-6)


def test_just_below_threshold_is_still_gaussian():
    q = torch.randn(1, 64, 2)
    out = QueryBlur(8, 8, 9999.0)(q)
    ref = map_to_tokens(direct_blur_2d(tokens_to_map(q, 8, 8), 9999.0))
    assert_close(out, ref, rel=1e-5)


def test_kernel_size_rule_and_matrix_properties():
    assert [kernel_size(s) for s in (0.5, 1, 1.1, 2, 10)] == [3, 7, 7, 13, 61]
    m = blur_matrix(9, 1.5)
    assert torch.allclose(m.sum(1), torch.ones(9))  # every output is a weighted mean
    assert torch.equal(blur_matrix(5, 0.0), torch.eye(5))
    # interior rows hold the normalised Gaussian taps centred on the diagonal
    x = torch.arange(-3, 4, dtype=torch.float64)
    w = torch.exp(-(x**2) / 2)
    assert torch.allclose(blur_matrix(20, 1.0, torch.float64)[10, 7:14], w / w.sum())


def test_blur_matrix_rejects_bad_values():
    with pytest.raises(ValueError, match="sigma"):
        blur_matrix(4, float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        blur_matrix(4, -1.0)
    with pytest.raises(ValueError, match="length"):
        blur_matrix(0, 1.0)
    with pytest.raises(ValueError, match="grid"):
        QueryBlur(4, 4, 1.0)(torch.randn(1, 15, 2))


def test_frames_axis_is_blur_of_each_axis_in_turn():
    t, h, w, c = 5, 4, 6, 3
    q = torch.randn(2, t * h * w, c)
    out = QueryBlur(h, w, 2.0, frames=t, sigma_time=1.0)(q)
    x = q.view(2, t, h, w, c)
    x = torch.einsum("st,bthwc->bshwc", blur_matrix(t, 1.0), x)
    x = torch.einsum("gh,bthwc->btgwc", blur_matrix(h, 2.0), x)
    x = torch.einsum("vw,bthwc->bthvc", blur_matrix(w, 2.0), x)
    assert_close(out, x.reshape_as(q), rel=1e-5)


def test_zero_time_sigma_keeps_frames_independent():
    t, h, w = 4, 3, 3
    q = torch.randn(1, t * h * w, 2)
    blur = QueryBlur(h, w, 1.0, frames=t, sigma_time=0.0)
    q2 = q.clone()
    q2[:, : h * w] += 5.0  # change frame 0
    a, b = blur(q).view(1, t, h * w, 2), blur(q2).view(1, t, h * w, 2)
    assert torch.equal(a[:, 3], b[:, 3])
    assert not torch.allclose(a[:, 0], b[:, 0])
