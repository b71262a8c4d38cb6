"""Webhooks against a loopback receiver: the signature verifies, a 500 is retried, a host outside
the allow-list is refused at submission and never called."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import torch
from fastapi.testclient import TestClient

from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.cluster.serving.webhooks import check_url

SECRET = "hush-hush"
BODY = {"prompt": "a cat", "seed": 5, "steps": 2, "height": 64, "width": 64}
WAIT = 900.0  # seconds: a bound for a stuck worker, not a speed check


class Receiver(BaseHTTPRequestHandler):
    got: ClassVar[list] = []
    answers: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.got.append((dict(self.headers), body))
        self.send_response(self.answers.pop(0) if self.answers else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.got, Receiver.answers = [], [500]  # the first delivery fails: retried
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


def test_webhook_signed_retried_and_only_to_allowed_hosts(sdxl, tmp_path, receiver):
    hooks = {"allow_hosts": ["127.0.0.1"], "secret": SECRET, "backoff_s": 0.01}
    core = ServingCore(ServeConfig(model="tiny-sdxl", state_dir=str(tmp_path), webhooks=hooks), sdxl)
    c = TestClient(build_app(core))
    try:
        for url, host in (("http://example.com/hook", "example.com"), ("http://localhost:1/x", "localhost")):
            r = c.post("/v1/jobs", json=BODY | {"webhook_url": url})
            assert r.status_code == 422 and r.json()["detail"] == (
                f"webhook_url host {host!r} is not allowed by the server (webhooks.allow_hosts: 127.0.0.1)"
            )
        assert c.post("/v1/jobs", json=BODY | {"webhook_url": "file:///etc/passwd"}).status_code == 422
        with torch.inference_mode():
            job_id = c.post("/v1/jobs", json=BODY | {"webhook_url": receiver}).json()["id"]
            assert core.jobs.wait(core.jobs.jobs[job_id], WAIT)
        deadline = time.monotonic() + WAIT
        while len(Receiver.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(Receiver.got) == 2  # the 500, then the retry; nothing for the refused hosts
        for headers, body in Receiver.got:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Seg-Rt-Signature"] == expected
        payload = json.loads(Receiver.got[1][1])
        assert payload["id"] == job_id and payload["status"] == "succeeded"
        assert payload["step"] == payload["total_steps"] == 2
        metrics = c.get("/metrics").text
        assert 'seg_rt_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
        assert 'seg_rt_webhook_deliveries_total{outcome="retried"} 1.0' in metrics
    finally:
        core.close()


def test_no_webhooks_without_an_allow_list():
    with pytest.raises(ValueError, match=r"webhooks.allow_hosts: none"):
        check_url("http://127.0.0.1/hook", [])
    with pytest.raises(ValueError, match="must not carry a user name"):
        check_url("http://u:p@127.0.0.1/hook", ["127.0.0.1"])


def test_serving_line_waits_until_the_server_answers(sdxl, tmp_path):
    from seg_rt.cluster.serving.deployment import wait_answering

    from .live_server import live_server
    from .ray_helpers import free_port

    closed = ServeConfig(model="m", port=free_port())
    assert not wait_answering(closed, timeout_s=0.5)  # nothing answers there: no "serving on" yet
    core = ServingCore(ServeConfig(model="tiny", state_dir=str(tmp_path)), sdxl)
    try:
        with live_server(build_app(core)) as url:
            assert wait_answering(ServeConfig(model="m", port=int(url.rsplit(":", 1)[1])), timeout_s=30)
    finally:
        core.close()
