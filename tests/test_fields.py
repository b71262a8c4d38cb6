"""The request field table (``seg_rt.params``): it covers every field of the request types, the Python
API takes its wire names and the diffusers spellings, and a field a path cannot honour is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import seg_rt
from seg_rt.config import SEGConfig
from seg_rt.params import (
    FIELDS,
    GenerationParams,
    VideoParams,
    canonical,
    fields_for,
    request_from_fields,
    values_of,
)
from seg_rt.step_cache import CACHE_FIELDS
from seg_rt.tasks import TASK_FIELDS


def test_every_request_field_is_in_the_table_once_per_kind():
    for kind in ("image", "video"):
        paths = [f.path for f in fields_for(kind)]
        assert len(paths) == len(set(paths)) and len({f.key for f in fields_for(kind)}) == len(paths)
        top = {f.name for f in dataclasses.fields(GenerationParams)} - {"seg", "video"}
        seg = {f.name for f in dataclasses.fields(SEGConfig)}
        want = {(n,) for n in top} | {("seg", n) for n in seg}
        if kind == "video":
            want |= {("video", f.name) for f in dataclasses.fields(VideoParams)}
            want -= {
                ("seg", "layers"),
                ("distilled_guidance",),
                ("loras",),
            }  # video layers are VideoParams.layers
            want -= {(key,) for key in TASK_FIELDS}  # img2img / inpainting: image requests only
            want -= {(key,) for key in CACHE_FIELDS}  # step caches: image requests only
        assert set(paths) == want, kind


def test_defaults_come_from_the_request_types():
    request = GenerationParams()
    for f in fields_for("image"):
        assert values_of(request, "image")[f.key] == f.default
    assert {f.key: f.default for f in FIELDS}["frames"] == VideoParams().frames


def test_fields_round_trip_and_aliases():
    request = request_from_fields(
        {
            "num_inference_steps": 3,
            "guidance_scale": 2.5,
            "seg_every": 2,
            "seg_sigma": "inf",
            "seg_layers": "mid,up.0",
        }
    )
    assert request.steps == 3 and request.cfg == 2.5 and request.seg.every == 2
    assert request.seg.sigma == float("inf") and request.seg.layers == ("mid", "up.0")
    assert request_from_fields(values_of(request, "image")) == request
    video = request_from_fields(
        {"frames": 5, "seg_layers": ["down_blocks.0"], "seg_mode": "temporal"}, "video"
    )
    assert video.video == VideoParams(frames=5, mode="temporal", layers=("down_blocks.0",))
    assert video.seg.layers == SEGConfig().layers
    assert canonical({"steps": 4, "num_inference_steps": 4}, "image") == {"steps": 4}  # same value: fine


@pytest.mark.parametrize(
    ("values", "kind", "message"),
    [
        ({"steps": 3, "num_inference_steps": 4}, "image", "gives steps=3 and num_inference_steps=4"),
        ({"frames": 3}, "image", "field 'frames' applies to video requests only, not image"),
        ({"distilled_guidance": 2.0}, "video", "field 'distilled_guidance' applies to image requests only"),
        ({"guidance": 3}, "image", r"guidance must be a list of guidance terms .* \(the CFG scale is cfg"),
        ({"guidnace": 3}, "image", "unknown request field 'guidnace'; the fields are: prompt,"),
        ({"seg_every": 0}, "image", "seg every must be an integer >= 1, got 0"),
    ],
)
def test_bad_fields_are_one_line(values, kind, message):
    with pytest.raises(ValueError, match=message):
        request_from_fields(values, kind)


def test_generate_takes_the_diffusers_spellings(sd15):
    kw = {"height": 64, "width": 64, "seed": 3, "output_type": "latent", "seg_sigma": 2.0}
    ours = seg_rt.generate(sd15, "a cube", steps=2, cfg=3.0, **kw)
    theirs = seg_rt.generate(sd15, "a cube", num_inference_steps=2, guidance_scale=3.0, **kw)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match=r"gives cfg=3\.0 and guidance_scale=4\.0"):
        seg_rt.generate(sd15, "a cube", cfg=3.0, guidance_scale=4.0, **kw)
    with pytest.raises(ValueError, match="guidance must be a list of guidance terms"):
        seg_rt.generate(sd15, "a cube", guidance=3.0, **kw)


def test_generate_video_honours_every_field_or_refuses_it():
    from seg_rt.tiny import tiny_video_pipeline
    from seg_rt.video.sampling import generate_video

    pipe = tiny_video_pipeline("animatediff")
    kw = {
        "frames": 2,
        "height": 32,
        "width": 32,
        "steps": 2,
        "cfg": 3.0,
        "seg_sigma": 2.0,
        "output_type": "latent",
    }
    exact = generate_video(pipe, "a cat", **kw)
    cheap = generate_video(pipe, "a cat", **kw, seg_every=2)  # was silently ignored with params=
    assert (exact - cheap).abs().max() > 1e-6
    fields = {k: v for k, v in kw.items() if k != "output_type"}
    request = request_from_fields({"prompt": "a cat", **fields, "seg_every": 2}, "video")
    assert torch.equal(generate_video(pipe, params=request, output_type="latent"), cheap)
    with pytest.raises(ValueError, match="applies to image requests only"):
        generate_video(pipe, "a cat", **kw, distilled_guidance=2.0)
    flux_guidance = GenerationParams(distilled_guidance=2.0, video=VideoParams(frames=2))
    with pytest.raises(ValueError, match="distilled guidance applies only to guidance-distilled models"):
        generate_video(pipe, params=flux_guidance, output_type="latent")


def test_generate_video_with_params_refuses_the_keywords_params_replaces():
    from seg_rt.video.sampling import generate_video

    request = request_from_fields({"frames": 2}, "video")
    with pytest.raises(ValueError, match="takes the prompt, seed and scheduler from params"):
        generate_video(object(), "a cat", params=request)


def test_open_model_refuses_a_bad_thread_count_before_loading():
    from seg_rt.models import open_model

    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        open_model("/nowhere/model", threads=0)


def test_the_demo_video_folder_has_its_pixel_size_factor_before_loading():
    from seg_rt.demo.video_model import video_weights_dir
    from seg_rt.pipeline import folder_scale_factor

    assert folder_scale_factor(video_weights_dir()) == 1  # pixel space: any size is checked as valid


def test_a1111_seg_script_takes_every_seg_rt_extra_by_its_name():
    from seg_rt.cluster.serving.a1111_api import _seg_script

    got = _seg_script(
        {"seg": {"args": [{"scale": 2, "seg_every": 2, "sequential": True, "guidance_rescale": 0.5}]}}
    )
    assert got == {"seg_scale": 2, "seg_every": 2, "sequential": True, "guidance_rescale": 0.5}
    assert _seg_script({"seg": {"args": [1.5, "inf"]}}) == {"seg_scale": 1.5, "seg_sigma": "inf"}
