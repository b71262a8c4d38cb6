"""The local ranks of branch-parallel SEG (``seg_rt.engines.parallel``): each rank is a process that
joins a ``torch.distributed`` group, opens the model once (``seg_rt.models.open_model``) and runs
whole sampling runs with only its denoiser call split, so each step exchanges only the predictions.

``ProcessBranchGroup``: the ranks as local processes (one per rank; rank r on ``cuda:r``), needing
nothing beyond the core install. ``seg_rt.cluster.branch.RayBranchGroup`` runs the same
``BranchRank`` in Ray actors. Both answer ``run(method, ...)`` (``BranchRank.images`` / ``video``)
with rank 0's result; an error on any rank ends the group and is raised to the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from multiprocessing.connection import wait

import torch.distributed as dist

from seg_rt.errors import RankExited
from seg_rt.execution import BranchParallel

from .parallel import BranchParallelDenoiser, check_backend, init_group, private_rendezvous

logger = logging.getLogger(__name__)


def check_group_args(model, engine) -> None:
    """Every rank loads the model and the engine itself: both must be given by name, not loaded."""
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
        """The video family's ``generate`` (``seg_rt.video.sampling.generate_video``) with this rank's rows."""
        family = self.model.family
        if family.kind != "video":
            raise ValueError(f"{family.name} is an image model: run it with images(), not video()")
        options["progress"] = options.get("progress", False) and self.rank == 0
        out = family.generate(
            self.pipe, params, output_type if self.rank == 0 else "latent",
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
        address, self._rendezvous = private_rendezvous()  # local ranks: no TCP store listening
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
        for r, conn in enumerate(self._conns):
            try:
                conn.send((method, args, kwargs))
            except OSError:  # the rank is gone (its end of the pipe closed)
                line = exit_line(r, self._procs[r])
                self.close()
                raise RankExited(line) from None
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
                except (EOFError, OSError):  # the rank ended: join it first, so its exit code is known
                    ok, value = False, RankExited(exit_line(r, self._procs[r]))
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
        shutil.rmtree(self._rendezvous, ignore_errors=True)

    def __enter__(self) -> ProcessBranchGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exit_line(rank: int, proc) -> str:
    """One line for a rank process that ended without answering: its exit code or signal."""
    proc.join(timeout=10)
    code = proc.exitcode
    if code is None:
        how = "closed its pipe and is still running"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer sends it too)" if -code == signal.SIGKILL else ""
        how = f"was killed by {name}{hint}"
    else:
        how = f"exited with code {code}"
    return f"branch-parallel rank {rank} {how}; the group is closed"


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
