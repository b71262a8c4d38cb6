"""The APIs image clients speak, tested with their real client libraries against a running server:
the OpenAI Images API (``openai``), the AUTOMATIC1111 API (``webuiapi``), their auth, the playground
page, ``/metrics`` and ``seg-rt serve`` without ``--model``. The server is the app of
``seg_rt.cluster.serving.http.build_app`` under uvicorn on loopback (no Ray: ``tests/test_serve.py`` has
the Ray Serve end-to-end test) serving the bundled demo model."""

import base64
import io
import json

import numpy as np
import openai
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import seg_rt
from seg_rt.cli import main
from seg_rt.cluster.serving.a1111_api import SAMPLERS, scheduler_for
from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.cluster.serving.request import RequestFailed
from seg_rt.demo.model import weights_dir
from seg_rt.params import SCHEDULERS, GenerationParams
from seg_rt.pipeline import load_pipeline

from .live_server import live_server, torch_threads

KEY = "test-key-123"
PROMPT = "yellow star on checks"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(weights_dir()), "cpu")


@pytest.fixture(scope="module")
def url(pipe):
    core = ServingCore(ServeConfig(model=str(weights_dir()), api_keys=[KEY]), pipe)
    # one thread for the server's sampling and the references alike (CPU results depend on it)
    with torch_threads(1), live_server(build_app(core)) as base:
        yield base


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def reference(pipe, **kwargs) -> list[np.ndarray]:
    return [pixels(im) for im in seg_rt.generate(pipe, PROMPT, height=32, width=32, **kwargs)]


def record(png: Image.Image) -> dict:
    return json.loads(png.text["parameters"])


def webui(url: str, key: str | None = KEY, **kwargs) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), **kwargs)
    if key is not None:
        api.set_auth("anyone", key)  # HTTP Basic, the web UI's --api-auth; the key is the password
    return api


# ---- OpenAI Images API with the official client ---------------------------------------------------


def test_openai_client_images_equal_generate(url, pipe):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["seg-rt-demo"]
    result = client.images.generate(
        prompt=PROMPT,
        n=2,
        size="32x32",
        response_format="b64_json",
        user="someone",
        model="dall-e-3",  # OpenAI's own model names: aliases of the served model
        quality="hd",  # look hints OpenAI documents: accepted and ignored (the pixels below)
        style="natural",
        background="opaque",
        extra_body={
            "seed": 3,
            "steps": 4,
            "cfg": 3,
            "seg_scale": 2,
            "seg_sigma": "inf",
            "seg_layers": ["mid"],
        },
    )
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [im.format for im in images] == ["PNG", "PNG"] and result.size == "32x32"
    expected = reference(pipe, seed=3, num_images=2, steps=4, cfg=3, seg_scale=2)
    for image, ref in zip(images, expected, strict=True):
        assert np.array_equal(pixels(image), ref)  # the same sampling run: bit-equal
    params = [GenerationParams.from_record(record(im)) for im in images]
    assert [p.seed for p in params] == [3, 4] and params[0].seg.sigma == float("inf")
    assert record(images[0])["model"] == "seg-rt-demo"


def test_openai_wrong_key_raises_authentication_error(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.images.generate(prompt=PROMPT, size="32x32")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert err.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "message"),
    [
        ({"n": 9}, openai.BadRequestError, "n", "n must be <= 4, got 9"),
        ({"size": "large"}, openai.BadRequestError, "size", "size must be 'WIDTHxHEIGHT'"),
        ({"size": "512x32"}, openai.BadRequestError, "size", "height and width must be <= 128 pixels each"),
        ({"response_format": "url"}, openai.BadRequestError, "response_format", "does not host image files"),
        (
            {"quality": "ultra"},
            openai.BadRequestError,
            "quality",
            "quality must be one of auto, standard, hd",
        ),
        (
            {"background": "transparent"},
            openai.BadRequestError,
            "background",
            "background must be one of auto",
        ),
        ({"style": "noir"}, openai.BadRequestError, "style", "style must be one of vivid, natural"),
        ({"extra_body": {"steps": 99}}, openai.BadRequestError, "steps", "steps must be <= 50, got 99"),
        (
            {"extra_body": {"seg_sigma": -1}},
            openai.BadRequestError,
            "seg_sigma",
            "seg sigma must be > 0 or inf",
        ),
        ({"model": "gpt-4o"}, openai.NotFoundError, "model", "this server serves 'seg-rt-demo'"),
    ],
)
def test_openai_errors_in_the_api_error_shape(url, kwargs, error, param, message):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(error) as err:
        client.images.generate(prompt=PROMPT, **kwargs)
    body = err.value.body  # the client's parsed {"error": {...}} object
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert err.value.param == param and message in body["message"]


# ---- AUTOMATIC1111 API with webuiapi -------------------------------------------------------------


def test_webuiapi_txt2img_equals_generate(url, pipe):
    api = webui(url, sampler="Euler a", steps=4)
    result = api.txt2img(
        prompt=PROMPT,
        seed=5,
        cfg_scale=3,
        width=32,
        height=32,
        batch_size=2,
        alwayson_scripts={"SEG": {"args": [{"scale": 2, "sigma": 5}]}},
    )
    assert len(result.images) == 2
    expected = reference(
        pipe, seed=5, num_images=2, steps=4, cfg=3, seg_scale=2, seg_sigma=5, scheduler="euler_a"
    )
    for image, ref in zip(result.images, expected, strict=True):
        assert np.array_equal(pixels(image), ref)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler a"
    assert "Steps: 4, Sampler: Euler a, CFG scale: 3, Seed: 5, Size: 32x32" in result.info["infotexts"][0]
    assert result.info["seg_rt"][1]["seg_sigma"] == 5 and result.parameters["seed"] == 5
    # the PNG's parameters chunk is the web UI's infotext (what A1111 / Forge PNG-info readers
    # parse), seg-rt's JSON record beside it
    for image, seed in zip(result.images, (5, 6), strict=True):
        prompt, settings = image.text["parameters"].split("\n")
        fields = dict(item.split(": ", 1) for item in settings.split(", "))
        assert prompt == PROMPT and fields["Steps"] == "4" and fields["Sampler"] == "Euler a"
        assert (fields["CFG scale"], fields["Seed"], fields["Size"]) == ("3", str(seed), "32x32")
        assert fields["Model"] == "seg-rt-demo"
        assert GenerationParams.from_record(json.loads(image.text["seg-rt"])).seed == seed


def test_webuiapi_random_seed_is_reported_and_reproduces(url):
    api = webui(url, sampler="Euler", steps=3)
    first = api.txt2img(
        prompt=PROMPT, seed=-1, width=32, height=32, alwayson_scripts={"seg": {"args": [1.0]}}
    )
    seed = first.info["seed"]
    assert seed >= 0 and first.parameters["seed"] == seed == json.loads(first.image.text["seg-rt"])["seed"]
    again = api.txt2img(
        prompt=PROMPT, seed=seed, width=32, height=32, alwayson_scripts={"seg": {"args": [1.0]}}
    )
    assert np.array_equal(pixels(first.image), pixels(again.image))


def test_webuiapi_probes_and_model_switch(url):
    api = webui(url)
    assert api.util_get_model_names() == ["seg-rt-demo"]
    assert api.util_get_sampler_names() == sorted(SAMPLERS)
    assert api.util_get_scheduler_names() == ["automatic"]
    assert api.util_get_current_model() == "seg-rt-demo"
    api.util_set_model("seg-rt-demo")  # the one model: accepted
    assert api.get_progress()["state"]["job_count"] == 0
    answer = api.set_options({"sd_model_checkpoint": "sd_xl_base_1.0"})  # webuiapi returns the body
    assert "option sd_model_checkpoint = 'sd_xl_base_1.0' cannot be set on seg-rt" in answer["detail"]
    assert api.util_get_current_model() == "seg-rt-demo"


def test_webuiapi_wrong_key_raises(url):
    for key in ("not-the-key", None):
        api = webui(url, key=key)
        with pytest.raises(RuntimeError) as err:
            api.txt2img(prompt=PROMPT, width=32, height=32, steps=2)
        status, text = err.value.args
        assert status == 401 and json.loads(text)["error"] == "Unauthorized"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"sampler_name": "DPM++ 2M Karras"},
            "sampler_name must be one of 'Euler', 'Euler a', 'DDIM', 'DPM++ 2M', 'UniPC', 'Heun', got 'DPM++ 2M Karras'",
        ),
        ({"enable_hr": True}, "enable_hr is not available on seg-rt (send False), got True"),
        ({"restore_faces": True}, "restore_faces is not available on seg-rt"),
        ({"scheduler": "Karras"}, "scheduler (schedule type) must be 'Automatic' on seg-rt, got 'Karras'"),
        (
            {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}},
            "alwayson script 'ControlNet' is not available",
        ),
        ({"batch_size": 3, "n_iter": 2}, "num_images must be <= 4, got 6"),
        ({"alwayson_scripts": {"seg": {"args": {"scale": 2}}}}, "alwayson_scripts.seg.args must be a list"),
        ({"alwayson_scripts": {"seg": {"args": [{"size": 2}]}}}, "seg script argument 'size' is unknown"),
        ({"alwayson_scripts": {"seg": {"args": [1.0, -2]}}}, "seg sigma must be > 0 or inf, got -2"),
        ({"cfg_scale": 0.5}, "cfg must be a finite number >= 1"),
    ],
)
def test_webuiapi_refusals_are_clear(url, kwargs, message):
    api = webui(url, steps=2)
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt=PROMPT, width=32, height=32, **kwargs)
    status, text = err.value.args
    body = json.loads(text)
    assert status == 422 and message in body["detail"] and set(body) == {"error", "detail", "body", "errors"}


def test_every_sampler_maps_to_a_seg_rt_scheduler():
    assert set(SAMPLERS.values()) == set(SCHEDULERS)
    assert scheduler_for("k_euler_a", "euler") == "euler_a" and scheduler_for(None, "ddim") == "ddim"
    with pytest.raises(RequestFailed, match="sampler_name must be one of"):
        scheduler_for("LMS", "euler")


# ---- auth per API, the playground page, metrics ---------------------------------------------------


def fake_core(pipe, seen: list | None = None, **cfg) -> ServingCore:
    """The demo model's limits with an instant stand-in for sampling (gray images)."""

    def run(pipe_, rows, engine):
        if seen is not None:
            seen.append(core.metrics.registry.get_sample_value("seg_rt_queue_depth"))
        return [Image.new("RGB", (p.width, p.height), (128, 128, 128)) for p in rows]

    core = ServingCore(ServeConfig(model=str(weights_dir()), **cfg), pipe, run=run)
    return core


def test_each_api_refuses_a_missing_key_in_its_own_shape(pipe):
    c = TestClient(build_app(fake_core(pipe, api_keys=[KEY])))
    page = c.get("/")  # the static page is open; it sends the key it is given
    assert (
        page.status_code == 200
        and 'id="compare"' in page.text
        and "text/html" in page.headers["content-type"]
    )
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = c.get("/sdapi/v1/sd-models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert r.json()["error"] == "Unauthorized"
    assert c.get("/v1/info").json() == {"detail": "missing or wrong API key (Authorization: Bearer KEY)"}
    assert c.get("/sdapi/v1/sd-models", auth=("x", KEY)).status_code == 200
    assert c.get("/v1/models", auth=("x", "wrong")).status_code == 401
    assert c.get("/metrics").status_code == 401


def test_metrics_count_routes_statuses_images_batches_and_queue(pipe):
    depth_seen: list = []
    core = fake_core(pipe, depth_seen, api_keys=[KEY])
    c = TestClient(build_app(core), headers={"Authorization": f"Bearer {KEY}"})
    assert c.post("/v1/images/generations", json={"prompt": "a", "n": 2}).status_code == 200
    assert c.post("/sdapi/v1/txt2img", json={"prompt": "a"}).status_code == 200
    assert c.post("/v1/generate", json={"steps": 99}).status_code == 422
    assert c.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/nowhere").status_code == 404
    text = c.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def requests(route, status):
        return samples.get(("seg_rt_requests_total", (("route", route), ("status", status))))

    assert requests("/v1/images/generations", "200") == 1 and requests("/sdapi/v1/txt2img", "200") == 1
    assert requests("/v1/generate", "422") == 1 and requests("/v1/info", "401") == 1
    assert requests("other", "404") == 1
    assert samples[("seg_rt_images_total", ())] == 3
    assert samples[("seg_rt_batch_images_count", ())] == 2 and samples[("seg_rt_batch_images_sum", ())] == 3
    assert samples[("seg_rt_sampling_seconds_count", ())] == 2
    assert depth_seen == [1, 1] and samples[("seg_rt_queue_depth", ())] == 0  # 1 while sampling, then 0


def test_serve_without_model_serves_the_demo_model(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(
        "seg_rt.cluster.serving.deployment.serve_forever", lambda cfg, **kw: seen.update(cfg=cfg)
    )
    monkeypatch.delenv("SEG_RT_API_KEY", raising=False)
    assert main(["serve"]) == 0
    assert seen["cfg"].model == str(weights_dir()) and seen["cfg"].public_model == "seg-rt-demo"
    config = tmp_path / "serve.yaml"
    config.write_text("model: org/other-model\nport: 8123\n")
    assert main(["serve", "--config", str(config)]) == 0  # a config's model wins over the demo
    assert seen["cfg"].model == "org/other-model" and seen["cfg"].port == 8123


def test_concurrent_requests_without_ray_equal_solo(url, pipe):
    """Concurrent requests of different settings: one sampling run at a time on the shared model
    (a run installs SEG processors on it), each answer equal to its solo run."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    sigmas = [1, 5, "inf"]

    def ask(sigma):
        result = client.images.generate(prompt=PROMPT, extra_body={"seed": 7, "steps": 3, "seg_sigma": sigma})
        return pixels(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))

    with ThreadPoolExecutor(len(sigmas)) as pool:
        got = list(pool.map(ask, sigmas))
    for sigma, image in zip(sigmas, got, strict=True):
        [ref] = reference(pipe, seed=7, steps=3, seg_sigma=float(sigma))
        assert np.array_equal(image, ref), sigma
