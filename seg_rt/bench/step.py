"""``seg-rt bench step``: time per denoising step of each guidance mode as a ratio to the CFG step."""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence

import torch
from torch import nn

from seg_rt.sampler import build_batch

from .models import move_inputs, sd15_shaped_pipeline, sdxl_shaped_unet, step_inputs
from .timing import alternating_ratio

STEP_MODES = (
    "vanilla",
    "cfg_seg",
    "cfg_seg_shared",
    "cfg_pag",
    "seg_every_2",
    "seg_uncond",
    "seg_window_half",
)


def bench_step_case(
    unet: nn.Module,
    model: str,
    layers: Sequence[str],
    latent: int,
    pairs: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    modes: Sequence[str] = STEP_MODES,
) -> dict:
    """Time per denoising step of each mode as a ratio to the CFG step ([uncond, cond] rows), one
    image, alternating pairs in this process. ``cfg_seg`` is today's batched SEG (every row runs the
    whole UNet); ``cfg_seg_shared`` the shared-prefix forward (``seg_rt.denoiser.SharedPrefix``).
    The cheap modes' cost per step is their average over a schedule: ``seg_every_2`` and
    ``seg_window_half`` alternate a SEG step and a CFG step; ``seg_uncond`` runs two rows."""
    from seg_rt.engines import TorchDenoiser

    x, cond, uncond = move_inputs(step_inputs(unet, latent), device, dtype)
    t = torch.tensor(500.0, device=device)
    cuda = torch.device(device).type == "cuda"
    batch = {
        names: build_batch(list(names), x, t, cond, uncond)
        for names in (("cond",), ("uncond", "cond"), ("uncond", "cond", "seg"), ("seg_uncond", "cond"))
    }
    den = TorchDenoiser(unet, sigma=math.inf, layers=layers, shared_prefix=True)
    seg = den.model.seg

    def step(names: tuple[str, ...], shared: bool = True, perturbation: str = "blur") -> Callable[[], object]:
        inputs = batch[names] if shared else dict(batch[names])  # a plain dict: no host layout, no sharing

        def call() -> object:
            seg.perturbation = perturbation
            out = den(inputs)
            if cuda:  # host timers measure the GPU work
                torch.cuda.synchronize(device)
            return out

        return call

    cfg = step(("uncond", "cond"))
    seg_step = step(("uncond", "cond", "seg"))
    candidates = {
        "vanilla": (step(("cond",)), 1),
        "cfg_seg": (step(("uncond", "cond", "seg"), shared=False), 1),
        "cfg_seg_shared": (seg_step, 1),
        "cfg_pag": (step(("uncond", "cond", "seg"), perturbation="identity"), 1),
        "seg_every_2": (lambda: (seg_step(), cfg()), 2),  # SEG step, then a step reusing its delta
        "seg_uncond": (step(("seg_uncond", "cond")), 1),
        "seg_window_half": (lambda: (seg_step(), cfg()), 2),  # window [0, 0.5): half the steps
    }
    row = {
        "bench": "step",
        "model": model,
        "layers": list(layers),
        "latent": f"{latent}x{latent}",
        "pairs": pairs,
    }
    try:
        with torch.no_grad():
            for name in modes:
                fn, steps = candidates[name]
                r = alternating_ratio(cfg, fn, pairs, calls=1)
                row[f"{name}_over_cfg"] = round(r["ratio_median"] / steps, 4)
                row[f"{name}_over_cfg_iqr"] = [
                    round(r["ratio_p25"] / steps, 4),
                    round(r["ratio_p75"] / steps, 4),
                ]
                row["cfg_step_ms"] = r["baseline_ms_median"]
    finally:
        den.close()
    row |= {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    return row


def bench_step(pairs: int = 3) -> list[dict]:
    """``seg-rt bench step``: the step-cost ratios on an SD1.5-shaped UNet (32x32 latents, 256 px)
    and an SDXL-shaped one (16x16 latents; its 10-layer level dominates), both at 1/5 width to fit
    a 2-core CPU in ~3 minutes, for SEG layers ``mid`` and ``up``."""
    models = [
        (sd15_shaped_pipeline().unet, "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch)", 32),
        (sdxl_shaped_unet(), "SDXL-shaped UNet at 1/5 width (64-128-256 ch, 1/2/10 transformer layers)", 16),
    ]
    return [
        bench_step_case(unet, name, [layers], latent, pairs)
        for unet, name, latent in models
        for layers in ("mid", "up")
    ]


def run(pairs: int = 3) -> list[dict]:
    """``seg-rt bench step``: the PyTorch rows, then the ONNX Runtime CPU row (``step_onnx``: CFG+SEG
    without and with the in-graph fork, SEG without CFG) on the SD1.5-shaped UNet and on a Wan-shaped
    video DiT (``seg_rt.video.bench_step``), then the step-cache rows (``step_cache``)."""
    from .step_onnx import bench_step_onnx

    rows = bench_step(pairs=pairs)
    name = "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch)"
    rows.append(bench_step_onnx(sd15_shaped_pipeline(), name, pairs=max(pairs, 5)))
    from seg_rt.video.bench_step import bench_video_step_onnx  # the video DiT export's row

    rows.append(bench_video_step_onnx(pairs=max(pairs, 5)))
    from .step_cache import run as cache_rows  # step caches: speed-up over uncached, quality

    rows += cache_rows(pairs=pairs)
    return rows


def describe(row: dict) -> str:
    if row.get("bench", "").startswith("step_cache"):
        from .step_cache import describe as describe_cache

        return describe_cache(row)
    if "engine" in row:
        from .step_onnx import describe as describe_onnx

        return describe_onnx(row)
    return (
        f"{row['model']}, SEG {','.join(row['layers'])}: CFG step {row['cfg_step_ms']:.0f} ms; "
        + ", ".join(f"{m} {row[f'{m}_over_cfg']:.2f}x" for m in STEP_MODES)
    )
