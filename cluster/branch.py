"""Branch-parallel SEG over Ray: the ranks (``seg_rt.engines.branch.BranchRank``) as Ray actors in a
placement group of one bundle per rank (``BranchParallel.strategy``; GPU bundles and NCCL for device
``cuda``). ``open_group`` opens the group a ``BranchParallel`` asks for (local processes,
``seg_rt.engines.branch``, or Ray) for serving's latency mode and for ``seg_rt.pipeline.branch_group``
(``seg_rt.generate(..., parallel=...)``, ``generate_video``, the CLI's ``--branch-parallel``) when
the launcher is Ray.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shutil

from seg_rt.engines.branch import BranchRank, ProcessBranchGroup, check_group_args
from seg_rt.engines.parallel import free_address, private_rendezvous
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.execution import BranchParallel

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # a placement group not placed by then: a clear error, not a hang


class RayRank:
    """A Ray actor around ``BranchRank`` (built in ``start`` once rank 0's address is known)."""

    def __init__(self) -> None:
        self.rank: BranchRank | None = None
        self._rendezvous: str | None = None

    def address(self) -> str:
        """The rendezvous (asked of rank 0): on a loopback node (the private Ray seg-rt starts, one
        machine) a file store in a fresh 0700 folder, which listens nowhere; else a free
        ``tcp://NODE_IP:PORT`` (torch's TCPStore then listens on every interface: docs/security.md)."""
        import ray

        ip = ray.util.get_node_ip_address()
        if ipaddress.ip_address(ip).is_loopback:
            address, self._rendezvous = private_rendezvous()
            return address
        return free_address(ip)

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
        if self._rendezvous is not None:
            shutil.rmtree(self._rendezvous, ignore_errors=True)


def rank_bundle(spec: BranchParallel) -> dict:
    """The placement-group bundle of one rank: 1 CPU, plus 1 GPU for device ``cuda``."""
    return {"CPU": 1, "GPU": 1} if spec.device == "cuda" else {"CPU": 1}


class RayBranchGroup:
    """The ranks of ``spec`` as Ray actors in one placement group (one bundle per rank: 1 CPU, plus
    1 GPU for device ``cuda``). Connects to ``spec.address`` or the running Ray, else starts a
    private local one (``seg_rt.cluster.jobs.driver.start_ray``)."""

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
    check_group_args(model, engine)
    if spec.launcher == "ray":
        return RayBranchGroup(spec, str(model), engine or "torch", threads, **ray_options)
    if ray_options:
        raise ValueError(f"{', '.join(ray_options)} apply to launcher 'ray' only, not {spec.launcher!r}")
    return ProcessBranchGroup(spec, str(model), engine or "torch", threads)
