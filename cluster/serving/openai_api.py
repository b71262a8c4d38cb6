"""The OpenAI Images API on the seg-rt server: ``POST /v1/images/generations``,
``POST /v1/images/edits``, ``GET /v1/models``.

Reference behaviour: the OpenAI API reference (Images → Create image; Models; Error codes), as the
official ``openai`` Python client speaks it: ``OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)``
sends ``Authorization: Bearer KEY``; ``client.images.generate(prompt=..., n=..., size="WxH",
response_format="b64_json", extra_body={"seed": 3, "seg_sigma": "inf", ...})``.

The one mapping from this API onto ``GenerateRequest`` is ``to_generate_request``: ``size`` →
width × height (OpenAI writes width first), ``n`` → ``num_images``; seg-rt's own fields (``seed``,
``steps``, ``cfg``, ``seg_scale``, ``seg_sigma``, ``seg_layers``, ...) come as extra body fields and
are checked by ``GenerateRequest``'s rules. ``user`` is accepted and ignored (it changes no image);
``quality`` / ``style`` / ``background`` values OpenAI documents as look hints are accepted and
ignored (``HINTS``; ``background: transparent`` is refused), and OpenAI's own model names
(``dall-e-3``, ``gpt-image-1``, ...) are aliases of the served model; every other OpenAI field that
would change the result is refused by name. Images are PNGs with the
seg-rt parameter record, returned as ``b64_json`` (this server does not host files, so no ``url``).
Errors come as ``{"error": {"message", "type", "param", "code"}}``; bad input is HTTP 400.

``/v1/images/edits`` (Images → Create image edit; ``client.images.edit(image=..., mask=...,
prompt=...)``) is a multipart form: ``image`` (one file), an optional ``mask`` whose fully
transparent pixels (alpha 0) mark the region to edit — turned into seg-rt's mask, white = repaint —
and the same fields as a generation (``n``, ``size``, ``response_format``, seg-rt's extras such as
``strength`` or ``seed``). Without a mask it is img2img (``strength``, default 1).
"""

import base64
import io
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seg_rt.params import fields_for

from .request import (
    ECHO_CHARS,
    INPUT_PIXELS,
    ErrorShape,
    GenerateRequest,
    Producer,
    RequestFailed,
    first_error,
    make_request,
    shown,
)

PREFIXES = ("/v1/images/", "/v1/models")
# seg-rt fields a client may add (``extra_body``); OpenAI's own names cover size and count
# (and the spellings OpenAI-clone clients bring: ``num_inference_steps``, ``guidance_scale``)
EXTRA_FIELDS = tuple(
    sorted(
        (set(GenerateRequest.model_fields) - {"height", "width", "num_images", "response"})
        | {alias for f in fields_for("image") if f.key in GenerateRequest.model_fields for alias in f.aliases}
    )
)
OUR_NAMES = {
    "num_images": "n",
    "height": "size",
    "width": "size",
    "init_image": "image",
}  # our field → the client's
SIZE = re.compile(r"([0-9]+)x([0-9]+)")  # whole string (fullmatch): no trailing newline, ASCII digits


def error_body(status: int, message: str, param: str | None) -> tuple[int, dict]:
    """OpenAI's error object; our 422 (bad input) is its 400 ``invalid_request_error``."""
    status = 400 if status == 422 else status
    param = OUR_NAMES.get(param, param) if param else _param_of(message)
    # OpenAI's codes: a wrong key, an unknown model; a missing object (a video id) has none
    code = (
        "invalid_api_key"
        if status == 401
        else "model_not_found"
        if (status, param) == (404, "model")
        else None
    )
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if message.startswith("num_images "):  # name the client's field, not ours
        message = "n" + message.removeprefix("num_images")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param_of(message: str) -> str | None:
    """The field a core message is about (they start with its name, e.g. ``steps must be <= 50``)."""
    first = message.split(" ", 1)[0]
    if first in OUR_NAMES:
        return OUR_NAMES[first]
    return first if first in EXTRA_FIELDS else None


ERRORS = ErrorShape(PREFIXES, error_body, challenge="Bearer")


# OpenAI's own image models: accepted as aliases of the served model (as other OpenAI-compatible
# servers do), so a client that names one works unchanged
OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
# look-only values OpenAI documents (Images → Create image): hints a model may ignore, accepted and
# ignored here; any other value (``background: transparent``, which this server cannot make) is refused
HINTS = {
    "quality": ("auto", "standard", "hd", "low", "medium", "high"),
    "style": ("vivid", "natural"),
    "background": ("auto", "opaque"),
}


class ImagesRequest(BaseModel):
    """The Create image body. OpenAI's own fields are typed here; seg-rt's arrive as extras."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = None
    n: int | None = Field(None, ge=1, strict=True)  # strict: no "2", no true
    size: str | None = Field(None, strict=True)
    response_format: str | None = None
    output_format: str | None = None
    user: str | None = None  # ignored: it changes no image
    quality: str | None = None  # hints (``HINTS``): accepted and ignored
    style: str | None = None
    background: str | None = None


def to_generate_request(req: ImagesRequest, served_model: str) -> GenerateRequest:
    """This API's one mapping onto ``GenerateRequest`` (``RequestFailed`` naming the field)."""
    if req.model not in (None, served_model, *OPENAI_IMAGE_MODELS):
        raise RequestFailed(
            404,
            f"model {shown(req.model)} does not exist; this server serves {served_model!r} "
            f"(OpenAI's {', '.join(OPENAI_IMAGE_MODELS)} are accepted as its aliases)",
            "model",
        )
    for key, allowed in HINTS.items():
        value = getattr(req, key)
        if value is not None and value not in allowed:
            raise RequestFailed(
                422,
                f"{key} must be one of {', '.join(allowed)} (accepted as hints and ignored), got {shown(value)}",
                key,
            )
    if req.response_format not in (None, "b64_json"):
        raise RequestFailed(
            422,
            f"response_format must be 'b64_json' (this server does not host image files), got {shown(req.response_format)}",
            "response_format",
        )
    if req.output_format not in (None, "png"):
        raise RequestFailed(
            422, f"output_format must be 'png', got {shown(req.output_format)}", "output_format"
        )
    extras = dict(req.model_extra or {})
    unknown = sorted(set(extras) - set(EXTRA_FIELDS))
    if unknown:
        raise RequestFailed(
            422,
            f"{unknown[0][:ECHO_CHARS]} is not supported; OpenAI fields: prompt, model, n, size, response_format, "
            f"output_format, user, quality, style, background; seg-rt fields: {', '.join(EXTRA_FIELDS)}",
            unknown[0][:ECHO_CHARS],
        )
    fields: dict[str, Any] = {"prompt": req.prompt, **extras, "response": "json"}
    if req.n is not None:
        fields["num_images"] = req.n
    if req.size not in (None, "auto"):
        match = SIZE.fullmatch(req.size)
        if not match:
            raise RequestFailed(
                422, f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {shown(req.size)}", "size"
            )
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    return make_request(**fields)


def edit_mask(raw: bytes) -> str:
    """An OpenAI edit mask (transparent = edit) as seg-rt's mask (white = repaint), base64 PNG for
    ``GenerateRequest``; its size is checked against the pixel limit before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))  # header only
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise RequestFailed(422, f"mask is not an image PIL can read ({type(e).__name__})", "mask") from None
    width, height = image.size
    if width * height > INPUT_PIXELS.get():
        raise RequestFailed(
            422,
            f"mask is {width}x{height} = {width * height} pixels; the limit is {INPUT_PIXELS.get()}",
            "mask",
        )
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise RequestFailed(
            422,
            "mask must have an alpha channel: its fully transparent pixels mark the region to edit",
            "mask",
        )
    try:
        alpha = image.convert("RGBA").getchannel("A")
    except (OSError, ValueError) as e:
        raise RequestFailed(422, f"mask could not be decoded ({type(e).__name__})", "mask") from None
    buf = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def images_response(rows, pngs) -> dict:
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": base64.b64encode(png).decode(), "seed": p.seed}
            for png, p in zip(pngs, rows, strict=True)
        ],
        "output_format": "png",
        "size": f"{rows[0].width}x{rows[0].height}",
    }


async def edit_request(request: Request, served_model: str) -> GenerateRequest:
    """The edit form as ``GenerateRequest``: files become the base64 ``init_image`` / ``mask``, the
    other form fields go through ``to_generate_request`` like a generation's."""
    form = await request.form()
    files = {k: v for k, v in form.multi_items() if not isinstance(v, str)}
    images = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if len(images) != 1 or isinstance(images[0], str):
        raise RequestFailed(422, f"image must be one image file, got {len(images)}", "image")
    fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    extra = sorted(set(files) - {"image", "image[]", "mask"})
    if extra:
        raise RequestFailed(422, f"{extra[0][:ECHO_CHARS]} must not be a file", extra[0][:ECHO_CHARS])
    if "n" in fields:  # form fields are text; n is typed strictly for JSON bodies
        if not fields["n"].isdigit():
            raise RequestFailed(422, f"n must be an integer >= 1, got {shown(fields['n'])}", "n")
        fields["n"] = int(fields["n"])
    for key in ("image", "image[]", "init_image", "mask_image"):
        if key in fields:
            raise RequestFailed(422, f"{key} must be a file", key)
    fields["init_image"] = base64.b64encode(await images[0].read()).decode()
    if "mask" in files:
        fields["mask"] = edit_mask(await files["mask"].read())
    elif "mask" in fields:
        raise RequestFailed(422, "mask must be a file", "mask")
    try:
        req = ImagesRequest(**fields)
    except ValidationError as exc:
        raise RequestFailed(422, first_error(exc), str(exc.errors()[0]["loc"][0])) from None
    return to_generate_request(req, served_model)


def router(produce: Producer, name: str, stream=None) -> APIRouter:
    """The OpenAI routes over the server's one producer (limits, batching, records); ``name`` is the
    served model as clients see it."""
    api = APIRouter(tags=["OpenAI Images API"])

    def model_object() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "seg-rt"}

    @api.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_object()]}

    @api.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        if model_id != name:
            raise RequestFailed(
                404, f"model {shown(model_id)} does not exist; this server serves {name!r}", "model"
            )
        return model_object()

    @api.post("/v1/images/generations")
    async def generations(req: ImagesRequest, request: Request) -> Any:
        extras = req.model_extra if req.model_extra is not None else {}
        wants_stream, partial = extras.pop("stream", False), extras.pop("partial_images", 0)
        if wants_stream not in (False, None):
            if stream is None or wants_stream is not True:
                raise RequestFailed(422, f"stream must be true or false, got {wants_stream!r}", "stream")
            return stream(to_generate_request(req, name), partial, request)  # openai_stream.streamed
        rows, pngs = await produce(to_generate_request(req, name))
        return images_response(rows, pngs)

    @api.post("/v1/images/edits")
    async def edits(request: Request) -> Any:
        rows, pngs = await produce(await edit_request(request, name))
        return images_response(rows, pngs)

    return api
