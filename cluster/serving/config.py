"""The server's settings and per-request limits (``seg-rt serve --config FILE``; CLI flags override).

``load_config`` validates the whole config before Ray starts: any bad setting is one ``ValueError`` line.
"""

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from seg_rt.execution import BranchParallel, parse_engine_spec
from seg_rt.model_refs import check_model_url, public_name
from seg_rt.params import DEFAULT_SCHEDULER
from seg_rt.safe_load import safe_load_yaml

from ..jobs.spec import Scheduler
from .request import first_error
from .webhooks import WebhookSettings

API_KEY_ENV = "SEG_RT_API_KEY"


class Limits(BaseModel):
    """Per-request limits (HTTP 422 beyond them). Side limits derive from the model unless set."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(50, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_images: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_seg_scale: float = Field(20.0, ge=0, allow_inf_nan=False)
    max_cfg: float = Field(30.0, ge=1, allow_inf_nan=False)
    min_sigma: float = Field(0.1, gt=0, allow_inf_nan=False)
    max_side: int | None = Field(
        None, ge=1, description="pixels per side; default 4x the model's default side"
    )
    max_aspect: float = Field(4.0, ge=1, allow_inf_nan=False, description="longer side / shorter side")
    max_frames: int = Field(128, ge=1, description="frames of one video (video models)")


class JobSettings(BaseModel):
    """The job API (``/v1/jobs``): queue length, how long finished results are kept, previews."""

    model_config = ConfigDict(extra="forbid")
    queue_length: int = Field(64, ge=1, description="queued jobs; beyond this, HTTP 429 with Retry-After")
    retention_s: float = Field(86400.0, gt=0, allow_inf_nan=False, description="finished jobs kept this long")
    max_bytes: int = Field(
        1 << 30, ge=1, description="finished jobs' files kept up to this (oldest go first)"
    )
    preview_every: int = Field(5, ge=0, description="a preview every N steps (0: none)")


def state_dir_default() -> Path:
    """Where a server keeps its jobs when the config names no ``state_dir``."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "seg-rt" / "serve"


def check_engine_spec(spec: str) -> str:
    """``torch``, ``torch-compile``, ``onnx:DIR`` or ``trt:DIR`` with DIR an existing folder."""
    _, path = parse_engine_spec(spec)
    if path and not Path(path).is_dir():
        raise ValueError(f"engine folder {path!r} does not exist")
    return spec


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def model_name(model: str) -> str:
    """What clients see of the model (``seg_rt.model_refs.public_name``): a local folder's basename,
    a URL's last segment or the hub id, never a server path nor a URL; the demo model is ``seg-rt-demo``."""
    return public_name(model)


class ServeConfig(BaseModel):
    """Server settings (``--config FILE`` YAML; CLI flags override), validated whole before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, AfterValidator(check_model_url)]  # a URL: no credentials, no query
    model_name: str | None = Field(None, description="name shown to clients; default: folder name or hub id")
    single_file_config: str | None = Field(
        None, description="single-file model: the diffusers folder whose component configs it takes"
    )
    engine: Annotated[str, AfterValidator(check_engine_spec)] = "torch"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    trusted_hosts: list[str] = Field(
        default_factory=list,
        description="Host names answered besides loopback and the bound host (DNS rebinding guard; '*': any)",
    )
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Bearer keys; required off loopback"
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies: HTTP 413")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; None: autoscaling")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    num_gpus_per_replica: float | None = Field(None, ge=0, description="default: 1 when a GPU is visible")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    max_batch_size: int = Field(4, ge=1, description="images per sampling run")
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(16, ge=0, description="beyond this, HTTP 503")
    default_height: int | None = Field(None, ge=1)
    default_width: int | None = Field(None, ge=1)
    scheduler: Scheduler = DEFAULT_SCHEDULER
    limits: Limits = Limits()
    state_dir: str | None = Field(
        None, description="jobs and their results; default ~/.local/state/seg-rt/serve"
    )
    jobs: JobSettings = JobSettings()
    webhooks: WebhookSettings = WebhookSettings()
    branch_parallel: int = Field(
        1, ge=1, description="latency mode: each step's rows split over N ranks (branch-parallel SEG)"
    )
    branch_parallel_device: str = Field("cpu", description="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    loras: dict[str, str] = Field(
        default_factory=dict, description="LoRA files preloaded by name (NAME: PATH); requests pick by name"
    )

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: dict[str, str]) -> dict[str, str]:
        from seg_rt.lora import preload

        preload(v)  # names and files checked (safetensors, readable) before Ray starts
        return v

    @model_validator(mode="after")
    def _loras_engine(self) -> "ServeConfig":
        from seg_rt.lora import check_engine
        from seg_rt.singlefile import check_config_applies

        check_config_applies(self.model, self.single_file_config, "single_file_config")
        if self.single_file_config is not None and self.branch_parallel > 1:
            raise ValueError(
                "single_file_config: not available with branch_parallel > 1 (the ranks open the model)"
            )
        if self.loras and self.branch_parallel > 1:
            raise ValueError("loras: not available with branch_parallel > 1 (the ranks load no LoRAs)")
        check_engine(self.engine == "torch", self.loras.values(), self.engine)
        return self

    def preloaded_loras(self) -> dict:
        """The named LoRA set as ``seg_rt.lora.LoRA`` objects (file name, sha256; read here)."""
        from seg_rt.lora import preload

        return preload(self.loras)

    @field_validator("branch_parallel_device")
    @classmethod
    def _parallel_device(cls, v: str) -> str:
        BranchParallel(device=v)  # the one check of the value
        return v

    def parallel(self, launcher: str) -> BranchParallel | None:
        """The latency mode's ``BranchParallel`` (``None``: one device per run)."""
        if self.branch_parallel == 1:
            return None
        return BranchParallel(
            ranks=self.branch_parallel, launcher=launcher, device=self.branch_parallel_device
        )

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("API keys must not be empty")
        return [k.strip() for k in keys]

    @model_validator(mode="after")
    def _exposed_needs_key(self) -> "ServeConfig":
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable from other machines: give an API key "
                f"(--api-key or {API_KEY_ENV}) or bind 127.0.0.1"
            )
        return self

    @property
    def public_model(self) -> str:
        return self.model_name or model_name(self.model)


def load_config(path: str | Path | None, defaults: dict | None = None, **overrides: Any) -> ServeConfig:
    """Read ``path`` (YAML) over ``defaults`` and apply ``overrides``; any problem is one ``ValueError`` line."""
    data: dict = {}
    if path:
        from seg_rt.optional import require

        yaml = require("yaml", "server config files")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"server config {str(p)!r} does not exist")
        try:
            data = safe_load_yaml(p.read_text(), f"server config {str(p)!r}") or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ValueError(f"server config {str(p)!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"server config {str(p)!r} must be a mapping of settings, got {type(data).__name__}"
            )
    data = {**(defaults or {}), **data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"server config: {first_error(exc)}") from None
