"""The AUTOMATIC1111 web UI API on the seg-rt server: ``/sdapi/v1/txt2img``, ``/sdapi/v1/img2img``
and what clients probe.

Reference behaviour: stable-diffusion-webui's ``modules/api/api.py`` and ``models.py`` (txt2img
request and response, ``sd-models``, ``samplers``, ``schedulers``, ``options``, ``scripts``,
``progress``), as clients such as ``webuiapi`` speak it: ``WebUIApi(host, port)``, its
``set_auth(user, KEY)`` sends HTTP Basic auth (any user name, the server's API key as password).

The one mapping onto ``GenerateRequest`` is ``to_generate_request``: ``cfg_scale`` → ``cfg``,
``distilled_cfg_scale`` (Forge's Flux field) → ``distilled_guidance``,
``batch_size × n_iter`` images with seeds ``seed + i`` (as the web UI numbers them),
``sampler_name`` (or the older ``sampler_index``) → a seg-rt scheduler through ``SAMPLERS``,
``seed: -1`` (the web UI's default) → a random seed, reported back in ``info`` and ``parameters``.
SEG settings come as top-level extras (``seg_scale``, ``seg_sigma``, ``seg_layers``, ``seg_start``,
``seg_end``) or as an ``alwayson_scripts`` entry ``{"seg": {"args": [{"scale": 3, "sigma": "inf"}]}}``
(or positional ``[scale, sigma, layers, start, end]``). Fields left out take seg-rt's defaults
(size: the model's). Web UI features seg-rt does not have (hires fix, face restoration, tiling,
variation seeds, styles, other scripts, other schedule types) are refused by name unless sent at
their off value; fields that only act through them (``hr_*``, ``denoising_strength``, ``subseed``)
and the save flags are ignored, as is ``eta``: the schedulers keep diffusers' noise (Euler a:
fully ancestral, the web UI's η = 1; DDIM: η = 0). Errors come in the web UI's API error shape
``{"error", "detail", "body", "errors"}``. Images carry the web UI's infotext in their ``parameters``
PNG chunk (what A1111 / Forge PNG-info readers parse: ``prompt``, ``Negative prompt: ...``,
``Steps: N, Sampler: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...``) and seg-rt's JSON
record beside it in a ``seg-rt`` chunk (``with_infotext``).

``img2img`` (``webuiapi``'s ``img2img(images=[...], mask_image=..., denoising_strength=...)``) maps
``init_images`` (one base64 image) → ``init_image``, ``denoising_strength`` → ``strength``, ``mask``
(white = repaint) and ``mask_blur``; settings diffusers has no equivalent for are refused by name
unless sent at the value diffusers' pipelines mean (``IMG2IMG_ONLY``).
"""

import base64
import json
import secrets
import struct
import zlib
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from seg_rt.config import sigma_label
from seg_rt.images import PARAMS_KEY
from seg_rt.params import MAX_SEED, fields_for
from seg_rt.tasks import TASK_FIELDS

from .request import ECHO_CHARS, ErrorShape, GenerateRequest, Producer, RequestFailed, make_request, shown

PREFIXES = ("/sdapi/",)
# web UI sampler name → seg-rt scheduler; aliases as the web UI lists them
SAMPLERS = {
    "Euler": "euler",
    "Euler a": "euler_a",
    "DDIM": "ddim",
    "DPM++ 2M": "dpmpp_2m",
    "UniPC": "unipc",
    "Heun": "heun",
}
ALIASES = {
    "Euler": ["k_euler"],
    "Euler a": ["k_euler_a"],
    "DDIM": ["ddim"],
    "DPM++ 2M": ["k_dpmpp_2m"],
    "UniPC": ["unipc"],
    "Heun": ["k_heun"],
}
SCHEDULE_TYPES = ("automatic", "Automatic")  # the sampler's own schedule (seg-rt has no other)
SEG_SCRIPT_NAMES = ("seg", "smoothed energy guidance")  # alwayson_scripts key, any case
# the request fields the web UI's body has its own names for (``Txt2ImgRequest``); every other field
# of the request field table is a seg-rt extra the body may carry under its record key
NATIVE_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg",
    "width",
    "height",
    "scheduler",
    "distilled_guidance",
)
# the task fields (init image, mask, ...) come with /sdapi/v1/img2img, not as txt2img script arguments
SEG_FIELDS = tuple(
    f.key for f in fields_for("image") if f.key not in NATIVE_FIELDS and f.key not in TASK_FIELDS
)
SCRIPT_ARGS = ("seg_scale", "seg_sigma", "seg_layers", "seg_start", "seg_end")  # the script's positional args
RANDOM_SEED = -1


def error_body(status: int, message: str, param: str | None) -> tuple[int, dict]:
    """The web UI API's error object (``api_middleware``'s ``handle_exception`` shape)."""
    kind = {401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 422: "ValueError"}.get(
        status, "HTTPException"
    )
    return status, {"error": kind, "detail": message, "body": "", "errors": message}


ERRORS = ErrorShape(PREFIXES, error_body, challenge="Basic")


class Txt2ImgRequest(BaseModel):
    """The txt2img body: the fields seg-rt maps, the web UI switches it checks are off, extras."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = RANDOM_SEED
    steps: int | None = None
    cfg_scale: float | None = None
    distilled_cfg_scale: float | None = None  # Forge's Flux distilled guidance
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older field; sampler_name wins
    scheduler: str | None = None  # the web UI's schedule type (1.9+), not a seg-rt scheduler
    alwayson_scripts: dict[str, Any] = {}
    send_images: bool = True


# web UI switches that would change the image: accepted only at their off value
OFF_VALUES: dict[str, tuple] = {
    "enable_hr": (False, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "subseed_strength": (0, 0.0, None),
    "seed_resize_from_h": (0, -1, None),
    "seed_resize_from_w": (0, -1, None),
    "s_churn": (0, 0.0, None),
    "s_noise": (1, 1.0, None),
    "styles": ([], None),
    "script_name": (None, ""),
    "script_args": ([], None),
}
# fields that act only through a switch above, or change no image
IGNORED = {
    "denoising_strength",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "subseed",
    "eta",
    "s_tmin",
    "s_tmax",
    "do_not_save_samples",
    "do_not_save_grid",
    "save_images",
    "override_settings_restore_afterwards",
}


def scheduler_for(sampler: str | None, default: str) -> str:
    """A web UI sampler name (or alias) → the seg-rt scheduler; ``None`` → the server's default."""
    if sampler is None:
        return default
    for name, scheduler in SAMPLERS.items():
        if sampler == name or sampler in ALIASES[name]:
            return scheduler
    accepted = ", ".join(repr(n) for n in SAMPLERS)
    raise RequestFailed(422, f"sampler_name must be one of {accepted}, got {shown(sampler)}", "sampler_name")


def _check_off(req: Txt2ImgRequest, served_model: str) -> dict[str, Any]:
    """The extras that are seg-rt fields; refuses web UI features left on and unknown settings."""
    ours = {}
    for key, value in (req.model_extra or {}).items():
        if key in SEG_FIELDS:
            ours[key] = value
        elif key in OFF_VALUES:
            if value not in OFF_VALUES[key]:
                raise RequestFailed(
                    422,
                    f"{key} is not available on seg-rt (send {OFF_VALUES[key][0]!r}), got {shown(value)}",
                    key,
                )
        elif key == "override_settings":
            if not isinstance(value, dict | None):
                raise RequestFailed(
                    422,
                    f"override_settings must be a mapping of option names to values, got {type(value).__name__}",
                    key,
                )
            _check_options(value or {}, served_model)
        elif key not in IGNORED and value not in (None, "", [], {}, False, 0):
            raise RequestFailed(
                422,
                f"{key[:ECHO_CHARS]} is not supported by seg-rt's txt2img, got {shown(value)}",
                key[:ECHO_CHARS],
            )
    if req.scheduler is not None and req.scheduler not in SCHEDULE_TYPES:
        raise RequestFailed(
            422,
            f"scheduler (schedule type) must be 'Automatic' on seg-rt, got {shown(req.scheduler)}",
            "scheduler",
        )
    return ours


def _seg_script(scripts: dict[str, Any]) -> dict[str, Any]:
    """SEG fields from ``alwayson_scripts``; other scripts are refused unless disabled."""
    seg: dict[str, Any] = {}
    for name, entry in scripts.items():
        args = (entry or {}).get("args", []) if isinstance(entry, dict) else entry
        if name.lower() not in SEG_SCRIPT_NAMES:
            if args in ([], [False], None):
                continue  # a client's "disabled" placeholder
            raise RequestFailed(
                422, f"alwayson script {shown(name)} is not available; seg-rt has: seg", "alwayson_scripts"
            )
        if not isinstance(args, list):
            raise RequestFailed(
                422,
                f"alwayson_scripts.{name[:ECHO_CHARS]}.args must be a list, got {shown(args)}",
                "alwayson_scripts",
            )
        if len(args) == 1 and isinstance(args[0], dict):
            # SEG's own settings may drop their seg_ prefix (scale, sigma, ...)
            seg = {
                k if k in SEG_FIELDS or f"seg_{k}" not in SEG_FIELDS else f"seg_{k}": v
                for k, v in args[0].items()
            }
        else:
            seg = dict(zip(SCRIPT_ARGS, args, strict=False))
    unknown = sorted(set(seg) - set(SEG_FIELDS))
    if unknown:
        raise RequestFailed(
            422,
            f"seg script argument {shown(unknown[0])} is unknown; accepted: {', '.join(SEG_FIELDS)}",
            "alwayson_scripts",
        )
    return seg


def _check_options(options: dict[str, Any], served_model: str) -> None:
    for key, value in options.items():
        if key == "sd_model_checkpoint" and value in (served_model, None, ""):
            continue
        raise RequestFailed(
            422,
            f"option {key[:ECHO_CHARS]} = {shown(value)} cannot be set on seg-rt (it serves {served_model!r} as is)",
            key[:ECHO_CHARS],
        )


def to_generate_request(req: Txt2ImgRequest, served_model: str, default_scheduler: str) -> GenerateRequest:
    """This API's one mapping onto ``GenerateRequest`` (a random seed for ``seed: -1``)."""
    return make_request(**generate_fields(req, served_model, default_scheduler))


def generate_fields(req: Txt2ImgRequest, served_model: str, default_scheduler: str) -> dict[str, Any]:
    """The ``GenerateRequest`` fields of a txt2img body (and of an img2img body's txt2img part)."""
    top = _check_off(req, served_model)
    script = _seg_script(req.alwayson_scripts)
    if top and script:
        raise RequestFailed(
            422, "give SEG settings top level or in alwayson_scripts.seg, not both", "alwayson_scripts"
        )
    if req.batch_size < 1 or req.n_iter < 1:
        raise RequestFailed(
            422, f"batch_size and n_iter must be >= 1, got {req.batch_size} and {req.n_iter}", "batch_size"
        )
    seed = secrets.randbelow(2**32) if req.seed == RANDOM_SEED else req.seed
    if not 0 <= seed <= MAX_SEED:
        raise RequestFailed(
            422, f"seed must be -1 (random) or an integer from 0 to 2**64 - 1, got {req.seed}", "seed"
        )
    fields: dict[str, Any] = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt or None,
        "seed": seed,
        "steps": req.steps,
        "cfg": req.cfg_scale,
        "distilled_guidance": req.distilled_cfg_scale,
        "width": req.width,
        "height": req.height,
        "scheduler": scheduler_for(req.sampler_name or req.sampler_index, default_scheduler),
        "num_images": req.batch_size * req.n_iter,
        "response": "json",
        **top,
        **script,
    }
    return {k: v for k, v in fields.items() if v is not None}


class Img2ImgRequest(Txt2ImgRequest):
    """The img2img body: txt2img's fields, the init image, ``denoising_strength`` and the inpainting
    settings diffusers has an equivalent for (the rest only at the value that means it)."""

    init_images: list[str] = []
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    resize_mode: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False
    image_cfg_scale: float | None = None  # instruct-pix2pix only: changes no image of other models


# img2img / inpainting settings: what the web UI's value means, and the only value diffusers' img2img
# and inpaint pipelines have an equivalent for (``resize_mode`` 0: resized to the size, as their
# image processor does; ``inpainting_fill`` 1 "original": the masked region starts from the noised
# init image; ``inpaint_full_res`` false "whole picture": diffusers' ``padding_mask_crop`` is not
# wired in). ``with_mask``: the setting acts only on inpainting, as in the web UI.
IMG2IMG_ONLY = {
    "resize_mode": (0, False, "0 (just resize)"),
    "inpainting_mask_invert": (0, True, "0 (white = repaint)"),
    "initial_noise_multiplier": (1.0, False, "1"),
    "include_init_images": (False, False, "false"),
    "inpainting_fill": (1, True, "1 (original)"),
    "inpaint_full_res": (False, True, "false (whole picture)"),
}


def to_img2img_request(req: Img2ImgRequest, served_model: str, default_scheduler: str) -> GenerateRequest:
    """The img2img body onto ``GenerateRequest``: ``init_images[0]`` → ``init_image``,
    ``denoising_strength`` → ``strength``, ``mask`` / ``mask_blur`` (inpainting)."""
    if len(req.init_images) != 1:
        raise RequestFailed(
            422,
            f"init_images must hold one base64 image on seg-rt, got {len(req.init_images)}",
            "init_images",
        )
    for key, (value, with_mask, spelled) in IMG2IMG_ONLY.items():
        given = getattr(req, key)
        if given is not None and given != value and (req.mask is not None or not with_mask):
            raise RequestFailed(
                422,
                f"{key} must be {spelled} on seg-rt (diffusers has no equivalent), got {shown(given)}",
                key,
            )
    fields = generate_fields(req, served_model, default_scheduler)
    fields.update(init_image=req.init_images[0], strength=req.denoising_strength)
    if req.mask is not None:  # the web UI blurs only a mask it has
        fields.update(mask=req.mask, mask_blur=req.mask_blur)
    return make_request(**fields)


def infotext(p, model: str, sampler: str) -> str:
    """The web UI's one-line parameters text (``prompt\\nNegative prompt: ...\\nSteps: ...``)."""
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    sigma = sigma_label(p.seg.sigma)
    lines.append(
        f"Steps: {p.steps}, Sampler: {sampler}, CFG scale: {p.cfg:g}, Seed: {p.seed}, "
        f"Size: {p.width}x{p.height}, Model: {model}, SEG scale: {p.seg.scale:g}, SEG sigma: {sigma}"
    )
    return "\n".join(lines)


RECORD_KEY = "seg-rt"  # the PNG text chunk that keeps seg-rt's JSON record on A1111 answers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, text: str) -> bytes:
    """A PNG text chunk: ``tEXt`` when Latin-1 holds it, else ``iTXt`` (UTF-8), as PIL writes them."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def with_infotext(png: bytes, text: str) -> bytes:
    """``png`` with the web UI's infotext as its ``parameters`` chunk (what A1111 / Forge PNG-info
    readers parse) and seg-rt's JSON record beside it under ``seg-rt``; the image data untouched
    (text chunks only: no re-encoding)."""
    head, pos, out = png[:8], 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        chunk = png[pos : pos + 12 + length]
        pos += 12 + length
        if kind == b"tEXt" and data.startswith(PARAMS_KEY.encode() + b"\0"):
            record = data[len(PARAMS_KEY) + 1 :].decode("latin-1")
            chunk = _text_chunk(PARAMS_KEY, text) + _text_chunk(RECORD_KEY, record)
        out.append(chunk)
    return head + b"".join(out)


def sampler_name(scheduler: str) -> str:
    return next(name for name, s in SAMPLERS.items() if s == scheduler)


def router(produce: Producer, name: str, default_scheduler: str) -> APIRouter:
    """The web UI routes over the server's one producer (limits, batching, records); ``name`` is the
    served model as clients see it, ``default_scheduler`` the server's scheduler."""
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"])

    def options_now() -> dict:
        return {"sd_model_checkpoint": name, "sd_checkpoint_hash": None, "samples_format": "png"}

    @api.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest) -> dict:
        rows, pngs = await produce(to_generate_request(req, name, default_scheduler))
        return answer(req, rows, pngs)

    @api.post("/img2img")
    async def img2img(req: Img2ImgRequest) -> dict:
        rows, pngs = await produce(to_img2img_request(req, name, default_scheduler))
        return answer(req, rows, pngs, init_images=None, mask=None)  # the web UI echoes no images

    def answer(req: Txt2ImgRequest, rows, pngs, **echo) -> dict:
        first, sampler = rows[0], sampler_name(rows[0].scheduler)
        info = {
            "prompt": first.prompt,
            "all_prompts": [p.prompt for p in rows],
            "negative_prompt": first.negative_prompt or "",
            "all_negative_prompts": [p.negative_prompt or "" for p in rows],
            "seed": first.seed,
            "all_seeds": [p.seed for p in rows],
            "subseed": first.seed,
            "all_subseeds": [p.seed for p in rows],
            "subseed_strength": 0,
            "width": first.width,
            "height": first.height,
            "sampler_name": sampler,
            "cfg_scale": first.cfg,
            "steps": first.steps,
            "batch_size": req.batch_size,
            "sd_model_name": name,
            "sd_model_hash": None,
            "index_of_first_image": 0,
            "infotexts": [infotext(p, name, sampler) for p in rows],
            "seg_rt": [p.to_record() for p in rows],  # seg-rt's own record, one per image
            "version": "seg-rt",
        }
        parameters = (
            req.model_dump()
            | echo
            | {
                "seed": first.seed,
                "sampler_name": sampler,
                "scheduler": "Automatic",
            }
        )
        return {
            "images": [
                base64.b64encode(with_infotext(png, infotext(p, name, sampler))).decode()
                for png, p in zip(pngs, rows, strict=True)
            ]
            if req.send_images
            else [],
            "parameters": parameters,
            "info": json.dumps(info),
        }

    @api.get("/sd-models")
    def sd_models() -> list[dict]:
        return [
            {
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": name,
                "config": None,
            }
        ]

    @api.get("/samplers")
    def samplers() -> list[dict]:
        return [{"name": n, "aliases": ALIASES[n], "options": {}} for n in SAMPLERS]

    @api.get("/schedulers")
    def schedulers() -> list[dict]:
        return [
            {
                "name": "automatic",
                "label": "Automatic",
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            }
        ]

    @api.get("/options")
    def get_options() -> dict:
        return options_now()

    @api.post("/options")
    def set_options(options: dict[str, Any]) -> None:
        _check_options(options, name)

    @api.get("/scripts")
    def scripts() -> dict:
        return {"txt2img": ["seg"], "img2img": ["seg"]}

    return api
