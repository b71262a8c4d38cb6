"""What a new user hit with ``seg-rt serve`` (#24 item 7), in-process (no Ray): a blocking request
whose client went away is cancelled at the next step and frees the server; the ``serving ... on``
line comes only once the server answers."""

import http.client
import http.server
import json
import socket
import threading
import time

import pytest
import torch

from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app

from .live_server import live_server, torch_threads
from .ray_helpers import free_port

BODY = {"prompt": "a cat", "seed": 5, "steps": 50, "height": 64, "width": 64}


def until(check, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_blocking_request_whose_client_went_away_is_cancelled(sdxl, tmp_path):
    core = ServingCore(ServeConfig(model="tiny-sdxl", state_dir=str(tmp_path)), sdxl)
    app = build_app(core)
    watches = []
    track = core.jobs.track

    def slow_track(rows):  # each step of the blocking request takes >= 50 ms: it outlasts the test
        watched = track(rows)
        watched.watch.listeners.append(lambda job: time.sleep(0.05))
        watches.append(watched.watch)
        return watched

    core.jobs.track = slow_track
    try:
        with torch.inference_mode(), torch_threads(1), live_server(app) as url:
            conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
            conn.request("POST", "/v1/generate", json.dumps(BODY), {"Content-Type": "application/json"})
            until(lambda: watches and watches[0].done_steps >= 2)
            (watch,) = watches
            conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-run
            conn.close()
            gone_at = watch.done_steps
            until(lambda: watch.cancelled, timeout=30)
            until(lambda: not core.jobs.live, timeout=30)  # its run ended: the replica is free
            assert watch.done_steps < BODY["steps"] and watch.done_steps <= gone_at + 20
            cancelled = core.metrics.registry.get_sample_value(
                "seg_rt_job_cancellations_total", {"state": "disconnected"}
            )
            assert cancelled == 1
            # a client that stays gets its image as before
            core.jobs.track = track
            conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
            conn.request(
                "POST", "/v1/generate", json.dumps(BODY | {"steps": 2}), {"Content-Type": "application/json"}
            )
            r = conn.getresponse()
            assert r.status == 200 and r.read()[:4] == b"\x89PNG"
    finally:
        core.close()


def test_a_cancelled_handler_cancels_its_rows(sdxl, tmp_path):
    """Ray Serve cancels the handler of a request whose client disconnected: its rows are
    cancelled too (the batch they are in goes on without them)."""
    import asyncio

    from seg_rt.cluster.serving.http import until_client_gone
    from seg_rt.cluster.serving.jobs import jobs_for
    from seg_rt.params import GenerationParams

    core = ServingCore(ServeConfig(model="tiny-sdxl", state_dir=str(tmp_path)), sdxl)
    try:
        watched = jobs_for(core).track([GenerationParams(steps=2)])

        async def main():
            started = asyncio.Event()

            async def batch():  # the batch the rows wait in
                started.set()
                await asyncio.sleep(30)

            handler = asyncio.ensure_future(until_client_gone(batch(), watched, core.jobs))
            await started.wait()
            handler.cancel()
            with pytest.raises(asyncio.CancelledError):
                await handler

        asyncio.run(main())
        assert watched.watch.cancelled
    finally:
        core.close()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v1/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_serving_line_only_once_the_server_answers(monkeypatch):
    """``serve_forever`` calls ``ready`` (the CLI's ``serving ... on http://...``) after /v1/health
    answers, not when the deployment is submitted; never when the server does not answer."""
    import seg_rt.cluster.jobs.driver as driver
    from seg_rt.cluster.serving import deployment

    port = free_port()
    config = ServeConfig(model="m", port=port)
    events: list[tuple[str, float]] = []
    servers = []

    def answer_later():
        time.sleep(0.5)
        server = http.server.HTTPServer(("127.0.0.1", port), _Health)
        servers.append(server)
        events.append(("answering", time.monotonic()))
        server.serve_forever(poll_interval=0.05)

    monkeypatch.setattr(driver, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(deployment.serve, "start", lambda **k: None)
    monkeypatch.setattr(deployment, "build_app", lambda args: None)
    monkeypatch.setattr(
        deployment.serve, "run", lambda *a, **k: threading.Thread(target=answer_later, daemon=True).start()
    )
    ready = lambda: events.append(("ready", time.monotonic()))  # noqa: E731
    try:
        deployment.serve_forever(config, blocking=False, ready=ready, answer_timeout_s=60)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert [name for name, _ in events] == ["answering", "ready"]
    # nothing answers: no ready line, one error naming the port
    monkeypatch.setattr(deployment.serve, "run", lambda *a, **k: None)
    events.clear()
    closed = free_port()
    with pytest.raises(RuntimeError, match=f"did not answer /v1/health on port {closed} within 0.5 s"):
        deployment.serve_forever(
            ServeConfig(model="m", port=closed), blocking=False, ready=ready, answer_timeout_s=0.5
        )
    assert events == []


def test_job_soak_short():
    """5 s of the job API's soak (``python -m tests.soak_serve --jobs``) in-process: 8 clients
    mixing blocking requests, polled and cancelled jobs, an img2img job (the cheaper of the soak's
    image jobs; the full soak adds inpainting) and invalid image jobs; no 5xx, no lost job, bytes
    equal solo, memory and the state folder bounded."""
    from .soak_serve import soak_jobs

    summary = soak_jobs(seconds=5, clients=8, in_process=True, image_jobs=1)
    shown = {k: v for k, v in summary.items() if k != "failures"}
    assert summary["passed"], f"{shown} failures: {summary['failures'][:5]}"
    assert summary["jobs_lost"] == 0 and summary["5xx_or_dropped"] == 0
    assert summary["image_job_bytes_equal_solo"] >= 1 and summary["invalid_own_4xx_and_message"] >= 1
