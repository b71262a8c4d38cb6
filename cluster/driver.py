"""Run a batch job over Ray actors: keep every worker busy, survive worker deaths, resume.

The driver owns the output folder: each image is written atomically (temp file + rename), then
one line is appended to ``manifest.jsonl``. Rerunning the same job skips items whose manifest line
says ``ok`` and whose file exists, so nothing is lost or duplicated. A worker that dies is replaced
and its in-flight items retried; an item that fails ``max_attempts`` times is recorded as failed,
the rest of the job finishes, and the run reports failure.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from seg_rt.errors import first_line
from seg_rt.images import write_atomic
from seg_rt.optional import require

from .spec import Item, JobSpec, expand_items
from .worker import SEGWorker

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
# Ray rewrites 127.0.0.1 to the machine's network address; any other 127/8 address stays on the
# loopback interface (Linux routes the whole range to lo). Elsewhere keep Ray's default.
LOOPBACK_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None
IN_FLIGHT_PER_WORKER = 2  # one computing, one queued: hides Ray's round trip


@dataclass
class JobResult:
    total: int
    done: int
    skipped: int
    failed: list[str]
    seconds: float
    compute_seconds: float = 0.0  # workers' generate time, summed over items
    batch_seconds: float = 0.0  # workers' wall time inside run(), summed over batches
    startup_seconds: float = 0.0  # until every worker had loaded the model
    loop_seconds: float = 0.0  # scheduling loop, all workers ready
    batches: int = 0
    restarts: int = 0
    per_worker: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.failed


def read_manifest(output: Path) -> list[dict]:
    path = output / MANIFEST
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a torn manifest line (driver killed mid-write?)")
    return rows


def completed(output: Path) -> set[str]:
    """Items recorded ok whose image file exists."""
    return {
        r["item"] for r in read_manifest(output) if r.get("status") == "ok" and (output / r["path"]).is_file()
    }


class Manifest:
    """Append-only ``manifest.jsonl``; every line flushed and fsynced before the next item."""

    def __init__(self, output: Path) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.f = open(output / MANIFEST, "a")  # noqa: SIM115 (held open for the job)

    def append(self, row: dict) -> None:
        self.f.write(json.dumps(row, sort_keys=True) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def start_ray(address: str | None, num_cpus: float | None = None, temp_dir: str | None = None):
    """Connect to ``address`` or start a private local Ray (own temp dir, no dashboard)."""
    ray = require("ray", "cluster jobs")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        temp_dir = temp_dir or tempfile.mkdtemp(prefix="segrt-ray-", dir="/tmp")
        # a private cluster on loopback only
        ray.init(
            num_cpus=num_cpus, _temp_dir=temp_dir, _node_ip_address=LOOPBACK_NODE_IP, include_dashboard=False,
            log_to_driver=False,
        )  # fmt: skip
    return ray


def run_job(
    spec: JobSpec,
    base: Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    ray_temp_dir: str | None = None,
    runtime_env: dict | None = None,
) -> JobResult:
    """Generate every item of ``spec`` not already done under ``spec.output``."""
    t_start = time.perf_counter()
    output = Path(spec.output)
    output = output if output.is_absolute() else base / output
    items = expand_items(spec, base)
    done_before = completed(output)
    todo = [i for i in items if i.id not in done_before]
    n_workers = min(workers or spec.workers, max(1, len(todo)))
    result = JobResult(total=len(items), done=0, skipped=len(items) - len(todo), failed=[], seconds=0.0)
    if todo:
        res = spec.resources_per_worker
        ray = start_ray(
            address,
            num_cpus=None if address else max(os.cpu_count() or 1, n_workers * res.num_cpus),
            temp_dir=ray_temp_dir,
        )
        _Driver(ray, spec, output, n_workers, result, progress, runtime_env).run(todo)
    if spec.contact_sheet and spec.video is None:
        write_contact_sheets(items, output)
    result.seconds = time.perf_counter() - t_start
    return result


class _Driver:
    def __init__(
        self,
        ray,
        spec: JobSpec,
        output: Path,
        n_workers: int,
        result: JobResult,
        progress: bool,
        runtime_env: dict | None = None,
    ) -> None:
        self.ray, self.spec, self.output, self.result = ray, spec, output, result
        res = spec.resources_per_worker
        options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_restarts": 0}
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actor_cls = ray.remote(SEGWorker).options(**options)
        self.spec_dict = spec.model_dump(mode="json")
        self.workers = {f"w{k}": self._start(f"w{k}") for k in range(n_workers)}
        self.progress = progress

    def _start(self, wid: str):
        return self.actor_cls.remote(self.spec_dict, wid)

    def run(self, todo: list[Item]) -> None:
        ray = self.ray
        size = self.spec.batch_size
        queue = deque(todo[k : k + size] for k in range(0, len(todo), size))
        attempts: Counter = Counter()
        inflight: dict = {}  # ref -> (worker id, actor, batch)
        t0 = time.perf_counter()
        ray.get([a.ready.remote() for a in self.workers.values()])  # load once, fail fast
        self.result.startup_seconds = time.perf_counter() - t0
        t_loop = time.perf_counter()
        manifest = Manifest(self.output)
        bar = tqdm(total=len(todo), unit="img", desc="seg-rt run", disable=not self.progress)
        try:
            while queue or inflight:
                self._fill(queue, inflight)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                wid, actor, batch = inflight.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    if self.workers[wid] is actor:  # the slot's current actor died: replace it once
                        self._replace_dead(wid, exc)
                    self._retry(batch, f"worker {wid} died: {type(exc).__name__}", attempts, queue, manifest)
                    continue
                except ray.exceptions.RayError as exc:
                    self._retry(
                        batch,
                        f"{type(exc).__name__}: {first_line(exc)[:300]}",
                        attempts,
                        queue,
                        manifest,
                    )
                    continue
                self.result.batches += 1
                self.result.batch_seconds += rows[0].get("batch_seconds", 0.0) if rows else 0.0
                by_id = {i.id: i for i in batch}
                for row in rows:
                    item = by_id[row["item"]]
                    if "error" in row:
                        self._retry([item], row["error"], attempts, queue, manifest)
                        continue
                    folder, ext = ("videos", "mp4") if "mp4" in row else ("images", "png")
                    rel = Path(folder) / f"{item.id}.{ext}"
                    write_atomic(self.output / rel, row[ext])
                    manifest.append({"item": item.id, "status": "ok", "prompt_index": item.prompt_index,
                                     "sample_index": item.sample_index, "prompt": item.prompt, "seed": item.seed,
                                     "params": item.params.to_record(), "path": str(rel), "worker": row["worker"],
                                     "seconds": round(row["seconds"], 4)})  # fmt: skip
                    self.result.done += 1
                    self.result.compute_seconds += row["seconds"]
                    self.result.per_worker[row["worker"]] += 1
                    bar.update(1)
        finally:
            self.result.loop_seconds = time.perf_counter() - t_loop
            bar.close()
            manifest.close()
            for actor in self.workers.values():
                ray.kill(actor)

    def _fill(self, queue: deque, inflight: dict) -> None:
        """Breadth-first: every worker gets one batch before any gets its second."""
        for depth in range(1, IN_FLIGHT_PER_WORKER + 1):
            for wid, actor in self.workers.items():
                if queue and sum(1 for w, _, _ in inflight.values() if w == wid) < depth:
                    batch = queue.popleft()
                    inflight[actor.run.remote(batch)] = (wid, actor, batch)

    def _replace_dead(self, wid: str, exc: Exception) -> None:
        """Start a fresh actor in the dead one's slot; later refs of the old actor fail and retry."""
        logger.warning("worker %s died (%s); starting a replacement", wid, type(exc).__name__)
        self.ray.kill(self.workers[wid])
        self.workers[wid] = self._start(wid)
        self.result.restarts += 1

    def _retry(
        self, batch: list[Item], error: str, attempts: Counter, queue: deque, manifest: Manifest
    ) -> None:
        for item in batch:
            attempts[item.id] += 1
            if attempts[item.id] >= self.spec.max_attempts:
                logger.error("item %s failed %d times: %s", item.id, attempts[item.id], error)
                manifest.append({"item": item.id, "status": "failed", "error": error, "attempts": attempts[item.id],
                                 "prompt_index": item.prompt_index, "sample_index": item.sample_index})  # fmt: skip
                self.result.failed.append(item.id)
            else:
                queue.append([item])  # retried alone, so one bad item cannot sink its neighbours


def write_contact_sheets(items: list[Item], output: Path) -> list[Path]:
    """One PNG per prompt: its samples in a grid labelled by seed (prompts with every sample done)."""
    import math

    from PIL import Image

    from seg_rt.images import grid, png_bytes

    done = completed(output)
    by_prompt: dict[int, list[Item]] = {}
    for item in items:
        by_prompt.setdefault(item.prompt_index, []).append(item)
    paths = []
    for p, group in sorted(by_prompt.items()):
        if not all(i.id in done for i in group):
            continue
        images = [Image.open(output / "images" / f"{i.id}.png").convert("RGB") for i in group]
        sheet = grid(images, [f"seed {i.seed}" for i in group], columns=math.ceil(math.sqrt(len(images))))
        path = output / "contact" / f"p{p:05d}.png"
        write_atomic(
            path, png_bytes(sheet, json.dumps({"prompt": group[0].prompt, "items": [i.id for i in group]}))
        )
        paths.append(path)
    return paths
