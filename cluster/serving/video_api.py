"""Video over HTTP, OpenAI's Videos API shape on top of the job API: ``POST /v1/videos`` (queues a
job, answers the video object with ``status: queued``), ``GET /v1/videos`` (the caller's videos),
``GET /v1/videos/{id}`` (status and progress), ``GET /v1/videos/{id}/content`` (the mp4),
``DELETE /v1/videos/{id}`` (cancels a queued or running video, then removes it and its mp4;
OpenAI's ``{"id", "object": "video.deleted", "deleted": true}``).

Reference behaviour: the OpenAI API reference (Videos → Create video, Retrieve, Download content, Delete) as
the official ``openai`` client speaks it: ``client.videos.create(prompt=..., seconds="4",
size="64x64", extra_body={"steps": 10, "seg_mode": "spatial"})`` (a multipart form), then
``client.videos.retrieve(id)``, ``client.videos.download_content(id)`` and
``client.videos.delete(id)``. The one mapping onto
``VideoRequest`` (the video kind of the request field table) is ``to_video_request``: ``seconds`` →
``frames`` at the request's ``fps``, ``size`` → width × height, ``input_reference`` (an image file)
→ ``image`` (image-to-video); ``model`` is the served model, or one of OpenAI's own video models
(an alias of it); every other field is a seg-rt video field by its table name or alias.
A video is a job (``/v1/jobs/{id}`` sees it too): the same queue, limits, owner and results on disk.
Status: ``queued``, ``in_progress``, ``completed``, ``failed`` (a cancelled job is ``failed`` with
code ``cancelled``); errors in OpenAI's shape.

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

import base64
import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from seg_rt.params import VideoParams

from . import openai_api
from .core import ServingCore
from .job import Job, JobElsewhere, JobNotFound, QueueFull
from .jobs import JobManager
from .jobs_api import result_response, submit_job
from .request import ECHO_CHARS, ErrorShape, RequestFailed, shown
from .video_request import make_video_request

ERRORS = ErrorShape(("/v1/videos",), openai_api.error_body, challenge="Bearer")
OPENAI_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
# OpenAI's own video models (the openai client's VideoModel names): aliases of the served model
OPENAI_VIDEO_MODELS = (
    "sora-2",
    "sora-2-pro",
    "sora-2-2025-10-06",
    "sora-2-pro-2025-10-06",
    "sora-2-2025-12-08",
)
STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "failed",
}


def frames_of(seconds: Any, fps: int) -> int:
    """OpenAI's ``seconds`` (a string such as ``"4"``, or a number) as frames at ``fps``."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(seconds, bool) or not math.isfinite(value) or value <= 0:
        raise RequestFailed(422, f"seconds must be a number > 0, got {shown(seconds)}", "seconds")
    return max(1, round(value * fps))


def to_video_request(body: dict, served_model: str):
    """This API's one mapping onto ``VideoRequest`` (``RequestFailed`` naming the field)."""
    model = body.get("model")
    if model not in (None, served_model, *OPENAI_VIDEO_MODELS):
        raise RequestFailed(
            404,
            f"model {shown(model)} does not exist; this server serves {served_model!r} "
            f"(OpenAI's {', '.join(OPENAI_VIDEO_MODELS[:2])}, ... are accepted as its aliases)",
            "model",
        )
    if not isinstance(body.get("prompt"), str):
        raise RequestFailed(422, "prompt: a text prompt is required", "prompt")
    fields = {k: v for k, v in body.items() if k not in OPENAI_FIELDS}
    fields["prompt"] = body["prompt"]
    if body.get("size") is not None:
        match = openai_api.SIZE.fullmatch(str(body["size"]))
        if not match:
            raise RequestFailed(
                422, f"size must be 'WIDTHxHEIGHT' (e.g. '64x64'), got {shown(body['size'])}", "size"
            )
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    if body.get("seconds") is not None:
        fps = fields.get("fps", VideoParams().fps)
        try:
            fps = int(fps)
        except (TypeError, ValueError):
            fps = VideoParams().fps  # the field's own check names a bad fps below
        frames = frames_of(body["seconds"], fps)
        if fields.get("frames") not in (None, frames, str(frames)):
            raise RequestFailed(
                422,
                f"seconds={body['seconds']} is {frames} frames at {fps} fps, but frames={shown(fields['frames'])}: "
                "give one of them",
                "frames",
            )
        fields["frames"] = frames
    if body.get("input_reference") is not None:
        fields["image"] = body["input_reference"]
    return make_video_request(fields)


async def read_body(request: Request) -> dict:
    """A JSON body, or a form (the ``openai`` client sends one): files become base64 text."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        body: dict = {}
        for key, value in form.multi_items():
            if key in body:
                raise RequestFailed(422, f"{key[:ECHO_CHARS]} is given twice", key[:ECHO_CHARS])
            body[key] = value if isinstance(value, str) else base64.b64encode(await value.read()).decode()
        return body
    try:
        body = await request.json()
    except ValueError:
        raise RequestFailed(422, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestFailed(422, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def video_object(jobs: JobManager, job: Job, served_model: str) -> dict:
    """OpenAI's video object for a job, plus seg-rt's own progress fields."""
    p = job.rows[0]
    fps = p.video.fps if p.video is not None else VideoParams().fps
    frames = p.video.frames if p.video is not None else 0
    view = jobs.view(job)
    error = None
    if job.status == "failed":
        error = {"code": "generation_failed", "message": job.error or "failed"}
    elif job.status == "cancelled":
        error = {"code": "cancelled", "message": "the video was cancelled"}
    finished = int(job.finished) if job.finished else None
    return {
        "id": job.id,
        "object": "video",
        "model": served_model,
        "status": STATUS[job.status],
        "progress": round(100 * view["progress"]),
        "created_at": int(job.created),
        "completed_at": finished if job.status == "succeeded" else None,
        "expires_at": int(job.finished + jobs.retention_s) if job.status == "succeeded" else None,
        "prompt": p.prompt,
        "seconds": f"{frames / fps:g}",
        "size": f"{p.width}x{p.height}",
        "remixed_from_video_id": None,
        "error": error,
        # seg-rt's own: where the job stands (as GET /v1/jobs/{id})
        "queue_position": view["queue_position"],
        "step": view["step"],
        "total_steps": view["total_steps"],
        "eta_seconds": view["eta_seconds"],
        "frames": frames,
        "fps": fps,
        "seed": p.seed,
    }


def router(core: ServingCore, jobs: JobManager, owner: Callable[[Request], str]) -> APIRouter:
    api = APIRouter(tags=["OpenAI Videos API"])
    name = core.config.public_model

    def find(video_id: str, request: Request) -> Job:
        try:
            job = jobs.get(video_id, owner(request))
        except JobNotFound:
            job = None
        if job is None or job.kind != "mp4":
            raise RequestFailed(404, f"no video {video_id!r}", "video_id")
        return job

    @api.post("/v1/videos")
    async def create(request: Request) -> Any:
        if core.kind != "video":
            raise RequestFailed(422, core.wrong_kind(), "model")
        req = to_video_request(await read_body(request), name)
        try:
            job = submit_job(core, jobs, req, owner(request))
        except QueueFull as exc:
            _, body = openai_api.error_body(429, str(exc), None)
            return JSONResponse(body, 429, headers={"Retry-After": str(exc.retry_after)})
        return video_object(jobs, job, name)

    @api.get("/v1/videos")
    def list_videos(request: Request) -> dict:
        videos = [video_object(jobs, j, name) for j in jobs.owned(owner(request)) if j.kind == "mp4"]
        return {"object": "list", "data": videos, "has_more": False}

    @api.get("/v1/videos/{video_id}")
    def retrieve(video_id: str, request: Request) -> dict:
        return video_object(jobs, find(video_id, request), name)

    @api.delete("/v1/videos/{video_id}")
    def delete(video_id: str, request: Request) -> dict:
        job = find(video_id, request)
        try:
            jobs.delete(job.id, owner(request))  # a queued or running one is cancelled first
        except JobNotFound:
            raise RequestFailed(404, f"no video {video_id!r}", "video_id") from None
        except JobElsewhere as exc:
            raise RequestFailed(409, str(exc), "video_id") from None
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @api.get("/v1/videos/{video_id}/content", response_model=None)
    def content(video_id: str, request: Request, variant: str = "video") -> Response:
        if variant != "video":
            raise RequestFailed(422, f"variant must be 'video' (the mp4), got {shown(variant)}", "variant")
        return result_response(jobs, find(video_id, request))

    return api
