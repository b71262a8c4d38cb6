"""The HTTP serving core, Ray-free: server config, request model, limits, grouping, records, the app.

``cluster/serve.py`` wraps this in a thin Ray Serve deployment (model loaded once, ``@serve.batch``);
everything that decides what a request gets lives here and is tested in-process
(``tests/test_serving.py``), the way ``cluster/worker.py`` holds the jobs side.

One request: the HTTP body (``GenerateRequest``) becomes a ``GenerationParams`` through validators
that call the type's own rules (bad field → one line, HTTP 422); ``ServingCore.check`` applies the
server's limits and the model's size rules (per side, aspect, multiple of the model's scale factor);
``ServingCore.run_batch`` groups the requests of one batch by ``GenerationParams.batch_key()``,
chunks each group to the engine's batch and runs each chunk as one sampling run. A chunk that fails
is re-run one request at a time, so a bad request fails alone with its own message and its
neighbours get the images they get served alone (batch-invariant sampling, per-row seeds).

The same core answers the APIs image clients already speak, each mapped onto ``GenerateRequest`` in
one module: the OpenAI Images API (``openai_api.py``), the AUTOMATIC1111 web UI API
(``a1111_api.py``), and a browser playground at ``/`` (``playground.html``). Prometheus metrics
(``metrics.py``) at ``/metrics``.

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations as classes.
"""

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from seg_rt.config import SEGConfig, parse_sigma
from seg_rt.errors import first_line
from seg_rt.images import params_text, png_bytes
from seg_rt.params import (
    DEFAULT_SCHEDULER,
    BranchParallel,
    GenerationParams,
    parse_engine_spec,
)

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, MetricsMiddleware
from .spec import Scheduler, Seed

logger = logging.getLogger(__name__)

API_KEY_ENV = "SEG_RT_API_KEY"
# answered without an API key: health (load balancers, Serve's own probes) and the playground page
# (static HTML; the page asks for the key and sends it with each request)
OPEN_PATHS = ("/v1/health", "/")
DEMO_MODEL_NAME = "seg-rt-demo"  # what clients see of the bundled demo model
PLAYGROUND = Path(__file__).with_name("playground.html")


class Limits(BaseModel):
    """Per-request limits (HTTP 422 beyond them). Side limits derive from the model unless set."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(50, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_images: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_seg_scale: float = Field(20.0, ge=0, allow_inf_nan=False)
    max_cfg: float = Field(30.0, ge=1, allow_inf_nan=False)
    min_sigma: float = Field(0.1, gt=0, allow_inf_nan=False)
    max_side: int | None = Field(
        None, ge=1, description="pixels per side; default 4x the model's default side"
    )
    max_aspect: float = Field(4.0, ge=1, allow_inf_nan=False, description="longer side / shorter side")


def check_engine_spec(spec: str) -> str:
    """``torch``, ``torch-compile``, ``onnx:DIR`` or ``trt:DIR`` with DIR an existing folder."""
    _, path = parse_engine_spec(spec)
    if path and not Path(path).is_dir():
        raise ValueError(f"engine folder {path!r} does not exist")
    return spec


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def model_name(model: str) -> str:
    """What clients see of the model: a local folder's basename or the hub id, never a server path;
    the bundled demo model is ``seg-rt-demo``."""
    from seg_rt.demo.model import is_demo_folder

    path = Path(model)
    if not path.is_dir():
        return model
    return DEMO_MODEL_NAME if is_demo_folder(path) else path.resolve().name


class ServeConfig(BaseModel):
    """Server settings (``--config FILE`` YAML; CLI flags override), validated whole before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    model: str
    model_name: str | None = Field(None, description="name shown to clients; default: folder name or hub id")
    engine: Annotated[str, AfterValidator(check_engine_spec)] = "torch"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Bearer keys; required off loopback"
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies: HTTP 413")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; None: autoscaling")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    num_gpus_per_replica: float | None = Field(None, ge=0, description="default: 1 when a GPU is visible")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    max_batch_size: int = Field(4, ge=1, description="images per sampling run")
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(16, ge=0, description="beyond this, HTTP 503")
    default_height: int | None = Field(None, ge=1)
    default_width: int | None = Field(None, ge=1)
    scheduler: Scheduler = DEFAULT_SCHEDULER
    limits: Limits = Limits()
    branch_parallel: int = Field(
        1, ge=1, description="latency mode: each step's rows split over N ranks (branch-parallel SEG)"
    )
    branch_parallel_device: str = Field("cpu", description="cpu (gloo) or cuda (NCCL, one GPU per rank)")

    @field_validator("branch_parallel_device")
    @classmethod
    def _parallel_device(cls, v: str) -> str:
        BranchParallel(device=v)  # the one check of the value
        return v

    def parallel(self, launcher: str) -> BranchParallel | None:
        """The latency mode's ``BranchParallel`` (``None``: one device per run)."""
        if self.branch_parallel == 1:
            return None
        return BranchParallel(
            ranks=self.branch_parallel, launcher=launcher, device=self.branch_parallel_device
        )

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("API keys must not be empty")
        return [k.strip() for k in keys]

    @model_validator(mode="after")
    def _exposed_needs_key(self) -> "ServeConfig":
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable from other machines: give an API key "
                f"(--api-key or {API_KEY_ENV}) or bind 127.0.0.1"
            )
        return self

    @property
    def public_model(self) -> str:
        return self.model_name or model_name(self.model)


def first_error(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: message``."""
    return validation_lines(exc.errors())[0]


def validation_lines(errors: Sequence[dict]) -> list[str]:
    """One line per bad field. Our validators' messages already name the field; pydantic's do not.
    The offending input is never echoed (it may be huge, or NaN, which JSON cannot carry)."""
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            lines.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
        elif err.get("type") == "value_error":
            lines.append(msg.removeprefix("Value error, "))
        else:
            lines.append(f"{loc or 'request body'}: {msg}")
    return lines


def load_config(path: str | Path | None, defaults: dict | None = None, **overrides: Any) -> ServeConfig:
    """Read ``path`` (YAML) over ``defaults`` and apply ``overrides``; any problem is one ``ValueError`` line."""
    data: dict = {}
    if path:
        from seg_rt.optional import require

        yaml = require("yaml", "server config files")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"server config {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ValueError(f"server config {str(p)!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"server config {str(p)!r} must be a mapping of settings, got {type(data).__name__}"
            )
    data = {**(defaults or {}), **data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"server config: {first_error(exc)}") from None


def _params_rule(name: str, value: Any) -> Any:
    """``value`` checked by ``GenerationParams``' own rule for field ``name`` (one rule, one place)."""
    return getattr(GenerationParams(**{name: value}), name)


def _seg_rule(name: str, value: Any) -> Any:
    return getattr(SEGConfig(**{name: value}), name)


class GenerateRequest(BaseModel):
    """The ``POST /v1/generate`` body; defaults are ``GenerationParams``' (the server's size and
    scheduler where left out)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str | None = None
    seed: Seed = GenerationParams.seed
    steps: int = GenerationParams.steps
    cfg: float = GenerationParams.cfg
    seg_scale: float = SEGConfig.scale
    seg_sigma: float | str = SEGConfig.sigma
    seg_layers: list[str] = list(SEGConfig().layers)
    seg_start: float = SEGConfig.start
    seg_end: float = SEGConfig.end
    guidance_rescale: float = GenerationParams.guidance_rescale
    distilled_guidance: float = GenerationParams.distilled_guidance
    height: int | None = None
    width: int | None = None
    scheduler: Scheduler | None = None
    num_images: int = Field(1, ge=1)
    response: Literal["png", "json"] = "png"

    @field_validator("steps", "cfg", "guidance_rescale", "distilled_guidance", "height", "width")
    @classmethod
    def _params_fields(cls, v: Any, info) -> Any:
        return _params_rule(info.field_name, v)

    @field_validator("seg_scale", "seg_start", "seg_end", "seg_layers")
    @classmethod
    def _seg_fields(cls, v: Any, info) -> Any:
        name = info.field_name.removeprefix("seg_")
        value = _seg_rule(name, v)
        return list(value) if name == "layers" else value

    @field_validator("seg_sigma")
    @classmethod
    def _sigma(cls, v: Any) -> float:
        return _seg_rule("sigma", parse_sigma(v))

    @model_validator(mode="after")
    def _whole(self) -> "GenerateRequest":
        self.params()  # cross-field rules (the SEG window)
        return self

    def params(
        self, height: int | None = None, width: int | None = None, scheduler: str = DEFAULT_SCHEDULER
    ) -> GenerationParams:
        """The request as the one request type; ``height`` / ``width`` / ``scheduler`` fill what it leaves out."""
        seg = SEGConfig(self.seg_scale, self.seg_sigma, tuple(self.seg_layers), self.seg_start, self.seg_end)
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            steps=self.steps,
            cfg=self.cfg,
            seg=seg,
            guidance_rescale=self.guidance_rescale,
            distilled_guidance=self.distilled_guidance,
            height=self.height or height,
            width=self.width or width,
            scheduler=self.scheduler or scheduler,
        )


class GenerateResponse(BaseModel):
    images: list[str]  # base64 PNG
    seeds: list[int]
    parameters: dict
    seconds: float


def run_group(pipe, params_list: Sequence[GenerationParams], engine=None) -> list:
    """One sampling run for rows sharing a ``batch_key()``: their images (PIL), in order."""
    from seg_rt.pipeline import run_params

    return run_params(pipe, params_list, engine=engine)


def run_on_group(group, pipe, params_list: Sequence[GenerationParams], engine=None) -> list:
    """``run_group`` for latency mode: the branch-parallel ranks sample; rank 0's images come back."""
    return group.run("images", list(params_list), "pil")


def group_rows(requests: Sequence[Sequence[GenerationParams]], capacity: int) -> list[list[tuple[int, int]]]:
    """Sampling runs for one batch: rows ``(request, image)`` grouped by ``batch_key()`` (first-seen
    order), each group cut into chunks of at most ``capacity`` rows."""
    groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for k, rows in enumerate(requests):
        for i, p in enumerate(rows):
            groups[p.batch_key()].append((k, i))
    return [rows[s : s + capacity] for rows in groups.values() for s in range(0, len(rows), capacity)]


@dataclass
class Failure:
    """Why one request got no images: HTTP ``status`` and a one-line message."""

    status: int
    message: str


class RequestFailed(Exception):
    """A request answered with an error: HTTP ``status``, one-line ``message`` and, where known, the
    request field (``param``) it is about. Each API turns it into its own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def make_request(**fields: Any) -> GenerateRequest:
    """``GenerateRequest(**fields)``; a bad field is a 422 ``RequestFailed`` naming it (one line each)."""
    try:
        return GenerateRequest(**fields)
    except ValidationError as exc:
        errors = exc.errors()
        loc = [p for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        param = str(loc[0]) if loc else None
        raise RequestFailed(422, "\n".join(validation_lines(errors)), param) from None


def _failure(exc: Exception) -> Failure:
    if isinstance(exc, ValueError):  # bad input only the model or engine can see (SegRtError included)
        return Failure(422, first_line(exc))
    logger.error("sampling failed", exc_info=exc)
    return Failure(500, f"sampling failed ({type(exc).__name__})")


class ServingCore:
    """One replica's state: the loaded model and engine, the limits, stats; no Ray, no HTTP."""

    def __init__(self, cfg: ServeConfig, pipe, engine=None, run: Callable = run_group, group=None) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.engine = engine
        self.group = group  # latency mode: the branch-parallel ranks that sample (closed with the core)
        self._run = run if group is None else partial(run_on_group, group)
        from seg_rt.pipeline import default_side, size_factor

        self.factor = size_factor(pipe)  # pixel sizes are multiples of it (the family's rule)
        self.latent_factor = int(pipe.vae_scale_factor)  # pixels per latent (engine shapes)
        self.default_side = default_side(pipe)
        self.max_side = cfg.limits.max_side or 4 * self.default_side
        # a fixed-shape engine (seg_rt.engines.Denoiser) accepts one shape and at most its batch per run
        self.shapes = engine.shapes if engine is not None and engine.shapes.batch is not None else None
        per_run = engine.images_per_run if engine is not None else None
        self.run_capacity = per_run if per_run is not None else cfg.max_batch_size
        self.stats = {"requests": 0, "images": 0, "sampling_runs": 0, "failed": 0}
        self.metrics = Metrics()
        self._lock = threading.Lock()
        # one sampling run at a time: a run installs SEG processors on the shared pipeline
        self._sampling = threading.Lock()

    @classmethod
    def load(cls, cfg: ServeConfig, launcher: str = "processes", **group_options) -> "ServingCore":
        """Load the model (and engine) once, as a replica does. Latency mode (``branch_parallel`` > 1):
        the ranks (``launcher``: processes or ray; ``group_options`` for ``open_group``) load and run
        the model; the replica keeps a CPU copy only to check requests (sizes, SEG layers)."""
        import torch

        from seg_rt.pipeline import load_pipeline

        # CPU results depend on the thread count: fix it from the replica's resources
        torch.set_num_threads(max(1, int(cfg.num_cpus_per_replica)))
        parallel = cfg.parallel(launcher)
        from .storage import resolve_model

        if parallel is not None:
            from .branch import open_group

            group = open_group(parallel, cfg.model, cfg.engine, **group_options)
            return cls(cfg, load_pipeline(resolve_model(cfg.model), "cpu"), group=group)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(resolve_model(cfg.model), device)  # a URL: fetched once per node
        engine = None
        if cfg.engine != "torch":
            from seg_rt.engines import load_engine

            engine = load_engine(cfg.engine, pipe, device)
        return cls(cfg, pipe, engine)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.group is not None:
            self.group.close()

    # ---- per request, before batching -------------------------------------------------------

    def check(self, req: GenerateRequest) -> list[GenerationParams]:
        """Limits and the model's size rules; one ``GenerationParams`` per image (seed + i).
        Raises ``ValueError`` with the line the client gets (422)."""
        cfg, lim = self.cfg, self.cfg.limits
        p = req.params(
            cfg.default_height or self.default_side, cfg.default_width or self.default_side, cfg.scheduler
        )
        h, w = p.height, p.width
        most_images = min(lim.max_images, cfg.max_batch_size)
        checks = [
            (p.steps <= lim.max_steps, f"steps must be <= {lim.max_steps}, got {p.steps}"),
            (len(p.prompt) <= lim.max_prompt_chars,
             f"prompt must be <= {lim.max_prompt_chars} characters, got {len(p.prompt)}"),
            (len(p.negative_prompt or "") <= lim.max_prompt_chars,
             f"negative_prompt must be <= {lim.max_prompt_chars} characters, got {len(p.negative_prompt or '')}"),
            (p.seg.scale <= lim.max_seg_scale, f"seg_scale must be in [0, {lim.max_seg_scale:g}], got {p.seg.scale:g}"),
            (p.cfg <= lim.max_cfg, f"cfg must be in [1, {lim.max_cfg:g}], got {p.cfg:g}"),
            (p.seg.sigma >= lim.min_sigma, f"seg_sigma must be >= {lim.min_sigma:g} or inf, got {p.seg.sigma:g}"),
            (req.num_images <= most_images, f"num_images must be <= {most_images}, got {req.num_images}"),
            (req.response == "json" or req.num_images == 1,
             "response 'png' carries one image; use response 'json' for num_images > 1"),
            (h <= self.max_side and w <= self.max_side,
             f"height and width must be <= {self.max_side} pixels each, got {h}x{w}"),
            (max(h, w) <= lim.max_aspect * min(h, w),
             f"aspect ratio must be at most {lim.max_aspect:g}:1, got {h}x{w}"),
            (h * w <= lim.max_pixels, f"height x width must be <= {lim.max_pixels} pixels, got {h}x{w}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.check_model(p)
        return [p.replace(seed=p.seed + i) for i in range(req.num_images)]

    def check_model(self, p: GenerationParams) -> None:
        """What only the loaded model / engine can tell: size multiple, engine shape, SEG layers,
        whether it takes a distilled guidance value."""
        from seg_rt.pipeline import check_model_guidance, check_size, select_seg_layers

        check_size(p.height, p.width, self.factor)
        check_model_guidance(self.pipe, p.distilled_guidance)
        if self.shapes is not None:
            f = self.latent_factor
            self.shapes.check(self.shapes.batch, p.height // f, p.width // f)
        if p.seg.enabled:
            select_seg_layers(self.pipe, p.seg.layers)

    # ---- one batch of checked requests -------------------------------------------------------

    def run_batch(self, requests: Sequence[Sequence[GenerationParams]]) -> list[list | Failure]:
        """Images per request (or its ``Failure``): one sampling run per ``group_rows`` chunk; a
        chunk that fails is re-run one request at a time, so only the bad request fails."""
        with self._sampling:
            return self._run_batch(requests)

    def _run_batch(self, requests: Sequence[Sequence[GenerationParams]]) -> list[list | Failure]:
        results: list[list | Failure] = [[None] * len(rows) for rows in requests]
        self.metrics.batch_requests.observe(len(requests))
        for chunk in group_rows(requests, self.run_capacity):
            try:
                self._fill(results, requests, chunk)
            except Exception as exc:  # isolate: each request of the chunk alone
                members = sorted({k for k, _ in chunk})
                if len(members) == 1:
                    results[members[0]] = _failure(exc)
                    continue
                for k in members:
                    if isinstance(results[k], Failure):
                        continue
                    try:
                        self._fill(results, requests, [(kk, i) for kk, i in chunk if kk == k])
                    except Exception as solo_exc:
                        results[k] = _failure(solo_exc)
        with self._lock:
            self.stats["requests"] += len(requests)
            self.stats["failed"] += sum(isinstance(r, Failure) for r in results)
        return results

    def _fill(self, results: list, requests: Sequence[Sequence[GenerationParams]], chunk) -> None:
        t0 = time.perf_counter()
        images = self._run(self.pipe, [requests[k][i] for k, i in chunk], self.engine)
        self.metrics.sampling_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_images.observe(len(chunk))
        self.metrics.images.inc(len(chunk))
        with self._lock:
            self.stats["sampling_runs"] += 1
            self.stats["images"] += len(chunk)
        for (k, i), img in zip(chunk, images, strict=True):
            if not isinstance(results[k], Failure):
                results[k][i] = img

    # ---- records and answers -----------------------------------------------------------------

    def png(self, image, params: GenerationParams) -> bytes:
        """The PNG with the same parameter record ``seg-rt generate`` writes (model by name)."""
        return png_bytes(image, params_text(self.cfg.public_model, params.to_record()))

    def info(self) -> dict:
        shapes: Any = f"any multiple of {self.factor}"
        if self.shapes is not None:
            shapes = {
                "images_per_run": self.run_capacity,
                "height": self.shapes.height * self.factor,
                "width": self.shapes.width * self.factor,
            }
        with self._lock:
            stats = dict(self.stats)
        return {
            "model": self.cfg.public_model,
            "engine": self.cfg.engine.partition(":")[0],  # the kind, not the server's folder
            "accepted_shapes": shapes,
            "default_size": [
                self.cfg.default_height or self.default_side,
                self.cfg.default_width or self.default_side,
            ],
            "max_side": self.max_side,
            "limits": self.cfg.limits.model_dump(),
            "max_batch_size": self.cfg.max_batch_size,
            "branch_parallel": self.cfg.branch_parallel,
            "defaults": GenerationParams(scheduler=self.cfg.scheduler).to_record(),  # request defaults
            "stats": stats,
        }


# ---- HTTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorShape:
    """How one API answers errors: its paths, its JSON body and its auth challenge.

    ``body(status, message, param)`` → (status sent, JSON body); the API may map statuses (the
    OpenAI API answers bad input with 400 where ``/v1/generate`` says 422)."""

    prefixes: tuple[str, ...]
    body: Callable[[int, str, str | None], tuple[int, dict]]
    challenge: str = "Bearer"


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
    code, body = shape.body(status, message, param)
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


class RequestGuard:
    """ASGI middleware: API keys and the body-size limit, before any route reads or parses the body.

    Starlette offers neither: its request-size handling is left to the server, and Ray Serve's
    proxy passes bodies through. ``Content-Length`` over the limit is refused at once; a body sent
    without one (chunked) is counted as it streams and refused when it passes the limit. Refusals
    come in the error shape of the API that owns the path."""

    def __init__(
        self, app, *, api_keys: Sequence[str], max_body_bytes: int, shapes: Sequence[ErrorShape] = ()
    ) -> None:
        self.app = app
        self.api_keys = list(api_keys)
        self.max_body_bytes = max_body_bytes
        self.shapes = list(shapes)

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
                    raise HTTPException(413, f"request body must be <= {limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _reply(self, send, path: str, status: int, detail: str) -> None:
        response = error_response(self.shapes, path, status, detail)
        await response({"type": "http"}, None, send)


Batcher = Callable[[list[GenerationParams]], Awaitable[list | Failure]]
Producer = Callable[[GenerateRequest], Awaitable[tuple[list[GenerationParams], list[bytes]]]]


def producer(core: ServingCore, batcher: Batcher) -> Producer:
    """``GenerateRequest`` → (its per-image params, its PNGs) through the core's limits, the batcher
    and the records; every route of every API generates through this one function."""

    async def produce(req: GenerateRequest) -> tuple[list[GenerationParams], list[bytes]]:
        try:
            rows = core.check(req)
        except ValueError as exc:
            raise RequestFailed(422, str(exc)) from None
        core.metrics.queue_depth.inc()
        try:
            result = await batcher(rows)
        finally:
            core.metrics.queue_depth.dec()
        if isinstance(result, Failure):
            raise RequestFailed(result.status, result.message)
        return rows, [core.png(img, p) for img, p in zip(result, rows, strict=True)]

    return produce


def build_app(core: ServingCore, batcher: Batcher | None = None) -> FastAPI:
    """The FastAPI app of one deployment: ``/v1/generate``, ``/v1/health``, ``/v1/info``, the OpenAI
    Images routes, the AUTOMATIC1111 routes, the playground at ``/`` and ``/metrics``.

    ``batcher`` takes one checked request's rows and returns its images or ``Failure`` (Ray Serve's
    ``@serve.batch`` method in a replica); default: run it alone in a thread (tests, no Ray; the
    core runs one batch at a time either way)."""
    from . import a1111_api, openai_api  # they build on this module's request type

    async def alone(rows: list[GenerationParams]) -> list | Failure:
        return (await asyncio.to_thread(core.run_batch, [rows]))[0]

    produce = producer(core, batcher or alone)
    shapes = [openai_api.ERRORS, a1111_api.ERRORS]
    app = FastAPI(title="seg-rt", description="Smoothed Energy Guidance (SEG) image generation", version="1")
    app.add_middleware(
        RequestGuard, api_keys=core.cfg.api_keys, max_body_bytes=core.cfg.max_body_bytes, shapes=shapes
    )
    routes: set[str] = set()  # filled below, once every route exists
    app.add_middleware(MetricsMiddleware, metrics=core.metrics, routes=routes)  # outermost: sees 401/413

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

    for api in (openai_api.router(core, produce), a1111_api.router(core, produce)):
        routes.update(r.path for r in api.routes)
        app.include_router(api)
    routes.update(r.path for r in app.routes if hasattr(r, "path"))
    return app
