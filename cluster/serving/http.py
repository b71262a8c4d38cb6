"""The HTTP side of one replica: error shapes, API keys and the body limit (ASGI middleware), the FastAPI app.

``build_app`` serves ``/v1/generate``, ``/v1/health``, ``/v1/info``, the OpenAI Images API
(``openai_api``), the AUTOMATIC1111 API (``a1111_api``), the playground at ``/`` (``playground.html``)
and Prometheus metrics at ``/metrics`` (``metrics``); every route generates through one ``producer``
over the core's limits, batching and records. Errors come in the shape of the API that owns the path.

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations as classes.
"""

import asyncio
import base64
import binascii
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from functools import partial
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest

from seg_rt.params import GenerationParams

from . import a1111_api, docs_page, guard, jobs_api, openai_api, openai_stream, progress_api, video_api
from .core import Failure, ServingCore
from .jobs import jobs_for, owner_of
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import MetricsMiddleware
from .request import (
    INPUT_PIXELS,
    ErrorShape,
    GenerateRequest,
    Producer,
    RequestFailed,
    capped,
    validation_lines,
)

# answered without an API key: health (load balancers, Serve's own probes) and the playground page
# (static HTML; the page asks for the key and sends it with each request)
OPEN_PATHS = ("/v1/health", "/", "/docs")  # /docs: a page that sends the key itself (docs_page)
PLAYGROUND = Path(__file__).with_name("playground.html")
# whether the client of the HTTP request being answered has gone (set per request by RequestGuard):
# a blocking request whose client went away is cancelled (``producer``)
CLIENT_GONE: ContextVar[Callable[[], Awaitable[bool]] | None] = ContextVar("client_gone", default=None)
GONE_POLL_S = 0.25  # how often a blocking request looks whether its client is still there


class GenerateResponse(BaseModel):
    images: list[str]  # base64 PNG
    seeds: list[int]
    parameters: dict
    seconds: float


def _detail_body(status: int, message: str, param: str | None) -> tuple[int, dict]:
    return status, {"detail": message}


NATIVE_ERRORS = ErrorShape((), _detail_body)  # /v1/generate, /v1/info, ... and unknown paths
AUTH_HINTS = {
    "Bearer": "missing or wrong API key (Authorization: Bearer KEY)",
    "Basic": "missing or wrong API key (HTTP Basic auth with the key as password, or Authorization: Bearer KEY)",
}


def shape_for(shapes: Sequence[ErrorShape], path: str) -> ErrorShape:
    return next((s for s in shapes if path.startswith(s.prefixes)), NATIVE_ERRORS)


def error_response(
    shapes: Sequence[ErrorShape], path: str, status: int, message: str, param: str | None = None
) -> JSONResponse:
    """The error answer in the shape of the API that owns ``path``."""
    shape = shape_for(shapes, path)
    code, body = shape.body(status, capped(message), param)
    headers = {"www-authenticate": shape.challenge} if status == 401 else None
    return JSONResponse(body, status_code=code, headers=headers)


def _credentials(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a client sent: ``Authorization: Bearer KEY`` (OpenAI clients, ours) or HTTP Basic
    with the key as password and any user name (AUTOMATIC1111 clients, e.g. webuiapi's ``set_auth``)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
            if scheme.lower() == b"basic":
                try:
                    user_pass = base64.b64decode(token.strip(), validate=True)
                except (binascii.Error, ValueError):
                    return None
                _user, colon, password = user_pass.partition(b":")
                return password if colon else None
            return None
    return None


def key_matches(token: bytes | None, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every key (no early exit on the first match)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token or b"", key.encode())
    return ok and bool(token)


def _path(scope) -> str:
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


# An over-limit body up to this size is read and dropped before the 413 is sent: a client still
# sending (most HTTP libraries send the whole body before reading) would otherwise get its
# connection reset, through Ray Serve's proxy too, and never see the status. Past it, or with
# ``Expect: 100-continue`` (the client waits for a go-ahead), the 413 goes out before the body is read.
DRAIN_BYTES = 16 * 2**20


def _expects_continue(headers) -> bool:
    return any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in headers)


async def _drain(receive, budget: int = DRAIN_BYTES) -> None:
    """Read and drop the rest of the request body, at most ``budget`` more bytes."""
    seen = 0
    while seen <= budget:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class RequestGuard:
    """ASGI middleware: API keys and the body-size limit, before any route reads or parses the body.

    Starlette offers neither: its request-size handling is left to the server, and Ray Serve's
    proxy passes bodies through. ``Content-Length`` over the limit is refused at once; a body sent
    without one (chunked) is counted as it streams and refused when it passes the limit. Refusals
    come in the error shape of the API that owns the path. It also sets the request's input-image
    pixel limit (``request.INPUT_PIXELS``) that the body's image fields are decoded under."""

    def __init__(
        self,
        app,
        *,
        api_keys: Sequence[str],
        max_body_bytes: int,
        shapes: Sequence[ErrorShape] = (),
        input_pixels: int | None = None,
    ) -> None:
        self.app = app
        self.api_keys = list(api_keys)
        self.max_body_bytes = max_body_bytes
        self.shapes = list(shapes)
        self.input_pixels = input_pixels

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _path(scope)
        headers = scope.get("headers", [])
        if self.api_keys and path not in OPEN_PATHS and not key_matches(_credentials(headers), self.api_keys):
            hint = AUTH_HINTS[shape_for(self.shapes, path).challenge]
            return await self._reply(send, path, 401, hint)
        limit = self.max_body_bytes
        length = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit() and int(length) <= DRAIN_BYTES and not _expects_continue(headers):
                await _drain(receive)  # the client still sending would otherwise see a reset, not the 413
            return await self._reply(
                send, path, 413, f"request body must be <= {limit} bytes, got {length.decode()}"
            )
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_BYTES - seen)
                    raise HTTPException(413, f"request body must be <= {limit} bytes")
            return message

        token = INPUT_PIXELS.set(self.input_pixels) if self.input_pixels is not None else None
        gone = CLIENT_GONE.set(StarletteRequest(scope, counted).is_disconnected)
        try:
            await self.app(scope, counted, send)
        finally:
            CLIENT_GONE.reset(gone)
            if token is not None:
                INPUT_PIXELS.reset(token)

    async def _reply(self, send, path: str, status: int, detail: str) -> None:
        response = error_response(self.shapes, path, status, detail)
        await response({"type": "http"}, None, send)


Batcher = Callable[[list[GenerationParams]], Awaitable[list | Failure]]


async def until_client_gone(work: Awaitable, watched, jobs) -> list | Failure:
    """``await work``, cancelling the request's rows (``watched.watch``: they leave the run at the
    next step, as ``DELETE /v1/jobs/{id}`` does) when its HTTP client goes away: seen by polling
    the connection (uvicorn), or as this task's cancellation (Ray Serve cancels a request whose
    client disconnected). The other rows of its batch go on unchanged."""

    def cancel() -> None:
        watch = getattr(watched, "watch", None)
        if watch is not None and not watch.cancelled:
            watch.cancelled = True
            jobs.metrics.cancellations.labels(state="disconnected").inc()

    gone = CLIENT_GONE.get()
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=GONE_POLL_S)
            if not task.done() and gone is not None and await gone():
                cancel()
                gone = None  # cancelled: wait for the run to let its rows go
        return task.result()
    except asyncio.CancelledError:
        cancel()
        raise


def producer(core: ServingCore, batcher: Batcher, jobs=None) -> Producer:
    """``GenerateRequest`` → (its per-image params, its PNGs) through the core's limits, the batcher
    and the records; every route of every API generates through this one function."""

    async def produce(req: GenerateRequest) -> tuple[list[GenerationParams], list[bytes]]:
        try:
            rows = core.check(req)
        except ValueError as exc:
            raise RequestFailed(422, str(exc)) from None
        core.metrics.queue_depth.inc()
        watched = jobs.track(rows) if jobs is not None else rows  # progress, /sdapi/v1/interrupt
        try:
            result = await until_client_gone(batcher(watched), watched, jobs)
        finally:
            core.metrics.queue_depth.dec()
            if jobs is not None:
                jobs.untrack(watched)
        if isinstance(result, Failure):
            raise RequestFailed(result.status, result.message)
        return rows, [core.encode(out, p) for out, p in zip(result, rows, strict=True)]

    return produce


def build_app(core: ServingCore, batcher: Batcher | None = None) -> FastAPI:
    """The FastAPI app of one deployment: ``/v1/generate``, ``/v1/health``, ``/v1/info``, the OpenAI
    Images routes, the AUTOMATIC1111 routes, the playground at ``/`` and ``/metrics``.

    ``batcher`` takes one checked request's rows and returns its images or ``Failure`` (Ray Serve's
    ``@serve.batch`` method in a replica); default: run it alone in a thread (tests, no Ray; the
    core runs one batch at a time either way)."""

    async def alone(rows: list[GenerationParams]) -> list | Failure:
        return (await asyncio.to_thread(core.run_batch, [rows]))[0]

    jobs = jobs_for(core)
    produce = producer(core, batcher or alone, jobs)
    shapes = [openai_api.ERRORS, video_api.ERRORS, a1111_api.ERRORS]
    app = FastAPI(
        title="seg-rt",
        description="Smoothed Energy Guidance (SEG) image and video generation",
        version="1",
        docs_url=None,  # docs_page's, which opens on a keyed server too
    )
    app.add_middleware(
        RequestGuard,
        api_keys=core.config.api_keys,
        max_body_bytes=core.config.max_body_bytes,
        shapes=shapes,
        input_pixels=core.config.limits.max_pixels,  # an input image is at most what the server makes
    )
    routes: set[str] = set()  # filled below, once every route exists
    app.add_middleware(MetricsMiddleware, metrics=core.metrics, routes=routes)  # sees 401/413

    async def reply(send, scope, status: int, message: str) -> None:
        await error_response(shapes, _path(scope), status, message)({"type": "http"}, None, send)

    # trusted hosts and security headers around every route, added now or later (guard.py)
    guard.install(
        app,
        host=core.config.host,
        trusted=core.config.trusted_hosts,
        page_html=PLAYGROUND.read_text(encoding="utf-8"),
        reply=reply,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = [p for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        message = "\n".join(validation_lines(errors))
        return error_response(shapes, _path(request.scope), 422, message, str(loc[0]) if loc else None)

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, exc: RequestFailed) -> JSONResponse:
        return error_response(shapes, _path(request.scope), exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(shapes, _path(request.scope), exc.status_code, str(exc.detail))

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    def info() -> dict:
        return core.info()

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(core.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_page.PAGE, headers={"Content-Security-Policy": docs_page.csp()})

    @app.post("/v1/generate", response_model=None)
    async def generate(req: GenerateRequest) -> Response | GenerateResponse:
        t0 = time.perf_counter()
        rows, pngs = await produce(req)
        seeds = [p.seed for p in rows]
        if req.response == "png":
            headers = {"X-Seed": str(seeds[0]), "X-Server-Seconds": f"{time.perf_counter() - t0:.4f}"}
            return Response(content=pngs[0], media_type="image/png", headers=headers)
        return GenerateResponse(
            images=[base64.b64encode(p).decode() for p in pngs],
            seeds=seeds,
            parameters=rows[0].to_record() | {"num_images": req.num_images},
            seconds=round(time.perf_counter() - t0, 4),
        )

    config = core.config
    apis = (
        openai_api.router(produce, config.public_model, partial(openai_stream.streamed, core, jobs)),
        a1111_api.router(produce, config.public_model, config.scheduler),
    )
    keyed = bool(config.api_keys)

    def owner(r: Request) -> str:
        return owner_of(_credentials(r.scope["headers"]) if keyed else None)

    apis = (  # /sdapi/v1/progress and /interrupt live in progress_api (over the job manager)
        progress_api.router(jobs, owner),
        *apis,
        jobs_api.router(core, jobs, owner),
        video_api.router(core, jobs, owner),
    )
    for api in apis:
        routes.update(r.path for r in api.routes)
        app.include_router(api)
    routes.update(r.path for r in app.routes if hasattr(r, "path"))
    return app
