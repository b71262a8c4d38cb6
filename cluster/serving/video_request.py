"""The video request body (``VideoRequest``): every field of the request field table's video kind
(``seg_rt.params.fields_for("video")``: frames, fps, seg_mode, seg_sigma_time, the video's SEG
layers, ``image`` for image-to-video, the common ones, and their aliases), checked by the request
type's own rules, as ``GenerateRequest`` does for images. ``POST /v1/videos`` and ``POST /v1/jobs``
on a server of a video model take it.

No ``from __future__ import annotations`` here: FastAPI reads the annotations as classes.
"""

from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model, field_validator, model_validator

from seg_rt.params import VideoParams, check_field, field_named, fields_for, request_from_fields

from .request import (
    SERVER_DEFAULTS,
    RequestFailed,
    _annotation,
    canonical_body,
    decode_image,
    validation_lines,
)

_TABLE = fields_for("video")
# filled from the server when left out: size and scheduler (as for images), frames (the model's clip)
VIDEO_DEFAULTS = {**SERVER_DEFAULTS, "frames": None}

_Fields = create_model(
    "_VideoFields",
    __config__=ConfigDict(extra="forbid"),
    **{
        f.key: (
            int | None if f.key == "frames" else _annotation(f),
            VIDEO_DEFAULTS.get(f.key, f.dump(f.default)),
        )
        for f in _TABLE
    },
)


class VideoRequest(_Fields):
    """One video: every video field of the request field table (aliases such as
    ``num_inference_steps`` / ``guidance_scale`` accepted, both spellings with different values a
    422); defaults are ``GenerationParams`` / ``VideoParams``' (the server's size, scheduler and the
    model's clip length where left out)."""

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return canonical_body(data, "video")

    @field_validator(*(f.key for f in _TABLE))
    @classmethod
    def _field(cls, v: Any, info) -> Any:
        if v is None and info.field_name in VIDEO_DEFAULTS:
            return v
        f = field_named(info.field_name, "video")
        if f.type == "image":  # bytes only: a server never opens a path a client names
            return None if v is None else decode_image(v, f.key, "RGB")
        value = check_field(info.field_name, v, "video")  # the request type's own rule
        return list(value) if f.type == "layers" else value

    @model_validator(mode="after")
    def _whole(self) -> "VideoRequest":
        self.params(frames=self.frames or VideoParams().frames)  # cross-field rules
        return self

    def params(
        self,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        frames: int | None = None,
    ):
        """The request as the one request type (a video ``GenerationParams``); the arguments fill
        what it leaves out."""
        values = {f.key: getattr(self, f.key) for f in _TABLE}
        fill = {"height": height, "width": width, "scheduler": scheduler, "frames": frames}
        for key, value in fill.items():
            if values[key] is None:  # the server's value, else the request type's default
                values[key] = value
                if value is None:
                    del values[key]
        return request_from_fields(values, "video")

    def record(self) -> dict:
        """The body as JSON for a job record (the still by its sha256)."""
        body = self.model_dump(mode="json", exclude={"image"})
        if self.image is not None:
            body["image"] = self.image.record()
        return body


def make_video_request(fields: Mapping[str, Any]) -> VideoRequest:
    """``VideoRequest(**fields)``; a bad field is a 422 ``RequestFailed`` naming it."""
    try:
        return VideoRequest(**fields)
    except ValidationError as exc:
        errors = exc.errors()
        loc = [p for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        raise RequestFailed(422, "\n".join(validation_lines(errors)), str(loc[0]) if loc else None) from None
