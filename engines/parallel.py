"""Branch-parallel SEG: one step's ``[uncond | cond | perturbed]`` rows split over the ranks of a
``torch.distributed`` group, so one image's step takes the time of one branch, not three.

Every rank runs the same sampling loop (:func:`seg_rt.sampler.sample`) with the same inputs; only
the denoiser call is split. :class:`BranchParallelDenoiser` wraps any row-independent denoiser:
rank r computes a contiguous block of the batch rows (:func:`row_split`; with one image and three
ranks, one branch each), then one ``all_gather`` of the predictions (a few hundred KB per step)
gives every rank the whole batch. Guidance and the scheduler step then run identically on every
rank, so all ranks hold the same latents after every step and no further exchange is needed.

Exact: a row's prediction is the same function of its inputs whatever block it is computed in,
so the result equals the batched run within float tolerance (scale-relative 1e-5, tested with 2
and 3 gloo processes); it is not bit for bit, since CPU kernels (convolutions, attention GEMMs)
pick other algorithms for another row count. ``seg_mask`` travels with its rows: a rank whose
block holds no perturbed row runs the plain attention (SEG, arXiv 2408.00760, eq. 10 needs only
the perturbed *rows'* query blurred).

Backends: gloo on CPU, NCCL on GPUs (``init_process_group``; ``check_backend`` says in one line
what NCCL lacks). The ranks themselves (local processes or Ray actors in a placement group) are
``seg_rt.engines.branch`` (local processes) and ``seg_rt.cluster.branch`` (Ray actors).

Shared prefix (``TorchDenoiser(shared_prefix=True)``) is not used across ranks: each rank gets a plain
block of rows, so the rank holding the perturbed rows computes their prefix itself. docs/design.md
("Branch-parallel SEG") says why that costs no step time with 3 ranks and what 2 ranks could gain.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seg_rt.engines import Denoiser
from seg_rt.errors import EnvironmentUnavailable

logger = logging.getLogger(__name__)

SHAPE_SLOTS = 8  # trailing dims exchanged once when a rank has no rows (ndim < 8 for every model)


def row_split(rows: int, world: int) -> list[int]:
    """Rows per rank: contiguous blocks, sizes differing by at most one, larger blocks first
    (rank 0 always has a row). 3 rows over 2 ranks: [2, 1]; 2 rows over 3 ranks: [1, 1, 0]."""
    return [rows // world + (1 if r < rows % world else 0) for r in range(world)]


def init_group(rank: int, world: int, address: str, backend: str = "gloo") -> None:
    """Join the process group at ``address`` (``tcp://host:port``, or ``file://PATH`` from
    :func:`private_rendezvous` for ranks on one machine), as ``torch.distributed`` does."""
    check_backend(backend)
    if address.startswith("file://") and sys.platform.startswith("linux"):
        # ranks on one machine: gloo's and NCCL's own connections on the loopback interface too
        # (they would otherwise bind the address the host name resolves to); a user's choice stays
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, "lo")
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world)


def private_rendezvous() -> tuple[str, str]:
    """``(file://PATH, folder)``: a rendezvous for ranks on this machine in a fresh 0700 folder.
    torch's ``tcp://`` rendezvous starts a TCPStore that listens on the wildcard address whatever
    host the URL names, unauthenticated; a file store listens nowhere and only this user can open
    it. The caller removes ``folder`` when the group is closed."""
    folder = tempfile.mkdtemp(prefix="segrt-rdv-")  # mode 0700
    return f"file://{os.path.join(folder, 'store')}", folder


def check_backend(backend: str, ranks: int | None = None) -> None:
    """NCCL needs CUDA GPUs (``ranks`` of them when given, local launcher) and a torch built with
    NCCL; say which is missing in one line instead of failing inside ``init_process_group``."""
    if backend == "gloo":
        return
    if backend != "nccl":
        raise ValueError(f"torch.distributed backend must be gloo (CPU) or nccl (GPU), got {backend!r}")
    if not torch.cuda.is_available():
        raise EnvironmentUnavailable(
            "branch parallel on cuda uses torch.distributed NCCL, which needs CUDA GPUs; none is visible "
            "here (use device 'cpu' for gloo)"
        )
    if not dist.is_nccl_available():
        raise EnvironmentUnavailable(
            "branch parallel on cuda needs a torch build with NCCL; this torch has none"
        )
    if ranks is not None and torch.cuda.device_count() < ranks:
        raise EnvironmentUnavailable(
            f"branch parallel on cuda needs one GPU per rank: {ranks} ranks, "
            f"{torch.cuda.device_count()} GPUs visible"
        )


def free_address(host: str = "127.0.0.1") -> str:
    """``tcp://host:port`` with a port free now, for rank 0's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class BranchParallelDenoiser(Denoiser):
    """``inner`` evaluated on this rank's block of rows; the whole batch's prediction is returned on
    every rank (``all_gather``). ``comm_seconds``: time spent in the exchange, one entry per call."""

    def __init__(self, inner: Denoiser, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise ValueError("branch-parallel SEG needs an initialised torch.distributed process group")
        self.inner, self.group = inner, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.comm_seconds: list[float] = []
        self.block_shape: tuple[int, ...] | None = None  # the last exchanged block (rows padded), per rank
        self._trailing: dict[tuple, tuple[int, ...]] = {}

    @property
    def shapes(self):  # the inner engine sees only a block of rows: it must accept any batch
        return self.inner.shapes

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        self.inner.configure(sigma, layers)

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        sample = inputs["sample"]
        rows = sample.shape[0]
        sizes = row_split(rows, self.world)
        start = sum(sizes[: self.rank])
        block = {k: _rows(v, rows, start, start + sizes[self.rank]) for k, v in inputs.items()}
        out = self.inner(block).to(sample.dtype) if sizes[self.rank] else None
        t0 = time.perf_counter()
        trailing = self._out_trailing(out, sample, sizes)
        # gloo / NCCL all_gather takes equal sizes: pad every block to the largest, trim after
        buf = torch.zeros((max(sizes), *trailing), dtype=sample.dtype, device=sample.device)
        if out is not None:
            buf[: out.shape[0]] = out
        self.block_shape = tuple(buf.shape)
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(gathered, buf, group=self.group)
        result = torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])  # [rows, *trailing]
        self.comm_seconds.append(time.perf_counter() - t0)
        return result

    def _out_trailing(self, out: Tensor | None, sample: Tensor, sizes: list[int]) -> tuple[int, ...]:
        """The prediction's shape past the batch dim. Known locally when this rank computed rows; when
        some rank has none (fewer rows than ranks) rank 0 broadcasts it once per input shape."""
        if min(sizes) > 0:
            return tuple(out.shape[1:])
        key = tuple(sample.shape[1:])
        if key not in self._trailing:
            msg = torch.full((SHAPE_SLOTS,), -1, dtype=torch.int64)
            if self.rank == 0:
                msg[: out.ndim - 1] = torch.tensor(out.shape[1:])
            dist.broadcast(
                msg, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group
            )
            self._trailing[key] = tuple(int(d) for d in msg if d >= 0)
        return self._trailing[key]

    def close(self) -> None:
        self.inner.close()
        self.closed = True


def _rows(value, rows: int, start: int, stop: int):
    """Per-row inputs (batch dim first) sliced to this rank's block; anything else as is."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows:
        return value[start:stop]
    return value
