"""OpenAI's streamed image generation: ``POST /v1/images/generations`` with ``stream: true`` and
``partial_images`` (0-3) answers server-sent events in OpenAI's shape: ``partial_images`` events
``image_generation.partial_image`` (the family's cheap previews, evenly spaced over the steps),
then one ``image_generation.completed`` with the final PNG. The request runs as a job (queue,
limits, batching with other jobs); a client that goes away cancels it at the next step.

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

import asyncio
import base64
import contextlib
import json
import time

from fastapi.responses import StreamingResponse

from .core import ServingCore
from .jobs import FINISHED, JobManager, QueueFull
from .request import GenerateRequest, RequestFailed

MAX_PARTIAL_IMAGES = 3  # OpenAI's range: 0-3


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def streamed(
    core: ServingCore, jobs: JobManager, gen: GenerateRequest, partial_images, request
) -> StreamingResponse:
    """Queue ``gen`` as a job and stream its partial images and result (``RequestFailed`` on bad input)."""
    if (
        not isinstance(partial_images, int)
        or isinstance(partial_images, bool)
        or not 0 <= partial_images <= 3
    ):
        raise RequestFailed(
            422,
            f"partial_images must be an integer 0-{MAX_PARTIAL_IMAGES}, got {partial_images!r}",
            "partial_images",
        )
    if gen.num_images != 1:
        raise RequestFailed(422, f"stream: true takes n = 1, got {gen.num_images}", "n")
    try:
        rows = core.check(gen)
    except ValueError as exc:
        raise RequestFailed(422, str(exc)) from None
    try:
        job = jobs.submit(rows, "", "png", {"stream": True})
    except QueueFull as exc:
        raise RequestFailed(429, str(exc)) from None
    every = max(1, rows[0].steps // (partial_images + 1))
    job.preview_every = every if partial_images else 0
    size = f"{rows[0].width}x{rows[0].height}"
    common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": size}

    async def events():
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        job.listeners.append(lambda _j: loop.call_soon_threadsafe(changed.set))
        sent, last_step = 0, 0
        try:
            while True:
                changed.clear()
                step = job.preview_step
                if job.preview_png and step != last_step and step % every == 0 and sent < partial_images:
                    last_step = step
                    yield _event("image_generation.partial_image", common | {
                        "type": "image_generation.partial_image", "b64_json": base64.b64encode(job.preview_png).decode(),
                        "created_at": int(time.time()), "partial_image_index": sent})  # fmt: skip
                    sent += 1
                if job.status in FINISHED:
                    break
                if await request.is_disconnected():
                    return
                with contextlib.suppress(TimeoutError):  # look again now and then
                    await asyncio.wait_for(changed.wait(), timeout=1.0)
            if job.status != "succeeded":
                message = job.error or f"the request was {job.status}"
                yield _event(
                    "error", {"type": "error", "error": {"message": message, "type": "server_error"}}
                )
                return
            png = jobs.result(job)[0]
            yield _event("image_generation.completed", common | {
                "type": "image_generation.completed", "b64_json": base64.b64encode(png).decode(),
                "created_at": int(time.time()),
                "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}})  # fmt: skip
        finally:
            if job.status not in FINISHED:  # the client went away: free its slot
                jobs.cancel(job.id, job.owner)

    return StreamingResponse(events(), media_type="text/event-stream")
