"""The request's field table: every field of ``GenerationParams`` / ``SEGConfig`` / ``VideoParams``
that a user sets, once, with its wire name (= its record key), value type, where it lives in the
request, help text and the spellings users bring from diffusers / OpenAI clones.

Every edge is derived from it (docs/design.md §3): the CLI's request flags (``add_arguments``), the
Python API's keywords (``request_from_fields``), the HTTP body and job items (``wire_schema`` gives
the pydantic fields), so a field added here appears everywhere it applies. Defaults are not written
here: each comes from its dataclass field (``RequestField.default``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import SEGConfig, parse_layers, parse_sigma, sigma_label, sigma_to_json
from .params import SCHEDULERS, VIDEO_MODES, GenerationParams, VideoParams

KINDS = ("image", "video")


@dataclass(frozen=True)
class RequestField:
    """One request field.

    key:     wire name = record key (flat: ``seg_scale``; video fields as ``VideoParams`` names them
             inside the record's ``video`` object, flat ``seg_mode`` / ``seg_sigma_time`` / ``frames``
             on the wire).
    path:    where the value lives: ``("steps",)``, ``("seg", "scale")``, ``("video", "frames")``.
    type:    ``str``, ``int``, ``float``, ``bool``, ``"sigma"`` (a number or ``inf``), ``"layers"``
             (comma-separated or a list), ``"optional_str"``, ``"optional_int"``.
    kinds:   the requests it applies to (``image``, ``video``).
    aliases: other spellings accepted by the Python API and HTTP (``num_inference_steps``).
    choices: the allowed values, when a fixed set.
    recorded: ``"always"`` in the flat record, or ``"when set"`` (fields added after the first
             release: records of runs that leave them at their default stay byte-identical).
    Video-only fields are recorded in the record's ``video`` object (``VideoParams.to_record``).
    """

    key: str
    path: tuple[str, ...]
    type: Any
    help: str
    kinds: tuple[str, ...] = KINDS
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    recorded: str = "always"  # or "when set": in records only when it differs from its default

    @property
    def default(self) -> Any:
        """The default, read from the request dataclasses (written there once)."""
        owner: Any = {"seg": SEGConfig(), "video": VideoParams()}.get(self.path[0], GenerationParams())
        return getattr(owner, self.path[-1])

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """A wire / flag value as the request type takes it (σ ``"inf"``, layer lists); validation
        is the request type's own."""
        if self.type == "sigma" and isinstance(value, str):
            return parse_sigma(value)
        if self.type == "layers" and value is not None and not isinstance(value, tuple):
            return parse_layers(value) if isinstance(value, str | list) else value
        return value

    def dump(self, value: Any) -> Any:
        """The value as the JSON record writes it (σ ``inf`` as ``"inf"``, layers as a list)."""
        if self.type == "sigma":
            return sigma_to_json(value)
        if self.type == "layers":
            return None if value is None else list(value)
        return value

    def default_text(self) -> str:
        value = self.default
        if self.type == "sigma":
            return sigma_label(value)
        if self.type == "layers":
            return "all" if value is None else ",".join(value)
        if value == "":
            return "''"
        return "none" if value is None else str(value)


def _f(key, path, type_, help_, **kw) -> RequestField:
    return RequestField(key, tuple(path.split(".")), type_, help_, **kw)


FIELDS: tuple[RequestField, ...] = (
    _f("prompt", "prompt", str, "text prompt ('' for unconditional SEG)"),
    _f("negative_prompt", "negative_prompt", "optional_str", "negative prompt (the CFG branch's text)"),
    _f("steps", "steps", int, "sampling steps", aliases=("num_inference_steps",)),
    _f("cfg", "cfg", float, "CFG scale (1 = no CFG)", aliases=("guidance_scale",)),
    _f("seg_scale", "seg.scale", float, "SEG guidance scale s (0 = off)"),
    _f("seg_sigma", "seg.sigma", "sigma", "blur σ in tokens, or 'inf'"),
    _f(
        "seg_layers",
        "seg.layers",
        "layers",
        "SEG layers: mid, down, up, down.N, up.N, module names",
        kinds=("image",),
    ),
    _f(
        "seg_layers",
        "video.layers",
        "layers",
        "video self-attention layers (module names or prefixes)",
        kinds=("video",),
    ),
    _f("seg_start", "seg.start", float, "SEG window start, fraction of the schedule"),
    _f("seg_end", "seg.end", float, "SEG window end, fraction of the schedule"),
    _f("guidance_rescale", "guidance_rescale", float, "CFG rescale φ in [0, 1]"),
    _f("height", "height", "optional_int", "height in pixels (none: the model's default)"),
    _f("width", "width", "optional_int", "width in pixels (none: the model's default)"),
    _f("seed", "seed", int, "seed; image i of a batch uses seed + i"),
    _f("scheduler", "scheduler", str, "sampler", choices=tuple(SCHEDULERS)),
    _f("sequential", "sequential", bool, "one denoiser call per branch (less memory, same images)"),
    # fields added after the first release enter records only when set: old records stay byte-identical
    _f(
        "seg_every",
        "seg.every",
        int,
        "cheap mode: run the SEG branch every k-th step, reuse its delta between",
        recorded="when set",
    ),
    _f(
        "seg_placement",
        "seg.placement",
        str,
        "cheap mode: 'uncond' blurs inside the CFG row (no extra row)",
        choices=SEGConfig.PLACEMENTS,
        recorded="when set",
    ),
    _f(
        "distilled_guidance",
        "distilled_guidance",
        float,
        "the guidance value Flux.1-dev embeds",
        kinds=("image",),
        recorded="when set",
    ),
    _f("frames", "video.frames", int, "output frames", kinds=("video",)),
    _f("fps", "video.fps", int, "frames per second of the written file", kinds=("video",)),
    _f(
        "seg_mode",
        "video.mode",
        str,
        "which axes the query blur runs over",
        kinds=("video",),
        choices=VIDEO_MODES,
    ),
    _f(
        "seg_sigma_time",
        "video.sigma_time",
        "sigma",
        "blur σ along time in frames (0: frames independent)",
        kinds=("video",),
    ),
)


def fields_for(kind: str) -> tuple[RequestField, ...]:
    if kind not in KINDS:
        raise ValueError(f"request kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tuple(f for f in FIELDS if kind in f.kinds)


def field_named(key: str, kind: str) -> RequestField:
    for f in fields_for(kind):
        if f.key == key:
            return f
    raise KeyError(key)


def canonical(values: Mapping[str, Any], kind: str, *, what: str = "request") -> dict[str, Any]:
    """``values`` by wire name: aliases replaced by their field's key (both spellings with different
    values is an error); a key the ``kind`` of request has no field for is an error naming them."""
    table = fields_for(kind)
    by_name = {name: f for f in table for name in (f.key, *f.aliases)}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, value in values.items():
        f = by_name.get(name)
        if f is None:
            other = [
                k for k in KINDS if k != kind and any(name in (g.key, *g.aliases) for g in fields_for(k))
            ]
            if other:
                raise ValueError(f"{what} field {name!r} applies to {other[0]} requests only, not {kind}")
            known = ", ".join(f.key for f in table)
            raise ValueError(f"unknown {what} field {name!r}; the fields are: {known}")
        if f.key in out and out[f.key] != value:
            raise ValueError(
                f"{what} gives {spelled[f.key]}={out[f.key]!r} and {name}={value!r}: the same field spelled "
                "twice with different values"
            )
        out[f.key], spelled[f.key] = value, name
    return out


def request_from_fields(values: Mapping[str, Any], kind: str = "image", *, what: str = "request"):
    """A ``GenerationParams`` from flat wire fields (aliases accepted; the rest at their defaults).
    ``kind="video"`` gives a video request (``GenerationParams.video`` set)."""
    nested: dict[str, dict[str, Any]] = {"": {}, "seg": {}, "video": {}}
    for key, value in canonical(values, kind, what=what).items():
        f = field_named(key, kind)
        where = f.path[0] if len(f.path) > 1 else ""
        nested[where][f.path[-1]] = f.parse(value)
    seg = SEGConfig(**nested["seg"])
    video = VideoParams(**nested["video"]) if kind == "video" else None
    return GenerationParams(**nested[""], seg=seg, video=video)


def values_of(params, kind: str) -> dict[str, Any]:
    """The flat wire values of a request (inverse of ``request_from_fields``; σ stays a float)."""
    return {f.key: _value(params, f) for f in fields_for(kind)}


def _value(params, f: RequestField) -> Any:
    obj = params
    for part in f.path:
        obj = getattr(obj, part)
    return obj


def to_record(params) -> dict[str, Any]:
    """The flat JSON record of a request (``GenerationParams.to_record``): the image fields in table
    order (``"when set"`` ones only when they differ from their default), then the ``video`` object."""
    record = {}
    for f in fields_for("image"):
        value = _value(params, f)
        if f.recorded == "always" or value != f.default:
            record[f.key] = f.dump(value)
    if params.video is not None:
        record["video"] = params.video.to_record()
    return record


def from_record(record: Mapping[str, Any]):
    """Inverse of ``to_record``; keys that are no request field (``model``, ``generator``) are ignored."""
    keys = {f.key for f in fields_for("image")}
    request = request_from_fields({k: v for k, v in record.items() if k in keys}, "image", what="record")
    video = record.get("video")
    return request if video is None else request.replace(video=VideoParams.from_record(video))


# ---- edges ------------------------------------------------------------------------------------

_ARG_TYPES: dict[Any, Callable[[str], Any]] = {int: int, float: float, "optional_int": int}


def add_arguments(
    parser, kind: str, *, skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None
) -> None:
    """The request flags of ``kind`` on an argparse parser, one per field (``--seg-scale``), help
    showing each default. ``defaults`` overrides a shown default (``None`` in the namespace means
    "the request type's default": ``args_to_fields`` leaves such flags out)."""
    skip = set(skip)
    for f in fields_for(kind):
        if f.key in skip:
            continue
        default = (defaults or {}).get(f.key, f.default)
        shown = f.default_text() if default == f.default else str(default)
        extra = f" ({', '.join(f.choices)})" if f.choices else ""
        if f.type is bool:
            parser.add_argument(f.flag, action="store_true", default=default, help=f"{f.help}{extra}")
            continue
        parser.add_argument(
            f.flag,
            type=_ARG_TYPES.get(f.type),
            default=default,
            help=f"{f.help}{extra} (default: {shown})",
        )


def args_to_fields(args, kind: str, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The request fields of an argparse namespace made by ``add_arguments``."""
    skip = set(skip)
    return {
        f.key: getattr(args, f.key) for f in fields_for(kind) if f.key not in skip and hasattr(args, f.key)
    }


def replace_fields(params, kind: str, values: Mapping[str, Any]):
    """``params`` with some wire fields changed (aliases accepted), validated again."""
    base = values_of(params, kind)
    base.update(canonical(values, kind))
    return request_from_fields(base, kind)
