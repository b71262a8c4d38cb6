"""Video over HTTP on the bundled demo video model (no Ray): the official ``openai`` client's
``videos.create`` / ``retrieve`` / ``download_content`` / ``delete`` against a loopback server, the mp4 equal
to the same request encoded from ``generate_video`` run alone; the Videos API's refusals; a video
job through ``/v1/jobs``; ``seg-rt serve --model seg-rt-demo-video``."""

import io
import time

import av
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.demo.video_model import video_weights_dir
from seg_rt.params import request_from_fields
from seg_rt.video.io import mp4_bytes
from seg_rt.video.sampling import generate_video

from .live_server import live_server, torch_threads

KEY = "video-key"
PROMPT = "red square moving right on plain"
FIELDS = {"steps": 2, "seg_mode": "spatial", "seed": 3}  # spatial: cheap on CPU
WAIT = 600.0  # a bound for a stuck worker, not a speed check


@pytest.fixture(scope="module")
def vpipe():
    from seg_rt.pipeline import load_pipeline

    return load_pipeline(video_weights_dir(), "cpu")


@pytest.fixture
def vcore(vpipe, tmp_path):
    config = ServeConfig(
        model=str(video_weights_dir()), state_dir=str(tmp_path / "state"), api_keys=[KEY, "other"]
    )
    core = ServingCore(config, vpipe)
    yield core
    core.close()


def solo_mp4(pipe, **fields) -> bytes:
    """The same request generated alone and encoded as the server does (mp4 at the request's fps)."""
    p = request_from_fields({"prompt": PROMPT, **fields}, "video")
    return mp4_bytes(generate_video(pipe, params=p)[0], fps=p.video.fps)


def test_openai_client_creates_polls_and_downloads_a_video(vcore, vpipe):
    openai = pytest.importorskip("openai")
    assert hasattr(openai.OpenAI(api_key="x", base_url="http://127.0.0.1/v1").videos, "download_content")
    with torch.inference_mode(), torch_threads(1), live_server(build_app(vcore)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        # seconds 0.25 at the default 8 fps: 2 frames; the rest are seg-rt's video fields
        video = client.videos.create(
            prompt=PROMPT, model="sora-2", seconds="0.25", size="32x32", extra_body=FIELDS
        )
        assert video.status == "queued" and video.object == "video" and video.model == "seg-rt-demo-video"
        deadline = time.monotonic() + WAIT
        while (video := client.videos.retrieve(video.id)).status in ("queued", "in_progress"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert video.status == "completed" and video.progress == 100, video
        assert (video.seconds, video.size) == ("0.25", "32x32")
        data = client.videos.download_content(video.id).content
        listed = client.videos.list()
        assert [v.id for v in listed.data] == [video.id]
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="other", max_retries=0).videos.retrieve(video.id)
        ref = solo_mp4(vpipe, frames=2, height=32, width=32, **FIELDS)
        # delete: another key's video and an unknown id are 404s in OpenAI's shape; then it is gone
        for other, video_id in (("other", video.id), (KEY, "video_" + "0" * 32)):
            with pytest.raises(openai.NotFoundError) as missing:
                openai.OpenAI(base_url=f"{url}/v1", api_key=other, max_retries=0).videos.delete(video_id)
            error = missing.value.body
            assert error["message"] == f"no video {video_id!r}" and error["param"] == "video_id", error
            assert error["type"] == "invalid_request_error" and error["code"] is None, error
        folder = vcore.jobs.root / video.id
        assert folder.is_dir()
        deleted = client.videos.delete(video.id)
        assert isinstance(deleted, openai.types.VideoDeleteResponse)
        assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
        assert not folder.exists() and client.videos.list().data == []  # the mp4 and record too
        for call in (client.videos.retrieve, client.videos.download_content, client.videos.delete):
            with pytest.raises(openai.NotFoundError):
                call(video.id)
    assert data[4:8] == b"ftyp" and data == ref  # the same bytes as the request run alone
    frames = [f.to_ndarray(format="rgb24") for f in av.open(io.BytesIO(data)).decode(video=0)]
    assert len(frames) == 2 and frames[0].shape == (32, 32, 3)


def test_deleting_a_running_and_a_queued_video_cancels_them(vcore):
    """``videos.delete`` of a running video stops it within a step and removes it; of a queued
    one, it never runs."""
    openai = pytest.importorskip("openai")
    steps = 30
    with torch.inference_mode(), torch_threads(1), live_server(build_app(vcore)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        body = {**FIELDS, "steps": steps}
        running = client.videos.create(prompt=PROMPT, seconds="0.25", size="32x32", extra_body=body)
        job = vcore.jobs.jobs[running.id]
        job.listeners.append(lambda j: time.sleep(0.05))  # each step >= 50 ms: it outlasts the test
        deadline = time.monotonic() + WAIT
        while job.done_steps < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = client.videos.create(prompt=PROMPT, seconds="0.25", size="32x32", extra_body=body)
        assert client.videos.retrieve(queued.id).status == "queued"  # the one worker is busy
        for video in (queued, running):
            deleted = client.videos.delete(video.id)
            assert (deleted.id, deleted.deleted) == (video.id, True)
            with pytest.raises(openai.NotFoundError):
                client.videos.retrieve(video.id)
        stopped_at = job.done_steps
        assert vcore.jobs.wait(job, WAIT) and job.status == "cancelled"
        assert job.done_steps <= stopped_at + 1 < steps  # it stopped at its next step
        gone = vcore.jobs.jobs.get(queued.id)
        assert gone is None and not (vcore.jobs.root / queued.id).exists()
        assert not (vcore.jobs.root / running.id).exists() and running.id not in vcore.jobs.jobs
        cancelled = {
            state: vcore.metrics.registry.get_sample_value("seg_rt_job_cancellations_total", {"state": state})
            for state in ("queued", "running")
        }
        assert cancelled == {"queued": 1, "running": 1} and client.videos.list().data == []


def test_videos_api_refusals_and_the_job_api_on_a_video_model(vcore, sdxl, tmp_path):
    h = {"Authorization": f"Bearer {KEY}"}
    c = TestClient(build_app(vcore))
    for body, status, param, text in (
        ({"prompt": "a", "seconds": 1, "frames": 3}, 400, "frames", "seconds=1 is 8 frames at 8 fps"),
        ({"prompt": "a", "colour": "red"}, 400, "colour", "colour: Extra inputs are not permitted"),
        ({"prompt": "a", "seconds": "soon"}, 400, "seconds", "seconds must be a number > 0"),
        ({"prompt": "a", "size": "big"}, 400, "size", "size must be 'WIDTHxHEIGHT'"),
        ({"prompt": "a", "frames": 500}, 400, None, "frames must be <= 128, got 500"),
        ({"prompt": "a", "model": "gpt-4o"}, 404, "model", "model 'gpt-4o' does not exist"),
        ({"prompt": "a", "guidance_scale": 4, "cfg": 3}, 400, None, "the same field spelled twice"),
    ):
        r = c.post("/v1/videos", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert text in error["message"] and (param is None or error["param"] == param), error
    assert c.post("/v1/videos", json={"prompt": "a"}).status_code == 401
    r = c.post("/v1/generate", json={"prompt": "a"}, headers=h)
    assert r.status_code == 422 and "is a video model: POST /v1/videos" in r.json()["detail"]
    # a video job through the job API: the same fields, the mp4 as its result
    with torch.inference_mode(), torch_threads(1):
        body = {"prompt": PROMPT, "frames": 2, "num_inference_steps": 2, "seg_mode": "spatial", "seed": 4}
        r = c.post("/v1/jobs", json=body, headers=h)
        assert r.status_code == 202, r.text
        job = vcore.jobs.jobs[r.json()["id"]]
        assert vcore.jobs.wait(job, WAIT) and job.status == "succeeded", job.error
        result = c.get(f"/v1/jobs/{job.id}/result", headers=h)
        assert result.headers["content-type"] == "video/mp4"
        assert c.get(f"/v1/videos/{job.id}/content", headers=h).content == result.content
        ref = solo_mp4(vcore.pipe, frames=2, steps=2, seg_mode="spatial", seed=4)
        assert result.content == ref
        reloaded = vcore.jobs._load(job.id)  # as a restarted server reads it back
        assert reloaded.kind == "mp4" and reloaded.rows == job.rows
    # an image server refuses videos with the line that says what to serve
    image = ServingCore(ServeConfig(model="tiny-sdxl", state_dir=str(tmp_path / "img")), sdxl)
    try:
        r = TestClient(build_app(image)).post("/v1/videos", json={"prompt": "a"})
        assert r.status_code == 400 and "is an image model: video needs a video model" in r.text
    finally:
        image.close()


def test_serve_cli_takes_the_demo_video_model_by_name(monkeypatch, capsys):
    import seg_rt.cluster.serving.deployment as deployment
    from seg_rt.cli import main

    seen = {}
    monkeypatch.setattr(deployment, "serve_forever", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    assert main(["serve", "--model", "seg-rt-demo-video"]) == 0
    cfg = seen["cfg"]
    assert cfg.model == str(video_weights_dir()) and cfg.public_model == "seg-rt-demo-video"
    assert np.isfinite(cfg.limits.max_frames)
