"""The ``POST /v1/generate`` body (``GenerateRequest``) and its one mapping onto ``GenerationParams``.

Validators call the request type's own rules, so a bad field is one line (HTTP 422), the same line the
CLI and job specs give. The API modules (``openai_api``, ``a1111_api``) map their own bodies onto
``GenerateRequest`` and build on the few names here that every API shares: ``RequestFailed`` (an
error answer), ``ErrorShape`` (how an API writes it) and ``Producer`` (the server's one way to turn a
request into images). They import this module only, never the core or the app.

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from seg_rt.lora import named_specs, resolve_named
from seg_rt.params import (
    DEFAULT_SCHEDULER,
    GenerationParams,
    RequestField,
    canonical,
    check_field,
    field_named,
    fields_for,
    request_from_fields,
)
from seg_rt.tasks import MAX_INPUT_PIXELS, check_mask_blur, check_strength, load_image

from ..jobs.spec import Seed

ECHO_CHARS = 80  # of one offending value quoted in an error message
MAX_ERROR_CHARS = 2000  # of a whole error message (a body may hold many bad fields)


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, capped at ``ECHO_CHARS`` (a 1 MB field is not echoed)."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def capped(message: str) -> str:
    """An error message as an answer carries it: at most ``MAX_ERROR_CHARS`` characters."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... ({len(message)} characters)"


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


# Where the body's defaults differ from the request type's: the server fills these from its config.
SERVER_DEFAULTS = {"scheduler": None, "height": None, "width": None}
_TABLE = fields_for("image")
# The pixel limit of an input image (init image, mask) of this request: the server's (set per HTTP
# request by ``http.RequestGuard`` from ``Limits.max_pixels``), checked from the image header before
# any pixel is decoded; PIL's own decompression-bomb guard stays on besides.
INPUT_PIXELS: ContextVar[int] = ContextVar("input_pixels", default=MAX_INPUT_PIXELS)
DATA_URL = ("data:image/", ";base64,")


def decode_image(value: Any, key: str, mode: str):
    """An HTTP image field: base64-encoded image bytes (a ``data:image/...;base64,`` prefix
    accepted), never a path; one ``ValueError`` line naming ``key`` when it is not base64, not an
    image, or over ``INPUT_PIXELS``."""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a base64-encoded image (a string), got {type(value).__name__}")
    text = value.strip()
    if text.startswith(DATA_URL[0]) and DATA_URL[1] in text:
        text = text.partition(DATA_URL[1])[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{key} must be base64-encoded image bytes (never a path): not valid base64"
        ) from None
    return load_image(raw, key, mode=mode, max_pixels=INPUT_PIXELS.get())  # its lines name ``key``


_EXTRA = {"num_images": (int, Field(1, ge=1)), "response": (Literal["png", "json"], "png")}


def _annotation(f: RequestField) -> Any:
    """The pydantic type of a table field on the wire."""
    if f.key == "seed":
        return Seed
    if f.key in SERVER_DEFAULTS:
        base = {"optional_int": int, str: str}[f.type]
        return base | None
    return {
        "optional_str": str | None,
        "optional_int": int | None,
        "sigma": float | str,
        "layers": list[str] | str,
        "loras": list[str | dict[str, Any]],  # NAME[:WEIGHT] or {name, weight}: the server's set
        "image": str | None,  # base64 image bytes on the wire (seg_rt.tasks.InputImage once decoded)
        "mask": str | None,
    }.get(f.type, f.type)


_Fields = create_model(
    "_GenerateFields",
    __config__=ConfigDict(extra="forbid"),
    **{
        f.key: (_annotation(f), SERVER_DEFAULTS.get(f.key, [] if f.type == "loras" else f.dump(f.default)))
        for f in _TABLE
    },
    **_EXTRA,
)


def canonical_body(data: Any, kind: str) -> Any:
    """A request body with the field table's names of ``kind`` (keys and aliases such as
    ``num_inference_steps``) folded to their keys by ``canonical`` (both spellings with different
    values refused); other keys are left for the request type's own checks."""
    if not isinstance(data, dict):
        return data
    table = {name for f in fields_for(kind) for name in (f.key, *f.aliases)}
    ours = {k: v for k, v in data.items() if k in table}
    return {**{k: v for k, v in data.items() if k not in table}, **canonical(ours, kind)}


class GenerateRequest(_Fields):
    """The ``POST /v1/generate`` body: every image field of the request field table
    (``seg_rt.params``: the record's keys, ``seg_every``, ``seg_placement``, ``sequential`` and
    ``guidance_rescale`` included; ``num_inference_steps`` / ``guidance_scale`` accepted as
    aliases), plus ``num_images`` and ``response``. Defaults are ``GenerationParams``' (the
    server's size and scheduler where left out); each field is checked by the request type's own
    rule, so a bad value gets the line the CLI and job specs give."""

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return canonical_body(data, "image")

    @field_validator(*(f.key for f in _TABLE))
    @classmethod
    def _field(cls, v: Any, info) -> Any:
        if v is None and info.field_name in SERVER_DEFAULTS:
            return v
        if info.field_name == "loras":  # names of the server's preloaded set: looked up by the core
            return [{"name": n, "weight": w} for n, w in named_specs(v)]
        f = field_named(info.field_name, "image")
        if f.type in ("image", "mask"):  # bytes only: a server never opens a path a client names
            return None if v is None else decode_image(v, f.key, "L" if f.type == "mask" else "RGB")
        if f.key in ("strength", "mask_blur"):  # alone; with the init image in ``_whole``
            return check_strength(v) if f.key == "strength" else check_mask_blur(v)
        value = check_field(info.field_name, v)  # the request type's own rule
        return list(value) if field_named(info.field_name, "image").type == "layers" else value

    @model_validator(mode="after")
    def _whole(self) -> "GenerateRequest":
        self.params()  # cross-field rules (the SEG window, cheap modes with CFG)
        return self

    def params(
        self,
        height: int | None = None,
        width: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        loras: Mapping[str, Any] | None = None,
    ) -> GenerationParams:
        """The request as the one request type; ``height`` / ``width`` / ``scheduler`` fill what it leaves out.
        ``loras``: the server's preloaded LoRAs by name, which the request's ``loras`` pick from
        (``None``: the names are not looked up, for the syntax checks)."""
        values = {f.key: getattr(self, f.key) for f in _TABLE}
        picked = [(x["name"], x["weight"]) for x in values.pop("loras")]
        if loras is not None:
            values["loras"] = resolve_named(picked, loras)
        init = values["init_image"]  # an init image gives the size it leaves out (seg_rt.generate's rule)
        if init is not None:
            height, width = init.height, init.width
        fill = {"height": height, "width": width, "scheduler": scheduler}
        values.update({k: values[k] or fill[k] for k in fill})
        return request_from_fields(values)


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
