"""``seg-rt bench step``: every mode's ratio is reported, on a tiny UNet (no timing asserted)."""

import math

from seg_rt.bench import models, step
from seg_rt.cli import build_parser


def test_step_case_reports_every_mode(sd15):
    row = step.bench_step_case(sd15.unet, "tiny SD1.5", ["mid"], latent=8, pairs=2)
    assert row["bench"] == "step" and row["layers"] == ["mid"] and row["pairs"] == 2
    for mode in step.STEP_MODES:
        ratio, (lo, hi) = row[f"{mode}_over_cfg"], row[f"{mode}_over_cfg_iqr"]
        assert math.isfinite(ratio) and ratio > 0 and lo <= hi
    assert {"cfg_seg_over_cfg", "cfg_seg_shared_over_cfg"} <= set(row)
    assert "SEG mid" in step.describe(row)
    # the denoiser was closed: the UNet's own processors are back
    assert not any(type(p).__name__.startswith("SEG") for p in sd15.unet.attn_processors.values())


def test_sdxl_shaped_unet_has_sdxl_layout():
    unet = models.sdxl_shaped_unet(width_scale=10)
    assert unet.config.transformer_layers_per_block == (1, 2, 10)
    assert unet.config.addition_embed_type == "text_time"
    x, cond, _ = models.step_inputs(unet, latent=8)
    assert cond["text_embeds"].shape[1] == 128 and x.shape == (1, 4, 8, 8)


def test_cli_accepts_bench_step():
    args = build_parser().parse_args(["bench", "step", "--json", "--pairs", "2"])
    assert (args.what, args.json, args.pairs) == ("step", True, 2)


def test_onnx_step_row_reports_the_fork_ratio(sd15):
    """The ONNX Runtime row: the fork engine's CFG+SEG step against the plain CFG graph (no timing asserted)."""
    import pytest

    pytest.importorskip("onnxruntime")
    from seg_rt.bench import step_onnx

    row = step_onnx.bench_step_onnx(sd15, "tiny SD1.5", size=64, pairs=2, modes=("cfg_seg_fork",))
    assert row["engine"] == "onnxruntime-cpu" and row["fork_block"] == "mid_block"
    ratio, (lo, hi) = row["cfg_seg_fork_over_cfg"], row["cfg_seg_fork_over_cfg_iqr"]
    assert math.isfinite(ratio) and ratio > 0 and lo <= hi and row["cfg_step_ms"] > 0
    assert "cfg_seg_fork " in step.describe(row)
    assert not any(type(p).__name__.startswith("SEG") for p in sd15.unet.attn_processors.values())


def test_gpu_runtimes_report_why_they_are_skipped(sd15):
    import pytest
    import torch

    from seg_rt.bench import step_onnx

    if torch.cuda.is_available():
        pytest.skip("checks the rows of a machine without CUDA")
    for runtime in ("onnxruntime-cuda", "tensorrt"):
        row = step_onnx.bench_step_onnx(sd15, "tiny SD1.5", size=64, pairs=2, runtime=runtime)
        assert row["engine"] == runtime and row["skipped"].startswith("skipped: ")
    with pytest.raises(ValueError, match="runtime must be one of"):
        step_onnx.bench_step_onnx(sd15, "x", runtime="cuda")


def test_cache_row_reports_speedup_and_served_share(sd15):
    """The step-cache row (seg_rt.bench.step_cache) on the tiny UNet: DeepCache interval 3 over 3
    steps serves each row once (step 1 and 2 reuse, a third of the rows full)."""
    import math

    from seg_rt.bench import step_cache
    from seg_rt.bench.models import step_inputs
    from seg_rt.config import SEGConfig
    from seg_rt.engines import TorchDenoiser
    from seg_rt.step_cache import CacheConfig

    x, cond, uncond = step_inputs(sd15.unet, 8)
    den = TorchDenoiser(sd15.unet, sigma=math.inf, layers=("mid",))
    try:
        row = step_cache.bench_cache_case(
            den, "tiny", step_cache._euler(), x, cond, uncond, CacheConfig("deepcache"), 3, 2, SEGConfig()
        )
    finally:
        den.close()
    assert row["served"] == {"uncond": 2, "cond": 2, "seg": 2} and row["served_share"] == round(2 / 3, 4)
    assert row["speedup"] > 0 and row["default"] and row["latents_max_rel_diff"] > 0
    assert "deepcache interval 3" in step.describe(row)


def test_trained_dit_cache_rows_report_the_first_block_change_and_quality():
    """The trained digits DiT's first-block cache rows: the change spread it was judged on, the rows
    it served, and the quality row's distances and scores (no timing asserted)."""
    from seg_rt.bench import step_cache

    (row,) = step_cache.trained_dit_rows(pairs=2, steps=(12,))
    spread = row["first_block_change"]
    assert row["default"] and row["threshold"] == 0.08 and row["steps"] == 12
    assert spread["min"] <= spread["median"] <= spread["max"] == max(spread.values())
    assert set(row["served"]) <= {"uncond", "cond", "seg"} and 0 <= row["served_share"] <= 1
    q = step_cache.dit_quality_row(samples=10, steps=6)
    assert q["model"] == "digits-dit" and q["samples"] == 10 and q["cache"] == "fbcache"
    assert q["mean_abs_diff"] <= q["max_abs_diff"] and q["seed_to_seed_mean_abs_diff"] > 0
    assert 0 <= q["accuracy_cached"] <= 1 and q["fid_cached"] >= 0
    assert "threshold 0.08" in step.describe(q)
