"""The serving core without Ray or a network: config, request model, limits, grouping, records,
failure isolation, API keys and the body limit (FastAPI's TestClient on the app)."""

import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from seg_rt.cli import main
from seg_rt.cluster.serving.config import ServeConfig, load_config
from seg_rt.cluster.serving.core import Failure, ServingCore, group_rows, run_group
from seg_rt.cluster.serving.http import build_app, key_matches
from seg_rt.cluster.serving.request import GenerateRequest
from seg_rt.config import SEGConfig
from seg_rt.engines import ShapeSpec
from seg_rt.images import png_bytes
from seg_rt.params import GenerationParams
from seg_rt.tiny import tiny_pipeline

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return tiny_pipeline("sdxl")


@pytest.fixture(scope="module")
def core(pipe):
    return ServingCore(ServeConfig(model="tiny-sdxl"), pipe)


def client(core_: ServingCore, **cfg) -> TestClient:
    c = ServingCore(core_.config.model_copy(update=cfg), core_.pipe, core_.engine)
    return TestClient(build_app(c))


def lines(response) -> list[str]:
    return response.json()["detail"].split("\n")


# ---- config: every value checked before Ray starts ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [unclosed\n", "is not valid YAML (line 2)"),
        ("- a\n- b\n", "must be a mapping of settings, got list"),
        ("model: m\nscheduler: bogus\n", "scheduler must be one of euler"),
        (
            "model: m\nengine: onnx\n",
            "engine must be one of torch, torch-compile, onnx:DIR, trt:DIR, got 'onnx'",
        ),
        ("model: m\nengine: onnx:/no/such/dir\n", "engine folder '/no/such/dir' does not exist"),
        (
            "model: m\nlimits: {max_steps: 0}\n",
            "limits.max_steps: Input should be greater than or equal to 1",
        ),
        ("model: m\nlimits: {max_aspect: .nan}\n", "limits.max_aspect: Input should be a finite number"),
        ("model: m\nhost: 0.0.0.0\n", "host '0.0.0.0' is reachable from other machines: give an API key"),
    ],
)
def test_bad_config_is_one_line_at_startup(tmp_path, text, message):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_serve_cli_refuses_bad_config_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SEG_RT_API_KEY", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text("model: m\nscheduler: [\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and len(err.splitlines()) == 1
    assert main(["serve", "--model", "m", "--host", "0.0.0.0"]) == 2
    assert "give an API key" in capsys.readouterr().err


def test_api_keys_from_flag_and_env_allow_a_public_host(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "seg_rt.cluster.serving.deployment.serve_forever", lambda cfg, **kw: seen.update(cfg=cfg)
    )
    monkeypatch.setenv("SEG_RT_API_KEY", "k2, k3")
    assert main(["serve", "--model", "m", "--host", "0.0.0.0", "--api-key", "k1"]) == 0
    assert seen["cfg"].api_keys == ["k1", "k2", "k3"] and "k1" not in repr(seen["cfg"])


def test_public_model_name_is_never_a_path(tmp_path):
    folder = tmp_path / "models" / "my-sdxl"
    folder.mkdir(parents=True)
    assert ServeConfig(model=str(folder)).public_model == "my-sdxl"
    assert ServeConfig(model="org/model").public_model == "org/model"
    assert ServeConfig(model=str(folder), model_name="prod").public_model == "prod"


# ---- the request model: the type's rules, one line per bad field --------------------------------


def test_request_becomes_generation_params_with_server_defaults():
    req = GenerateRequest(prompt="a", seed=7, seg_sigma="inf", seg_layers=["mid", "up.0"], height=96)
    p = req.params(64, 64, "ddim")
    assert p == GenerationParams(
        prompt="a", seed=7, seg=p.seg, height=96, width=64, scheduler="ddim"
    ) and p.seg.layers == ("mid", "up.0")
    assert math.isinf(p.seg.sigma)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"cfg": NaN}', ["cfg must be a finite number >= 1 (1 disables classifier-free guidance), got nan"]),
        (
            '{"cfg": Infinity}',
            ["cfg must be a finite number >= 1 (1 disables classifier-free guidance), got inf"],
        ),
        (
            '{"seg_scale": NaN, "steps": 0}',
            ["steps must be an integer >= 1, got 0", "seg scale must be a finite number >= 0, got nan"],
        ),
        ('{"seg_sigma": -1}', ["seg sigma must be > 0 or inf, got -1"]),
        (
            '{"seg_start": 0.9, "seg_end": 0.5}',
            ["seg window must satisfy 0 <= start < end <= 1, got start=0.9 end=0.5"],
        ),
        (
            '{"seed": 18446744073709551616}',
            ["seed must be an integer from 0 to 2**64 - 1, got 18446744073709551616"],
        ),
        (
            '{"scheduler": "plms"}',
            ["scheduler must be one of euler, euler_a, ddim, dpmpp_2m, unipc, heun, got 'plms'"],
        ),
        (
            '{"steps": "many", "colour": 1}',
            [
                "steps: Input should be a valid integer, unable to parse string as an integer",
                "colour: Extra inputs are not permitted",
            ],
        ),
        ("{not json", ["request body is not valid JSON: Expecting property name enclosed in double quotes"]),
    ],
)
def test_bad_fields_are_422_one_line_each(core, raw, expected):
    r = client(core).post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and lines(r) == expected


# ---- limits: the server's and the model's ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"steps": 51}, "steps must be <= 50, got 51"),
        ({"prompt": "x" * 2001}, "prompt must be <= 2000 characters, got 2001"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt must be <= 2000 characters, got 2001"),
        ({"seg_scale": 20.5}, "seg_scale must be in [0, 20], got 20.5"),
        ({"cfg": 31}, "cfg must be in [1, 30], got 31"),
        ({"seg_sigma": 0.05}, "seg_sigma must be >= 0.1 or inf, got 0.05"),
        ({"num_images": 5, "response": "json"}, "num_images must be <= 4, got 5"),
        ({"num_images": 2}, "response 'png' carries one image; use response 'json' for num_images > 1"),
        ({"height": 264, "width": 64}, "height and width must be <= 256 pixels each, got 264x64"),  # 4 x 64
        ({"height": 8, "width": 131072}, "height and width must be <= 256 pixels each, got 8x131072"),
        ({"height": 256, "width": 56}, "aspect ratio must be at most 4:1, got 256x56"),
        ({"height": 60}, "height must be a positive multiple of 8, got 60"),
        ({"seg_layers": ["nowhere"]}, "seg layer 'nowhere' matches no self-attention layer"),
        (
            {"seed": 2**64 - 1, "num_images": 2, "response": "json"},
            "seed must be an integer from 0 to 2**64 - 1",
        ),
    ],
)
def test_limits(core, body, message):
    with pytest.raises(ValueError) as err:
        core.check(GenerateRequest(**body))
    assert message in str(err.value)


def test_configured_limits_and_pixel_cap(pipe):
    cfg = ServeConfig(model="m", limits={"max_side": 1024, "max_aspect": 16, "max_pixels": 64 * 512})
    c = ServingCore(cfg, pipe)
    assert len(c.check(GenerateRequest(height=64, width=512, seg_scale=0))) == 1  # 8:1 allowed here
    with pytest.raises(ValueError, match="height x width must be <= 32768 pixels, got 64x1024"):
        c.check(GenerateRequest(height=64, width=1024))


def test_side_limits_follow_the_model_scale_factor():
    """A pixel-space model (the demo model's architecture: factor 1, 32 px default): sides of any
    integer, at most 4 x 32."""
    from seg_rt.demo.model import build

    pixel_model = build(seed=0)
    assert pixel_model.unet.config.sample_size == 32
    c = ServingCore(ServeConfig(model="demo"), pixel_model)
    assert c.check(GenerateRequest(height=33, width=40, seg_scale=0))[0].height == 33
    assert c.check(GenerateRequest(seg_scale=0))[0].width == 32  # the model's default size
    with pytest.raises(ValueError, match="<= 128 pixels each, got 129x40"):
        c.check(GenerateRequest(height=129, width=40, seg_scale=0))


def test_fixed_shape_engine_rejects_other_sizes_naming_both(pipe):
    engine = SimpleNamespace(shapes=ShapeSpec(3, 8, 12), images_per_run=1)  # a fixed-shape Denoiser's surface
    c = ServingCore(ServeConfig(model="m"), pipe, engine)
    assert c.run_capacity == 1 and c.info()["accepted_shapes"] == {
        "images_per_run": 1,
        "height": 64,
        "width": 96,
    }
    c.check(GenerateRequest(height=64, width=96))
    with pytest.raises(ValueError, match="engine accepts batch x latent height x width = 3x8x12, got 3x8x8"):
        c.check(GenerateRequest(height=64, width=64))


# ---- grouping and chunking ------------------------------------------------------------------------


def test_rows_grouped_by_batch_key_and_chunked():
    a, b = GenerationParams(steps=2), GenerationParams(steps=3)
    requests = [[a, a.replace(seed=1)], [b], [a.replace(prompt="x")], [a.with_seg(sigma=2.0)], [a]]
    assert group_rows(requests, 2) == [[(0, 0), (0, 1)], [(2, 0), (4, 0)], [(1, 0)], [(3, 0)]]
    assert group_rows(requests, 4) == [[(0, 0), (0, 1), (2, 0), (4, 0)], [(1, 0)], [(3, 0)]]


# ---- records, stats, failure isolation ------------------------------------------------------------


def test_batch_equals_solo_and_a_bad_request_fails_alone(core):
    good = [
        GenerationParams(prompt=p, seed=s, steps=2, height=64, width=64)
        for p, s in (("a cat", 1), ("a dog", 2))
    ]
    bad = good[0].replace(prompt="bad", seg=SEGConfig(layers=("nowhere",)))  # not caught by check
    before = dict(core.stats)
    with torch.inference_mode():
        out = core.run_batch([[good[0]], [bad], [good[1], good[1].replace(seed=3)]])
        solo = [run_group(core.pipe, [p]) for p in (good[0], good[1], good[1].replace(seed=3))]
    assert isinstance(out[1], Failure) and out[1].status == 422
    assert out[1].message.startswith("seg layer 'nowhere' matches no self-attention layer")
    got = [out[0][0], *out[2]]
    for image, (ref,) in zip(got, solo, strict=True):
        assert image.tobytes() == ref.tobytes()  # the same code path: bit-equal
    assert core.stats["requests"] - before["requests"] == 3 and core.stats["failed"] - before["failed"] == 1
    assert core.stats["images"] - before["images"] == 3


def test_unexpected_error_is_500_for_that_request_only(core):
    def run(pipe, rows, engine):
        if any(p.prompt == "boom" for p in rows):
            raise RuntimeError("/secret/path exploded")
        return [p.prompt for p in rows]

    c = ServingCore(core.config, core.pipe, run=run)
    ok, boom = GenerationParams(prompt="ok"), GenerationParams(prompt="boom")
    out = c.run_batch([[ok], [boom], [ok]])
    assert out[0] == ["ok"] and out[2] == ["ok"]
    assert out[1] == Failure(500, "sampling failed (RuntimeError)")  # no message text, no path


def test_png_record_names_the_model_not_its_path(tmp_path, pipe):
    folder = tmp_path / "secret" / "my-model"
    folder.mkdir(parents=True)
    c = ServingCore(ServeConfig(model=str(folder)), pipe)
    p = GenerationParams(prompt="a", height=64, width=64)
    img = Image.new("RGB", (64, 64))
    png = c.png(img, p)
    record = json.loads(Image.open(io.BytesIO(png)).text["parameters"])
    assert record["model"] == "my-model" and str(tmp_path) not in png.decode("latin-1")
    assert GenerationParams.from_record(record) == p
    assert png == png_bytes(
        img, json.dumps({"model": "my-model", "generator": "seg-rt", **p.to_record()}, sort_keys=True)
    )
    info = json.dumps(ServingCore(ServeConfig(model=str(folder), engine=f"onnx:{folder}"), pipe).info())
    assert str(tmp_path) not in info and '"engine": "onnx"' in info


# ---- HTTP: one app per deployment, keys, body limit ----------------------------------------------


def test_generate_over_http_equals_run_group(core):
    c = client(core)
    with torch.inference_mode():
        r = c.post("/v1/generate", json={"prompt": "a cat", "seed": 5, "steps": 2})
        ref = run_group(core.pipe, [GenerationParams(prompt="a cat", seed=5, steps=2, height=64, width=64)])[
            0
        ]
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "5"
    assert r.content == core.png(ref, GenerationParams(prompt="a cat", seed=5, steps=2, height=64, width=64))


def test_each_app_has_its_own_state(pipe):
    one = build_app(ServingCore(ServeConfig(model="one"), pipe))
    two = build_app(ServingCore(ServeConfig(model="two"), pipe))
    assert one is not two
    assert TestClient(one).get("/v1/info").json()["model"] == "one"
    assert TestClient(two).get("/v1/info").json()["model"] == "two"


def test_api_keys_guard_every_route_but_health(core):
    c = client(core, api_keys=[KEY, "other"])
    assert c.get("/v1/health").status_code == 200
    for path in ("/v1/info", "/openapi.json", "/redoc"):
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": "missing or wrong API key (Authorization: Bearer KEY)"}
    assert c.get("/v1/info", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert c.get("/v1/info", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert c.get("/v1/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert c.get("/v1/info", headers={"Authorization": "Bearer other"}).status_code == 200
    assert c.post("/v1/generate", json={"steps": 2}).status_code == 401
    assert key_matches(b"a", ["a"]) and not key_matches(None, ["a"]) and not key_matches(b"", [""])


def test_docs_open_on_a_keyed_server_and_fetch_the_keyed_spec_with_the_key(core):
    """A browser cannot send the key header when it opens /docs: the page is served without the
    key, /openapi.json stays keyed and the page sends the key with each of its requests."""
    import base64
    import hashlib
    import re

    c = client(core, api_keys=[KEY])
    page = c.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'url: "/openapi.json"' in html and 'req.headers.Authorization = "Bearer " + key' in html
    assert 'localStorage.getItem("seg-rt-key")' in html  # the playground's entry, one key for both
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)  # its one inline script...
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = page.headers["content-security-policy"]  # ...allowed by hash, requests to this server only
    assert f"'sha256-{digest}'" in csp and "connect-src 'self'" in csp
    assert c.get("/openapi.json").status_code == 401
    spec = c.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert spec.status_code == 200 and "/v1/generate" in spec.json()["paths"]
    for path in ("/v1/generate", "/v1/jobs", "/v1/videos", "/v1/images/generations", "/sdapi/v1/txt2img"):
        assert c.post(path, json={"prompt": "a"}).status_code == 401, path  # generating routes keyed


def test_body_limit_before_the_body_is_parsed(core):
    c = client(core, max_body_bytes=4096)
    big = json.dumps({"prompt": "x" * 5000})
    r = c.post("/v1/generate", content=big, headers={"Content-Type": "application/json"})
    assert (
        r.status_code == 413 and r.json()["detail"] == f"request body must be <= 4096 bytes, got {len(big)}"
    )

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = c.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == "request body must be <= 4096 bytes"
    r = c.post("/v1/generate", json={"prompt": "x" * 3000, "steps": 99})
    assert r.status_code == 422 and "steps must be <= 50" in r.text  # under the limit: parsed
