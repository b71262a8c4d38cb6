"""Image output: PNG with generation parameters, atomic writes, labelled comparison grids."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

PARAMS_KEY = "parameters"


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return Image.open(path).convert("RGB")


def params_text(model, record: dict) -> str:
    """A request's record (``GenerationParams.to_record()``, JSON-ready: σ = inf already ``"inf"``) as
    the JSON of a PNG's ``parameters`` text chunk, with the model it came from by its public name
    (``seg_rt.model_refs.public_name``: a folder's name, never its absolute path nor a URL)."""
    from .model_refs import public_name

    return json.dumps({"model": public_name(model), "generator": "seg-rt", **record}, sort_keys=True)


def read_params(path: str | Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text[PARAMS_KEY])


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file next to ``path``, fsync it, rename it over ``path`` and fsync
    the folder: once this returns, the bytes and the name survive a crash or power loss (so a
    manifest line written afterwards never names a file that is not on disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def png_bytes(image: Image.Image, params: str) -> bytes:
    """PNG-encode ``image`` with ``params`` in its ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, params)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def check_png_path(path: str | Path) -> Path:
    """An output path for a PNG: must end in ``.png`` (checked before any sampling)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {str(path)!r}")
    return path


def save_png(image: Image.Image, path: str | Path, params: str) -> Path:
    return write_atomic(check_png_path(path), png_bytes(image, params))


def _fitting_font(labels: Sequence[str], width: int) -> ImageFont.FreeTypeFont:
    """The largest default-font size (8-24 px) at which every label line fits ``width``."""
    for size in range(max(8, min(24, width // 8)), 7, -1):
        font = ImageFont.load_default(size=size)
        if all(font.getlength(line) <= width - 6 for label in labels for line in label.splitlines()):
            return font
    return ImageFont.load_default(size=8)


def grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int | None = None) -> Image.Image:
    """Images in rows of ``columns`` (default: one row), each under its (multi-line) label; images
    under 64 px are enlarged to at least 128 px by an integer factor (nearest neighbour)."""
    columns = columns or len(images)
    w, h = images[0].size
    if max(w, h) < 64:  # tiny images (the 32x32 demo model): enlarge, pixels kept sharp, to be seen
        f = -(-128 // max(w, h))
        images = [img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST) for img in images]
        w, h = images[0].size
    font = _fitting_font(labels, w)
    lines = max(len(label.splitlines()) for label in labels)
    strip = int(font.size * 1.25 * lines + font.size * 0.5)
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (w * columns, (h + strip) * rows), "white")
    draw = ImageDraw.Draw(out)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * w, (i // columns) * (h + strip)
        out.paste(img, (x, y + strip))
        draw.multiline_text(
            (x + 3, y + font.size // 4), label, fill="black", font=font, spacing=font.size // 4
        )
    return out
