"""One job of the job API: its record (``Job``: status, progress, the ``job.json`` it is saved as),
its ids and owner, the input images it keeps beside its record, and ``WatchedRows`` (a blocking
request's rows carrying their watch). No disk access beyond reading input images, no threads:
``job_store`` keeps jobs on disk, ``jobs.JobManager`` queues and runs them.
"""

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg_rt.params import GenerationParams

from .core import Watch

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
RECORD = "job.json"
LOST = "the server stopped before the job finished (it was {status}); it is not re-run: submit it again"


def owner_of(key: bytes | str | None) -> str:
    """The owner id of jobs created with API key ``key`` (no key: ``""``); never the key itself."""
    if not key:
        return ""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(b"seg-rt job owner\0" + raw).hexdigest()[:32]


class QueueFull(Exception):
    """The job queue is at its length; ``retry_after``: seconds a client should wait."""

    def __init__(self, length: int, retry_after: int) -> None:
        super().__init__(f"the job queue is full ({length} jobs); retry after {retry_after} s")
        self.retry_after = retry_after


class JobNotFound(KeyError):
    pass


class JobElsewhere(Exception):
    """A queued or running job of another replica (same state folder): only that one can cancel it."""


@dataclass
class Job(Watch):
    """One job: its request, its per-image params, where it stands. A ``Watch`` for the core."""

    id: str
    owner: str
    kind: str  # what its result is: "png" (one image), "json" (images as base64)
    body: dict  # the request as the client's fields (JSON-ready), for the record
    rows: list[GenerationParams]
    created: float = field(default_factory=time.time)
    status: str = "queued"
    started: float | None = None
    finished: float | None = None
    done_steps: int = 0
    total_steps: int = 0
    error: str | None = None
    error_status: int | None = None
    outputs: list[dict] = field(default_factory=list)  # job-manifest rows, one per output file
    cancelled: bool = False
    removed: bool = False  # deleted (``JobManager.delete``): gone for every lookup, its folder too
    preview_png: bytes | None = None
    preview_step: int = 0
    extra: dict = field(default_factory=dict)  # what other layers keep on the job (webhook url, ...)
    previewer: Callable[[Any], bytes | None] | None = field(default=None, repr=False)
    preview_every: int = 0
    listeners: list[Callable[["Job"], None]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.total_steps = self.rows[0].steps if self.rows else 0

    def step(self, done: int, total: int) -> None:
        self.done_steps, self.total_steps = done, total
        if self.status == "queued":  # a blocking request (``JobManager.track``): it runs now
            self.status, self.started = "running", self.started or time.time()
        for listen in list(self.listeners):
            listen(self)

    def preview(self, latents, rows: Sequence[int]) -> None:
        every = self.preview_every
        if self.previewer is not None and every and (self.done_steps % every == 0 or self.done_steps == 1):
            self.preview_png = self.previewer(latents[list(rows)])
            self.preview_step = self.done_steps

    def elapsed(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return round((self.finished or now or time.time()) - self.started, 3)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: the steps left at the pace so far (None before the first step)."""
        if self.status != "running" or not self.done_steps:
            return None
        spent = (now or time.time()) - (self.started or 0.0)
        return round(spent / self.done_steps * (self.total_steps - self.done_steps), 3)

    def view(self, position: int | None = None) -> dict:
        """The job's status as clients see it (``GET /v1/jobs/{id}``)."""
        now = time.time()
        return {
            "id": self.id,
            "object": "job",
            "status": self.status,
            "queue_position": position,
            "step": self.done_steps,
            "total_steps": self.total_steps,
            "progress": round(self.done_steps / self.total_steps, 4) if self.total_steps else 0.0,
            "created": round(self.created, 3),
            "elapsed_seconds": self.elapsed(now),
            "eta_seconds": self.eta(now),
            "error": self.error,
            "num_outputs": len(self.outputs),
        }

    def record(self) -> dict:
        return {
            "id": self.id,
            "owner": self.owner,
            "kind": self.kind,
            "status": self.status,
            "request": self.body,
            "params": [p.to_record() for p in self.rows],
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "steps": [self.done_steps, self.total_steps],
            "error": self.error,
            "error_status": self.error_status,
            "outputs": self.outputs,
            "extra": self.extra,
        }

    @classmethod
    def from_record(cls, r: dict, folder: Path | None = None) -> "Job":
        """``folder``: the job's own, where its input images are kept (``input_files``)."""
        job = cls(
            id=r["id"],
            owner=r["owner"],
            kind=r["kind"],
            body=r["request"],
            rows=[GenerationParams.from_record(with_inputs(p, folder)) for p in r["params"]],
            created=r["created"],
            status=r["status"],
            started=r["started"],
            finished=r["finished"],
            error=r["error"],
            error_status=r.get("error_status"),
            outputs=r["outputs"],
            extra=r.get("extra", {}),
        )
        job.done_steps, job.total_steps = r["steps"]
        return job


INPUT_KEYS = ("init_image", "mask")  # request fields holding an input image (records: its sha256)


def input_files(rows: Sequence[GenerationParams]) -> dict[str, bytes]:
    """A job's input images as lossless PNGs named by their sha256 (``InputImage.sha256``), kept in
    the job's folder: records name images by sha256 only, so a reloaded job reads them back here."""
    import io

    files = {}
    for p in rows:
        still = p.video.image if p.video is not None else None  # image-to-video
        for image in (*(getattr(p, key) for key in INPUT_KEYS), still):
            if image is not None:
                buf = io.BytesIO()
                image.pil().save(buf, format="PNG")
                files[f"input-{image.sha256}.png"] = buf.getvalue()
    return files


def with_inputs(record: dict, folder: Path | None) -> dict:
    """A row's record with its input images read back from the job's folder (their sha256 checked)."""
    from seg_rt.tasks import load_image

    def read(named: dict, key: str):
        image = load_image(folder / f"input-{named['sha256']}.png", key, mode=named["mode"])
        if image.sha256 != named["sha256"]:
            raise ValueError(f"{key} of the job record does not match its kept file")
        return image

    out = dict(record)
    for key in INPUT_KEYS:
        named = record.get(key)
        if isinstance(named, dict) and folder is not None:
            out[key] = read(named, key)
    video = record.get("video")
    if isinstance(video, dict) and isinstance(video.get("image"), dict) and folder is not None:
        out["video"] = {**video, "image": read(video["image"], "image")}  # an image-to-video still
    return out


class WatchedRows(list):
    """A request's per-image params carrying its ``Watch`` (``watch``) through any batcher (Ray
    Serve's ``@serve.batch`` passes the objects as they are) to ``ServingCore.run_batch``."""

    def __init__(self, rows, watch: Watch) -> None:
        super().__init__(rows)
        self.watch = watch


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    """Only names we give (``job_`` + 32 hex digits): a path from a client never reaches the disk."""
    rest = text.removeprefix("job_")
    return text.startswith("job_") and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)
