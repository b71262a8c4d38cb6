"""Image output: PNG with generation parameters, atomic writes, labelled comparison grids."""

from __future__ import annotations

import io
import json
import math
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


def params_text(model, params: dict) -> str:
    """Generation parameters as JSON for the PNG text chunk (σ = inf written as "inf")."""
    clean = {
        k: ("inf" if isinstance(v, float) and math.isinf(v) else list(v) if isinstance(v, tuple) else v)
        for k, v in params.items()
    }
    if isinstance(clean.get("compare_sigmas"), list):
        clean["compare_sigmas"] = ["inf" if math.isinf(s) else s for s in clean["compare_sigmas"]]
    return json.dumps({"model": str(model), "generator": "seg-rt", **clean}, sort_keys=True)


def generation_params(
    *, prompt: str, negative_prompt: str | None, steps: int, cfg: float, seg_scale: float, seg_sigma: float,
    seg_layers, seg_start: float, seg_end: float, height: int | None, width: int | None, seed: int,
    scheduler: str, guidance_rescale: float = 0.0, sequential: bool = False, seg_every: int = 1,
    seg_placement: str = "batched",
) -> dict:  # fmt: skip
    """The parameter record a seg-rt PNG carries: one key set for the CLI and the server, so the same
    request gives the same file bytes from either."""
    return {
        "prompt": prompt, "negative_prompt": negative_prompt, "steps": int(steps), "cfg": float(cfg),
        "seg_scale": float(seg_scale), "seg_sigma": float(seg_sigma), "seg_layers": list(seg_layers),
        "seg_start": float(seg_start), "seg_end": float(seg_end), "guidance_rescale": float(guidance_rescale),
        "height": height, "width": width, "seed": int(seed), "scheduler": scheduler, "sequential": bool(sequential),
        # cheap SEG modes only when set (SEGConfig.cheap_fields): default records stay byte-identical
        **({"seg_every": int(seg_every)} if seg_every != 1 else {}),
        **({"seg_placement": seg_placement} if seg_placement != "batched" else {}),
    }  # fmt: skip


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


def save_png(image: Image.Image, path: str | Path, params: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {str(path)!r}")
    return write_atomic(path, png_bytes(image, params))


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
