"""Progress while sampling: server-sent events per job (``GET /v1/jobs/{id}/events``) and the
AUTOMATIC1111 web UI's ``/sdapi/v1/progress`` and ``/sdapi/v1/interrupt`` over the job manager.

Events (``text/event-stream``): ``progress`` (the job's status, as ``GET /v1/jobs/{id}``) after
each step, ``preview`` (``{"step", "image"}``: a base64 PNG) when a new preview is made, and a last
``done`` with the final status. The web UI's progress reports the job or blocking request sampling
now (``JobManager.current``): fraction done, ETA, its latest preview as ``current_image``;
``interrupt`` cancels it (a blocking web UI request then gets an error, its rows freed at once).

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .jobs import FINISHED, Job, JobManager, JobNotFound
from .request import RequestFailed


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def router(jobs: JobManager, owner: Callable[[Request], str]) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def events(job_id: str, request: Request) -> StreamingResponse:
        try:
            job = jobs.get(job_id, owner(request))
        except JobNotFound:
            raise RequestFailed(404, f"no job {job_id!r}", "id") from None
        return StreamingResponse(stream(jobs, job, request), media_type="text/event-stream")

    @api.get("/sdapi/v1/progress", tags=["AUTOMATIC1111 API"])
    def progress(skip_current_image: bool = False) -> dict:
        job = jobs.current()
        waiting = jobs.waiting()
        state = {
            "skipped": False,
            "interrupted": bool(job and job.cancelled),
            "job": job.id if job else "",
            "job_count": waiting + (job is not None),
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": job.done_steps if job else 0,
            "sampling_steps": job.total_steps if job else 0,
        }
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }
        fraction = job.done_steps / job.total_steps if job.total_steps else 0.0
        image = job.preview_png if not skip_current_image else None
        return {
            "progress": round(fraction, 4),
            "eta_relative": job.eta() or 0.0,
            "state": state,
            "current_image": base64.b64encode(image).decode() if image else None,
            "textinfo": f"step {job.done_steps}/{job.total_steps}",
        }

    @api.post("/sdapi/v1/interrupt", tags=["AUTOMATIC1111 API"])
    def interrupt() -> dict:
        job = jobs.current()
        if job is not None:
            if job.kind == "blocking":
                job.cancelled = True
                jobs.metrics.cancellations.labels(state="running").inc()
            else:
                jobs.cancel(job.id, job.owner)
        return {}

    return api


async def stream(jobs: JobManager, job: Job, request: Request):
    """The job's events until it is finished or the client goes away."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake(_job: Job) -> None:  # called from the worker thread
        loop.call_soon_threadsafe(changed.set)

    job.listeners.append(wake)
    try:
        sent_step, sent_preview = -1, 0
        while True:
            changed.clear()
            view = jobs.view(job)
            if job.status in FINISHED:
                yield _event("done", view)
                return
            if job.done_steps != sent_step:
                sent_step = job.done_steps
                yield _event("progress", view)
            if job.preview_png is not None and job.preview_step != sent_preview:
                sent_preview = job.preview_step
                image = base64.b64encode(job.preview_png).decode()
                yield _event("preview", {"step": sent_preview, "image": image})
            if await request.is_disconnected():
                return
            # a status change (queue position) without a step: look again now and then
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=1.0)
    finally:
        if wake in job.listeners:
            job.listeners.remove(wake)
