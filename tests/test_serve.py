"""The Ray Serve app on a tiny model: real HTTP on loopback, batching, equality, 422 and 503."""

import base64
import contextlib
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import seg_rt
from seg_rt.cli import main
from seg_rt.cluster.jobs.driver import refresh_ray_auth

from .ray_helpers import LOOPBACK, free_port, kill_ray_under, short_temp_dir

pytestmark = pytest.mark.slow


def post(url, body, timeout=300):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("content-type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type")


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def one_thread():
    """The replicas compute with 1 CPU thread; CPU results depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def server(sdxl_dir, tmp_path_factory):
    import ray
    from ray import serve

    from seg_rt.cluster.serving.deployment import build_app
    from seg_rt.export import export_onnx
    from seg_rt.pipeline import load_pipeline

    onnx_dir = export_onnx(
        load_pipeline(sdxl_dir, "cpu"), tmp_path_factory.mktemp("e") / "onnx", height=64, width=96, sigma=2.0
    ).folder
    refresh_ray_auth()  # Ray caches auth settings per process: read this test's environment
    temp, port = short_temp_dir(), free_port()
    ray.init(
        num_cpus=4, _temp_dir=temp, _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model": str(sdxl_dir), "num_replicas": 1, "default_height": 64, "default_width": 64}
    serve.run(
        build_app({**common, "batch_wait_timeout_s": 0.5, "max_batch_size": 4}), name="main", route_prefix="/"
    )
    serve.run(build_app({**common, "max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1}),
              name="slow", route_prefix="/slow")  # fmt: skip
    serve.run(build_app({**common, "engine": f"onnx:{onnx_dir}"}), name="fixed", route_prefix="/fixed")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    kill_ray_under(temp)


def test_health_info_and_openapi(server, sdxl_dir):
    assert get(f"{server}/v1/health") == {"status": "ok"}
    info = get(f"{server}/v1/info")
    assert info["limits"]["max_steps"] == 50 and info["accepted_shapes"] == "any multiple of 8"
    assert info["model"] == "tiny-sdxl" and str(sdxl_dir) not in json.dumps(info)  # a name, not a path
    spec = get(f"{server}/openapi.json")
    assert "/v1/generate" in spec["paths"] and "GenerateRequest" in json.dumps(spec)
    fixed = get(f"{server}/fixed/v1/info")
    assert fixed["accepted_shapes"] == {"images_per_run": 1, "height": 64, "width": 96}
    assert fixed["engine"] == "onnx"  # the kind, not the server folder


def test_png_equals_cli_generate(server, sdxl_dir, tmp_path):
    status, body, ctype = post(f"{server}/v1/generate", {"prompt": "a cat", "seed": 3, "steps": 3, "seg_sigma": 2,
                                                          "height": 64, "width": 96})  # fmt: skip
    assert status == 200 and ctype == "image/png"
    out = tmp_path / "cli.png"
    assert (
        main(
            [
                "generate",
                "--model",
                str(sdxl_dir),
                "--prompt",
                "a cat",
                "--seed",
                "3",
                "--steps",
                "3",
                "--seg-sigma",
                "2",
                "--height",
                "64",
                "--width",
                "96",
                "--out",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )  # fmt: skip  (the replica has 1 CPU: same thread count, same bits)
    # the same pixels and parameter record; the server names its model by folder name, not path
    served, cli = Image.open(io.BytesIO(body)), Image.open(out)
    assert np.array_equal(np.asarray(served), np.asarray(cli))
    served_record, cli_record = json.loads(served.text["parameters"]), json.loads(cli.text["parameters"])
    assert served_record.pop("model") == "tiny-sdxl" and str(sdxl_dir) not in body.decode("latin-1")
    cli_record.pop("model")
    assert served_record == cli_record


def test_concurrent_requests_are_batched_and_equal_solo(server, sdxl_dir):
    from seg_rt.pipeline import load_pipeline

    # the same files the server loaded (CPU kernels may round differently for other weight memory)
    disk = load_pipeline(sdxl_dir, "cpu")
    before = get(f"{server}/v1/info")["stats"]
    bodies = [{"prompt": p, "seed": s, "steps": 3, "response": "json"} for p, s in
              [("a cat", 1), ("a dog", 2), ("a red cube", 3), ("a cat", 4)]]  # fmt: skip
    results = [None] * len(bodies)

    def worker(i):
        results[i] = post(f"{server}/v1/generate", bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = get(f"{server}/v1/info")["stats"]
    requests = after["requests"] - before["requests"]
    runs = after["sampling_runs"] - before["sampling_runs"]
    assert requests == 4 and runs < requests  # fewer engine runs than requests
    for body, (status, raw, _) in zip(bodies, results, strict=True):
        assert status == 200
        payload = json.loads(raw)
        assert payload["seeds"] == [body["seed"]] and payload["parameters"]["prompt"] == body["prompt"]
        with one_thread():  # the replica computes with 1 thread
            solo = seg_rt.generate(
                disk, body["prompt"], seed=body["seed"], steps=3, height=64, width=64, output_type="np"
            )
        solo = (solo[0] * 255).round().astype("uint8")
        assert np.array_equal(pixels(base64.b64decode(payload["images"][0])), solo)


def test_several_images_per_request(server):
    status, raw, _ = post(
        f"{server}/v1/generate", {"prompt": "x", "seed": 9, "steps": 2, "num_images": 2, "response": "json"}
    )
    payload = json.loads(raw)
    assert status == 200 and payload["seeds"] == [9, 10] and len(payload["images"]) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"steps": 500}, "steps must be <= 50, got 500"),
        ({"height": 2048, "width": 2048}, "height and width must be <= 256 pixels each, got 2048x2048"),
        ({"height": 8, "width": 131072}, "height and width must be <= 256 pixels each"),
        ({"height": 256, "width": 32}, "aspect ratio must be at most 4:1, got 256x32"),
        ({"height": 60}, "height must be a positive multiple of 8, got 60"),
        ({"cfg": float("nan")}, "cfg must be a finite number >= 1"),
        ({"seg_scale": float("inf")}, "seg scale must be a finite number >= 0, got inf"),
        ({"seg_sigma": -1}, "seg sigma must be > 0 or inf, got -1"),
        ({"seg_scale": 99}, "seg_scale must be in [0, 20]"),
        ({"num_images": 9, "response": "json"}, "num_images must be <= 4, got 9"),
        ({"num_images": 2}, "use response 'json'"),
        ({"prompt": "x" * 3000}, "prompt must be <= 2000 characters"),
        ({"seg_layers": ["nowhere"]}, "matches no self-attention layer"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_422_with_a_clear_message(server, body, message):
    status, raw, _ = post(f"{server}/v1/generate", {"prompt": "a", "steps": 2, **body})
    assert status == 422 and message in raw.decode(), raw


def test_shape_the_engine_was_not_built_for_is_422_naming_it(server):
    status, raw, _ = post(
        f"{server}/fixed/v1/generate", {"prompt": "a", "steps": 2, "seg_sigma": 2, "height": 64, "width": 64}
    )
    assert (
        status == 422 and "engine accepts batch x latent height x width = 3x8x12, got 3x8x8" in raw.decode()
    )
    status, raw, _ = post(
        f"{server}/fixed/v1/generate", {"prompt": "a", "steps": 2, "seg_sigma": 2, "height": 64, "width": 96}
    )
    assert status == 200, raw


def test_overload_is_503_not_an_unbounded_queue(server):
    statuses = []

    def worker(i):
        statuses.append(post(f"{server}/slow/v1/generate", {"prompt": f"p{i}", "steps": 25, "seed": i})[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}


def test_soak_short():
    """20 s of the soak run (``python -m tests.soak_serve``): 8 clients, valid and invalid requests."""
    from .soak_serve import soak

    summary = soak(seconds=20, clients=8)
    shown = {k: summary.get(k) for k in ("status_counts", "5xx_or_dropped", "rss_bounded", "server_rss_mb")}
    assert summary["passed"], f"{shown} failures: {summary.get('failures', [])[:5]}"


def test_openai_client_through_ray_serve(server, sdxl_dir):
    """The one Ray end-to-end run of the client APIs (the others run without Ray: test_apis.py)."""
    import openai

    from seg_rt.pipeline import load_pipeline

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a cat", size="64x64", extra_body={"seed": 3, "steps": 3})
    with one_thread():  # the replica computes with 1 thread
        solo = seg_rt.generate(load_pipeline(sdxl_dir, "cpu"), "a cat", seed=3, steps=3, height=64, width=64)
    assert np.array_equal(pixels(base64.b64decode(result.data[0].b64_json)), np.asarray(solo[0]))
    with urllib.request.urlopen(f"{server}/metrics", timeout=60) as r:
        metrics = r.read().decode()
    assert 'seg_rt_requests_total{route="/v1/images/generations",status="200"}' in metrics
