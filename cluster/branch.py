"""The ranks of branch-parallel SEG (``seg_rt.engines.parallel``): each rank is a process that joins
a ``torch.distributed`` group, loads the model once and runs whole sampling runs with only its
denoiser call split, so each step exchanges only the predictions.

``ProcessBranchGroup``: the ranks as local processes (one per rank; rank r on ``cuda:r``).
``RayBranchGroup``: the ranks as Ray actors in a placement group of one bundle per rank
(``BranchParallel.strategy``; GPU bundles and NCCL for device ``cuda``). Both answer
``run(method, ...)`` (``BranchRank.images`` / ``video``) with rank 0's result; an error on any rank
ends the group and is raised to the caller. ``seg_rt.generate(..., parallel=...)``,
``generate_video``, the CLI (``--branch-parallel``) and serving's latency mode open them with
``open_group``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from multiprocessing.connection import wait

import torch.distributed as dist

from seg_rt.engines.parallel import BranchParallelDenoiser, check_backend, free_address, init_group
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.params import BranchParallel

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # a placement group not placed by then: a clear error, not a hang


class BranchRank:
    """One rank of a branch-parallel group: joins the group, loads ``model`` once on ``device``, then
    runs whole sampling runs with only the denoiser call split. Every rank runs the same run; rank 0
    decodes and returns the output, the others return ``None``."""

    def __init__(
        self,
        rank: int,
        world: int,
        address: str,
        model: str,
        engine: str = "torch",
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        from seg_rt.models import open_model

        init_group(rank, world, address, "nccl" if device.startswith("cuda") else "gloo")
        self.rank = rank
        # CPU results depend on the thread count: fixed per rank; a URL: fetched once per node
        self.model = open_model(model, engine, device, threads)
        self.pipe = self.model.pipe
        self._engine = (
            BranchParallelDenoiser(self.model.engine) if self.model.engine is not None else None
        )  # loaded once, reused by every image run

    def images(self, params, output_type: str = "pil", **options):
        """``seg_rt.pipeline.run_params`` with this rank's rows."""
        from seg_rt.pipeline import run_params

        options["progress"] = options.get("progress", False) and self.rank == 0
        out = run_params(
            self.pipe, params, engine=self._engine, output_type=output_type if self.rank == 0 else "latent",
            **options,
        )  # fmt: skip
        return out if self.rank == 0 else None

    def video(self, params, output_type: str = "np", **options):
        """``seg_rt.video.sampling.generate_video`` with this rank's rows."""
        from seg_rt.video.sampling import generate_video

        options["progress"] = options.get("progress", False) and self.rank == 0
        out = generate_video(
            self.pipe, params=params, output_type=output_type if self.rank == 0 else "latent",
            wrap_denoiser=BranchParallelDenoiser, **options,
        )  # fmt: skip
        return out if self.rank == 0 else None

    def comm_seconds(self) -> list[float]:
        """Exchange seconds of every image denoiser call so far, one per step (with waiting)."""
        return list(self._engine.comm_seconds) if self._engine is not None else []

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class ProcessBranchGroup:
    """The ranks of ``spec`` as local processes (spawned, one per rank, rank r on ``cuda:r`` for
    device ``cuda``), kept alive between runs. ``run(method, ...)`` calls ``BranchRank.method`` on
    every rank and returns rank 0's result; an error on any rank ends the group and is raised here."""

    def __init__(
        self, spec: BranchParallel, model: str, engine: str = "torch", threads: int | None = None
    ) -> None:
        import multiprocessing as mp

        check_backend(spec.backend, spec.ranks)
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // spec.ranks)
        ctx = mp.get_context("spawn")
        address = free_address()
        self._conns, self._procs = [], []
        for r in range(spec.ranks):
            ours, theirs = ctx.Pipe()
            device = f"cuda:{r}" if spec.device == "cuda" else "cpu"
            proc = ctx.Process(
                target=_rank_main, args=(theirs, r, spec.ranks, address, model, engine, device, threads),
                name=f"seg-rt-rank{r}", daemon=True,
            )  # fmt: skip
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._gather()  # every rank has joined and loaded the model (or the first error is raised)

    def run(self, method: str, *args, **kwargs):
        for conn in self._conns:
            conn.send((method, args, kwargs))
        return self._gather()[0]

    def _gather(self) -> list:
        results: dict[int, object] = {}
        pending = dict(enumerate(self._conns))
        while pending:
            for conn in wait(list(pending.values())):
                r = next(k for k, c in pending.items() if c is conn)
                del pending[r]
                try:
                    ok, value = conn.recv()
                except EOFError:
                    ok, value = (
                        False,
                        RuntimeError(f"branch-parallel rank {r} exited (code {self._procs[r].exitcode})"),
                    )
                if not ok:  # the other ranks may wait in a collective for this one: end them all
                    self.close()
                    raise value
                results[r] = value
        return [results[r] for r in range(len(self._conns))]

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # a rank that already exited
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> ProcessBranchGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rank_main(conn, rank: int, world: int, address: str, model: str, engine: str, device: str, threads):
    """A rank process: build ``BranchRank``, then answer ``(method, args, kwargs)`` until ``None``."""
    worker = None
    try:
        worker = BranchRank(rank, world, address, model, engine, device, threads)
        conn.send((True, None))
        while (msg := conn.recv()) is not None:
            method, args, kwargs = msg
            conn.send((True, getattr(worker, method)(*args, **kwargs)))
    except EOFError:
        pass
    except Exception as exc:
        try:
            conn.send((False, exc))
        except Exception:  # an exception that does not pickle: its line
            conn.send((False, RuntimeError(f"branch-parallel rank {rank}: {type(exc).__name__}: {exc}")))
    finally:
        if worker is not None:
            worker.close()


class RayRank:
    """A Ray actor around ``BranchRank`` (built in ``start`` once rank 0's address is known)."""

    def __init__(self) -> None:
        self.rank: BranchRank | None = None

    def address(self) -> str:
        """A free rendezvous address on this actor's node (asked of rank 0)."""
        import ray

        return free_address(ray.util.get_node_ip_address())

    def start(self, *args) -> None:
        self.rank = BranchRank(*args)

    def call(self, method: str, args: tuple, kwargs: dict):
        return getattr(self.rank, method)(*args, **kwargs)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        if self.rank is not None:
            self.rank.close()


def rank_bundle(spec: BranchParallel) -> dict:
    """The placement-group bundle of one rank: 1 CPU, plus 1 GPU for device ``cuda``."""
    return {"CPU": 1, "GPU": 1} if spec.device == "cuda" else {"CPU": 1}


class RayBranchGroup:
    """The ranks of ``spec`` as Ray actors in one placement group (one bundle per rank: 1 CPU, plus
    1 GPU for device ``cuda``). Connects to ``spec.address`` or the running Ray, else starts a
    private local one (``seg_rt.cluster.driver.start_ray``)."""

    def __init__(
        self, spec: BranchParallel, model: str, engine: str = "torch", threads: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S, placement_group=None, first_bundle: int = 0,
    ) -> None:  # fmt: skip
        from ray.util.placement_group import placement_group as new_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .jobs.driver import start_ray

        ray = start_ray(spec.address)
        gpus = 1 if spec.device == "cuda" else 0
        if gpus and ray.cluster_resources().get("GPU", 0) < spec.ranks:
            raise EnvironmentUnavailable(
                f"branch parallel on cuda needs {spec.ranks} GPUs in the Ray cluster (NCCL, one per rank); "
                f"it has {ray.cluster_resources().get('GPU', 0):g}"
            )
        bundle = rank_bundle(spec)
        self._ray, self.actors = ray, []
        # a placement group given by the caller (a Serve replica's own: bundles first_bundle..) stays
        self._owns_pg = placement_group is None
        self.pg = (
            new_placement_group([bundle] * spec.ranks, strategy=spec.strategy)
            if self._owns_pg
            else placement_group
        )
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout_s)
        if not ready:
            self.close()
            raise EnvironmentUnavailable(
                f"the placement group of {spec.ranks} x {bundle} ({spec.strategy}) was not placed within "
                f"{ready_timeout_s:g} s; cluster resources: {ray.cluster_resources()}"
            )
        actor = ray.remote(RayRank)
        self.actors = [
            actor.options(
                num_cpus=1, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=first_bundle + r
                ),
            ).remote()
            for r in range(spec.ranks)
        ]  # fmt: skip
        address = ray.get(self.actors[0].address.remote())
        device = "cuda" if gpus else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the bundle's GPU
        self._gather(
            [
                a.start.remote(r, spec.ranks, address, model, engine, device, threads or 1)
                for r, a in enumerate(self.actors)
            ]
        )

    def nodes(self) -> list[str]:
        """The Ray node id of each rank."""
        return self._ray.get([a.node.remote() for a in self.actors])

    def run(self, method: str, *args, **kwargs):
        return self._gather([a.call.remote(method, args, kwargs) for a in self.actors])[0]

    def _gather(self, refs: list) -> list:
        """Every rank's result; the first error (any rank) ends the group and is raised."""
        pending = list(refs)
        while pending:
            ready, pending = self._ray.wait(pending, num_returns=1)
            try:
                self._ray.get(ready)
            except self._ray.exceptions.RayTaskError as exc:
                self.close()
                raise exc.as_instanceof_cause() from None
            except Exception:
                self.close()
                raise
        return self._ray.get(refs)

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            with contextlib.suppress(Exception):  # a rank stuck in a collective or gone: end it
                self._ray.get(a.close.remote(), timeout=10)
            self._ray.kill(a)
        self.actors = []
        if self.pg is not None and self._owns_pg:
            remove_placement_group(self.pg)
        self.pg = None

    def __enter__(self) -> RayBranchGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_group(
    spec: BranchParallel, model, engine: str | None = None, threads: int | None = None, **ray_options
):
    """The group ``spec`` asks for, loading ``model`` (a folder or hub id) on every rank.
    ``ray_options``: ``RayBranchGroup``'s placement group options (launcher ``ray``)."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            "branch parallel loads the model in every rank: give the model as a folder or hub id, "
            f"not a loaded {type(model).__name__}"
        )
    if engine is not None and not isinstance(engine, str):
        raise ValueError(
            "branch parallel loads the engine in every rank: give it as a spec (torch, onnx:DIR, trt:DIR), "
            f"not a loaded {type(engine).__name__}"
        )
    if spec.launcher == "ray":
        return RayBranchGroup(spec, str(model), engine or "torch", threads, **ray_options)
    if ray_options:
        raise ValueError(f"{', '.join(ray_options)} apply to launcher 'ray' only, not {spec.launcher!r}")
    return ProcessBranchGroup(spec, str(model), engine or "torch", threads)
