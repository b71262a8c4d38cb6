"""The job API's routes: ``POST /v1/jobs`` (202 + id), ``GET /v1/jobs``, ``GET /v1/jobs/{id}``,
``GET /v1/jobs/{id}/result``, ``GET /v1/jobs/{id}/preview``, ``DELETE /v1/jobs/{id}``.

A job's body is the ``POST /v1/generate`` body (``GenerateRequest``: every field the server takes,
checked by the same limits before it is queued). ``JobManager`` (``jobs.py``) holds the queue and
the results; this module only maps them onto HTTP. Jobs are the caller's own: the owner is a
digest of the API key sent (``owner``), another key's job is a 404.

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

import base64
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .core import ServingCore
from .jobs import Job, JobElsewhere, JobManager, JobNotFound, QueueFull
from .request import GenerateRequest, RequestFailed
from .video_request import VideoRequest
from .webhooks import check_url

MEDIA = {"png": "image/png", "mp4": "video/mp4"}  # a job's kind of one-file result


class JobRequest(GenerateRequest):
    """A job's body: every ``POST /v1/generate`` field, and ``webhook_url`` (called when the job
    ends; its host must be on the server's ``webhooks.allow_hosts``)."""

    webhook_url: str | None = None


class VideoJobRequest(VideoRequest):
    """A job's body on a server of a video model: every video field, and ``webhook_url``."""

    webhook_url: str | None = None


def router(core: ServingCore, jobs: JobManager, owner: Callable[[Request], str]) -> APIRouter:
    api = APIRouter(tags=["jobs"])

    def find(job_id: str, request: Request) -> Job:
        try:
            return jobs.get(job_id, owner(request))
        except JobNotFound:
            raise RequestFailed(404, f"no job {job_id!r}", "id") from None

    Body = VideoJobRequest if core.kind == "video" else JobRequest  # what the served model makes

    @api.post("/v1/jobs", status_code=202, response_model=None)
    def submit(req: Body, request: Request) -> JSONResponse:
        try:
            job = submit_job(core, jobs, req, owner(request), req.webhook_url)
        except QueueFull as exc:
            return queue_full(exc)
        return JSONResponse(jobs.view(job), 202, headers={"Location": f"/v1/jobs/{job.id}"})

    @api.get("/v1/jobs")
    def list_jobs(request: Request) -> dict:
        return {"object": "list", "data": [jobs.view(j) for j in jobs.owned(owner(request))]}

    @api.get("/v1/jobs/{job_id}")
    def status(job_id: str, request: Request) -> dict:
        return jobs.view(find(job_id, request))

    @api.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str, request: Request) -> dict:
        try:
            return jobs.view(jobs.cancel(job_id, owner(request)))
        except JobNotFound:
            raise RequestFailed(404, f"no job {job_id!r}", "id") from None
        except JobElsewhere as exc:
            raise RequestFailed(409, str(exc)) from None

    @api.get("/v1/jobs/{job_id}/result", response_model=None)
    def result(job_id: str, request: Request) -> Response | dict:
        job = find(job_id, request)
        return result_response(jobs, job)

    @api.get("/v1/jobs/{job_id}/preview", response_model=None)
    def preview(job_id: str, request: Request) -> Response:
        job = find(job_id, request)
        if job.preview_png is None:
            raise RequestFailed(
                404, f"job {job_id!r} has no preview yet (status {job.status}, step {job.done_steps})"
            )
        return Response(job.preview_png, media_type="image/png", headers={"X-Step": str(job.preview_step)})

    return api


def submit_job(core: ServingCore, jobs: JobManager, req, owner: str, webhook_url: str | None = None) -> Job:
    """Check and queue one request (``GenerateRequest`` or ``VideoRequest``): ``RequestFailed``
    (422) on bad input before it is queued, ``QueueFull`` past the queue length."""
    extra = {}
    if webhook_url is not None:
        try:
            extra["webhook_url"] = check_url(webhook_url, core.config.webhooks.allow_hosts)
        except ValueError as exc:
            raise RequestFailed(422, str(exc), "webhook_url") from None
    try:
        rows = core.check(req)
    except ValueError as exc:
        raise RequestFailed(422, str(exc)) from None
    if isinstance(req, VideoRequest):
        return jobs.submit(rows, owner, "mp4", req.record(), **extra)
    images = {k: getattr(req, k) for k in ("init_image", "mask") if getattr(req, k) is not None}
    body = req.model_dump(mode="json", exclude={"webhook_url", *images})  # images: by sha256
    body.update({k: image.record() for k, image in images.items()})
    return jobs.submit(rows, owner, req.response, body, **extra)


def queue_full(exc: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(exc.retry_after)})


def result_response(jobs: JobManager, job: Job) -> Response | dict:
    """A finished job's result as ``POST /v1/generate`` answers it (PNG, or JSON with base64
    images); a job that has not succeeded is an error naming its state."""
    if job.status == "failed":
        raise RequestFailed(job.error_status or 500, f"job failed: {job.error}")
    if job.status != "succeeded":
        step = f", step {job.done_steps}/{job.total_steps}" if job.status == "running" else ""
        raise RequestFailed(409, f"job {job.id} has no result: it is {job.status}{step}")
    try:
        files = jobs.result(job)
    except OSError:
        raise RequestFailed(410, f"job {job.id}'s result is no longer on the server") from None
    seeds = [row["seed"] for row in job.outputs]
    seconds = job.elapsed() or 0.0
    if job.kind in MEDIA:  # one file: the PNG or the mp4
        headers = {"X-Seed": str(seeds[0]), "X-Server-Seconds": f"{seconds:.4f}"}
        return Response(content=files[0], media_type=MEDIA[job.kind], headers=headers)
    return {
        "images": [base64.b64encode(f).decode() for f in files],
        "seeds": seeds,
        "parameters": job.outputs[0]["params"] | {"num_images": len(files)},
        "seconds": seconds,
    }
