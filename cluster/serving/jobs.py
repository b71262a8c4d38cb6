"""Asynchronous jobs on the serving core, Ray-free and HTTP-free: a bounded queue, one worker
thread, progress and cancellation per step, results kept on disk.

``JobManager.submit`` checks a request with the core's limits (a bad one is refused before it is
queued), queues it (past ``JobSettings.queue_length``: ``QueueFull``) and returns its ``Job``. The
worker thread takes queued jobs in order, as many as fill one batch (``max_batch_size`` images), and
runs them through ``ServingCore.run_batch`` with the jobs as its ``Watch``es: each step updates the
job's progress; a cancelled job's rows leave the run at the next step while its neighbours go on
unchanged (``seg_rt.sampler``: dropped rows). A queued job that is cancelled never runs.

Each job is a folder ``<state_dir>/jobs/<id>/`` holding ``job.json`` (status, owner, request,
timings, and per output a row in the job manifest's format: item, status, seed, params, path,
bytes, sha256, seconds) and its output files; every write is atomic (temp file + rename). Finished
jobs are kept until ``retention_s`` or the ``max_bytes`` cap (oldest first) and survive a restart.
Jobs that were queued or running when their server stopped are reported ``failed`` with the reason
after restart, never re-run: each manager holds an exclusive lock (``flock``) on its own
``servers/<instance>.lock``; a job whose server's lock is free lost its server.

Jobs belong to their owner (a digest of the API key that created them); another owner sees none.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from seg_rt.images import write_atomic
from seg_rt.params import GenerationParams

from .core import CANCELLED, Failure, ServingCore, Watch
from .webhooks import SECRET_ENV, Sender

logger = logging.getLogger(__name__)

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
        for key in INPUT_KEYS:
            image = getattr(p, key)
            if image is not None:
                buf = io.BytesIO()
                image.pil().save(buf, format="PNG")
                files[f"input-{image.sha256}.png"] = buf.getvalue()
    return files


def with_inputs(record: dict, folder: Path | None) -> dict:
    """A row's record with its input images read back from the job's folder (their sha256 checked)."""
    from seg_rt.tasks import load_image

    out = dict(record)
    for key in INPUT_KEYS:
        named = record.get(key)
        if isinstance(named, dict) and folder is not None:
            image = load_image(folder / f"input-{named['sha256']}.png", key, mode=named["mode"])
            if image.sha256 != named["sha256"]:
                raise ValueError(f"{key} of the job record does not match its kept file")
            out[key] = image
    return out


class JobMetrics:
    """The job API's metrics, in the core's registry (no user-controlled label values)."""

    def __init__(self, registry) -> None:
        self.queued = Gauge("seg_rt_jobs_queued", "jobs waiting in the queue", registry=registry)
        self.running = Gauge("seg_rt_jobs_running", "jobs sampling now", registry=registry)
        self.seconds = Histogram(
            "seg_rt_job_seconds",
            "seconds from submission to the end, by final status",
            ["status"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=registry,
        )
        self.cancellations = Counter(
            "seg_rt_job_cancellations",
            "jobs cancelled, by the state they were in",
            ["state"],
            registry=registry,
        )
        self.webhooks = Counter(
            "seg_rt_webhook_deliveries", "webhook deliveries by outcome", ["outcome"], registry=registry
        )


class JobManager:
    """The job queue of one replica over ``core``: submit, look up, cancel; a worker thread runs them."""

    def __init__(
        self,
        core: ServingCore,
        state_dir: str | Path,
        *,
        queue_length: int = 64,
        retention_s: float = 86400.0,
        max_bytes: int = 1 << 30,
        preview: Callable[[Any], bytes | None] | None = None,
        preview_every: int = 0,
        start: bool = True,
    ) -> None:
        self.core = core
        self.root = Path(state_dir) / "jobs"
        self.servers = Path(state_dir) / "servers"
        self.queue_length = queue_length
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.preview, self.preview_every = preview, preview_every
        self.metrics = JobMetrics(core.metrics.registry)
        self.instance = uuid.uuid4().hex
        self.jobs: dict[str, Job] = {}
        self.live: dict[str, Job] = {}  # blocking requests being served (``track``)
        self.queue: deque[Job] = deque()
        self.on_finish: list[Callable[[Job], None]] = []  # webhooks and other listeners
        self.sender = None  # webhooks.Sender when the config allows webhook hosts
        self._cond = threading.Condition()
        self._lock_fd: int | None = None
        self._closed = False
        self._pace: deque[float] = deque(maxlen=20)  # seconds per finished job: Retry-After, ETA
        self.recover()
        self._worker = threading.Thread(target=self._work, name="seg-rt-jobs", daemon=True)
        if start:
            self._worker.start()

    # ---- disk ------------------------------------------------------------------------------

    def _hold_instance_lock(self) -> None:
        if self._lock_fd is not None:
            return
        self.servers.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.servers / f"{self.instance}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd

    def _server_alive(self, instance: str | None) -> bool:
        if instance == self.instance:
            return True
        path = self.servers / f"{instance}.lock"
        if not instance or not path.is_file():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # another live server holds it
        finally:
            os.close(fd)
        return False

    def _save(self, job: Job) -> None:
        self._hold_instance_lock()
        record = job.record() | {"server": self.instance}
        write_atomic(self.root / job.id / RECORD, json.dumps(record, sort_keys=True).encode())

    def _load(self, job_id: str) -> Job | None:
        if not _is_job_id(job_id):
            return None
        path = self.root / job_id / RECORD
        try:
            return Job.from_record(json.loads(path.read_bytes()), path.parent)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def recover(self) -> None:
        """After a restart: jobs left queued or running by a server that is gone are ``failed``."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            try:
                record = json.loads((folder / RECORD).read_bytes())
            except (OSError, ValueError):
                continue
            if record.get("status") in ("queued", "running") and not self._server_alive(record.get("server")):
                job = self._load(folder.name)
                if job is None:
                    continue
                job.error, job.error_status = LOST.format(status=job.status), 503
                job.status, job.finished = "failed", time.time()
                self._save(job)
        self.prune()

    def prune(self) -> None:
        """Finished jobs past the retention time, then the oldest finished ones past the size cap."""
        if not self.root.is_dir():
            return
        now, rows = time.time(), []
        for folder in self.root.iterdir():
            job = self._load(folder.name)
            if job is None or job.status not in FINISHED or job.id in self._active_ids():
                continue
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            rows.append((job.finished or job.created, size, folder))
        rows.sort()
        total = sum(size for _, size, _ in rows)
        for finished, size, folder in rows:
            if now - finished > self.retention_s or total > self.max_bytes:
                shutil.rmtree(folder, ignore_errors=True)  # a folder of ours: an id we gave + job.json
                self.jobs.pop(folder.name, None)
                total -= size

    def _active_ids(self) -> set[str]:
        return {j.id for j in self.jobs.values() if j.status in ("queued", "running")}

    def disk_bytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    # ---- the API ---------------------------------------------------------------------------

    def submit(self, rows: list[GenerationParams], owner: str, kind: str, body: dict, **extra) -> Job:
        """Queue checked rows (``ServingCore.check``); ``QueueFull`` past the queue length."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the job manager is closed")
            if len(self.queue) >= self.queue_length:
                raise QueueFull(self.queue_length, self.retry_after())
            job = Job(id=new_job_id(), owner=owner, kind=kind, body=body, rows=rows, extra=extra)
            job.previewer, job.preview_every = self.preview, self.preview_every
            for name, data in input_files(rows).items():  # before the record that names them
                write_atomic(self.root / job.id / name, data)
            self._save(job)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.metrics.queued.set(len(self.queue))
            self._cond.notify_all()
        return job

    def track(self, rows: list[GenerationParams]) -> "WatchedRows":
        """A blocking request's rows, watched (progress, previews, ``/sdapi/v1/interrupt``) while
        they sample: ``ServingCore.run_batch`` finds the watch on them. Not queued, not stored;
        ``untrack`` it when it is answered."""
        job = Job(id=new_job_id(), owner="", kind="blocking", body={}, rows=rows)
        job.previewer, job.preview_every = self.preview, self.preview_every
        with self._cond:
            self.live[job.id] = job
        return WatchedRows(rows, job)

    def untrack(self, rows: "WatchedRows") -> None:
        with self._cond:
            self.live.pop(rows.watch.id, None)

    def current(self) -> Job | None:
        """The job (or blocking request) sampling now that started first; None when idle."""
        with self._cond:
            running = [j for j in (*self.jobs.values(), *self.live.values()) if j.status == "running"]
        return min(running, key=lambda j: j.started or 0.0, default=None)

    def waiting(self) -> int:
        """Jobs queued plus blocking requests not yet sampling."""
        with self._cond:
            return len(self.queue) + sum(j.status == "queued" for j in self.live.values())

    def retry_after(self) -> int:
        pace = sum(self._pace) / len(self._pace) if self._pace else 1.0
        return max(1, round(pace))

    def get(self, job_id: str, owner: str) -> Job:
        job = self.jobs.get(job_id) or self._load(job_id)
        if job is None or job.owner != owner:
            raise JobNotFound(job_id)  # another owner's job: as if it did not exist
        return job

    def position(self, job: Job) -> int | None:
        """Jobs ahead of ``job`` in the queue (0: it runs next); None when it is not queued."""
        with self._cond:
            try:
                return self.queue.index(job) if job.status == "queued" else None
            except ValueError:
                return None

    def view(self, job: Job) -> dict:
        return job.view(self.position(job))

    def owned(self, owner: str) -> list[Job]:
        jobs = {j.id: j for j in self.jobs.values() if j.owner == owner}
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.name not in jobs and (job := self._load(folder.name)) and job.owner == owner:
                    jobs[job.id] = job
        return sorted(jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str, owner: str) -> Job:
        """A queued job leaves the queue and never runs; a running one stops at its next step."""
        job = self.get(job_id, owner)
        if job.id not in self.jobs and job.status in ("queued", "running"):
            raise JobElsewhere(f"job {job_id} is {job.status} on another replica; cancel it there")
        with self._cond:
            ended = job.status == "queued"
            if ended:
                self.queue.remove(job)
                self.metrics.queued.set(len(self.queue))
                self.metrics.cancellations.labels(state="queued").inc()
                self._finish(job, "cancelled")
            elif job.status == "running" and not job.cancelled:
                job.cancelled = True
                self.metrics.cancellations.labels(state="running").inc()
        if ended:
            self._announce(job)
        return job

    def result(self, job: Job) -> list[bytes]:
        """The job's output files' bytes, checked against their recorded size and digest."""
        out = []
        for row in job.outputs:
            data = (self.root / job.id / Path(row["path"]).name).read_bytes()
            if len(data) != row["bytes"] or hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise OSError(f"job {job.id}: output {row['path']} does not match its record")
            out.append(data)
        return out

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until ``job`` is finished (tests, the blocking bridge); True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while job.status not in FINISHED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout=60)
        if self.sender is not None:
            self.sender.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- the worker ------------------------------------------------------------------------

    def _next_batch(self) -> list[Job]:
        """Queued jobs in order, as many as fill one batch (at least one)."""
        batch, images = [], 0
        while self.queue and (
            not batch or images + len(self.queue[0].rows) <= self.core.config.max_batch_size
        ):
            job = self.queue.popleft()
            batch.append(job)
            images += len(job.rows)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self.queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._next_batch()
                now = time.time()
                for job in batch:
                    job.status, job.started = "running", now
                self.metrics.queued.set(len(self.queue))
                self.metrics.running.set(len(batch))
            for job in batch:
                self._save(job)
            try:
                results = self.core.run_batch([j.rows for j in batch], watches=batch)
            except Exception as exc:  # the core isolates request failures; this is the core itself
                logger.error("job batch failed", exc_info=exc)
                results = [Failure(500, f"sampling failed ({type(exc).__name__})")] * len(batch)
            for job, result in zip(batch, results, strict=True):
                try:
                    self._store(job, result)
                except Exception as exc:
                    logger.error("storing job %s failed", job.id, exc_info=exc)
                    with self._cond:
                        job.error, job.error_status = f"storing the result failed ({type(exc).__name__})", 500
                        self._finish(job, "failed")
                    self._announce(job)
            self.metrics.running.set(0)
            try:
                self.prune()
            except OSError as exc:
                logger.warning("pruning finished jobs failed: %s", exc)

    def _store(self, job: Job, result: list | Failure) -> None:
        if result == CANCELLED or (job.cancelled and not isinstance(result, Failure)):
            with self._cond:
                self._finish(job, "cancelled")
            return self._announce(job)
        if isinstance(result, Failure):
            with self._cond:
                job.error, job.error_status = result.message, result.status
                self._finish(job, "failed")
            return self._announce(job)
        seconds = time.time() - (job.started or job.created)
        outputs = []
        for i, (image, p) in enumerate(zip(result, job.rows, strict=True)):
            data = self.core.png(image, p)
            name = f"image-{i}.png"
            write_atomic(self.root / job.id / name, data)  # complete before the record names it
            outputs.append(
                {
                    "item": f"{job.id}-{i}",
                    "status": "ok",
                    "seed": p.seed,
                    "params": p.to_record(),
                    "path": name,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "seconds": round(seconds / len(job.rows), 4),
                }
            )
        with self._cond:
            job.outputs = outputs
            self._finish(job, "succeeded")
        self._pace.append(seconds)
        self._announce(job)

    def _finish(self, job: Job, status: str) -> None:
        """Called with ``_cond`` held: the final status, saved, waiters told (then ``_announce``)."""
        job.status, job.finished = status, time.time()
        if status == "succeeded":
            job.done_steps = job.total_steps
        self._save(job)
        self.metrics.seconds.labels(status=status).observe(job.finished - job.created)
        self._cond.notify_all()

    def _announce(self, job: Job) -> None:
        """Listeners (webhooks, event streams) told of the end, without the lock held."""
        for listen in list(self.on_finish) + list(job.listeners):
            try:
                listen(job)
            except Exception as exc:
                logger.warning("job listener failed: %s", exc)


class WatchedRows(list):
    """A request's per-image params carrying its ``Watch`` (``watch``) through any batcher (Ray
    Serve's ``@serve.batch`` passes the objects as they are) to ``ServingCore.run_batch``."""

    def __init__(self, rows, watch: Watch) -> None:
        super().__init__(rows)
        self.watch = watch


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def _is_job_id(text: str) -> bool:
    """Only names we give (``job_`` + 32 hex digits): a path from a client never reaches the disk."""
    rest = text.removeprefix("job_")
    return text.startswith("job_") and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


def jobs_for(core: ServingCore) -> JobManager:
    """The core's one job manager (made on first use, closed with the core), with the config's
    state folder and job settings."""
    manager = getattr(core, "jobs", None)
    if manager is None:
        from .config import state_dir_default
        from .previews import previewer

        s = core.config.jobs
        manager = JobManager(
            core,
            core.config.state_dir or state_dir_default(),
            queue_length=s.queue_length,
            retention_s=s.retention_s,
            max_bytes=s.max_bytes,
            preview=previewer(core.pipe),
            preview_every=s.preview_every,
        )
        hooks = core.config.webhooks
        if hooks.allow_hosts:
            manager.sender = Sender(hooks, hooks.secret or os.environ.get(SECRET_ENV), manager.metrics)

            def notify(job: Job) -> None:
                if job.extra.get("webhook_url"):
                    manager.sender.send(job.extra["webhook_url"], job.view())

            manager.on_finish.append(notify)
        core.jobs = manager
    return manager
