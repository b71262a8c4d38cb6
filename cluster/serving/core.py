"""The serving core, Ray-free and HTTP-free: one replica's model, limits, grouping and failure isolation.

``ServingCore.check`` applies the server's limits and the model's size rules (per side, aspect,
multiple of the model's scale factor) to one ``GenerateRequest``; ``ServingCore.run_batch`` groups
the requests of one batch by ``GenerationParams.batch_key()``, chunks each group to the engine's
batch and runs each chunk as one sampling run. A chunk that fails is re-run one request at a time,
so a bad request fails alone with its own message and its neighbours get the images they get
served alone (batch-invariant sampling, per-row seeds). Tested in-process (``tests/test_serving.py``),
the way ``cluster/jobs/worker.py`` holds the jobs side.
"""

import inspect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from seg_rt.errors import first_line
from seg_rt.images import params_text, png_bytes
from seg_rt.params import SCHEDULERS, GenerationParams, VideoParams

from .config import ServeConfig
from .metrics import Metrics
from .request import GenerateRequest

logger = logging.getLogger(__name__)


def run_group(pipe, params_list: Sequence[GenerationParams], engine=None, callback=None) -> list:
    """One sampling run for rows sharing a ``batch_key()``: their images (PIL), in order.
    ``callback``: the sampler's step callback (it may drop rows: then only the rows left come back)."""
    from seg_rt.pipeline import run_params

    return run_params(pipe, params_list, engine=engine, callback=callback)


def run_video(pipe, params_list: Sequence[GenerationParams], engine=None, callback=None) -> list:
    """``run_group`` for a video model: one video per run (``ServingCore.run_capacity`` is 1 there),
    its ``[F, H, W, 3]`` frames in [0, 1]."""
    from seg_rt.video.sampling import generate_video

    if engine is not None or len(params_list) != 1:
        raise ValueError("a video model serves one video per sampling run, with the torch engine")
    return [generate_video(pipe, params=params_list[0], callback=callback)[0]]


def model_kind(pipe) -> str:
    """``image`` or ``video``: what the loaded model makes (its family's kind)."""
    from seg_rt.families import family_of

    try:
        family_of(pipe, "image")
        return "image"
    except ValueError:
        family_of(pipe, "video")  # neither: the family lookup's own line
        return "video"


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


class Watch:
    """What a caller of ``run_batch`` sees of one request while it samples: ``step(done, total)``
    after each step, and ``cancelled`` (set from another thread), read after each step: its rows
    then leave the run and the request gets ``CANCELLED``. The base class watches nothing."""

    cancelled = False

    def step(self, done: int, total: int) -> None:
        pass

    def preview(self, latents, rows: Sequence[int]) -> None:
        """The request's rows of the latents after a step (a view; copy what you keep)."""


class _AllCancelled(Exception):
    pass


@dataclass
class Failure:
    """Why one request got no images: HTTP ``status`` and a one-line message."""

    status: int
    message: str


def _failure(exc: Exception) -> Failure:
    if isinstance(exc, ValueError):  # bad input only the model or engine can see (SegRtError included)
        return Failure(422, first_line(exc))
    logger.error("sampling failed", exc_info=exc)
    return Failure(500, f"sampling failed ({type(exc).__name__})")


CANCELLED = Failure(499, "cancelled")  # 499: nginx's "client closed request"


class ServingCore:
    """One replica's state: the loaded model and engine, the limits, stats; no Ray, no HTTP."""

    def __init__(
        self, config: ServeConfig, pipe, engine=None, run: Callable = run_group, group=None, loras=None
    ) -> None:
        self.config = config
        self.pipe = pipe
        self.kind = model_kind(pipe)  # image or video: which requests it takes, what it answers
        if self.kind == "video":
            if engine is not None or group is not None:
                raise ValueError(
                    "a video model is served with the torch engine on one device: no engine, no branch_parallel"
                )
            if run is run_group:
                run = run_video
        self.engine = engine
        self.group = group  # latency mode: the branch-parallel ranks that sample (closed with the core)
        self._run = run if group is None else partial(run_on_group, group)
        # runs that take the sampler's step callback report progress and drop cancelled rows per
        # step; others (latency mode's ranks, a caller's own run) only between runs
        self._stepwise = "callback" in inspect.signature(self._run).parameters
        from seg_rt.pipeline import default_side, size_factor

        self.factor = size_factor(pipe)  # pixel sizes are multiples of it (the family's rule)
        self.latent_factor = int(pipe.vae_scale_factor)  # pixels per latent (engine shapes)
        self.default_side = default_side(pipe)
        self.max_side = config.limits.max_side or 4 * self.default_side
        # a fixed-shape engine (seg_rt.engines.Denoiser) accepts one shape and at most its batch per run
        self.shapes = engine.shapes if engine is not None and engine.shapes.batch is not None else None
        per_run = engine.images_per_run if engine is not None else None
        self.run_capacity = per_run if per_run is not None else config.max_batch_size
        if self.kind == "video":  # video sampling takes one request (prompt, seed) per run
            self.run_capacity = 1
        self.default_frames = getattr(pipe, "default_frames", None) or VideoParams().frames
        # the preloaded LoRAs by name (seg_rt.lora.LoRA, loaded into pipe): what requests pick from
        self.loras: dict = dict(loras or {})
        self.stats = {"requests": 0, "images": 0, "sampling_runs": 0, "failed": 0}
        self.metrics = Metrics()
        self._lock = threading.Lock()
        # one sampling run at a time: a run installs SEG processors on the shared pipeline
        self._sampling = threading.Lock()

    @classmethod
    def load(cls, config: ServeConfig, launcher: str = "processes", **group_options) -> "ServingCore":
        """Load the model (and engine) once, as a replica does. Latency mode (``branch_parallel`` > 1):
        the ranks (``launcher``: processes or ray; ``group_options`` for ``open_group``) load and run
        the model; the replica keeps a CPU copy only to check requests (sizes, SEG layers)."""
        import torch

        from seg_rt.models import open_model

        # CPU results depend on the thread count: fix it from the replica's resources
        threads = max(1, int(config.num_cpus_per_replica))
        parallel = config.parallel(launcher)
        if parallel is not None:
            from ..branch import open_group

            group = open_group(parallel, config.model, config.engine, **group_options)
            try:  # a CPU copy without an engine: it only checks requests
                return cls(config, open_model(config.model, None, "cpu", threads).pipe, group=group)
            except BaseException:
                group.close()
                raise
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loras = config.preloaded_loras()
        # a URL: fetched once per node; the named LoRAs loaded as adapters, each request picks its own
        opened = open_model(
            config.model,
            config.engine,
            device,
            threads,
            loras=tuple(loras.values()),
            model_config=config.single_file_config,
        )
        try:
            return cls(config, opened.pipe, opened.engine, loras=loras)
        except BaseException:
            opened.close()
            raise

    def close(self) -> None:
        if getattr(self, "jobs", None) is not None:  # the job API's manager (jobs.jobs_for)
            self.jobs.close()
        if self.engine is not None:
            self.engine.close()
        if self.group is not None:
            self.group.close()

    # ---- per request, before batching -------------------------------------------------------

    def check(self, req) -> list[GenerationParams]:
        """Limits and the model's size rules; one ``GenerationParams`` per image (seed + i), or the
        one of a video (``video_request.VideoRequest``). Raises ``ValueError`` with the line the
        client gets (422)."""
        config, lim = self.config, self.config.limits
        video = not isinstance(req, GenerateRequest)
        if video != (self.kind == "video"):
            raise ValueError(self.wrong_kind())
        defaults = (
            config.default_height or self.default_side,
            config.default_width or self.default_side,
            config.scheduler,
        )
        if video:
            p = req.params(*defaults, frames=self.default_frames)
        else:
            p = req.params(*defaults, loras=self.loras)
        h, w = p.height, p.width
        most_images = min(lim.max_images, config.max_batch_size)
        checks = [
            (p.steps <= lim.max_steps, f"steps must be <= {lim.max_steps}, got {p.steps}"),
            (len(p.prompt) <= lim.max_prompt_chars,
             f"prompt must be <= {lim.max_prompt_chars} characters, got {len(p.prompt)}"),
            (len(p.negative_prompt or "") <= lim.max_prompt_chars,
             f"negative_prompt must be <= {lim.max_prompt_chars} characters, got {len(p.negative_prompt or '')}"),
            (p.seg.scale <= lim.max_seg_scale, f"seg_scale must be in [0, {lim.max_seg_scale:g}], got {p.seg.scale:g}"),
            (p.cfg <= lim.max_cfg, f"cfg must be in [1, {lim.max_cfg:g}], got {p.cfg:g}"),
            (p.seg.sigma >= lim.min_sigma, f"seg_sigma must be >= {lim.min_sigma:g} or inf, got {p.seg.sigma:g}"),
            (video or req.num_images <= most_images, f"num_images must be <= {most_images}, got {getattr(req, 'num_images', 1)}"),
            (video or req.response == "json" or req.num_images == 1,
             "response 'png' carries one image; use response 'json' for num_images > 1"),
            (not video or p.video.frames <= lim.max_frames,
             f"frames must be <= {lim.max_frames}, got {p.video.frames if video else 0}"),
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
        return [p.replace(seed=p.seed + i) for i in range(getattr(req, "num_images", 1))]

    def wrong_kind(self) -> str:
        """Why an image request cannot go to a video model (and the other way round)."""
        name = self.config.public_model
        if self.kind == "video":
            return (
                f"the served model {name!r} is a video model: POST /v1/videos (or /v1/jobs with video "
                "fields); image routes need an image model"
            )
        return (
            f"the served model {name!r} is an image model: video needs a video model "
            "(seg-rt serve --model <video model>, e.g. seg-rt-demo-video)"
        )

    def check_model(self, p: GenerationParams) -> None:
        """What only the loaded model / engine can tell: size multiple, engine shape, SEG layers,
        the task (inpainting needs a family with it), whether it takes a distilled guidance value."""
        from seg_rt.params import check_size
        from seg_rt.pipeline import family_of, select_seg_layers

        check_size(p.height, p.width, self.factor)
        family_of(self.pipe).check_request(self.pipe, p)  # the task, distilled guidance
        if self.shapes is not None:
            f = self.latent_factor
            self.shapes.check(self.shapes.batch, p.height // f, p.width // f)
        if p.seg.enabled:
            select_seg_layers(self.pipe, p.video.layers if p.video is not None else p.seg.layers)

    # ---- one batch of checked requests -------------------------------------------------------

    def run_batch(
        self, requests: Sequence[Sequence[GenerationParams]], watches: Sequence[Watch] | None = None
    ) -> list[list | Failure]:
        """Images per request (or its ``Failure``): one sampling run per ``group_rows`` chunk; a
        chunk that fails is re-run one request at a time, so only the bad request fails.
        ``watches`` (one per request): progress, and cancellation at the next step (``CANCELLED``;
        the other rows of its run go on unchanged). Latency mode samples in the ranks: there a
        cancelled request is only dropped between runs."""
        if watches is None:  # watches carried on the rows (``jobs.WatchedRows``: blocking requests)
            found = [getattr(rows, "watch", None) for rows in requests]
            if any(w is not None for w in found):
                watches = [w if w is not None else Watch() for w in found]
        with self._sampling:
            return self._run_batch(requests, watches)

    def _run_batch(self, requests, watches) -> list[list | Failure]:
        results: list[list | Failure] = [[None] * len(rows) for rows in requests]
        self.metrics.batch_requests.observe(len(requests))
        for chunk in group_rows(requests, self.run_capacity):
            if watches is not None:
                for k in {k for k, _ in chunk if watches[k].cancelled}:
                    results[k] = CANCELLED
                chunk = [(k, i) for k, i in chunk if not isinstance(results[k], Failure)]
                if not chunk:
                    continue
            try:
                self._fill(results, requests, chunk, watches)
            except _AllCancelled:
                for k, _ in chunk:
                    results[k] = CANCELLED
            except Exception as exc:  # isolate: each request of the chunk alone
                members = sorted({k for k, _ in chunk})
                if len(members) == 1:
                    results[members[0]] = _failure(exc)
                    continue
                for k in members:
                    if isinstance(results[k], Failure):
                        continue
                    try:
                        self._fill(results, requests, [(kk, i) for kk, i in chunk if kk == k], watches)
                    except _AllCancelled:
                        results[k] = CANCELLED
                    except Exception as solo_exc:
                        results[k] = _failure(solo_exc)
        with self._lock:
            self.stats["requests"] += len(requests)
            self.stats["failed"] += sum(isinstance(r, Failure) and r != CANCELLED for r in results)
        return results

    def _fill(
        self, results: list, requests: Sequence[Sequence[GenerationParams]], chunk, watches=None
    ) -> None:
        t0 = time.perf_counter()
        rows = [requests[k][i] for k, i in chunk]
        if watches is None:
            images = self._run(self.pipe, rows, self.engine)
        elif not self._stepwise:  # latency mode: the steps run in the ranks
            images = self._run(self.pipe, rows, self.engine)
            cancelled = {k for k, _ in chunk if watches[k].cancelled}
            for k in cancelled:
                results[k] = CANCELLED
            kept = [n for n, (k, _) in enumerate(chunk) if k not in cancelled]
            chunk, images = [chunk[n] for n in kept], [images[n] for n in kept]
        else:
            alive = list(chunk)  # the rows still in the run, in its row order
            total = rows[0].steps

            def step(i, t, latents):
                members = sorted({k for k, _ in alive})
                for k in members:
                    watches[k].step(i + 1, total)
                    watches[k].preview(latents, [r for r, (kk, _) in enumerate(alive) if kk == k])
                gone = {k for k in members if watches[k].cancelled}
                if not gone:
                    return None
                if len(gone) == len(members):
                    raise _AllCancelled
                for k in gone:
                    results[k] = CANCELLED
                drop = [r for r, (k, _) in enumerate(alive) if k in gone]
                alive[:] = [row for row in alive if row[0] not in gone]
                return drop

            images = self._run(self.pipe, rows, self.engine, callback=step)
            chunk = alive
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
        return png_bytes(image, params_text(self.config.public_model, params.to_record()))

    @property
    def output(self) -> tuple[str, str, str]:
        """(file stem, suffix, media type) of what this model makes."""
        return ("video", "mp4", "video/mp4") if self.kind == "video" else ("image", "png", "image/png")

    def encode(self, out, params: GenerationParams) -> bytes:
        """One output's file: a PNG with its record, or an H.264 mp4 at the request's fps."""
        if params.video is None:
            return self.png(out, params)
        from seg_rt.video.io import mp4_bytes

        return mp4_bytes(out, fps=params.video.fps)

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
            "model": self.config.public_model,
            "kind": self.kind,
            "engine": self.config.engine.partition(":")[0],  # the kind, not the server's folder
            "accepted_shapes": shapes,
            "default_size": [
                self.config.default_height or self.default_side,
                self.config.default_width or self.default_side,
            ],
            "max_side": self.max_side,
            "limits": self.config.limits.model_dump(),
            "max_batch_size": self.config.max_batch_size,
            "branch_parallel": self.config.branch_parallel,
            "loras": {name: {"file": x.file, "sha256": x.sha256} for name, x in self.loras.items()},
            "defaults": GenerationParams(scheduler=self.config.scheduler).to_record(),  # request defaults
            "schedulers": list(SCHEDULERS),  # the sampler names requests may pick
            "stats": stats,
        }
