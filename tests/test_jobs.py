"""The job API in-process (no Ray, FastAPI's TestClient): lifecycle, queue position and progress,
cancellation (queued: never runs; running: stops at the next step, its batch neighbours' bytes
unchanged), the bounded queue, ownership by API key, results on disk across a restart."""

import base64
import io
import json
import threading
import time
from contextlib import contextmanager

import pytest
import requests
import torch
from fastapi.testclient import TestClient
from PIL import Image

from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app

from .live_server import live_server, torch_threads

K1, K2 = "key-one", "key-two"
BODY = {"prompt": "a cat", "seed": 5, "steps": 4, "height": 64, "width": 64}
WAIT = 900.0  # seconds: a bound for a stuck worker, not a speed check (CI machines are shared)


OPEN: list[ServingCore] = []


def make(pipe, tmp_path, **cfg):
    config = ServeConfig(model="tiny-sdxl", state_dir=str(tmp_path / "state"), **cfg)
    core = ServingCore(config, pipe)
    OPEN.append(core)
    return core, TestClient(build_app(core))


@pytest.fixture(autouse=True)
def _close_cores():
    """Each test's workers end with it (the cores share one pipeline: one sampler at a time)."""
    yield
    while OPEN:
        OPEN.pop().close()


@contextmanager
def sampling_held(core):
    """Hold the core's sampling lock: the worker takes a job and waits, the rest stay queued."""
    core._sampling.acquire()
    try:
        yield
    finally:
        core._sampling.release()


def until(check, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def status(c, job_id, **kw):
    r = c.get(f"/v1/jobs/{job_id}", **kw)
    assert r.status_code == 200, r.text
    return r.json()


def blocking(c, body, **kw):
    r = c.post("/v1/generate", json=body, **kw)
    assert r.status_code == 200, r.text
    return r.content


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode(), torch_threads(1):  # one thread, as a replica: no oversubscription
        yield


def test_lifecycle_queue_position_progress_and_the_blocking_bytes(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, max_batch_size=1)
    steps_seen: list[int] = []
    with sampling_held(core):
        first = c.post("/v1/jobs", json=BODY)
        assert first.status_code == 202 and first.headers["location"] == f"/v1/jobs/{first.json()['id']}"
        a = first.json()["id"]
        until(lambda: status(c, a)["status"] == "running")
        b = c.post("/v1/jobs", json=BODY | {"seed": 6}).json()["id"]
        d = c.post("/v1/jobs", json=BODY | {"seed": 7, "response": "json"}).json()["id"]
        sb, sd = status(c, b), status(c, d)
        assert (sb["status"], sb["queue_position"]) == ("queued", 0)
        assert (sd["status"], sd["queue_position"]) == ("queued", 1)
        assert status(c, a)["queue_position"] is None and status(c, a)["step"] == 0
        assert c.get(f"/v1/jobs/{a}/result").status_code == 409
        core.jobs.jobs[a].listeners.append(lambda j: steps_seen.append(j.done_steps))
    assert core.jobs.wait(core.jobs.jobs[d], WAIT)
    assert steps_seen == [1, 2, 3, 4, 4]  # progress after every step, then the end
    for job_id in (a, b, d):
        s = status(c, job_id)
        assert s["status"] == "succeeded" and (s["step"], s["total_steps"], s["progress"]) == (4, 4, 1.0)
        assert s["elapsed_seconds"] >= 0 and s["eta_seconds"] is None and s["error"] is None
    assert c.get(f"/v1/jobs/{a}/result").content == blocking(c, BODY)
    assert c.get(f"/v1/jobs/{b}/result").content == blocking(c, BODY | {"seed": 6})
    as_json = c.get(f"/v1/jobs/{d}/result").json()
    assert as_json["seeds"] == [7] and as_json["parameters"]["seed"] == 7
    ref = c.post("/v1/generate", json=BODY | {"seed": 7, "response": "json"}).json()
    assert as_json["images"] == ref["images"]
    listed = [j["id"] for j in c.get("/v1/jobs").json()["data"]]
    assert listed == [a, b, d]
    preview = c.get(f"/v1/jobs/{a}/preview")  # the family's latent -> RGB projection, no VAE
    assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size == (8, 8)


def test_cancel_a_queued_job_it_never_runs(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, max_batch_size=1)
    with sampling_held(core):
        a = c.post("/v1/jobs", json=BODY).json()["id"]
        until(lambda: status(c, a)["status"] == "running")
        b = c.post("/v1/jobs", json=BODY | {"seed": 9}).json()["id"]
        before = core.stats["images"]
        r = c.delete(f"/v1/jobs/{b}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert core.jobs.wait(core.jobs.jobs[a], WAIT)
    time.sleep(0.2)  # the worker had its chance to (wrongly) pick b up
    assert status(c, b)["status"] == "cancelled" and status(c, b)["step"] == 0
    assert core.stats["images"] - before == 1  # a's image only
    r = c.get(f"/v1/jobs/{b}/result")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_cancel_a_running_job_stops_it_and_its_batch_neighbours_are_unchanged(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, max_batch_size=4)
    bodies = [BODY | {"prompt": p, "seed": s} for p, s in (("a cat", 1), ("a dog", 2), ("a cow", 3))]
    with sampling_held(core):
        blocker = c.post("/v1/jobs", json=BODY | {"steps": 2}).json()["id"]
        until(lambda: status(c, blocker)["status"] == "running")
        ids = [c.post("/v1/jobs", json=b).json()["id"] for b in bodies]
        middle = core.jobs.jobs[ids[1]]
        middle.listeners.append(lambda j: j.done_steps == 2 and core.jobs.cancel(j.id, j.owner))
        runs = core.stats["sampling_runs"]
    for job_id in ids:
        assert core.jobs.wait(core.jobs.jobs[job_id], WAIT)
    assert core.stats["sampling_runs"] - runs == 2  # the blocker, then the three in one run
    s = status(c, ids[1])
    assert s["status"] == "cancelled" and s["step"] == 2  # stopped at the step it was cancelled in
    for job_id, body in ((ids[0], bodies[0]), (ids[2], bodies[2])):
        assert status(c, job_id)["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{job_id}/result").content == blocking(c, body)  # bit-equal to solo


def test_full_queue_is_429_with_retry_after(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, max_batch_size=1, jobs={"queue_length": 1})
    with sampling_held(core):
        a = c.post("/v1/jobs", json=BODY).json()["id"]
        until(lambda: status(c, a)["status"] == "running")
        assert c.post("/v1/jobs", json=BODY).status_code == 202
        r = c.post("/v1/jobs", json=BODY)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["detail"].startswith("the job queue is full (1 jobs)")
        bad = c.post("/v1/jobs", json=BODY | {"steps": 500})
        assert bad.status_code == 422 and "steps must be <= 50" in bad.json()["detail"]  # before queueing


def test_jobs_belong_to_the_key_that_created_them(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, api_keys=[K1, K2])
    h1, h2 = {"Authorization": f"Bearer {K1}"}, {"Authorization": f"Bearer {K2}"}
    assert c.post("/v1/jobs", json=BODY).status_code == 401
    job_id = c.post("/v1/jobs", json=BODY, headers=h1).json()["id"]
    for method, path in (("get", ""), ("get", "/result"), ("get", "/preview"), ("delete", "")):
        r = getattr(c, method)(f"/v1/jobs/{job_id}{path}", headers=h2)
        assert r.status_code == 404 and r.json()["detail"] == f"no job {job_id!r}"
    assert c.get("/v1/jobs", headers=h2).json()["data"] == []
    assert core.jobs.wait(core.jobs.jobs[job_id], WAIT)
    assert status(c, job_id, headers=h1)["status"] == "succeeded", status(c, job_id, headers=h1)
    assert c.get("/v1/jobs/../../etc/passwd", headers=h1).status_code == 404
    assert c.get("/v1/jobs/job_" + "0" * 32, headers=h1).status_code == 404


def test_restart_serves_finished_results_and_reports_interrupted_jobs_failed(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, max_batch_size=1)
    done = c.post("/v1/jobs", json=BODY).json()["id"]
    assert core.jobs.wait(core.jobs.jobs[done], WAIT)
    png = c.get(f"/v1/jobs/{done}/result").content
    with sampling_held(core):
        running = c.post("/v1/jobs", json=BODY | {"seed": 8}).json()["id"]
        until(lambda: status(c, running)["status"] == "running")
        queued = c.post("/v1/jobs", json=BODY | {"seed": 9}).json()["id"]
        core.jobs.store.release()  # the server process dies: its lock goes with it
        core.jobs._closed = True  # and its worker takes nothing more
        core.jobs._save = lambda job: None  # nor writes anything more
        _, c2 = make(sdxl, tmp_path)  # the restarted server, same state folder
        assert c2.get(f"/v1/jobs/{done}/result").content == png
        for job_id, was in ((running, "running"), (queued, "queued")):
            s = status(c2, job_id)
            assert s["status"] == "failed" and f"(it was {was})" in s["error"]
            r = c2.get(f"/v1/jobs/{job_id}/result")
            assert r.status_code == 503 and r.json()["detail"].startswith("job failed: the server stopped")


def test_retention_removes_old_results_only(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, jobs={"retention_s": 3600})
    job_id = c.post("/v1/jobs", json=BODY).json()["id"]
    assert core.jobs.wait(core.jobs.jobs[job_id], WAIT)
    folder = tmp_path / "state" / "jobs" / job_id
    assert (folder / "image-0.png").is_file(), (core.jobs.jobs[job_id].record(), list(folder.iterdir()))
    mine = tmp_path / "state" / "jobs" / "not-a-job"  # what seg-rt did not write stays
    mine.mkdir()
    core.jobs.prune()
    assert folder.is_dir()
    core.jobs.retention_s = 0.0
    core.jobs.prune()
    assert not folder.exists() and mine.is_dir()
    assert c.get(f"/v1/jobs/{job_id}").status_code == 404


# ---- progress: events, the web UI's progress and interrupt --------------------------------------


def test_events_stream_progress_previews_then_done(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path, jobs={"preview_every": 2})
    with sampling_held(core):
        job_id = c.post("/v1/jobs", json=BODY).json()["id"]
    events = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    names = [n for n, _ in events]
    assert names[-1] == "done" and events[-1][1]["status"] == "succeeded"
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    previews = [d for n, d in events if n == "preview"]
    assert previews and all(p["step"] in (1, 2, 4) for p in previews)
    Image.open(io.BytesIO(base64.b64decode(previews[0]["image"]))).verify()
    assert names.index("preview") < names.index("done")


def test_webuiapi_progress_during_a_blocking_txt2img_and_interrupt(sdxl, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    core, _ = make(sdxl, tmp_path, jobs={"preview_every": 1})
    app = build_app(core)
    seen = []
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))

        def at_step(job):
            if job.done_steps == 2 and not seen:
                seen.append(api.get_progress())

        def watch_live():  # the blocking request's watch appears once it is tracked
            try:
                until(lambda: core.jobs.live)
                next(iter(core.jobs.live.values())).listeners.append(at_step)
            finally:
                core._sampling.release()  # its sampling starts once the listener is attached

        core._sampling.acquire()  # (a Lock: the watcher releases it) the job waits for the listener
        watcher = threading.Thread(target=watch_live)
        watcher.start()
        result = api.txt2img(prompt="a cat", seed=5, steps=4, width=64, height=64, cfg_scale=5)
        watcher.join()
        assert len(result.images) == 1
        (progress,) = seen
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_step"] == 2
        assert progress["state"]["sampling_steps"] == 4 and progress["eta_relative"] >= 0
        Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).verify()
        idle = api.get_progress()
        assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0

        # interrupt: the running job stops at its next step
        with sampling_held(core):  # the job starts once its listener is attached
            job_id = requests.post(f"{url}/v1/jobs", json=BODY | {"steps": 6}).json()["id"]
            job = core.jobs.jobs[job_id]
            job.listeners.append(lambda j: j.done_steps == 2 and api.interrupt())
        assert core.jobs.wait(job, WAIT)
        assert job.status == "cancelled" and job.done_steps == 2


def test_other_servers_field_names_are_aliases_and_a_clash_is_422(sdxl, tmp_path):
    core, c = make(sdxl, tmp_path)
    r = c.post("/v1/jobs", json=BODY | {"true_cfg_scale": 4.0, "cfg": 3.0})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "request gives true_cfg_scale=4.0 and cfg=3.0: the same field spelled twice with different values"
    )
    same = {"prompt": "a", "num_inference_steps": 3, "true_cfg_scale": 2.5, "negative_prompt": "b", "seed": 1}
    with sampling_held(core):
        job_id = c.post("/v1/jobs", json=same).json()["id"]
        (row,) = core.jobs.jobs[job_id].rows
    assert (row.steps, row.cfg, row.negative_prompt, row.seed) == (3, 2.5, "b", 1)
