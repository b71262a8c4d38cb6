"""Asynchronous jobs on the serving core, Ray-free and HTTP-free: a bounded queue, one worker
thread, progress and cancellation per step.

``JobManager.submit`` checks a request with the core's limits (a bad one is refused before it is
queued), queues it (past ``JobSettings.queue_length``: ``QueueFull``) and returns its ``Job``. The
worker thread takes queued jobs in order, as many as fill one batch (``max_batch_size`` images), and
runs them through ``ServingCore.run_batch`` with the jobs as its ``Watch``es: each step updates the
job's progress; a cancelled job's rows leave the run at the next step while its neighbours go on
unchanged (``seg_rt.sampler``: dropped rows). A queued job that is cancelled never runs.

The job itself (record, ids, owner) is ``job.py``; its folder on disk, the restart rule and
retention are ``job_store.py``. Jobs belong to their owner (a digest of the API key that created
them); another owner sees none.
"""

import hashlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from seg_rt.params import GenerationParams

from .core import CANCELLED, Failure, ServingCore
from .job import (  # re-exported: the job API's names live here for its callers
    FINISHED,
    LOST,
    RECORD,
    STATES,
    Job,
    JobElsewhere,
    JobNotFound,
    QueueFull,
    WatchedRows,
    input_files,
    new_job_id,
    owner_of,
)
from .job_store import JobStore
from .webhooks import SECRET_ENV, Sender

__all__ = [
    "FINISHED",
    "LOST",
    "RECORD",
    "STATES",
    "Job",
    "JobElsewhere",
    "JobManager",
    "JobMetrics",
    "JobNotFound",
    "QueueFull",
    "WatchedRows",
    "jobs_for",
    "owner_of",
]

logger = logging.getLogger(__name__)


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
        self.queue_length = queue_length
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.preview, self.preview_every = preview, preview_every
        self.metrics = JobMetrics(core.metrics.registry)
        self.instance = uuid.uuid4().hex
        self.store = JobStore(state_dir, self.instance)
        self.jobs: dict[str, Job] = {}
        self.live: dict[str, Job] = {}  # blocking requests being served (``track``)
        self.queue: deque[Job] = deque()
        self.on_finish: list[Callable[[Job], None]] = []  # webhooks and other listeners
        self.sender = None  # webhooks.Sender when the config allows webhook hosts
        self._cond = threading.Condition()
        self._closed = False
        self._pace: deque[float] = deque(maxlen=20)  # seconds per finished job: Retry-After, ETA
        self.recover()
        self._worker = threading.Thread(target=self._work, name="seg-rt-jobs", daemon=True)
        if start:
            self._worker.start()

    # ---- disk (``job_store.JobStore``) -------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.store.root

    def _save(self, job: Job) -> None:
        if not job.removed:  # a deleted job's folder is not written again
            self.store.save(job)

    def _load(self, job_id: str) -> Job | None:
        return self.store.load(job_id)

    def recover(self) -> None:
        """After a restart: jobs left queued or running by a server that is gone are ``failed``."""
        self.store.recover()
        self.prune()

    def prune(self) -> None:
        """Finished jobs past the retention time, then the oldest finished ones past the size cap."""
        for job_id in self.store.prune(self.retention_s, self.max_bytes, self._active_ids()):
            self.jobs.pop(job_id, None)

    def _active_ids(self) -> set[str]:
        return {j.id for j in self.jobs.values() if j.status in ("queued", "running")}

    def disk_bytes(self) -> int:
        return self.store.disk_bytes()

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
                self.store.write(job.id, name, data)
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
        if job is None or job.owner != owner or job.removed:
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
        jobs = {j.id: j for j in self.jobs.values() if j.owner == owner and not j.removed}
        for job_id in self.store.ids():
            if job_id not in self.jobs and (job := self._load(job_id)) and job.owner == owner:
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

    def delete(self, job_id: str, owner: str) -> Job:
        """Cancel the job if it is queued or running (``cancel``), then remove it with its result:
        every lookup misses it at once; a running one's folder goes when its run lets it go (the
        next step). ``JobElsewhere`` for a queued or running job of another replica."""
        job = self.get(job_id, owner)
        if job.status in ("queued", "running"):
            job = self.cancel(job_id, owner)
        with self._cond:
            job.removed = True
            if job.status in FINISHED:
                self._drop(job)
        return job

    def _drop(self, job: Job) -> None:
        """Called with ``_cond`` held: a deleted job forgotten and its folder removed."""
        self.jobs.pop(job.id, None)
        self.store.remove(job.id)

    def result(self, job: Job) -> list[bytes]:
        """The job's output files' bytes, checked against their recorded size and digest."""
        return self.store.result(job)

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
        self.store.release()

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
        stem, suffix, _ = self.core.output
        for i, (out, p) in enumerate(zip(result, job.rows, strict=True)):
            data = self.core.encode(out, p)
            name = f"{stem}-{i}.{suffix}"
            self.store.write(job.id, name, data)  # complete before the record names it
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
        if job.removed:  # deleted while it ran: gone now that its run let it go
            self._drop(job)
        self.metrics.seconds.labels(status=status).observe(job.finished - job.created)
        self._cond.notify_all()

    def _announce(self, job: Job) -> None:
        """Listeners (webhooks, event streams) told of the end, without the lock held."""
        for listen in list(self.on_finish) + list(job.listeners):
            try:
                listen(job)
            except Exception as exc:
                logger.warning("job listener failed: %s", exc)


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
