"""The request type (seg_rt.params): validation, record round trip, one set of defaults everywhere."""

import inspect
import json
import math
import re

import pytest

from seg_rt.cli import build_parser
from seg_rt.cli.generate import request_from_args
from seg_rt.cli.video import video_request_from_args
from seg_rt.config import SEGConfig, check_sigma, sigma_label, sigma_to_json
from seg_rt.errors import first_line
from seg_rt.execution import parse_engine_spec
from seg_rt.images import params_text
from seg_rt.params import GenerationParams, VideoParams, request_from_fields
from seg_rt.pipeline import generate, generate_batch, run_params
from seg_rt.video.sampling import generate_video


def full_request(seg_layers=("mid", "up.0"), **video) -> GenerationParams:
    seg = SEGConfig(scale=2.5, sigma=math.inf, layers=seg_layers, start=0.1, end=0.9)
    return GenerationParams(
        prompt="a cat", negative_prompt="blurry", seed=2**64 - 1, steps=7, cfg=3.5, seg=seg,
        guidance_rescale=0.7, height=64, width=96, scheduler="dpmpp_2m", sequential=True,
        video=VideoParams(**video) if video else None,
    )  # fmt: skip


def test_record_is_the_flat_png_record_and_round_trips():
    p = full_request()
    record = p.to_record()
    # the exact record seg-rt PNGs have carried: flat seg_* keys, σ = inf as "inf", layers a list
    assert record == {
        "prompt": "a cat", "negative_prompt": "blurry", "steps": 7, "cfg": 3.5, "seg_scale": 2.5,
        "seg_sigma": "inf", "seg_layers": ["mid", "up.0"], "seg_start": 0.1, "seg_end": 0.9,
        "guidance_rescale": 0.7, "height": 64, "width": 96, "seed": 2**64 - 1, "scheduler": "dpmpp_2m",
        "sequential": True,
    }  # fmt: skip
    assert GenerationParams.from_record(record) == p
    text = params_text("m", record)  # valid JSON (no Infinity), round trips through the PNG chunk
    assert "Infinity" not in text and GenerationParams.from_record(json.loads(text)) == p
    finite = p.with_seg(sigma=2.0)
    assert (
        finite.to_record()["seg_sigma"] == 2.0 and GenerationParams.from_record(finite.to_record()) == finite
    )


def test_distilled_guidance_is_recorded_only_when_set():
    """Records of runs at the default (every non-Flux run) stay byte-identical to older records."""
    p = full_request()
    assert "distilled_guidance" not in p.to_record()
    q = p.replace(distilled_guidance=2.0)
    record = json.loads(params_text("m", q.to_record()))
    assert record["distilled_guidance"] == 2.0 and GenerationParams.from_record(record) == q
    assert {**record, "distilled_guidance": 3.5} != p.to_record()  # the key is omitted, not defaulted


def test_video_record_round_trips():
    video = {"frames": 5, "fps": 12, "mode": "temporal", "sigma_time": math.inf, "layers": ("down_blocks.0",)}
    p = full_request(seg_layers=SEGConfig().layers, **video)
    record = json.loads(json.dumps(p.to_record()))
    assert record["video"] == {"frames": 5, "fps": 12, "mode": "temporal", "sigma_time": "inf",
                               "layers": ["down_blocks.0"]}  # fmt: skip
    assert GenerationParams.from_record(record) == p


def test_batch_key_ignores_only_prompt_negative_prompt_and_seed():
    p = GenerationParams()
    same = p.replace(prompt="x", negative_prompt="y", seed=9)
    assert same.batch_key() == p.batch_key()
    for other in (p.replace(cfg=2.0), p.with_seg(sigma=2.0), p.replace(height=64), p.replace(steps=3),
                  p.replace(scheduler="ddim"), p.replace(video=VideoParams()),
                  p.replace(distilled_guidance=2.0)):  # fmt: skip
        assert other.batch_key() != p.batch_key()


def _defaults(fn) -> dict:
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}


def test_one_set_of_defaults_for_cli_api_job_and_video():
    from seg_rt.cluster.jobs.spec import parse_job

    d = GenerationParams()
    parser = build_parser()
    assert request_from_args(parser.parse_args(["generate"])) == d
    assert video_request_from_args(parser.parse_args(["video", "--model", "m"])) == d.replace(
        video=VideoParams()
    )
    job = parse_job({"model": "org/name", "prompts": ["a"], "output": "o"})
    assert job.base_params() == d and job.seed == d.seed
    video_job = parse_job({"model": "org/name", "prompts": ["a"], "output": "o", "video": {}})
    assert video_job.base_params() == d.replace(video=VideoParams())
    # the Python API takes the request fields by the table's names: no defaults of its own
    for fn, name in ((generate, "settings"), (generate_batch, "settings"), (generate_video, "fields")):
        assert inspect.signature(fn).parameters[name].kind is inspect.Parameter.VAR_KEYWORD
    assert _defaults(generate)["seed"] == d.seed and _defaults(generate_video)["seed"] == d.seed
    assert request_from_fields({}) == d
    assert request_from_fields({}, "video") == d.replace(video=VideoParams())
    assert d.distilled_guidance == 3.5  # FluxPipeline's guidance_scale
    v = VideoParams()
    assert (v.mode, v.sigma_time, v.frames, v.fps) == ("spatiotemporal", 1.0, 16, 8)


BAD = [
    (lambda: GenerationParams(cfg=math.inf), "cfg must be a finite number >= 1", "inf"),
    (lambda: GenerationParams(cfg=math.nan), "cfg must be a finite number >= 1", "nan"),
    (lambda: GenerationParams(cfg=0.5), "cfg must be a finite number >= 1", "0.5"),
    (lambda: GenerationParams(cfg="5"), "cfg must be a number", "'5'"),
    (lambda: GenerationParams(seed=2**64), "seed must be an integer from 0 to 2**64 - 1", "18446744073709551616"),
    (lambda: GenerationParams(seed=-1), "seed must be an integer from 0 to 2**64 - 1", "-1"),
    (lambda: GenerationParams(seed=1.5), "seed must be an integer", "1.5"),
    (lambda: GenerationParams(steps=0), "steps must be an integer >= 1", "0"),
    (lambda: GenerationParams(scheduler="lms"), "scheduler must be one of euler, euler_a", "'lms'"),
    (lambda: GenerationParams(guidance_rescale=2.0), "guidance rescale must be in [0, 1]", "2"),
    (lambda: GenerationParams(height=0), "height must be an integer >= 1", "0"),
    (lambda: GenerationParams(distilled_guidance=-1.0), "distilled guidance must be a finite number >= 0", "-1"),
    (lambda: GenerationParams(distilled_guidance=math.inf), "distilled guidance must be a finite number >= 0", "inf"),
    (lambda: SEGConfig(sigma=0.0), "seg sigma must be > 0 or inf", "0"),
    (lambda: SEGConfig(sigma=math.nan), "seg sigma must be > 0 or inf", "nan"),
    (lambda: SEGConfig(scale=math.inf), "seg scale must be a finite number >= 0", "inf"),
    (lambda: check_sigma(-2.0), "seg sigma must be > 0 or inf", "-2"),
    (lambda: VideoParams(frames=0), "video frames must be an integer >= 1", "0"),
    (lambda: VideoParams(mode="diagonal"), "seg mode must be one of spatial, temporal, spatiotemporal", "'diagonal'"),
    (lambda: VideoParams(sigma_time=-1.0), "seg sigma time must be >= 0 or inf", "-1"),
    (lambda: VideoParams(mode="temporal", sigma_time=0.0), "seg mode 'temporal' with seg sigma time 0", "0"),
    (lambda: GenerationParams(video=VideoParams(), seg=SEGConfig(layers=("up",))), "do not apply to video", "'up'"),
    (lambda: parse_engine_spec("onnx:"), "engine must be one of torch, torch-compile, onnx:DIR, trt:DIR", "'onnx:'"),
    (lambda: parse_engine_spec("torch:x"), "engine must be one of", "'torch:x'"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message", "value"), BAD)
def test_every_bad_value_is_one_line_naming_it(build, message, value):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        build()
    text = str(err.value)
    assert len(text.splitlines()) == 1 and value in text


def test_engine_specs():
    assert parse_engine_spec("torch") == ("torch", None)
    assert parse_engine_spec("torch-compile") == ("torch-compile", None)
    assert parse_engine_spec("onnx:/a/b") == ("onnx", "/a/b") and parse_engine_spec("trt:e") == ("trt", "e")


def test_run_params_refuses_before_loading_anything(tmp_path):
    missing = tmp_path / "no-model"  # would fail to load: the checks must come first
    p = GenerationParams()
    for params, message in [
        ([p, p.replace(cfg=2.0)], "must share every setting but prompt, negative prompt and seed"),
        ([p.replace(video=VideoParams())], "a video request goes through"),
        ([], "need at least one request"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_params(missing, params)
    with pytest.raises(ValueError, match="engine must be one of"):
        run_params(missing, [p], engine="magic")
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        generate(missing, cfg=math.inf)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 2"):
        generate(missing, seed=2**64)


def test_sigma_forms():
    assert sigma_to_json(math.inf) == "inf" and sigma_to_json(2.0) == 2.0
    assert sigma_label(math.inf) == "inf" and sigma_label(1e5) == "inf"  # the blur's infinite rule
    assert sigma_label(2.5) == "2.5" and sigma_to_json(1e5) == 1e5  # JSON keeps the exact number


def test_first_line():
    assert first_line(ValueError("\n  bad thing\nmore detail")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"
