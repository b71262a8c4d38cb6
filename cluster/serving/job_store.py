"""Jobs on disk: each job is a folder ``<state_dir>/jobs/<id>/`` holding ``job.json`` (status,
owner, request, timings, and per output a row in the job manifest's format: item, status, seed,
params, path, bytes, sha256, seconds) and its output and input files; every write is atomic (temp
file + rename). Finished jobs are kept until ``retention_s`` or the ``max_bytes`` cap (oldest
first) and survive a restart. Jobs that were queued or running when their server stopped are
reported ``failed`` with the reason after restart, never re-run: each server holds an exclusive
lock (``flock``) on its own ``servers/<instance>.lock``; a job whose server's lock is free lost
its server.
"""

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from seg_rt.images import write_atomic

from .job import FINISHED, LOST, RECORD, Job, is_job_id


class JobStore:
    """The state folder of one server instance (``instance``: its id, named in the records it saves)."""

    def __init__(self, state_dir: str | Path, instance: str) -> None:
        self.root = Path(state_dir) / "jobs"
        self.servers = Path(state_dir) / "servers"
        self.instance = instance
        self.lock_fd: int | None = None

    def hold_instance_lock(self) -> None:
        if self.lock_fd is not None:
            return
        self.servers.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.servers / f"{self.instance}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.lock_fd = fd

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def server_alive(self, instance: str | None) -> bool:
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

    def write(self, job_id: str, name: str, data: bytes) -> None:
        """One file of a job's folder (an input or output), complete before a record names it."""
        write_atomic(self.root / job_id / name, data)

    def save(self, job: Job) -> None:
        self.hold_instance_lock()
        record = job.record() | {"server": self.instance}
        write_atomic(self.root / job.id / RECORD, json.dumps(record, sort_keys=True).encode())

    def load(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        path = self.root / job_id / RECORD
        try:
            return Job.from_record(json.loads(path.read_bytes()), path.parent)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove(self, job_id: str) -> None:
        """A job's folder and everything in it (its record, inputs and outputs)."""
        if is_job_id(job_id):
            shutil.rmtree(self.root / job_id, ignore_errors=True)  # a folder of ours: an id we gave

    def ids(self) -> list[str]:
        return [f.name for f in self.root.iterdir()] if self.root.is_dir() else []

    def recover(self) -> None:
        """After a restart: jobs left queued or running by a server that is gone are ``failed``."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            try:
                record = json.loads((folder / RECORD).read_bytes())
            except (OSError, ValueError):
                continue
            if record.get("status") in ("queued", "running") and not self.server_alive(record.get("server")):
                job = self.load(folder.name)
                if job is None:
                    continue
                job.error, job.error_status = LOST.format(status=job.status), 503
                job.status, job.finished = "failed", time.time()
                self.save(job)

    def prune(self, retention_s: float, max_bytes: int, active: Iterable[str]) -> list[str]:
        """Finished jobs past the retention time, then the oldest finished ones past the size cap;
        never one of ``active``. Returns the ids removed."""
        if not self.root.is_dir():
            return []
        now, rows, active = time.time(), [], set(active)
        for folder in self.root.iterdir():
            job = self.load(folder.name)
            if job is None or job.status not in FINISHED or job.id in active:
                continue
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            rows.append((job.finished or job.created, size, folder))
        rows.sort()
        total = sum(size for _, size, _ in rows)
        removed = []
        for finished, size, folder in rows:
            if now - finished > retention_s or total > max_bytes:
                shutil.rmtree(folder, ignore_errors=True)  # a folder of ours: an id we gave + job.json
                removed.append(folder.name)
                total -= size
        return removed

    def disk_bytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def result(self, job: Job) -> list[bytes]:
        """The job's output files' bytes, checked against their recorded size and digest."""
        out = []
        for row in job.outputs:
            data = (self.root / job.id / Path(row["path"]).name).read_bytes()
            if len(data) != row["bytes"] or hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise OSError(f"job {job.id}: output {row['path']} does not match its record")
            out.append(data)
        return out
