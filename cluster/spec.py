"""Batch job specs (YAML) and their deterministic work items.

A job is a prompt list x ``samples_per_prompt``. Item (p, s) gets the seed ``item_seed(job_seed, p, s)``:
a function of those three numbers only, so an output never depends on worker count, micro-batch
size, retries or resume. Invalid specs raise ``ValueError`` naming the bad field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seg_rt.config import SEGConfig, parse_layers, parse_sigma
from seg_rt.optional import require


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegSpec(_Strict):
    scale: float = 3.0
    sigma: float = math.inf
    layers: tuple[str, ...] = ("mid",)
    start: float = 0.0
    end: float = 1.0

    @field_validator("sigma", mode="before")
    @classmethod
    def _sigma(cls, v: Any) -> float:
        return parse_sigma(v) if isinstance(v, str) else v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> tuple[str, ...]:
        return parse_layers(v)

    @model_validator(mode="after")
    def _check(self) -> SegSpec:
        self.config()  # SEGConfig's own validation, one source of truth
        return self

    def config(self) -> SEGConfig:
        return SEGConfig(self.scale, self.sigma, self.layers, self.start, self.end)


class Resources(_Strict):
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)


class VideoSpec(_Strict):
    frames: int = Field(16, ge=1)
    fps: int = Field(8, ge=1)
    mode: Literal["spatial", "temporal", "spatiotemporal"] = "spatial"
    sigma_time: float = Field(0.0, ge=0)


class Overrides(_Strict):
    """Per-item settings a JSONL prompts file may override."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0)
    cfg: float | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    seg: SegSpec | None = None


class JobSpec(_Strict):
    model: str
    engine: str = "torch"
    seg: SegSpec = SegSpec()
    cfg: float = Field(5.0, ge=1)
    steps: int = Field(25, ge=1)
    height: int | None = Field(None, gt=0, multiple_of=8)
    width: int | None = Field(None, gt=0, multiple_of=8)
    scheduler: str = "euler"
    negative_prompt: str | None = None
    prompts: tuple[str, ...] | None = None
    prompts_file: str | None = None
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1, description="items per actor call (micro-batch)")
    batch_mode: Literal["item", "fused"] = "item"
    workers: int = Field(1, ge=1)
    resources_per_worker: Resources = Resources()
    max_attempts: int = Field(3, ge=1)
    output: str
    contact_sheet: bool = False
    video: VideoSpec | None = None

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        from seg_rt.pipeline import SCHEDULERS

        if v not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}, got {v!r}")
        return v

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        kind, _, path = v.partition(":")
        if not ((kind in ("torch", "torch-compile") and not path) or (kind in ("onnx", "trt") and path)):
            raise ValueError(f"must be torch, torch-compile, onnx:DIR or trt:DIR, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self) -> JobSpec:
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of prompts (a list) or prompts_file")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts is empty")
        return self


def _field_error(exc: ValidationError, source: str) -> ValueError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "job"
    msg = err["msg"].removeprefix("Value error, ")
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return ValueError(f"{source}: {where}: {msg}{extra}")


def load_job(path: str | Path) -> tuple[JobSpec, Path]:
    """Parse and validate a YAML job file; returns the spec and the folder relative paths resolve in."""
    yaml = require("yaml", "job files")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job file must be a mapping of fields, got {type(data).__name__}")
    return parse_job(data, str(path)), path.parent.resolve()


def parse_job(data: dict, source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc, source) from None


@dataclass(frozen=True)
class Item:
    """One output: prompt index p, sample index s, and everything needed to generate it."""

    prompt_index: int
    sample_index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    cfg: float
    steps: int
    seg: dict

    @property
    def id(self) -> str:
        return f"p{self.prompt_index:05d}_s{self.sample_index:03d}"

    def params(self) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "cfg": self.cfg, "steps": self.steps, "seg": self.seg}  # fmt: skip


def item_seed(job_seed: int, prompt_index: int, sample_index: int) -> int:
    """Stable 63-bit seed from (job seed, prompt index, sample index) only."""
    digest = hashlib.sha256(f"seg-rt:{job_seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def read_prompts(spec: JobSpec, base: Path) -> list[Overrides]:
    """Inline prompts, a text file (one per line), or JSONL (``{"prompt": ..., overrides}`` per line)."""
    if spec.prompts is not None:
        return [Overrides(prompt=p) for p in spec.prompts]
    path = Path(spec.prompts_file)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file {str(path)!r} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                out.append(Overrides.model_validate(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc.msg}") from None
            except ValidationError as exc:
                raise _field_error(exc, f"{path}:{n}") from None
        else:
            out.append(Overrides(prompt=line.strip()))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def expand_items(spec: JobSpec, base: Path) -> list[Item]:
    """Every (prompt, sample) item of the job, in a fixed order."""
    items = []
    for p, o in enumerate(read_prompts(spec, base)):
        seg = (o.seg or spec.seg).config().to_dict()
        for s in range(spec.samples_per_prompt):
            seed = o.seed + s if o.seed is not None else item_seed(spec.seed, p, s)
            items.append(Item(p, s, o.prompt, o.negative_prompt if o.negative_prompt is not None else spec.negative_prompt,
                              seed, o.cfg or spec.cfg, o.steps or spec.steps, seg))  # fmt: skip
    return items
