"""Input images of a request: the init image of img2img / inpainting, the mask, the still that
image-to-video animates.

An ``InputImage`` is decoded once at the edge (a path, bytes, a PIL image or an array) and checked
against a pixel limit *before* decoding (PIL reads the size from the header; its own decompression
bomb limit stays in place as a second guard, never lifted). Records identify it by the sha256 of
its decoded pixels, its mode and size (``record()``), never by bytes or paths: the same picture gives
the same record whether it came as a PNG file, a base64 body or a PIL image.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The default pixel limit of an input image: a 4096 x 4096 picture (a server sets its own).
MAX_INPUT_PIXELS = 4096 * 4096
IMAGE_MODES = ("RGB", "L")  # colour images; masks (white = repaint)


@dataclass(frozen=True)
class InputImage:
    """A decoded input image: ``mode`` ``RGB`` or ``L``, ``size`` (width, height), ``data`` the raw
    pixel bytes (PIL's ``tobytes()`` layout). Equal images compare and hash equal (batch keys)."""

    mode: str
    size: tuple[int, int]
    data: bytes

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.mode.encode() + b"\0" + self.data).hexdigest()

    def pil(self):
        """A fresh PIL image (callers may modify it)."""
        from PIL import Image

        return Image.frombytes(self.mode, self.size, self.data)

    def record(self) -> dict[str, Any]:
        """How records name the image: pixels' sha256, mode and size (no bytes, no path)."""
        return {"sha256": self.sha256, "mode": self.mode, "width": self.width, "height": self.height}

    def __repr__(self) -> str:  # never the bytes
        return f"InputImage({self.mode}, {self.width}x{self.height}, sha256={self.sha256[:12]})"


def load_image(
    value: Any, what: str = "init image", *, mode: str = "RGB", max_pixels: int = MAX_INPUT_PIXELS
) -> InputImage:
    """``value`` (an ``InputImage``, a path, encoded bytes, a PIL image or an HxW[xC] uint8 array) as an
    ``InputImage`` of ``mode``; one ``ValueError`` line naming ``what`` for anything else, for bytes
    that are no image, and for an image over ``max_pixels`` (checked before decoding)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, InputImage):
        image = value.pil()
    elif isinstance(value, Image.Image):
        image = value
    elif isinstance(value, str | Path | bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(value)) if not isinstance(value, str | Path) else Path(value)
        if isinstance(source, Path) and not source.is_file():
            raise ValueError(f"{what} {str(source)!r} is not a file")
        try:
            image = Image.open(source)  # lazy: reads the header (size) only
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{what} is not an image PIL can read ({type(e).__name__})") from None
        except Image.DecompressionBombError:
            raise ValueError(f"{what} is larger than {max_pixels} pixels") from None
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        import numpy as np

        array = np.asarray(value)
        if (
            array.dtype != np.uint8
            or array.ndim not in (2, 3)
            or (array.ndim == 3 and array.shape[2] not in (1, 3, 4))
        ):
            raise ValueError(
                f"{what} array must be uint8 HxW, HxWx1, HxWx3 or HxWx4, got {array.dtype} {array.shape}"
            )
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    else:
        raise ValueError(
            f"{what} must be a path, image bytes, a PIL image or a uint8 array, got {type(value).__name__}"
        )
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ValueError(f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image = image.convert(mode)  # decodes; for L: luminance, as diffusers' mask processor does
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} could not be decoded ({type(e).__name__})") from None
    return InputImage(mode, image.size, image.tobytes())


# ---- the task fields of an image request (GenerationParams.init_image / mask / strength / mask_blur)
TASKS = ("txt2img", "img2img", "inpaint")
TASK_FIELDS = ("init_image", "mask", "strength", "mask_blur")  # the request fields (wire names) of a task


def task_of(request) -> str:
    """The task a request asks for: ``inpaint`` (init image and mask), ``img2img`` (init image), or
    ``txt2img``."""
    if request.init_image is None:
        return "txt2img"
    return "inpaint" if request.mask is not None else "img2img"


def task_key(request) -> tuple:
    """What rows of one sampling run share about their task: the task, the input size, strength and
    mask blur (the pixels themselves are per row, like prompts)."""
    size = None if request.init_image is None else request.init_image.size
    return (task_of(request), size, request.strength, request.mask_blur)


def check_strength(strength) -> float:
    """img2img's strength: a number in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength must be in (0, 1] (the fraction of the schedule re-run), got {strength:g}"
        )
    return strength


def check_mask_blur(blur) -> int:
    if isinstance(blur, bool) or not isinstance(blur, int) or blur < 0:
        raise ValueError(f"mask blur must be an integer >= 0 (pixels), got {blur!r}")
    return blur


def check_task(request) -> None:
    """The task fields' own rules (no model needed): one ``ValueError`` line naming the field."""
    init, mask = request.init_image, request.mask
    for name, value, mode in (("init image", init, "RGB"), ("mask", mask, "L")):
        if value is not None and not isinstance(value, InputImage):
            raise ValueError(
                f"{name} must be an InputImage (seg_rt.tasks.load_image), got {type(value).__name__}"
            )
        if value is not None and value.mode != mode:
            raise ValueError(f"{name} must be a {mode} image, got mode {value.mode}")
    strength = check_strength(request.strength)
    object.__setattr__(request, "strength", strength)
    blur = check_mask_blur(request.mask_blur)
    if init is None:
        for name, changed in (("mask", mask is not None), ("strength", strength != 1.0), ("mask blur", blur)):
            if changed:
                raise ValueError(f"{name} applies only with an init image (img2img / inpainting)")
        return
    if request.video is not None:
        raise ValueError("init image is for image requests; image-to-video takes the video's own image")
    if strength * request.steps < 1:
        raise ValueError(
            f"strength x steps must be >= 1 (at least one step re-run), got {strength:g} x {request.steps}"
        )
    if mask is None and blur:
        raise ValueError("mask blur applies only with a mask (inpainting)")
    if mask is not None and mask.size != init.size:
        raise ValueError(
            f"mask is {mask.width}x{mask.height} but the init image is {init.width}x{init.height}: "
            "give a mask of the image's size"
        )
