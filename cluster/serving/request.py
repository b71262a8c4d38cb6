"""The ``POST /v1/generate`` body (``GenerateRequest``) and its one mapping onto ``GenerationParams``.

Validators call the request type's own rules, so a bad field is one line (HTTP 422), the same line the
CLI and job specs give. The API modules (``openai_api``, ``a1111_api``) map their own bodies onto
``GenerateRequest`` and build on the few names here that every API shares: ``RequestFailed`` (an
error answer), ``ErrorShape`` (how an API writes it) and ``Producer`` (the server's one way to turn a
request into images). They import this module only, never the core or the app.

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seg_rt.config import SEGConfig, parse_sigma
from seg_rt.params import DEFAULT_SCHEDULER, GenerationParams

from ..jobs.spec import Scheduler, Seed


def first_error(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: message``."""
    return validation_lines(exc.errors())[0]


def validation_lines(errors: Sequence[dict]) -> list[str]:
    """One line per bad field. Our validators' messages already name the field; pydantic's do not.
    The offending input is never echoed (it may be huge, or NaN, which JSON cannot carry)."""
    lines = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            lines.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
        elif err.get("type") == "value_error":
            lines.append(msg.removeprefix("Value error, "))
        else:
            lines.append(f"{loc or 'request body'}: {msg}")
    return lines


def _params_rule(name: str, value: Any) -> Any:
    """``value`` checked by ``GenerationParams``' own rule for field ``name`` (one rule, one place)."""
    return getattr(GenerationParams(**{name: value}), name)


def _seg_rule(name: str, value: Any) -> Any:
    return getattr(SEGConfig(**{name: value}), name)


class GenerateRequest(BaseModel):
    """The ``POST /v1/generate`` body; defaults are ``GenerationParams``' (the server's size and
    scheduler where left out)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str | None = None
    seed: Seed = GenerationParams.seed
    steps: int = GenerationParams.steps
    cfg: float = GenerationParams.cfg
    seg_scale: float = SEGConfig.scale
    seg_sigma: float | str = SEGConfig.sigma
    seg_layers: list[str] = list(SEGConfig().layers)
    seg_start: float = SEGConfig.start
    seg_end: float = SEGConfig.end
    guidance_rescale: float = GenerationParams.guidance_rescale
    distilled_guidance: float = GenerationParams.distilled_guidance
    height: int | None = None
    width: int | None = None
    scheduler: Scheduler | None = None
    num_images: int = Field(1, ge=1)
    response: Literal["png", "json"] = "png"

    @field_validator("steps", "cfg", "guidance_rescale", "distilled_guidance", "height", "width")
    @classmethod
    def _params_fields(cls, v: Any, info) -> Any:
        return _params_rule(info.field_name, v)

    @field_validator("seg_scale", "seg_start", "seg_end", "seg_layers")
    @classmethod
    def _seg_fields(cls, v: Any, info) -> Any:
        name = info.field_name.removeprefix("seg_")
        value = _seg_rule(name, v)
        return list(value) if name == "layers" else value

    @field_validator("seg_sigma")
    @classmethod
    def _sigma(cls, v: Any) -> float:
        return _seg_rule("sigma", parse_sigma(v))

    @model_validator(mode="after")
    def _whole(self) -> "GenerateRequest":
        self.params()  # cross-field rules (the SEG window)
        return self

    def params(
        self, height: int | None = None, width: int | None = None, scheduler: str = DEFAULT_SCHEDULER
    ) -> GenerationParams:
        """The request as the one request type; ``height`` / ``width`` / ``scheduler`` fill what it leaves out."""
        seg = SEGConfig(self.seg_scale, self.seg_sigma, tuple(self.seg_layers), self.seg_start, self.seg_end)
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            steps=self.steps,
            cfg=self.cfg,
            seg=seg,
            guidance_rescale=self.guidance_rescale,
            distilled_guidance=self.distilled_guidance,
            height=self.height or height,
            width=self.width or width,
            scheduler=self.scheduler or scheduler,
        )


class RequestFailed(Exception):
    """A request answered with an error: HTTP ``status``, one-line ``message`` and, where known, the
    request field (``param``) it is about. Each API turns it into its own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def make_request(**fields: Any) -> GenerateRequest:
    """``GenerateRequest(**fields)``; a bad field is a 422 ``RequestFailed`` naming it (one line each)."""
    try:
        return GenerateRequest(**fields)
    except ValidationError as exc:
        errors = exc.errors()
        loc = [p for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        param = str(loc[0]) if loc else None
        raise RequestFailed(422, "\n".join(validation_lines(errors)), param) from None


@dataclass(frozen=True)
class ErrorShape:
    """How one API answers errors: its paths, its JSON body and its auth challenge.

    ``body(status, message, param)`` → (status sent, JSON body); the API may map statuses (the
    OpenAI API answers bad input with 400 where ``/v1/generate`` says 422)."""

    prefixes: tuple[str, ...]
    body: Callable[[int, str, str | None], tuple[int, dict]]
    challenge: str = "Bearer"


Producer = Callable[[GenerateRequest], Awaitable[tuple[list[GenerationParams], list[bytes]]]]
