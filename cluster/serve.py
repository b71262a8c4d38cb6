"""HTTP serving of SEG generation: a Ray Serve application with a FastAPI ingress.

``POST /v1/generate`` (PNG, or JSON with base64 images and their parameters), ``GET /v1/health``,
``GET /v1/info``; OpenAPI at ``/docs`` and ``/openapi.json``. Concurrent requests are grouped by
``@serve.batch`` and compatible ones (same size, steps, cfg, SEG settings) share one sampling run;
each image still equals the same request served alone (batch-invariant sampling, per-request
seeds). Bad or over-limit input is HTTP 422 with a clear message; a full queue is HTTP 503 (Serve's
``max_queued_requests``). Binds to 127.0.0.1 unless told otherwise.

Run it with ``seg-rt serve --model M`` or ``serve run seg_rt.cluster.serve:build_app model=M``.

No ``from __future__ import annotations`` here: FastAPI, behind Serve's ingress wrapper, needs the
endpoint annotations as real classes to read the request body.
"""

import asyncio
import base64
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from seg_rt.config import SEGConfig, parse_layers, parse_sigma
from seg_rt.images import generation_params, params_text, png_bytes
from seg_rt.optional import require

logger = logging.getLogger(__name__)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(50, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_images: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_seg_scale: float = Field(20.0, ge=0)
    max_cfg: float = Field(30.0, ge=1)
    min_sigma: float = Field(0.1, gt=0)


class ServeConfig(BaseModel):
    """Server settings (``--config FILE`` YAML; CLI flags override)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    engine: str = "torch"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
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
    default_height: int | None = None
    default_width: int | None = None
    scheduler: str = "euler"
    limits: Limits = Limits()


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(25, ge=1)
    cfg: float = Field(5.0, ge=1)
    seg_scale: float = Field(3.0, ge=0)
    seg_sigma: float | str = math.inf
    seg_layers: list[str] = ["mid"]
    seg_start: float = 0.0
    seg_end: float = 1.0
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    num_images: int = Field(1, ge=1)
    response: Literal["png", "json"] = "png"

    @field_validator("seg_sigma")
    @classmethod
    def _sigma(cls, v: Any) -> float:
        return parse_sigma(v)


class GenerateResponse(BaseModel):
    images: list[str]  # base64 PNG
    seeds: list[int]
    parameters: dict
    seconds: float


def check_request(
    req: GenerateRequest, cfg: ServeConfig, shapes, vae_factor: int
) -> tuple[int, int, SEGConfig]:
    """Limits and engine shapes; raises ``ValueError`` with the message the client gets (422)."""
    lim = cfg.limits
    seg = SEGConfig(req.seg_scale, req.seg_sigma, parse_layers(req.seg_layers), req.seg_start, req.seg_end)
    h = req.height or cfg.default_height
    w = req.width or cfg.default_width
    if h is None or w is None:
        raise ValueError("height and width are required (the server has no default size)")
    checks = [
        (req.steps <= lim.max_steps, f"steps must be <= {lim.max_steps}, got {req.steps}"),
        (h * w <= lim.max_pixels, f"height x width must be <= {lim.max_pixels} pixels, got {h}x{w}"),
        (h % vae_factor == 0 and w % vae_factor == 0, f"height and width must be multiples of {vae_factor}, got {h}x{w}"),
        (req.num_images <= min(lim.max_images, cfg.max_batch_size),
         f"num_images must be <= {min(lim.max_images, cfg.max_batch_size)}, got {req.num_images}"),
        (len(req.prompt) <= lim.max_prompt_chars, f"prompt must be <= {lim.max_prompt_chars} characters, got {len(req.prompt)}"),
        (len(req.negative_prompt or "") <= lim.max_prompt_chars, f"negative_prompt must be <= {lim.max_prompt_chars} characters"),
        (req.seg_scale <= lim.max_seg_scale, f"seg_scale must be in [0, {lim.max_seg_scale:g}], got {req.seg_scale:g}"),
        (req.cfg <= lim.max_cfg, f"cfg must be in [1, {lim.max_cfg:g}], got {req.cfg:g}"),
        (seg.sigma >= lim.min_sigma, f"seg_sigma must be >= {lim.min_sigma:g} or inf, got {seg.sigma:g}"),
        (req.response == "json" or req.num_images == 1, "response 'png' carries one image; use response 'json' for num_images > 1"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if shapes is not None:
        shapes.check(shapes.batch or 1, h // vae_factor, w // vae_factor)  # names both shapes
    return h, w, seg


def _group_key(req: GenerateRequest, h: int, w: int) -> tuple:
    return (
        h,
        w,
        req.steps,
        req.cfg,
        req.seg_scale,
        req.seg_sigma,
        tuple(req.seg_layers),
        req.seg_start,
        req.seg_end,
    )


api = FastAPI(title="seg-rt", description="Smoothed Energy Guidance (SEG) image generation", version="1")


def _deployment():
    serve = require("ray.serve", "serving")

    @serve.deployment(name="seg-rt", health_check_period_s=10, health_check_timeout_s=60)
    @serve.ingress(api)
    class SEGService:
        """One replica: the model loaded once, batched sampling runs, limits enforced."""

        def __init__(self, config: dict) -> None:
            import torch

            from seg_rt.pipeline import load_pipeline

            self.cfg = ServeConfig.model_validate(config)
            # CPU results depend on the thread count: fix it from the replica's resources
            torch.set_num_threads(max(1, int(self.cfg.num_cpus_per_replica)))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.pipe = load_pipeline(self.cfg.model, device)
            self.engine = None
            if self.cfg.engine != "torch":
                from seg_rt.engines import load_engine

                self.engine = load_engine(self.cfg.engine, self.pipe, device)
            shapes = getattr(self.engine, "shapes", None)
            self.shapes = shapes if shapes is not None and shapes.batch is not None else None
            # a fixed-shape engine serves at most its batch per run
            info = getattr(self.engine, "info", None)
            self.run_capacity = info.batch if info is not None else self.cfg.max_batch_size
            self.generate_batched.set_max_batch_size(self.cfg.max_batch_size)
            self.generate_batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
            self.stats = {"requests": 0, "images": 0, "sampling_runs": 0}

        def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
            if getattr(self, "engine", None) is not None:
                self.engine.close()

        def check_health(self) -> None:
            if self.pipe is None:
                raise RuntimeError("model not loaded")

        @api.get("/v1/health")
        def health(self) -> dict:
            return {"status": "ok"}

        @api.get("/v1/info")
        def info(self) -> dict:
            shapes = None
            if self.shapes is not None:
                f = self.pipe.vae_scale_factor
                shapes = {
                    "images_per_run": self.run_capacity,
                    "height": self.shapes.height * f,
                    "width": self.shapes.width * f,
                }
            return {
                "model": self.cfg.model,
                "engine": self.cfg.engine,
                "accepted_shapes": shapes or f"any multiple of {self.pipe.vae_scale_factor}",
                "limits": self.cfg.limits.model_dump(),
                "max_batch_size": self.cfg.max_batch_size,
                "stats": dict(self.stats),
            }

        @api.post("/v1/generate", response_model=None)
        async def generate(self, req: GenerateRequest) -> Response | GenerateResponse:
            t0 = time.perf_counter()
            try:
                h, w, _ = check_request(req, self.cfg, self.shapes, self.pipe.vae_scale_factor)
            except ValueError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            self.stats["requests"] += 1
            result = await self.generate_batched((req, h, w))
            if isinstance(result, Exception):
                raise HTTPException(status_code=422, detail=str(result))
            seeds = [req.seed + i for i in range(req.num_images)]
            pngs = [
                png_bytes(img, params_text(self.cfg.model, self._record(req, h, w, s)))
                for img, s in zip(result, seeds, strict=True)
            ]
            if req.response == "png":
                headers = {"X-Seed": str(seeds[0]), "X-Server-Seconds": f"{time.perf_counter() - t0:.4f}"}
                return Response(content=pngs[0], media_type="image/png", headers=headers)
            params = req.model_dump(mode="json", exclude={"response"}) | {"height": h, "width": w}
            return GenerateResponse(
                images=[base64.b64encode(p).decode() for p in pngs], seeds=seeds, parameters=params,
                seconds=round(time.perf_counter() - t0, 4),
            )  # fmt: skip

        @serve.batch(
            max_batch_size=4,
            batch_wait_timeout_s=0.05,
            batch_size_fn=lambda items: sum(r[0].num_images for r in items),
        )
        async def generate_batched(self, items: list[tuple[GenerateRequest, int, int]]) -> list:
            """Group compatible requests; one sampling run per group chunk; split results back."""
            groups: dict[tuple, list[int]] = {}
            for k, (req, h, w) in enumerate(items):
                groups.setdefault(_group_key(req, h, w), []).append(k)
            results: list = [[] for _ in items]  # per request: its images, or the error it gets
            for members in groups.values():
                rows = [(k, items[k][0].seed + i) for k in members for i in range(items[k][0].num_images)]
                for start in range(0, len(rows), self.run_capacity):
                    chunk = rows[start : start + self.run_capacity]
                    reqs = [items[k][0] for k, _ in chunk]
                    try:
                        images = await asyncio.to_thread(
                            self._run, items[members[0]], reqs, [s for _, s in chunk]
                        )
                    except ValueError as exc:  # e.g. SEG layers the model / engine does not have
                        for k in members:
                            results[k] = exc
                        break
                    for (k, _), img in zip(chunk, images, strict=True):
                        results[k].append(img)
            return results

        def _record(self, req: GenerateRequest, h: int, w: int, seed: int) -> dict:
            """The same parameter record `seg-rt generate` writes: equal requests, equal PNG bytes."""
            return generation_params(
                prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, cfg=req.cfg,
                seg_scale=req.seg_scale, seg_sigma=req.seg_sigma, seg_layers=parse_layers(req.seg_layers),
                seg_start=req.seg_start, seg_end=req.seg_end, height=h, width=w, seed=seed,
                scheduler=self.cfg.scheduler,
            )  # fmt: skip

        def _run(self, first: tuple, reqs: list[GenerateRequest], seeds: list[int]) -> list:
            from seg_rt.pipeline import generate_batch

            req, h, w = first
            self.stats["sampling_runs"] += 1
            self.stats["images"] += len(seeds)
            return generate_batch(
                self.pipe, [r.prompt for r in reqs], seeds, negative_prompts=[r.negative_prompt for r in reqs],
                steps=req.steps, cfg=req.cfg, seg_scale=req.seg_scale, seg_sigma=req.seg_sigma,
                seg_layers=req.seg_layers, seg_start=req.seg_start, seg_end=req.seg_end, height=h, width=w,
                scheduler=self.cfg.scheduler, engine=self.engine,
            )  # fmt: skip

    return SEGService


def build_app(args: dict):
    """Application builder for ``serve run seg_rt.cluster.serve:build_app model=...`` and ``seg-rt serve``."""
    cfg = ServeConfig.model_validate(args)
    gpus = cfg.num_gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": cfg.num_cpus_per_replica},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    if cfg.num_replicas is not None:
        options["num_replicas"] = cfg.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    return _deployment().options(**options).bind(cfg.model_dump(mode="json"))


def load_config(path: str | Path | None, **overrides) -> ServeConfig:
    data: dict = {}
    if path:
        yaml = require("yaml", "server config files")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"server config {str(p)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    from pydantic import ValidationError

    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"server config: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def serve_forever(
    cfg: ServeConfig, *, address: str | None = None, ray_temp_dir: str | None = None, blocking: bool = True
):
    """Start (or join) Ray, start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app."""
    from ray import serve

    from .driver import start_ray

    start_ray(address, temp_dir=ray_temp_dir)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(
        build_app(cfg.model_dump(mode="json")), name="seg-rt", route_prefix="/", blocking=False
    )
    logger.info("seg-rt serving %s on http://%s:%d", cfg.model, cfg.host, cfg.port)
    if blocking:
        while True:
            time.sleep(3600)
    return handle
