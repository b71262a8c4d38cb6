"""Image output: PNG with generation parameters, atomic writes, labelled comparison grids."""

from __future__ import annotations

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


def read_params(path: str | Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text[PARAMS_KEY])


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temp file next to ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(image: Image.Image, path: str | Path, params: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {str(path)!r}")
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, params)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def compare_grid(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """One row of images, each with its label in a strip above it."""
    w, h = images[0].size
    font = ImageFont.load_default(size=max(10, min(24, w // 12)))
    strip = int(font.size * 1.6)
    grid = Image.new("RGB", (w * len(images), h + strip), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        grid.paste(img, (i * w, strip))
        draw.text((i * w + 4, strip // 5), label, fill="black", font=font)
    return grid
