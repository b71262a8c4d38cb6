"""Temporal-consistency and per-frame quality proxies for the video SEG harness.

- ``warping_error``: mean |frame_t - warp(frame_t+1 -> t)| with OpenCV Farnebäck optical flow
  (grayscale, values in [0, 1]); low = consecutive frames agree up to motion.
- ``flicker``: mean absolute difference of consecutive frames, no motion compensation.
- ``sharpness``: variance of the Laplacian per frame (higher = more detail).
- ``colorfulness``: Hasler & Süsstrunk (2003) per frame.
"""

from __future__ import annotations

import itertools

import numpy as np

from seg_rt.optional import require


def _gray(frames: np.ndarray) -> np.ndarray:
    cv2 = require("cv2", "video metrics")
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32) / 255.0


def _uint8(frames) -> np.ndarray:
    from .io import to_uint8

    return to_uint8(frames)


def warping_error(frames) -> float:
    """Mean flow-compensated error between consecutive frames (0 for a static or perfectly warped video)."""
    cv2 = require("cv2", "video metrics")
    gray = _gray(_uint8(frames))
    if len(gray) < 2:
        return 0.0
    h, w = gray.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    errors = []
    for prev, nxt in itertools.pairwise(gray):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        warped = cv2.remap(
            nxt, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        errors.append(float(np.abs(prev - warped).mean()))
    return float(np.mean(errors))


def flicker(frames) -> float:
    video = _uint8(frames).astype(np.float32) / 255.0
    return float(np.abs(np.diff(video, axis=0)).mean()) if len(video) > 1 else 0.0


def sharpness(frames) -> float:
    cv2 = require("cv2", "video metrics")
    return float(np.mean([cv2.Laplacian(g, cv2.CV_32F).var() for g in _gray(_uint8(frames))]))


def colorfulness(frames) -> float:
    video = _uint8(frames).astype(np.float32)
    r, g, b = video[..., 0], video[..., 1], video[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    per_frame = [
        np.hypot(rg[t].std(), yb[t].std()) + 0.3 * np.hypot(rg[t].mean(), yb[t].mean())
        for t in range(len(video))
    ]
    return float(np.mean(per_frame))


def video_metrics(frames) -> dict[str, float]:
    return {
        "warping_error": round(warping_error(frames), 6),
        "flicker": round(flicker(frames), 6),
        "sharpness": round(sharpness(frames), 6),
        "colorfulness": round(colorfulness(frames), 4),
    }
