"""How a request runs, not what it generates: the engine spec and the branch-parallel split.

Execution options change no output beyond the engines' stated bounds, so they are not request fields
and are not recorded; the CLI, job specs, the server config and ``seg_rt.engines.load_engine`` all
parse them here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import _int

ENGINE_KINDS = ("torch", "torch-compile", "onnx:DIR", "trt:DIR")


PARALLEL_LAUNCHERS = ("processes", "ray")
PARALLEL_DEVICES = ("cpu", "cuda")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class BranchParallel:
    """How one sampling run spreads each step's ``[uncond | cond | perturbed]`` rows over ``ranks``
    processes (``seg_rt.engines.parallel``): an execution option like the engine, not part of the
    request (the result equals the one-device run within scale-relative 1e-5, not bit for bit).

    launcher: ``processes`` (local processes, one per rank) or ``ray`` (one actor per rank in a
              placement group of one bundle per rank, ``strategy``; ``address``: Ray address,
              ``None`` = the connected Ray or a private local one).
    device:   ``cpu`` (torch.distributed gloo) or ``cuda`` (NCCL, one GPU per rank).
    strategy: Ray placement strategy. ``PACK`` (default) keeps the ranks on as few nodes as fit, so
              the per-step exchange stays on NVLink / loopback; ``STRICT_SPREAD`` puts each rank on
              its own node (one GPU per node clusters).
    """

    ranks: int = 2
    launcher: str = "processes"
    device: str = "cpu"
    strategy: str = "PACK"
    address: str | None = None

    def __post_init__(self) -> None:
        _int("branch parallel ranks", self.ranks, 1)
        if self.launcher not in PARALLEL_LAUNCHERS:
            raise ValueError(
                f"branch parallel launcher must be one of {', '.join(PARALLEL_LAUNCHERS)}, got {self.launcher!r}"
            )
        if self.device not in PARALLEL_DEVICES:
            raise ValueError(
                f"branch parallel device must be one of {', '.join(PARALLEL_DEVICES)}, got {self.device!r}"
            )
        if self.strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.strategy!r}"
            )

    @property
    def backend(self) -> str:
        """The torch.distributed backend: gloo on CPU, NCCL on GPUs."""
        return "nccl" if self.device == "cuda" else "gloo"

    @classmethod
    def of(cls, value: BranchParallel | int | None) -> BranchParallel | None:
        """``None`` / 1 → no split; an int → that many local CPU processes; a ``BranchParallel`` as is."""
        if value is None or isinstance(value, BranchParallel):
            return value if value is None or value.ranks > 1 else None
        ranks = _int("branch parallel ranks", value, 1)
        return cls(ranks=ranks) if ranks > 1 else None


def parse_engine_spec(spec: str) -> tuple[str, str | None]:
    """``torch`` / ``torch-compile`` → (kind, None); ``onnx:DIR`` / ``trt:DIR`` → (kind, DIR).

    The one parser of engine specs: the CLI, job specs and ``seg_rt.engines.load_engine`` call it."""
    kind, _, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind in ("torch", "torch-compile") and not path:
        return kind, None
    if kind in ("onnx", "trt") and path:
        return kind, path
    raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {spec!r}")
