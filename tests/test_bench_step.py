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
