"""Procedural captioned images for the demo model: coloured shapes and glyphs on simple textures.

Every image is a function of one integer seed (``render(seed)``), so the training set, the
classifier's data and the quality benchmark's reference set are reproducible without any file.
Glyphs use the font that ships inside Pillow (``ImageFont.load_default``), so nothing is fetched.
Drawing happens at 4x the size and is downsampled (antialiasing), as one would render a dataset.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
_SS = 4  # supersampling factor

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "star", "A", "G", "K", "R", "7")
COLORS = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "cyan": (40, 215, 225),
    "magenta": (220, 50, 210),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),
}
TEXTURES = ("plain", "stripes", "checks", "dots")
GLYPHS = frozenset(s for s in SHAPES if len(s) == 1)


def shape_word(shape: str) -> str:
    """The caption words for a shape: ``letter a`` / ``digit 7`` for glyphs, else the shape name."""
    if shape not in GLYPHS:
        return shape
    return f"digit {shape}" if shape.isdigit() else f"letter {shape.lower()}"


@dataclass(frozen=True)
class Item:
    shape: int  # index into SHAPES
    color: int  # index into COLORS
    texture: int  # index into TEXTURES

    @property
    def words(self) -> tuple[str, str, str]:
        """The caption's colour, shape and background words."""
        return list(COLORS)[self.color], shape_word(SHAPES[self.shape]), TEXTURES[self.texture]

    @property
    def caption(self) -> str:
        color, shape, texture = self.words
        return f"{color} {shape} on {texture}"

    @property
    def labels(self) -> tuple[int, int, int]:
        return (self.shape, self.color, self.texture)


def item_for(seed: int) -> Item:
    rng = random.Random(seed * 7919 + 1)
    return Item(rng.randrange(len(SHAPES)), rng.randrange(len(COLORS)), rng.randrange(len(TEXTURES)))


def parse_caption(caption: str) -> Item | None:
    """The labels a full caption (``"red letter a on stripes"``) names, or None for other prompts."""
    for i in range(len(SHAPES)):
        for j in range(len(COLORS)):
            for k in range(len(TEXTURES)):
                if Item(i, j, k).caption == caption.strip().lower():
                    return Item(i, j, k)
    return None


@lru_cache(maxsize=8)
def _font(px: int):
    return ImageFont.load_default(size=px)


def _background(
    rng: random.Random, texture: str, fg: tuple[int, int, int], n: int = SIZE * _SS
) -> Image.Image:
    """A ``n x n`` supersampled background (``n`` larger than the picture: room to scroll)."""
    base = tuple(rng.randint(15, 80) for _ in range(3))
    other = tuple(min(255, c + rng.randint(35, 70)) for c in base)
    img = Image.new("RGB", (n, n), base)
    draw = ImageDraw.Draw(img)
    if texture == "stripes":
        period = rng.choice((6, 8)) * _SS
        for x in range(-n, n, period):
            draw.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + n, n), (x + n, n)], fill=other)
    elif texture == "checks":
        cell = rng.choice((4, 8)) * _SS
        for y in range(0, n, cell):
            for x in range(0, n, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=other)
    elif texture == "dots":
        step = 6 * _SS
        r = _SS * 1.2
        off = rng.randrange(step)
        for y in range(off % step - step, n + step, step):
            for x in range(off % step - step, n + step, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=other)
    return img


def _polygon(cx: float, cy: float, r: float, k: int, rot: float, inner: float | None = None):
    pts = []
    for i in range(k * (2 if inner else 1)):
        rad = r if inner is None or i % 2 == 0 else r * inner
        a = rot + i * math.pi / (k if inner else k / 2)
        pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
    return pts


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    rot: float,
    fill: tuple[int, int, int],
) -> None:
    """Draw one shape (a ``SHAPES`` name) of radius ``r`` at ``(cx, cy)``, turned by ``rot`` (polygons;
    glyphs are drawn upright), in supersampled pixels."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(r * 0.35))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, math.pi / 4 + rot), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, rot * 0.3), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.15, 3, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.15, 5, rot, inner=0.45), fill=fill)
    elif shape == "cross":
        w = r * 0.36
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            ends = [(cx - dx * r, cy - dy * r), (cx + dx * r, cy + dy * r)]
            draw.polygon(
                [(ends[0][0] + px, ends[0][1] + py), (ends[1][0] + px, ends[1][1] + py),
                 (ends[1][0] - px, ends[1][1] - py), (ends[0][0] - px, ends[0][1] - py)],
                fill=fill,
            )  # fmt: skip
    else:  # glyph
        font = _font(int(r * 2.3))
        draw.text((cx, cy), shape, font=font, fill=fill, anchor="mm", stroke_width=_SS, stroke_fill=fill)


def render(seed: int, item: Item | None = None) -> tuple[np.ndarray, Item]:
    """One ``SIZE x SIZE`` RGB uint8 image and its labels, a function of ``seed`` only; ``item``
    overrides the labels the seed would pick (another picture of the same caption)."""
    item = item or item_for(seed)
    rng = random.Random(seed)
    shape, color, texture = SHAPES[item.shape], list(COLORS.values())[item.color], TEXTURES[item.texture]
    jitter = tuple(int(np.clip(c + rng.randint(-25, 25), 0, 255)) for c in color)
    img = _background(rng, texture, jitter)
    draw = ImageDraw.Draw(img)
    n = SIZE * _SS
    r = rng.uniform(0.27, 0.36) * n
    cx = n / 2 + rng.uniform(-0.1, 0.1) * n
    cy = n / 2 + rng.uniform(-0.1, 0.1) * n
    rot = rng.uniform(-0.3, 0.3)
    draw_shape(draw, shape, cx, cy, r, rot, jitter)
    out = img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8), item


def batch(seeds: Sequence[int], items: Sequence[Item] | None = None) -> tuple[torch.Tensor, list[Item]]:
    """Images ``[n, 3, SIZE, SIZE]`` in [-1, 1] (the model's pixel range) and their items."""
    chosen = items if items is not None else [None] * len(seeds)
    arrays, items = zip(*(render(int(s), it) for s, it in zip(seeds, chosen, strict=True)), strict=True)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, list(items)
