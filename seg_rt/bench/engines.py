"""``seg-rt bench engines``: one SEG denoiser step, ONNX Runtime CPU settings against torch eager."""

from __future__ import annotations

import time

import torch

from .models import sd15_shaped_pipeline
from .timing import alternating_ratio


def bench_engines(pairs: int = 10, size: int = 256) -> list[dict]:
    """Per-step time of the SEG denoiser ([uncond, cond, perturbed] rows): torch eager vs ONNX Runtime
    CPU at several settings, each as an alternating-pair ratio against torch in this process."""
    import tempfile

    from seg_rt.denoiser import SEGUNet
    from seg_rt.engines import TorchDenoiser
    from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
    from seg_rt.export.onnx import export_onnx
    from seg_rt.families import family_of

    pipe = sd15_shaped_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(pipe, f"{tmp}/onnx", height=size, width=size, sigma=2.0, validate=False)
        export_seconds = time.perf_counter() - t0
        probe = SEGUNet(pipe.unet, sigma=2.0)
        inputs = family_of(pipe).export_inputs(pipe, probe, 3, 1, size, size, torch.float32, seed=1)
        probe.remove()
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :77]
        settings = [("all", None), ("all", 1), ("extended", None), ("basic", None)]
        rows = []
        with TorchDenoiser(pipe.unet, sigma=2.0) as eager:
            for level, threads in settings:
                with OnnxRuntimeDenoiser(f"{tmp}/onnx", optimization=level, threads=threads) as engine:
                    err = (engine(inputs) - eager(inputs)).abs().max().item()
                    r = alternating_ratio(lambda e=engine: e(inputs), lambda: eager(inputs), pairs, calls=1)
                rows.append(
                    {
                        "bench": "engines",
                        "model": "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch), SEG on mid",
                        "latent": f"{size // 8}x{size // 8}",
                        "rows": 3,
                        "ort_optimization": level,
                        "ort_threads": threads or "default",
                        "speedup_ort_vs_torch": r["ratio_median"],
                        "speedup_iqr": [r["ratio_p25"], r["ratio_p75"]],
                        "ort_step_ms": r["baseline_ms_median"],
                        "max_abs_diff": err,
                        "pairs": pairs,
                        "export_seconds": round(export_seconds, 1),
                        "torch_threads": torch.get_num_threads(),
                    }
                )
    return rows


def run(pairs: int = 10) -> list[dict]:
    """``seg-rt bench engines``."""
    return bench_engines(pairs=pairs)


def describe(row: dict) -> str:
    return (
        f"ONNX Runtime ({row['ort_optimization']}, threads {row['ort_threads']}) vs torch eager: "
        f"{row['speedup_ort_vs_torch']:.2f}x faster, {row['ort_step_ms']:.0f} ms/step"
    )
