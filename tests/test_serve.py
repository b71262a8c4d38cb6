"""The Ray Serve app on a tiny model: real HTTP on loopback, batching, equality, 422 and 503."""

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import seg_rt
from seg_rt.cli import main
from seg_rt.cluster.jobs.driver import refresh_ray_auth, start_ray

from .ray_helpers import free_port, kill_ray_under, short_temp_dir
from .sockets import listening, not_on_loopback, tree

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
    temp, port = short_temp_dir(), free_port()
    saved = {
        k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_enable_metrics_collection")
    }
    start_ray(None, num_cpus=4, temp_dir=temp)  # seg-rt's own private Ray, as seg-rt serve starts it
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
    for key, value in saved.items():  # start_ray's settings (token, no metrics) end with this cluster
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    refresh_ray_auth()


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


def test_serve_and_its_ray_listen_on_loopback_only(server):
    """docs/security.md (#27 item 2): every socket that seg-rt's own Ray (gcs_server, raylet, the
    agents, the Serve controller / proxy / replicas, the workers) and this driver listen on, listed
    from the OS, is on loopback; the agent's metrics exporter is off."""
    pids = [p.pid for p in tree(os.getpid())]
    sockets = listening(pids)
    port = int(server.rsplit(":", 1)[1])
    assert any(s[3] == port for s in sockets), sockets  # the listing is real: Serve's HTTP port
    names = " ".join(s[1] for s in sockets)
    assert "gcs_server" in names and "raylet" in names and "ServeReplica" in names, sockets
    # the one exception (docs/security.md): each Serve replica's inter-deployment gRPC server, which
    # Ray Serve binds to [::]:0 in code (ray/serve/_private/replica.py), behind Ray's token auth
    wide = not_on_loopback(pids)
    replicas = [s for s in wide if "ServeReplica" in s[1] and s[2] == "::"]
    assert wide == replicas and len(replicas) == len({s[0] for s in replicas}), wide


def metric(server: str, name: str, **labels: str) -> float:
    """One sample's value on the app's ``/metrics`` (0 when it has none yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server}/metrics", timeout=60) as r:
        text = r.read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_blocking_request_whose_client_went_away_is_cancelled_through_ray_serve(server):
    """#24 item 7 end to end: a 50-step blocking request (4 images of 256x256: about 30 s of the
    replica's one CPU) whose client closes its socket after the first step is cancelled through
    Ray Serve's proxy (the replica's handler is cancelled, its rows leave the run at the next step):
    the disconnect counter rises by one, its run ends with no image made (uncancelled it would add 4),
    and the replica answers the next request."""
    body = {"prompt": "a long one", "seed": 21, "steps": 50, "height": 256, "width": 256}
    body |= {"num_images": 4, "response": "json"}
    gone = metric(server, "seg_rt_job_cancellations_total", state="disconnected")
    before = get(f"{server}/v1/info")["stats"]
    port = int(server.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    head = f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    progress = f"{server}/sdapi/v1/progress?skip_current_image=true"
    deadline = time.monotonic() + 300  # a bound for a stuck server, not a speed check
    while (state := get(progress)["state"])["sampling_step"] < 1 or state["sampling_steps"] != 50:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    job, steps = state["job"], [state["sampling_step"]]
    sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-run
    sock.close()
    # until the run has ended (the replica counts a request when its run returns)
    while get(f"{server}/v1/info")["stats"]["requests"] < before["requests"] + 1:
        assert time.monotonic() < deadline, "the abandoned request's run did not end"
        if (state := get(progress)["state"])["job"] == job:
            steps.append(state["sampling_step"])
        time.sleep(0.05)
    after = get(f"{server}/v1/info")["stats"]
    assert metric(server, "seg_rt_job_cancellations_total", state="disconnected") == gone + 1
    assert after["images"] == before["images"] and after["sampling_runs"] == before["sampling_runs"]
    assert max(steps) < body["steps"], steps
    status, raw, _ = post(f"{server}/v1/generate", {"prompt": "a cat", "seed": 3, "steps": 2})
    assert status == 200 and raw[:4] == b"\x89PNG"  # the replica is free
    assert get(f"{server}/v1/info")["stats"]["images"] == before["images"] + 1


def _raw_post(url: str, size: int, chunked: bool) -> tuple[int, bytes]:
    """POST ``size`` bytes as most clients do (send it all, then read the answer)."""
    port = int(url.rsplit(":", 1)[1])
    head = f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
    piece = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head.encode())
        for _ in range(size // len(piece)):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        reply = http.client.HTTPResponse(s)
        reply.begin()
        return reply.status, reply.read()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_a_413_a_sending_client_sees_through_the_proxy(server, chunked):
    """#27 item 9: 8 MB (past the kernel's loopback buffers, so the client is still sending when
    the limit is passed) through Ray Serve's proxy: the client reads the 413, not a reset."""
    status, body = _raw_post(server, 8 * 2**20, chunked)
    assert status == 413 and "request body must be <= 1000000 bytes" in body.decode()


def test_run_on_a_joined_cluster_that_can_never_hold_a_worker_fails_at_once(server, sdxl_dir, tmp_path):
    """#27 item 7: ``seg-rt run --address`` (run_job with an address) asking 64 GPUs of a cluster of
    ``ray start`` nodes (no autoscaler config): one line well before the 250 s start timeout."""
    import ray

    from seg_rt.cluster.jobs.driver import run_job
    from seg_rt.cluster.jobs.spec import parse_job
    from seg_rt.errors import EnvironmentUnavailable

    spec = parse_job({"model": str(sdxl_dir), "prompts": ["a"], "output": str(tmp_path / "o"),
                      "resources_per_worker": {"num_gpus": 64}})  # fmt: skip
    address = ray.get_runtime_context().gcs_address
    t0 = time.monotonic()
    with pytest.raises(EnvironmentUnavailable) as exc:
        run_job(spec, tmp_path, address=address, progress=False, start_timeout=250)
    assert time.monotonic() - t0 < 30
    assert f"num_gpus=64 and no node of the cluster at {address} has that much" in str(exc.value)
    assert "no autoscaler" in str(exc.value) and "\n" not in str(exc.value)
