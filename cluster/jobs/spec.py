"""Batch job specs (YAML) and their deterministic work items.

A job is a prompt list x ``samples_per_prompt``. Item (p, s) gets the seed ``item_seed(job_seed, p, s)``:
a function of those three numbers only, so an output never depends on worker count, micro-batch
size, retries or resume. Invalid specs raise ``ValueError`` naming the bad field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from seg_rt.config import SEGConfig, parse_layers, parse_sigma, sigma_to_json
from seg_rt.errors import first_line
from seg_rt.execution import parse_engine_spec
from seg_rt.optional import require
from seg_rt.params import (
    GenerationParams,
    RequestField,
    VideoParams,
    check_field,
    check_scheduler,
    check_seed,
    fields_for,
    replace_fields,
    request_from_fields,
)
from seg_rt.safe_load import loads_json, safe_load_yaml
from seg_rt.tasks import TASK_FIELDS

from .inputs import (
    IMAGE_KEYS,
    IMAGE_TYPES,
    check_output_url,
    check_task_field,
    image_files,
    input_file,
    job_file,
    job_image,
)

# A job's defaults are the request type's: the same request gives the same output from the CLI,
# the API and a job (docs/design.md, "One request, one type").
_REQUEST = GenerationParams()
_VIDEO = VideoParams()


def _engine_syntax(spec: str) -> str:
    parse_engine_spec(spec)  # the folder is checked where the job runs: it may be on a worker node
    return spec


# Field types that call the one rule of their value (seg_rt.params / seg_rt.config), for every
# pydantic model of the cluster (job spec, server config, HTTP request).
Sigma = Annotated[
    float,
    BeforeValidator(lambda v: parse_sigma(v) if isinstance(v, str) else v),  # "inf" at JSON boundaries
    PlainSerializer(sigma_to_json),
]
Layers = Annotated[tuple[str, ...], BeforeValidator(parse_layers)]
OptionalLayers = Annotated[
    tuple[str, ...] | None, BeforeValidator(lambda v: v if v is None else parse_layers(v))
]
Scheduler = Annotated[str, AfterValidator(check_scheduler)]
Seed = Annotated[int, AfterValidator(check_seed)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def wire_type(f: RequestField, *, optional: bool = False) -> Any:
    """The pydantic type of a request field (``seg_rt.params``) in a job file or HTTP body."""
    if f.type == "layers" and (optional or f.default is None):
        return OptionalLayers
    if f.type in IMAGE_TYPES:  # a reference (loaded per item: .inputs.job_image)
        return str | None
    special = {"seed": Seed, "scheduler": Scheduler}
    types = {
        "sigma": Sigma,
        "layers": Layers,
        "optional_str": str | None,
        "optional_int": int | None,
        "loras": Any,  # PATH[:WEIGHT] strings or {path, weight}: seg_rt.lora's rules, by check_field
    }
    t = special.get(f.key) or types.get(f.type, f.type)
    return t | None if optional else t


_SEG_FIELDS = tuple(f for f in fields_for("image") if f.path[0] == "seg")


class _SegBase(_Strict):
    @model_validator(mode="after")
    def _check(self) -> _SegBase:
        self.config()  # SEGConfig's own validation, one source of truth
        return self

    def config(self) -> SEGConfig:
        return SEGConfig(**{f.path[1]: getattr(self, f.path[1]) for f in _SEG_FIELDS})


# the job file's ``seg:`` block: SEGConfig's fields by their own names (scale, sigma, layers, start,
# end, every, placement), from the request field table
SegSpec = create_model(
    "SegSpec", __base__=_SegBase, **{f.path[1]: (wire_type(f), f.default) for f in _SEG_FIELDS}
)


class Resources(_Strict):
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)


_VIDEO_FIELDS = tuple(f for f in fields_for("video") if f.path[0] == "video")


class _VideoBase(_Strict):
    _params: VideoParams | None = PrivateAttr(default=None)  # params(), built once per spec

    @field_validator(*(f.path[1] for f in _VIDEO_FIELDS), check_fields=False)
    @classmethod
    def _field(cls, v: Any, info) -> Any:
        f = next(f for f in _VIDEO_FIELDS if f.path[1] == info.field_name)
        if f.type in ("image", "mask"):
            # the spec keeps the absolute path (resolve_paths) or URL, so that it dumps to JSON for the
            # workers; the image is read and checked here and again where the request is built
            if v is not None:
                check_field(f.key, input_file(v, "video image"), "video")
            return v
        return check_field(f.key, v, "video")  # the request type's own rule, naming the field

    @model_validator(mode="after")
    def _check(self) -> _VideoBase:
        self._build()
        return self

    def params(self) -> VideoParams:
        """The block as the request's ``VideoParams``, built once per spec and shared by its items
        (frozen): the still (a download when it is a URL) is not read again per item."""
        if self._params is None:
            self._params = self._build()
        return self._params

    def _build(self) -> VideoParams:
        values = {f.path[1]: getattr(self, f.path[1]) for f in _VIDEO_FIELDS}
        for f in _VIDEO_FIELDS:
            if f.type in ("image", "mask") and values[f.path[1]] is not None:
                values[f.path[1]] = f.parse(input_file(values[f.path[1]], "video image"))
        return VideoParams(**values)


# the job file's ``video:`` block: VideoParams' fields by their own names (frames, fps, mode,
# sigma_time, layers), from the request field table; same defaults, same rules
VideoSpec = create_model(
    "VideoSpec", __base__=_VideoBase, **{f.path[1]: (wire_type(f), f.default) for f in _VIDEO_FIELDS}
)


MAX_ITEMS = 1_000_000  # default bound of one job's prompts x samples_per_prompt (max_items)


def _model_url(model: str) -> str:
    return check_output_url(model, "model")


class _OverridesBase(_Strict):
    """Per-item settings a JSONL prompts file may override: ``prompt`` and any image request field
    by its record key (``seg_every``, ``guidance_rescale``, ...; the request field table), or the
    SEG settings as a ``seg`` block like the job file's."""

    prompt: str
    seg: SegSpec | None = None

    @field_validator("*", check_fields=False)
    @classmethod
    def _field(cls, v: Any, info) -> Any:
        if v is None or info.field_name in ("prompt", "seg"):
            return v
        if info.field_name in _TASK_KEYS:
            return check_task_field(info.field_name, v)
        return check_field(info.field_name, v)  # the request type's own rule, naming the field

    @model_validator(mode="after")
    def _one_seg_spelling(self) -> _OverridesBase:
        flat = [f.key for f in _SEG_FIELDS if getattr(self, f.key) is not None]
        if self.seg is not None and flat:
            raise ValueError(f"give the SEG settings as a seg block or as {', '.join(flat)}, not both")
        return self

    def fields(self) -> dict[str, Any]:
        """The request fields this line sets (record keys; ``None`` = the job's)."""
        return {f.key: getattr(self, f.key) for f in _ITEM_FIELDS if getattr(self, f.key) is not None}


_ITEM_FIELDS = tuple(f for f in fields_for("image") if f.key != "prompt")
_IMAGE_KEYS = IMAGE_KEYS
_TASK_KEYS = TASK_FIELDS  # the task fields: set per item (with the item's images), each checked alone


Overrides = create_model(
    "Overrides", __base__=_OverridesBase, **{f.key: (wire_type(f, optional=True), None) for f in _ITEM_FIELDS}
)


# the request fields a job sets for all its items (prompt and seed are per item: the job's seed
# seeds the items' seeds), by their record keys, from the request field table
_JOB_FIELDS = tuple(f for f in fields_for("image") if len(f.path) == 1 and f.key not in ("prompt", "seed"))


class _JobBase(_Strict):
    model: Annotated[str, AfterValidator(_model_url)]  # a URL: fetched once per node (fetch_model)
    single_file_config: str | None = Field(
        None, description="single-file model: the diffusers folder whose component configs it takes"
    )
    engine: Annotated[str, AfterValidator(_engine_syntax)] = "torch"
    seg: SegSpec = SegSpec()
    prompts: tuple[str, ...] | None = None
    prompts_file: str | None = None
    samples_per_prompt: int = Field(1, ge=1)
    max_items: int = Field(MAX_ITEMS, ge=1, description="prompts x samples_per_prompt past this: refused")
    seed: Seed = _REQUEST.seed
    batch_size: int = Field(1, ge=1, description="items per actor call (micro-batch)")
    batch_mode: Literal["item", "fused"] = "item"
    workers: int = Field(1, ge=1)
    resources_per_worker: Resources = Resources()
    max_attempts: int = Field(3, ge=1)
    output: Annotated[str, AfterValidator(check_output_url)]
    contact_sheet: bool = False
    video: VideoSpec | None = None

    @field_validator(*(f.key for f in _JOB_FIELDS), check_fields=False)
    @classmethod
    def _request_field(cls, v: Any, info) -> Any:
        if info.field_name in _TASK_KEYS:
            return check_task_field(info.field_name, v)
        return check_field(info.field_name, v)  # the request type's own rule, naming the field

    @model_validator(mode="after")
    def _one_prompt_source(self) -> _JobBase:
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of prompts (a list) or prompts_file")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts is empty")
        return self

    @model_validator(mode="after")
    def _single_file_config(self) -> _JobBase:
        from seg_rt.singlefile import check_config_applies

        check_config_applies(self.model, self.single_file_config, "single_file_config")
        return self

    @model_validator(mode="after")
    def _bounded(self) -> _JobBase:
        check_item_count(self, len(self.prompts) if self.prompts is not None else 1)
        return self

    @model_validator(mode="after")
    def _request(self) -> _JobBase:
        self.base_params()  # the request type's own rules (video: seg layers, temporal σ_time)
        factor = local_scale_factor(self.model)
        if factor is not None:
            from seg_rt.params import check_size

            check_size(self.height, self.width, factor)
        return self

    def base_params(self) -> GenerationParams:
        """The job's request before per-item prompt, seed and overrides."""
        # the init image and mask are loaded per item (job_image), where the job's folder is known
        request = request_from_fields(
            {f.key: getattr(self, f.key) for f in _JOB_FIELDS if f.key not in _TASK_KEYS}
        )
        return request.replace(seg=self.seg.config(), video=self.video.params() if self.video else None)


JobSpec = create_model(
    "JobSpec", __base__=_JobBase, **{f.key: (wire_type(f), f.default) for f in _JOB_FIELDS}
)


def local_scale_factor(model: str) -> int | None:
    """The pixel-size factor of ``model`` when it is a local diffusers folder (read from its config
    files, no weights loaded); ``None`` for a hub id or a folder that is not there."""
    from seg_rt.pipeline import folder_scale_factor

    path = Path(model).expanduser()
    return folder_scale_factor(path) if path.is_dir() else None


def _field_error(exc: ValidationError, source: str) -> ValueError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = f"{loc}: " if loc else ""  # model-level rules name their fields in the message
    msg = err["msg"].removeprefix("Value error, ")
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return ValueError(f"{source}: {where}{msg}{extra}")


def load_job(path: str | Path) -> tuple[JobSpec, Path]:
    """Parse and validate a YAML job file; returns the spec and the folder relative paths resolve in.

    Relative ``model:`` / ``engine:`` folders resolve against that folder (not the worker's cwd)."""
    yaml = require("yaml", "job files")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {str(path)!r} does not exist")
    try:
        data = safe_load_yaml(path.read_text(), str(path))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job file must be a mapping of fields, got {type(data).__name__}")
    base = path.parent.resolve()
    return parse_job(data, str(path), base=base), base


def parse_job(data: dict, source: str = "job", base: Path | None = None) -> JobSpec:
    """Validate a job mapping; with ``base``, relative model and engine folders resolve against it."""
    if base is not None:
        data = resolve_paths(data, base)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc, source) from None


def input_files(spec: JobSpec, base: Path) -> list[str]:
    """The relative input files a job names (job-level and per prompt line; ``inputs.image_files``)."""
    return image_files(spec, base, read_prompts(spec, base) if spec.prompts_file is not None else None)


def resolve_paths(data: dict, base: Path) -> dict:
    """``model:``, ``single_file_config:``, ``engine: onnx:DIR`` / ``trt:DIR`` and a video block's
    ``image`` given relative →
    absolute under ``base``.

    A model that is neither an existing folder under ``base`` nor written as a path (``./m``, ``../m``)
    stays as given: a hub id such as ``org/name``."""
    data = resolve_lora_paths(data, base)
    model = data.get("model")
    if isinstance(model, str) and model and not Path(model).expanduser().is_absolute():
        local = base / model
        if model.startswith("~"):
            data["model"] = str(Path(model).expanduser())
        elif local.exists() or model.startswith((".", "/")):
            data["model"] = str(local.resolve())
    video = data.get("video")
    if isinstance(video, dict) and isinstance(video.get("image"), str):
        from seg_rt.models import is_url

        if not is_url(video["image"]):  # a URL is read when the field is checked (input_file)
            data["video"] = {**video, "image": str(job_file(video["image"], "video image", base))}
    config = data.get("single_file_config")
    if isinstance(config, str) and config and not Path(config).expanduser().is_absolute():
        data["single_file_config"] = str((base / config).resolve())  # the folder is read where it runs
    engine = data.get("engine")
    if isinstance(engine, str):
        try:
            kind, folder = parse_engine_spec(engine)
        except ValueError:
            return data  # reported by the validator, with the field name
        if folder is not None and not Path(folder).expanduser().is_absolute():
            data["engine"] = f"{kind}:{(base / folder).resolve()}"
    return data


def resolve_lora_paths(data: dict, base: Path) -> dict:
    """``loras:`` files given relative (``PATH[:WEIGHT]`` or ``{path, weight}``) → under ``base``."""
    from seg_rt.lora import split_spec

    data = dict(data)
    loras = data.get("loras")
    if not isinstance(loras, list | tuple | str | dict):
        return data

    def under(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else base / p)

    out = []
    for v in [loras] if isinstance(loras, str | dict) else loras:
        if isinstance(v, str) and v.strip():
            path, weight = split_spec(v)
            v = f"{under(path)}:{weight!r}"
        elif isinstance(v, dict) and isinstance(v.get("path"), str):
            v = {**v, "path": under(v["path"])}
        out.append(v)
    data["loras"] = out
    return data


@dataclass(frozen=True)
class Item:
    """One output: prompt index p, sample index s, and the request that generates it."""

    prompt_index: int
    sample_index: int
    params: GenerationParams

    @property
    def id(self) -> str:
        return f"p{self.prompt_index:05d}_s{self.sample_index:03d}"

    @property
    def prompt(self) -> str:
        return self.params.prompt

    @property
    def seed(self) -> int:
        return self.params.seed


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
                row = loads_json(line, f"{path}:{n}")
                out.append(
                    Overrides.model_validate(resolve_lora_paths(row, base) if isinstance(row, dict) else row)
                )
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc.msg}") from None
            except ValidationError as exc:
                raise _field_error(exc, f"{path}:{n}") from None
        else:
            out.append(Overrides(prompt=line.strip()))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def item_params(
    spec: JobSpec, o: Overrides, prompt_index: int, sample_index: int, folder: Path | None = None
) -> GenerationParams:
    """The request of item (p, s): the job's request, then the prompt line's overrides; the init
    image and mask (the line's, else the job's) loaded from ``folder``, the job's folder."""
    base = spec.base_params()
    fields = o.fields()
    for key in _TASK_KEYS:  # the line's, else the job's; images loaded from the job's folder
        value = fields.pop(key, None)
        value = getattr(spec, key) if value is None else value
        if value is not None and value != getattr(_REQUEST, key):
            fields[key] = job_image(value, key, folder or Path.cwd()) if key in _IMAGE_KEYS else value
    seed = fields.pop("seed", None)
    seed = seed + sample_index if seed is not None else item_seed(spec.seed, prompt_index, sample_index)
    kind = "video" if base.video is not None else "image"
    request = replace_fields(base, kind, {**fields, "prompt": o.prompt, "seed": seed})
    return request if o.seg is None else request.replace(seg=o.seg.config())


def check_item_count(spec: _JobBase, prompts: int) -> None:
    """A job's items (prompts x samples_per_prompt) are built up front: past ``max_items`` the job
    is refused at once with one line, not left growing memory with no output."""
    if prompts * spec.samples_per_prompt > spec.max_items:
        raise ValueError(
            f"{prompts} prompt(s) x samples_per_prompt {spec.samples_per_prompt} = "
            f"{prompts * spec.samples_per_prompt} items, more than max_items {spec.max_items}; "
            "split the job or raise max_items"
        )


def expand_items(spec: JobSpec, base: Path) -> list[Item]:
    """Every (prompt, sample) item of the job, in a fixed order; a bad override fails here, before
    Ray starts, naming its prompt. More than ``max_items`` items: refused before any is built."""
    items = []
    prompts = read_prompts(spec, base)
    check_item_count(spec, len(prompts))
    for p, o in enumerate(prompts):
        for s in range(spec.samples_per_prompt):
            try:
                items.append(Item(p, s, item_params(spec, o, p, s, base)))
            except ValueError as exc:
                raise ValueError(f"prompt {p} ({o.prompt[:40]!r}), sample {s}: {exc}") from None
    return items
