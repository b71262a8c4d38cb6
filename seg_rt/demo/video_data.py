"""Procedural captioned clips for the demo video model: the demo image world (``data``) in motion.

A clip is ``FRAMES`` frames of ``SIZE x SIZE`` RGB: one shape of the image world translating left /
right / up / down, bouncing, rotating, growing or shrinking over a plain or textured background that
is static or scrolls left. Every clip is a function of one integer seed (``render_clip(seed)``), so
the training set, the motion classifier's data and the benchmark's real clips need no file.
Captions name colour, shape, motion and background: ``"red star moving left on stripes"``,
``"green letter k rotating on scrolling checks"`` (rotation is only drawn for polygons, which a
turn changes visibly: circles, rings and glyphs never rotate).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import data

SIZE = data.SIZE
FRAMES = 8
MOTIONS = ("left", "right", "up", "down", "bouncing", "rotating", "growing", "shrinking")
MOTION_WORDS = {m: f"moving {m}" for m in ("left", "right", "up", "down")}
ROTATABLE = frozenset({"square", "triangle", "diamond", "star", "cross"})
TRAVEL = 12.0  # pixels (at SIZE) a translating shape covers over the clip
SCROLL = 1.0  # pixels per frame a scrolling background moves left
P_SCROLL = 0.35  # chance a textured background scrolls


def motion_phrase(motion: str) -> str:
    return MOTION_WORDS.get(motion, motion)


def motions_for(shape: str) -> tuple[str, ...]:
    return MOTIONS if shape in ROTATABLE else tuple(m for m in MOTIONS if m != "rotating")


@dataclass(frozen=True)
class ClipItem:
    shape: int  # index into data.SHAPES
    color: int  # index into data.COLORS
    texture: int  # index into data.TEXTURES
    motion: int  # index into MOTIONS
    scroll: bool = False  # the background scrolls left

    @property
    def image_item(self) -> data.Item:
        return data.Item(self.shape, self.color, self.texture)

    @property
    def background(self) -> str:
        return ("scrolling " if self.scroll else "") + data.TEXTURES[self.texture]

    @property
    def caption(self) -> str:
        color, shape, _ = self.image_item.words
        return f"{color} {shape} {motion_phrase(MOTIONS[self.motion])} on {self.background}"


def caption_words() -> list[str]:
    """Words of every clip caption beyond the image captions' (``model.caption_words``)."""
    words = {"scrolling"}
    for m in MOTIONS:
        words.update(motion_phrase(m).split())
    return sorted(words)


def item_for(seed: int) -> ClipItem:
    rng = random.Random(seed * 7919 + 3)
    shape, color, texture = rng.randrange(len(data.SHAPES)), rng.randrange(len(data.COLORS)), rng.randrange(4)
    motion = MOTIONS.index(rng.choice(motions_for(data.SHAPES[shape])))
    scroll = data.TEXTURES[texture] != "plain" and rng.random() < P_SCROLL
    return ClipItem(shape, color, texture, motion, scroll)


def all_items() -> list[ClipItem]:
    return [
        ClipItem(s, c, t, MOTIONS.index(m), scroll)
        for s in range(len(data.SHAPES))
        for c in range(len(data.COLORS))
        for t in range(len(data.TEXTURES))
        for m in motions_for(data.SHAPES[s])
        for scroll in ((False, True) if data.TEXTURES[t] != "plain" else (False,))
    ]


def parse_caption(caption: str) -> ClipItem | None:
    """The clip a full caption names, or None for any other prompt."""
    return _CAPTIONS.get(caption.strip().lower())


def _pose(motion: str, t: float, frames: int) -> tuple[float, float, float, float]:
    """(dx, dy, scale, turn) at frame ``t`` (pixels at ``SIZE``; turn in radians)."""
    u = t / max(1, frames - 1)  # 0 → 1 over the clip
    half = TRAVEL / 2
    if motion == "left":
        return half - TRAVEL * u, 0.0, 1.0, 0.0
    if motion == "right":
        return -half + TRAVEL * u, 0.0, 1.0, 0.0
    if motion == "up":
        return 0.0, half - TRAVEL * u, 1.0, 0.0
    if motion == "down":
        return 0.0, -half + TRAVEL * u, 1.0, 0.0
    if motion == "bouncing":  # two bounces off a floor below the centre
        return 0.0, 5.0 - 10.0 * abs(math.sin(math.pi * 2 * u)), 1.0, 0.0
    if motion == "rotating":
        return 0.0, 0.0, 1.0, 0.9 * math.pi * u
    if motion == "growing":
        return 0.0, 0.0, 0.55 + 0.75 * u, 0.0
    if motion == "shrinking":
        return 0.0, 0.0, 1.3 - 0.75 * u, 0.0
    raise ValueError(f"unknown motion {motion!r}; known: {', '.join(MOTIONS)}")


def render_clip(seed: int, item: ClipItem | None = None, frames: int = FRAMES) -> tuple[np.ndarray, ClipItem]:
    """``[frames, SIZE, SIZE, 3]`` uint8 frames and the clip's labels, a function of ``seed`` only;
    ``item`` overrides the labels the seed would pick (another clip of the same caption)."""
    item = item or item_for(seed)
    rng = random.Random(seed)
    ss = data._SS
    n = SIZE * ss
    shape, texture = data.SHAPES[item.shape], data.TEXTURES[item.texture]
    color = list(data.COLORS.values())[item.color]
    fill = tuple(int(np.clip(c + rng.randint(-25, 25), 0, 255)) for c in color)
    bg = data._background(rng, texture, fill, n=2 * n)  # twice the size: room to scroll
    r = rng.uniform(0.22, 0.28) * n
    cx0 = n / 2 + rng.uniform(-0.05, 0.05) * n
    cy0 = n / 2 + rng.uniform(-0.05, 0.05) * n
    rot0 = rng.uniform(-0.3, 0.3)
    offset = rng.randrange(n // 2)
    motion = MOTIONS[item.motion]
    out = []
    for t in range(frames):
        x0 = offset + (round(SCROLL * ss * t) if item.scroll else 0)
        img = bg.crop((x0, offset, x0 + n, offset + n))
        dx, dy, scale, turn = _pose(motion, t, frames)
        data.draw_shape(
            ImageDraw.Draw(img), shape, cx0 + dx * ss, cy0 + dy * ss, r * scale, rot0 + turn, fill
        )
        out.append(np.asarray(img.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8))
    return np.stack(out), item


def batch(
    seeds: Sequence[int], items: Sequence[ClipItem] | None = None, frames: int = FRAMES
) -> tuple[torch.Tensor, list[ClipItem]]:
    """Clips ``[n, 3, frames, SIZE, SIZE]`` in [-1, 1] (the model's pixel range) and their items."""
    chosen = items if items is not None else [None] * len(seeds)
    clips, items = zip(
        *(render_clip(int(s), it, frames) for s, it in zip(seeds, chosen, strict=True)), strict=True
    )
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return x, list(items)


_CAPTIONS = {it.caption: it for it in all_items()}
