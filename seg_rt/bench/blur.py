"""``seg-rt bench blur``: a whole diffusers self-attention layer with SEG on every row against the
same layer without SEG, and the reference code's k×k conv blur (``seg_rt.bench.reference``) as the
cost baseline of the separable op."""

from __future__ import annotations

import platform

import torch
from torch import nn

from seg_rt.attention import SEGAttention

from .reference import ReferenceSEGProcessor
from .timing import alternating_ratio


def bench_attention_layer(
    grid: tuple[int, int], channels: int = 1280, heads: int = 20, sigma: float = 10.0, pairs: int = 30
) -> dict:
    """A whole diffusers self-attention layer with SEG on every row vs the same layer without SEG."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn1 = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).eval()
    attn = holder.attn1
    x = torch.randn(1, grid[0] * grid[1], channels)
    plain = AttnProcessor2_0()
    seg = SEGAttention(holder, sigma, ["attn1"]).install()
    seg_proc = attn.processor
    seg_proc.grid = grid
    seg.set_mask(torch.ones(1, dtype=torch.bool))
    reference = ReferenceSEGProcessor(sigma, chunks=1, grid=grid)  # every row, as ours

    def run(proc):
        def call():
            attn.processor = proc
            with torch.no_grad():
                attn(x)

        return call

    ours = alternating_ratio(run(plain), run(seg_proc), pairs)
    ref = alternating_ratio(run(plain), run(reference), pairs)
    seg.remove()
    return {
        "bench": "blur",
        "case": "self-attention layer, SEG vs no SEG",
        "tokens": f"{grid[0]}x{grid[1]}",
        "channels": channels,
        "heads": heads,
        "sigma": sigma,
        "pairs": pairs,
        "seg_ratio": ours["ratio_median"],
        "seg_ratio_iqr": [ours["ratio_p25"], ours["ratio_p75"]],
        "reference_conv_ratio": ref["ratio_median"],
        "layer_ms_no_seg": ours["baseline_ms_median"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def run(pairs: int = 40) -> list[dict]:
    """``seg-rt bench blur``: SDXL's 1024x1024 mid block (32x32 tokens) and 832x1216 (26x38 tokens),
    1280 ch, 20 heads."""
    return [bench_attention_layer((32, 32), pairs=pairs), bench_attention_layer((26, 38), pairs=pairs)]


def describe(row: dict) -> str:
    return (
        f"{row['case']} at {row['tokens']} tokens, {row['channels']} ch, σ={row['sigma']}: "
        f"SEG {row['seg_ratio']:.3f}x (reference conv blur {row['reference_conv_ratio']:.3f}x), "
        f"layer {row['layer_ms_no_seg']:.1f} ms"
    )
