"""Which motion a clip shows: a hand-written estimator on the shape's colour mask (no training).

For a clip whose caption names the shape's colour, each frame's foreground mask is the pixels
within ``COLOR_RADIUS`` (RGB distance) of that colour; the rest is read off the mask track:
- centroid track and log-area fitted with lines: a net travel of at least ``MIN_TRAVEL`` pixels → ``left`` /
  ``right`` / ``up`` / ``down`` (dominant axis and sign);
- else a vertical range of at least ``MIN_TRAVEL`` → ``bouncing``;
- else the mask area growing / shrinking by ``MIN_AREA_RATIO`` or more → ``growing`` / ``shrinking``;
- else consecutive masks (centred) overlapping by less than ``MAX_IOU`` → ``rotating``;
- else ``still`` (no motion: never a caption's motion, so it counts as wrong).
It measures what the eye checks first — does the thing of the named colour move as named — and is
exact on the procedural clips (``seg-rt bench video-quality`` reports its accuracy on real held-out
clips as the floor). A clip with no pixel of the named colour in some frame is ``lost``.
"""

from __future__ import annotations

import numpy as np

from . import data, video_data

COLOR_RADIUS = 70.0  # RGB distance to the caption's colour (the data jitters each channel by ±25)
MIN_TRAVEL = 4.0  # pixels over the clip
MIN_AREA_RATIO = 1.6
MAX_IOU = 0.92  # a still shape overlaps itself ~1; a turning polygon 0.5-0.9
MIN_PIXELS = 4


def masks(frames: np.ndarray, color: int) -> np.ndarray:
    """``frames`` ``[F, H, W, 3]`` uint8 → ``[F, H, W]`` bool: pixels near ``data.COLORS``' ``color``."""
    ref = np.array(list(data.COLORS.values())[color], dtype=np.float32)
    return np.linalg.norm(frames.astype(np.float32) - ref, axis=-1) < COLOR_RADIUS


def _centred(mask: np.ndarray, cy: float, cx: float) -> np.ndarray:
    h, w = mask.shape
    return np.roll(mask, (round(h / 2 - cy), round(w / 2 - cx)), axis=(0, 1))


def track(frames: np.ndarray, color: int) -> dict[str, float] | None:
    """Per-clip motion statistics of the ``color`` mask, or None when it is lost in some frame."""
    m = masks(frames, color)
    area = m.sum(axis=(1, 2)).astype(np.float64)
    if (area < MIN_PIXELS).any():
        return None
    ys, xs = np.mgrid[0 : m.shape[1], 0 : m.shape[2]]
    cy = (m * ys).sum(axis=(1, 2)) / area
    cx = (m * xs).sum(axis=(1, 2)) / area
    t = np.arange(len(m), dtype=np.float64)
    span = len(m) - 1
    dx, dy = np.polyfit(t, cx, 1)[0] * span, np.polyfit(t, cy, 1)[0] * span
    ious = []
    for i in range(len(m) - 1):
        a, b = _centred(m[i], cy[i], cx[i]), _centred(m[i + 1], cy[i + 1], cx[i + 1])
        ious.append((a & b).sum() / max(1, (a | b).sum()))
    return {
        "dx": float(dx),
        "dy": float(dy),
        "y_range": float(cy.max() - cy.min()),
        "log_area_change": float(np.polyfit(t, np.log(area), 1)[0] * span),
        "iou": float(np.mean(ious)),
    }


def classify(frames: np.ndarray, color: int) -> str:
    """The motion (one of ``video_data.MOTIONS``, ``still`` or ``lost``) of a clip's ``color`` shape."""
    s = track(frames, color)
    if s is None:
        return "lost"
    if max(abs(s["dx"]), abs(s["dy"])) >= MIN_TRAVEL:
        if abs(s["dx"]) >= abs(s["dy"]):
            return "right" if s["dx"] > 0 else "left"
        return "down" if s["dy"] > 0 else "up"
    if s["y_range"] >= MIN_TRAVEL:
        return "bouncing"
    if abs(s["log_area_change"]) >= np.log(MIN_AREA_RATIO):
        return "growing" if s["log_area_change"] > 0 else "shrinking"
    if s["iou"] < MAX_IOU:
        return "rotating"
    return "still"


def accuracy(clips: list[np.ndarray], items: list[video_data.ClipItem]) -> tuple[float, float]:
    """(motion accuracy, fraction lost) of clips against their items' motions."""
    found = [classify(c, it.color) for c, it in zip(clips, items, strict=True)]
    hits = [f == video_data.MOTIONS[it.motion] for f, it in zip(found, items, strict=True)]
    return float(np.mean(hits)), float(np.mean([f == "lost" for f in found]))
