"""The SEG query blur as a fixed-shape separable op (docs/design.md §1).

SEG (Hong 2024, arXiv 2408.00760, eq. 8-9) blurs the self-attention queries with a Gaussian over
their spatial positions. The reference SEG-SDXL code builds one k×k kernel and runs a depthwise
``conv2d`` with reflect padding on square maps. Here the same numbers come from a separable form:
per axis an n×n matrix ``M`` with the reflect boundary folded in, so the 2D (3D) blur of tokens laid
out ``(B, H·W, C)`` is two (three) matmuls with no transposes and fixed shapes, which exports to
ONNX / TensorRT as plain MatMuls. torchvision's ``gaussian_blur`` is not used: it is 2D-conv only,
needs a square-map layout and cannot take σ as data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

INF_SIGMA_THRESHOLD = 9999.0
"""σ above this (or ``inf``) means infinite blur: every position becomes the mean (reference code)."""


def is_infinite(sigma: float) -> bool:
    return math.isinf(sigma) or sigma > INF_SIGMA_THRESHOLD


def kernel_size(sigma: float) -> int:
    """Odd kernel size of the reference code: ``ceil(6σ) + 1 - ceil(6σ) % 2``."""
    c = math.ceil(6 * sigma)
    return c + 1 - c % 2


def capped_kernel_size(n: int, sigma: float) -> int:
    """Kernel size on an axis of length ``n``: at most ``n`` (n odd) or ``n + 1`` (n even)."""
    return min(kernel_size(sigma), n if n % 2 else n + 1)


def gaussian_taps(k: int, sigma: float) -> Tensor:
    """Normalised 1D taps ``exp(-x²/2σ²)`` at ``x = linspace(-(k-1)/2, (k-1)/2, k)`` (float64)."""
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _reflect(p: int, n: int) -> int:
    # F.pad(mode="reflect") semantics: the edge sample is not repeated. The capped kernel keeps
    # the pad below n, so one reflection always suffices.
    if p < 0:
        return -p
    if p > n - 1:
        return 2 * (n - 1) - p
    return p


def blur_matrix(n: int, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 1D SEG blur on an axis of length ``n`` as an ``n × n`` matrix ``M``; ``y = M @ x``.

    Row ``i`` holds the Gaussian taps centred on ``i`` with the reflect boundary folded in.
    σ = 0 gives the identity (no blur along this axis); σ > 9999 or ``inf`` gives the mean.
    """
    if n < 1:
        raise ValueError(f"blur axis length must be >= 1, got {n}")
    if math.isnan(sigma) or sigma < 0:
        raise ValueError(f"blur sigma must be >= 0 or inf, got {sigma}")
    if is_infinite(sigma):
        return torch.full((n, n), 1.0 / n, dtype=dtype)
    if sigma == 0:
        return torch.eye(n, dtype=dtype)
    k = capped_kernel_size(n, sigma)
    taps = gaussian_taps(k, sigma)
    r = (k - 1) // 2
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for t in range(k):
            m[i, _reflect(i + t - r, n)] += taps[t]
    return m.to(dtype)


class QueryBlur(nn.Module):
    """Blur queries ``q: [B, N, C]`` over their token grid, each channel separately.

    Tokens are row-major over ``(H, W)``, or frame-major over ``(T, H, W)`` when ``frames`` is set.
    ``sigma`` blurs the spatial axes; ``sigma_time`` (default: ``sigma``) the frame axis, where
    0 keeps frames independent. The blur is ``M_h`` and ``M_w`` (and ``M_t``) applied as matmuls.
    """

    def __init__(
        self,
        height: int,
        width: int,
        sigma: float,
        frames: int | None = None,
        *,
        sigma_time: float | None = None,
    ) -> None:
        super().__init__()
        self.height, self.width, self.frames = height, width, frames
        self.sigma = float(sigma)
        self.sigma_time = self.sigma if sigma_time is None else float(sigma_time)
        self.register_buffer("m_h", blur_matrix(height, self.sigma), persistent=False)
        self.register_buffer("m_w", blur_matrix(width, self.sigma), persistent=False)
        m_t = blur_matrix(frames, self.sigma_time) if frames is not None else None
        self.register_buffer("m_t", m_t, persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width * (self.frames or 1)

    def forward(self, q: Tensor) -> Tensor:
        n = q.shape[1]
        if n != self.num_tokens:
            grid = (self.frames, self.height, self.width) if self.frames else (self.height, self.width)
            raise ValueError(f"QueryBlur built for grid {grid} ({self.num_tokens} tokens) got {n} tokens")
        return separable_blur(q, self.m_h, self.m_w, self.m_t)


def separable_blur(q: Tensor, m_h: Tensor, m_w: Tensor, m_t: Tensor | None = None) -> Tensor:
    """``q: [B, N, C]`` blurred by the per-axis matrices; N = (T·)H·W, row-major / frame-major."""
    b, c = q.shape[0], q.shape[2]
    h, w = m_h.shape[0], m_w.shape[0]
    m_h, m_w = m_h.to(q.dtype), m_w.to(q.dtype)
    x = q
    if m_t is not None:
        t = m_t.shape[0]
        x = torch.matmul(m_t.to(q.dtype), x.reshape(b, t, h * w * c))  # [B, T, H·W·C]
        b = b * t
    x = x.reshape(b, h, w * c)
    x = torch.mm(m_h, x[0]).unsqueeze(0) if b == 1 else torch.matmul(m_h, x)  # [B(·T), H, W·C]
    x = torch.matmul(m_w, x.reshape(b * h, w, c))  # [B(·T)·H, W, C]
    return x.reshape(q.shape)
