"""Run a batch job over Ray actors: keep every worker busy, survive worker deaths, resume.

The driver owns the output (a local folder or an fsspec URL such as ``s3://bucket/prefix``, see
:mod:`seg_rt.cluster.storage`): each image is written atomically (temp file + rename + fsync, or one
whole-object PUT), then one manifest row names it (an fsynced line of ``manifest.jsonl``, or one
object under ``manifest/``). Rerunning the
same job skips items whose manifest line says ``ok`` and whose file is there with the recorded size
and sha256, so nothing is lost or duplicated; a torn or garbage line (a driver killed mid-write, a
hand edit) is reported once and skipped, and never swallows the next row. A worker that dies is replaced
and its in-flight items retried; an item that fails ``max_attempts`` times is recorded as failed,
the rest of the job finishes, and the run reports failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from seg_rt.errors import EnvironmentUnavailable, ModelLoadError, first_line
from seg_rt.optional import require

from ..storage import (
    MANIFEST,
    FsspecStore,
    LocalStore,
    Manifest,
    ManifestWriter,
    Store,
    open_store,
)
from .spec import Item, JobSpec, expand_items
from .worker import SEGWorker

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "Manifest", "completed", "read_manifest", "run_job", "start_ray"]
# The node address of a Ray seg-rt starts itself. Ray binds its gRPC servers (GCS, raylet, core
# workers, agents) and its metrics servers to loopback only when the node address is 127.0.0.1; any
# other address (127.0.0.2 included) gets the wildcard address. ray.init rewrites 127.0.0.1 to the
# machine's network address unless Ray's single-machine mode is on (``_loopback_only_ray``).
LOOPBACK_NODE_IP = "127.0.0.1"
# Ray's single-machine switch (its default on macOS / Windows): the node address is loopback
_RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# no Prometheus exporter on the dashboard agent (it would serve the app's request counts and
# latencies without a credential); seg-rt's own /metrics is behind the API key
_RAY_NO_METRICS_ENV = {"RAY_enable_metrics_collection": "0"}
IN_FLIGHT_PER_WORKER = 2  # one computing, one queued: hides Ray's round trip
START_TIMEOUT_S = 300.0  # default wait for every worker to be placed and load its model


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
    rescheduled: int = 0  # items put back in the queue after their worker died
    nodes: dict[str, str] = field(default_factory=dict)  # worker id -> Ray node id (latest actor)
    start_nodes: dict[str, str] = field(default_factory=dict)  # worker id -> node, once all first loaded
    events: list[str] = field(default_factory=list)  # one line per worker lost / replacement placed
    loss_times: list[float] = field(default_factory=list)  # time.perf_counter() when each loss was seen

    def summary(self) -> str:
        """One line: counts, then every worker loss and replacement in order."""
        head = f"{self.done} done, {self.skipped} already there, {len(self.failed)} failed"
        if not self.events:
            return head
        return (
            f"{head}; {self.restarts} worker restart(s), {self.rescheduled} item(s) rescheduled: "
            + "; ".join(self.events)
        )

    @property
    def ok(self) -> bool:
        return not self.failed


def read_manifest(output: Path | str | Store) -> list[dict]:
    """Every row of the job's manifest that is a JSON object naming an item (local
    ``manifest.jsonl`` or the ``manifest/`` objects of a URL); torn or garbage rows are skipped
    with one warning."""
    return _store(output).read_manifest()


def completed(output: Path | str | Store) -> set[str]:
    """Items recorded ok whose output is there, unchanged (size and sha256 as recorded)."""
    store = _store(output)
    return {r["item"] for r in store.read_manifest() if store.verified(r)}


def _store(output: Path | str | Store) -> Store:
    return output if isinstance(output, (LocalStore, FsspecStore)) else open_store(output)


def _private_ray_env() -> None:
    """Token auth for a Ray cluster seg-rt starts itself (Ray >= 2.52 reads ``RAY_AUTH_MODE`` and
    ``RAY_AUTH_TOKEN``; its own default would write a token to ``~/.ray/auth_token`` with the
    umask's mode). The token lives only in this process's environment, which the raylet and workers
    inherit and other users cannot read, so another local user cannot attach to the cluster."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    refresh_ray_auth()


def refresh_ray_auth() -> None:
    """Make this process read ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` again. Ray caches its config
    (auth mode included) when imported and the token when first used; refresh both as Ray's own
    enable_token_auth_by_default does, so this process speaks the current token to a new cluster."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # Ray < 2.52 has no token auth (see docs/security.md)
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def private_temp_dir(parent: str | None = None) -> str:
    """Ray's temp dir (sockets, logs, object spill) inside a fresh 0700 folder (inside ``parent``
    if given): other users can neither reach the unix sockets nor read the logs. Ray makes its own
    temp dir world-writable (0777), so the privacy comes from the 0700 folder around it."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    private = tempfile.mkdtemp(prefix="segrt-", dir=parent or "/tmp")  # mkdtemp: mode 0700
    os.chmod(private, 0o700)
    return os.path.join(private, "ray")  # short: unix socket paths are limited to 107 bytes


def start_ray(address: str | None, num_cpus: float | None = None, temp_dir: str | None = None):
    """Connect to ``address`` or start a private local Ray: loopback only, no dashboard, token
    auth and Ray's temp dir in a fresh 0700 folder (inside ``temp_dir`` if given)."""
    ray = require("ray", "cluster jobs")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.update(_RAY_NO_METRICS_ENV)  # before _private_ray_env re-reads Ray's config
        _private_ray_env()
        temp_dir = private_temp_dir(temp_dir)
        with _loopback_only_ray():
            ray.init(
                num_cpus=num_cpus, _temp_dir=temp_dir, _node_ip_address=LOOPBACK_NODE_IP,
                include_dashboard=False, log_to_driver=False,
            )  # fmt: skip
    return ray


@contextlib.contextmanager
def _loopback_only_ray():
    """While a private Ray starts: Ray's single-machine mode (node address 127.0.0.1, so every Ray
    server binds loopback; docs/security.md lists what it binds) and no metrics exporter. The
    processes started now inherit it; this process gets Ray's default back afterwards, so a later
    ``ray.init(address=...)`` to a real cluster still finds its node address."""
    from ray._private import ray_constants

    before_env, before = os.environ.get(_RAY_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(_RAY_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_RAY_SINGLE_MACHINE_ENV] = before_env


def refuse_unplaceable(ray, res, address: str | None = None) -> None:
    """At once, not after the start timeout: ``EnvironmentUnavailable`` when no node of the cluster
    can hold even one worker (e.g. ``num_gpus: 1`` where there is no GPU) and no autoscaler can add
    one. seg-rt's own local cluster has no autoscaler; a cluster joined with ``address`` has one
    when it publishes an autoscaling config (KubeRay, ``ray up``): then a node type of it that can
    hold a worker (and may still be started) is enough."""
    totals = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(_holds(t, res) for t in totals):
        return
    groups = _autoscaler_node_types(ray) if address else None
    if groups and any(_holds(resources, res) for resources in groups):
        return  # an autoscaler can add a node that holds it: the start timeout decides
    have = "; ".join(", ".join(f"{k}={t.get(k, 0):g}" for k in ("CPU", "GPU")) for t in totals) or "no node"
    where = f"the cluster at {address}" if address else "the local cluster"
    scaler = (
        "no node type its autoscaler can add has that much either"
        if groups is not None
        else "it has no autoscaler to add one"
    )
    raise EnvironmentUnavailable(
        f"each worker asks for num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g} and no node of "
        f"{where} has that much ({have}); {scaler}: lower resources_per_worker"
        + ("" if address else ", or join a cluster that has them (--address)")
    )


def _holds(resources, res) -> bool:
    return resources.get("CPU", 0) >= res.num_cpus and resources.get("GPU", 0) >= res.num_gpus


def _autoscaler_node_types(ray) -> list[dict] | None:
    """The resources of each node type the cluster's autoscaler may still start (max count not 0),
    from the autoscaling config it publishes in the GCS; ``None`` when it publishes none (a cluster
    of ``ray start`` nodes: nothing adds a node)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older Ray without this record: assume an autoscaler may add nodes
        return [{"CPU": float("inf"), "GPU": float("inf")}]
    if config is None:
        return None
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def run_job(
    spec: JobSpec,
    base: Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    ray_temp_dir: str | None = None,
    runtime_env: dict | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> JobResult:
    """Generate every item of ``spec`` not already done under ``spec.output``.

    Gives up with :class:`EnvironmentUnavailable` when the workers are not all placed and loaded
    within ``start_timeout`` seconds (e.g. a GPU asked of a cluster without one), and with
    :class:`ModelLoadError` (one line) when a worker cannot load the model."""
    if not start_timeout > 0:
        raise ValueError(f"start timeout must be > 0 seconds, got {start_timeout}")
    t_start = time.perf_counter()
    output = open_store(spec.output, base)
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
        refuse_unplaceable(ray, res, address)  # at once when nothing can ever place a worker
        _Driver(ray, spec, output, n_workers, result, progress, runtime_env).run(todo, start_timeout)
    if spec.contact_sheet and spec.video is None:
        write_contact_sheets(items, output)
    result.seconds = time.perf_counter() - t_start
    logger.log(logging.WARNING if result.restarts else logging.INFO, "job %s: %s", output, result.summary())
    return result


class _Driver:
    def __init__(
        self,
        ray,
        spec: JobSpec,
        output: Store,
        n_workers: int,
        result: JobResult,
        progress: bool,
        runtime_env: dict | None = None,
    ) -> None:
        self.ray, self.spec, self.output, self.result = ray, spec, output, result
        res = spec.resources_per_worker
        # SPREAD: workers land on as many nodes as fit, so one lost node takes as few as possible
        options = {
            "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus,
            "max_restarts": 0,
            "scheduling_strategy": "SPREAD",
        }
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actor_cls = ray.remote(SEGWorker).options(**options)
        self.spec_dict = spec.model_dump(mode="json")
        self.workers = {f"w{k}": self._start(f"w{k}") for k in range(n_workers)}
        self.placed: set[str] = set()  # workers loaded and taking batches
        self.placing: dict = {}  # a replacement's ready() ref -> worker id
        self.progress = progress

    def _start(self, wid: str):
        return self.actor_cls.remote(self.spec_dict, wid)

    def wait_ready(self, timeout_s: float) -> None:
        """Every worker placed and its model loaded within ``timeout_s``, else one clear error."""
        ray = self.ray
        pending = {a.ready.remote(): wid for wid, a in self.workers.items()}
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise EnvironmentUnavailable(self._unplaced_message(len(pending), timeout_s))
            wid = pending.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                raise ModelLoadError(
                    f"worker {wid} could not load the model: {_init_error_line(exc)}"
                ) from None
            self._mark_placed(wid, info)

    def _mark_placed(self, wid: str, info: dict) -> None:
        self.placed.add(wid)
        if info.get("node"):
            self.result.nodes[wid] = info["node"]

    def _unplaced_message(self, n_pending: int, timeout_s: float) -> str:
        res = self.spec.resources_per_worker
        have = {k: v for k, v in self.ray.cluster_resources().items() if k in ("CPU", "GPU")}
        have_text = ", ".join(f"{k}={v:g}" for k, v in sorted(have.items())) or "nothing"
        return (
            f"{n_pending} of {len(self.workers)} worker(s) did not start within {timeout_s:g} s: each asks for "
            f"num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g} and the cluster has {have_text} "
            "(lower resources_per_worker or workers, or raise --start-timeout if the model loads slowly)"
        )

    def run(self, todo: list[Item], start_timeout: float = START_TIMEOUT_S) -> None:
        ray = self.ray
        size = self.spec.batch_size
        queue = deque(todo[k : k + size] for k in range(0, len(todo), size))
        attempts: Counter = Counter()
        inflight: dict = {}  # ref -> (worker id, actor, batch)
        t0 = time.perf_counter()
        try:
            self.wait_ready(start_timeout)  # load once, fail fast
        except BaseException:
            for actor in self.workers.values():
                ray.kill(actor)
            raise
        self.result.startup_seconds = time.perf_counter() - t0
        self.result.start_nodes = dict(self.result.nodes)
        t_loop = time.perf_counter()
        manifest = self.output.open_manifest()
        bar = tqdm(total=len(todo), unit="img", desc="seg-rt run", disable=not self.progress)
        try:
            while queue or inflight:
                self._fill(queue, inflight)
                if not inflight:  # items left but no placed worker: wait for a replacement
                    self._await_replacement(start_timeout, len(queue))
                    continue
                ready, _ = ray.wait(list(inflight) + list(self.placing), num_returns=1)
                ref = ready[0]
                if ref in self.placing:
                    self._replacement_ready(ref)
                    continue
                wid, actor, batch = inflight.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    if self.workers[wid] is actor:  # the slot's current actor died: replace it once
                        self._replace_dead(wid, exc)
                    self.result.rescheduled += len(batch)
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
                    rel = f"{folder}/{item.id}.{ext}"
                    data = row[ext]
                    self.output.write_atomic(rel, data)  # complete (fsynced / PUT) before the row names it
                    manifest.append(
                        {
                            "item": item.id,
                            "status": "ok",
                            "prompt_index": item.prompt_index,
                            "sample_index": item.sample_index,
                            "prompt": item.prompt,
                            "seed": item.seed,
                            "params": item.params.to_record(),
                            "path": rel,
                            "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "worker": row["worker"],
                            "seconds": round(row["seconds"], 4),
                        }
                    )
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
                if (
                    wid in self.placed
                    and queue
                    and sum(1 for w, _, _ in inflight.values() if w == wid) < depth
                ):
                    batch = queue.popleft()
                    inflight[actor.run.remote(batch)] = (wid, actor, batch)

    def _replace_dead(self, wid: str, exc: Exception) -> None:
        """Start a fresh actor in the dead one's slot; later refs of the old actor fail and retry.

        The replacement takes batches only once placed and loaded (``_replacement_ready``): after a
        node loss the cluster may have no room for it, and the surviving workers finish the job."""
        self.result.loss_times.append(time.perf_counter())
        node = self.result.nodes.get(wid, "?")
        logger.warning(
            "worker %s on node %s died (%s); starting a replacement", wid, node, type(exc).__name__
        )
        self.result.events.append(f"{wid} lost on node {node[:12]} ({type(exc).__name__})")
        self.ray.kill(self.workers[wid])
        self.placed.discard(wid)
        self.workers[wid] = self._start(wid)
        self.placing[self.workers[wid].ready.remote()] = wid
        self.result.restarts += 1

    def _replacement_ready(self, ref) -> None:
        wid = self.placing.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # its node died too, or the model failed to load
            logger.error("replacement worker %s did not start: %s", wid, first_line(exc)[:300])
            self.result.events.append(f"replacement {wid} did not start ({type(exc).__name__})")
            return
        self._mark_placed(wid, info)
        self.result.events.append(f"replacement {wid} placed on node {self.result.nodes.get(wid, '?')[:12]}")

    def _await_replacement(self, timeout_s: float, n_left: int) -> None:
        """No placed worker and ``n_left`` batches queued: wait for a replacement, or give up clearly."""
        if self.placing:
            ready, _ = self.ray.wait(list(self.placing), num_returns=1, timeout=timeout_s)
            if ready:
                self._replacement_ready(ready[0])
                return
        raise EnvironmentUnavailable(
            f"no worker left to run {n_left} queued batch(es): the replacements were not placed within "
            f"{timeout_s:g} s (the cluster lost capacity; rerun to resume once it is back)"
        )

    def _retry(
        self, batch: list[Item], error: str, attempts: Counter, queue: deque, manifest: ManifestWriter
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


def _init_error_line(exc: Exception) -> str:
    """The worker's own exception line (``ModelLoadError: cannot load ...``) from Ray's actor-death
    error, whose text ends with the remote traceback; Ray's summary line when there is none."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if getattr(exc, "actor_init_failed", False) and lines:
        last = lines[-1]
        kind, sep, message = last.partition(": ")
        return f"{kind.rsplit('.', 1)[-1]}: {message}"[:500] if sep else last[:500]
    return first_line(exc)[:300]


def write_contact_sheets(items: list[Item], output: Path | str | Store) -> list[str]:
    """One PNG per prompt: its samples in a grid labelled by seed (prompts with every sample done)."""
    import io
    import math

    from PIL import Image

    from seg_rt.images import grid, png_bytes

    output = _store(output)
    done = completed(output)
    by_prompt: dict[int, list[Item]] = {}
    for item in items:
        by_prompt.setdefault(item.prompt_index, []).append(item)
    paths = []
    for p, group in sorted(by_prompt.items()):
        if not all(i.id in done for i in group):
            continue
        images = [Image.open(io.BytesIO(output.read(f"images/{i.id}.png"))).convert("RGB") for i in group]
        sheet = grid(images, [f"seed {i.seed}" for i in group], columns=math.ceil(math.sqrt(len(images))))
        path = f"contact/p{p:05d}.png"
        output.write_atomic(
            path, png_bytes(sheet, json.dumps({"prompt": group[0].prompt, "items": [i.id for i in group]}))
        )
        paths.append(path)
    return paths
