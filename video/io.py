"""Write videos: H.264 mp4 through PyAV (cv2's H.264 is unavailable here), animated GIF through PIL.

Both are encoded in memory and written with ``seg_rt.images.write_atomic`` (temp file + rename).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from seg_rt.images import write_atomic
from seg_rt.optional import require


def to_uint8(frames) -> np.ndarray:
    """``[F, H, W, 3]`` floats in [0, 1] (or uint8, or PIL frames) → uint8."""
    if isinstance(frames, Sequence) and frames and isinstance(frames[0], Image.Image):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    arr = np.asarray(frames)
    return arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def mp4_bytes(frames, fps: int = 8, crf: int = 18) -> bytes:
    """H.264 (libx264, yuv420p) mp4 in memory; height and width must be even (seg-rt sizes are multiples of 8)."""
    av = require("av", "writing mp4 video")
    video = to_uint8(frames)
    _, h, w, _ = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def gif_bytes(frames, fps: int = 8) -> bytes:
    images = [Image.fromarray(f) for f in to_uint8(frames)]
    buf = io.BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    return buf.getvalue()


def write_mp4(frames, path: str | Path, fps: int = 8, crf: int = 18) -> Path:
    return write_atomic(path, mp4_bytes(frames, fps, crf))


def write_gif(frames, path: str | Path, fps: int = 8) -> Path:
    return write_atomic(path, gif_bytes(frames, fps))


def check_writer(path: str | Path) -> None:
    """Before any model loads: the output's writer can run here (``.mp4``: PyAV with an H.264
    encoder), so a missing extra is one line at once, not after minutes of sampling."""
    if Path(path).suffix.lower() != ".mp4":
        return
    av = require("av", "writing mp4 video")
    try:
        av.codec.Codec("libx264", "w")
    except Exception as exc:  # PyAV built without libx264: UnknownCodecError
        raise ImportError(
            f"PyAV has no libx264 encoder ({type(exc).__name__}); needed for mp4 output"
        ) from None


def write_video(frames, path: str | Path, fps: int = 8) -> Path:
    """By suffix: ``.mp4`` or ``.gif``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return write_mp4(frames, path, fps)
    if suffix == ".gif":
        return write_gif(frames, path, fps)
    raise ValueError(f"video output must end in .mp4 or .gif, got {str(path)!r}")


def side_by_side(videos: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Labelled videos next to each other, frame by frame (same frame count and size)."""
    from seg_rt.images import grid

    videos = [to_uint8(v) for v in videos]
    n = min(len(v) for v in videos)
    return np.stack([np.asarray(grid([Image.fromarray(v[t]) for v in videos], labels)) for t in range(n)])
