"""The tiny models' builders (seg_rt.tiny, tables in seg_rt.tiny_configs) build exactly what they
built before the tables: tests/golden.json covers SD1.5, SDXL, SDXL-ControlNet, AnimateDiff,
CogVideoX and Wan through their outputs; the families it does not run (LTX-Video, SD3, Flux,
Qwen-Image) are pinned here by a fingerprint recorded from the previous builders (commit 2ee3155):
per component its class, a hash of its config and parameter shapes (exact), and the sums of
|w| and w² of its random weights (within 1e-9 of their scale: a changed seed or RNG order moves them
by ~1e-2, another CPU's rounding by far less than the bound)."""

import copy
import hashlib
import json

import pytest
import torch

from seg_rt import tiny, tiny_configs

RECORDED = {
    "ltx": {
        "scheduler": ("FlowMatchEulerDiscreteScheduler", "f218d18236981372", 0.0, 0.0),
        "text_encoder": ("T5EncoderModel", "d20ba557423597d1", 9323.40627695625, 9812.15887322259),
        "tokenizer": ("T5Tokenizer", "8ca85270b848da4b", 0.0, 0.0),
        "transformer": (
            "LTXVideoTransformer3DModel",
            "13664d6081047d41",
            4058.814780647236,
            675.4058547079187,
        ),
        "vae": ("AutoencoderKLLTXVideo", "181e32f31b21f6bc", 2909.7768603234535, 137.49324218635488),
    },
    "sd3": {
        "scheduler": ("FlowMatchEulerDiscreteScheduler", "a35af310b3331bc7", 0.0, 0.0),
        "text_encoder": (
            "CLIPTextModelWithProjection",
            "8487c8d10c37b6a9",
            1976.3571235185016,
            374.9108038188698,
        ),
        "text_encoder_2": (
            "CLIPTextModelWithProjection",
            "8487c8d10c37b6a9",
            1970.6450086221116,
            369.7112598686846,
        ),
        "text_encoder_3": ("T5EncoderModel", "4951ccf4ea4ff114", 18385.179881879027, 20365.349441308208),
        "tokenizer": ("CLIPTokenizer", "462d888dd8f994ef", 0.0, 0.0),
        "tokenizer_2": ("CLIPTokenizer", "462d888dd8f994ef", 0.0, 0.0),
        "tokenizer_3": ("T5Tokenizer", "8ca85270b848da4b", 0.0, 0.0),
        "transformer": ("SD3Transformer2DModel", "7d34c901e96d80f6", 30732.499606385518, 17900.554165970898),
        "vae": ("AutoencoderKL", "a6cca6700476687e", 3629.465817908162, 700.5580443841557),
    },
    "flux": {
        "scheduler": ("FlowMatchEulerDiscreteScheduler", "f17a687b4febefb6", 0.0, 0.0),
        "text_encoder": ("CLIPTextModel", "8e0cc4362a060c66", 1827.191619333377, 340.64992948806866),
        "text_encoder_2": ("T5EncoderModel", "d20ba557423597d1", 9362.622637346902, 9913.488068264098),
        "tokenizer": ("CLIPTokenizer", "462d888dd8f994ef", 0.0, 0.0),
        "tokenizer_2": ("T5Tokenizer", "8ca85270b848da4b", 0.0, 0.0),
        "transformer": ("FluxTransformer2DModel", "b3bab0b52adb4022", 9683.8761010129, 1203.4640669273585),
        "vae": ("AutoencoderKL", "add75a6c8a43afe3", 3629.465817908162, 700.5580443841557),
    },
    "qwenimage": {
        "scheduler": ("FlowMatchEulerDiscreteScheduler", "7ef18e3836b91794", 0.0, 0.0),
        "text_encoder": (
            "Qwen2_5_VLForConditionalGeneration",
            "acc2688bc423c72c",
            1113.1953572429943,
            230.71211343266756,
        ),
        "tokenizer": ("Qwen2Tokenizer", "278c21b3b271eef6", 0.0, 0.0),
        "transformer": (
            "QwenImageTransformer2DModel",
            "8dbb08c4a6cb6dac",
            6838.904929582488,
            885.937835188591,
        ),
        "vae": ("AutoencoderKLQwenImage", "b6026ce483295fba", 2689.475001920242, 436.69089189970657),
    },
}


def fingerprint(pipe) -> dict:
    """component -> [class, sha256 of its config and parameter shapes, sum |w|, sum w^2]"""
    out = {}
    for name, obj in sorted(pipe.components.items()):
        if obj is None:
            continue
        cfg = getattr(obj, "config", None)
        if cfg is not None:
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and not k.endswith("_version")}
        else:
            cfg = {"vocab": sorted(obj.get_vocab().items())}
        shapes = []
        abs_sum = sq_sum = 0.0
        if isinstance(obj, torch.nn.Module):
            for k, t in sorted(obj.state_dict().items()):
                shapes.append([k, str(t.dtype), list(t.shape)])
                abs_sum += t.double().abs().sum().item()
                sq_sum += t.double().square().sum().item()
        text = json.dumps([cfg, shapes], sort_keys=True, default=str)
        out[name] = [type(obj).__name__, hashlib.sha256(text.encode()).hexdigest()[:16], abs_sum, sq_sum]
    return out


@pytest.mark.parametrize("family", list(RECORDED))
def test_tiny_pipeline_is_the_recorded_one(family):
    build = tiny.tiny_video_pipeline if family in tiny.VIDEO_FAMILIES else tiny.tiny_dit_pipeline
    got = fingerprint(build(family))
    assert got.keys() == RECORDED[family].keys()
    for name, (cls, digest, abs_sum, sq_sum) in RECORDED[family].items():
        assert got[name][:2] == [cls, digest], name
        assert got[name][2] == pytest.approx(abs_sum, rel=1e-9, abs=1e-12), name
        assert got[name][3] == pytest.approx(sq_sum, rel=1e-9, abs=1e-12), name


def test_families_are_the_tables_keys_in_order():
    assert tiny.FAMILIES == ("sd15", "sdxl", "sdxl-controlnet", "sd15-controlnet", "sdxl-inpaint")
    assert tiny.VIDEO_FAMILIES == ("animatediff", "cogvideox", "wan", "ltx")
    assert tiny.DIT_FAMILIES == ("sd3", "flux", "qwenimage")


@pytest.mark.parametrize(
    "build, what, choices",
    [
        (tiny.tiny_pipeline, "tiny family", "sd15, sdxl, sdxl-controlnet, sd15-controlnet, sdxl-inpaint"),
        (tiny.tiny_video_pipeline, "tiny video family", "animatediff, cogvideox, wan, ltx"),
        (tiny.tiny_video_denoiser, "tiny video family", "animatediff, cogvideox, wan, ltx"),
        (tiny.tiny_dit_pipeline, "tiny DiT family", "sd3, flux, qwenimage"),
        (tiny.tiny_dit, "tiny DiT family", "sd3, flux, qwenimage"),
    ],
)
def test_unknown_family_is_one_line_listing_the_choices(build, what, choices):
    with pytest.raises(ValueError, match=f"^unknown {what} 'sd9'; choose from {choices}$"):
        build("sd9")


def test_building_leaves_the_tables_as_written():
    before = copy.deepcopy({k: v for k, v in vars(tiny_configs).items() if k.isupper()})
    tiny.tiny_dit("qwenimage")
    tiny.tiny_video_denoiser("wan")
    assert {k: v for k, v in vars(tiny_configs).items() if k.isupper()} == before
