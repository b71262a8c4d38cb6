"""``seg-rt bench video-quality``: the open question of SEG on video, measured.

For a model and a prompt list, generate one video per (prompt, mode, σ) from the same seed plus a
no-SEG baseline, and report temporal consistency (flow warping error, flicker) and per-frame
proxies (sharpness, colorfulness) as JSON rows and a plot. On the tiny random models the numbers
only prove the harness runs; with real AnimateDiff weights they answer the question.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

from seg_rt.config import parse_sigma, sigma_to_json
from seg_rt.optional import require

from .attention import MODES
from .metrics import video_metrics
from .sampling import generate_video

DEFAULT_PROMPTS = ("a red ball rolling on grass", "waves on a beach at sunset")
DEFAULT_SIGMAS = (1.0, 2.0, 5.0, math.inf)


def run_harness(
    model=None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    *,
    sigma_time: float = 1.0,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    steps: int = 8,
    cfg: float = 5.0,
    seed: int = 0,
    plot: str | Path | None = None,
) -> list[dict]:
    """Rows ``{prompt, mode, sigma, sigma_time, metrics...}``; mode ``none`` is the no-SEG baseline.

    ``sigma`` is the swept σ: spatial for ``spatial`` / ``spatiotemporal`` (σ_time fixed at
    ``sigma_time``), temporal for ``temporal``."""
    if model is None:
        from seg_rt.tiny import tiny_video_pipeline

        model, name = tiny_video_pipeline("animatediff"), "tiny AnimateDiff (random weights)"
    else:
        name = str(model)
    common = {"frames": frames, "height": height, "width": width, "steps": steps, "cfg": cfg, "seed": seed}
    rows = []
    for prompt in prompts:
        base = generate_video(model, prompt, seg_scale=0.0, **common)[0]
        rows.append({"model": name, "prompt": prompt, "mode": "none", "sigma": None, **video_metrics(base)})
        for mode in MODES:
            for sigma in sigmas:
                # the swept σ is the one the mode uses: σ_time for temporal, σ_space otherwise
                space, time_ = (math.inf, sigma) if mode == "temporal" else (sigma, sigma_time)
                video = generate_video(
                    model, prompt, seg_mode=mode, seg_sigma=space, seg_sigma_time=time_, **common
                )[0]
                rows.append({"model": name, "prompt": prompt, "mode": mode, "sigma": sigma_to_json(sigma),
                             "sigma_time": sigma_to_json(time_) if mode != "spatial" else 0.0, **video_metrics(video)})  # fmt: skip
    if plot:
        plot_rows(rows, plot)
    return rows


def plot_rows(rows: list[dict], path: str | Path) -> Path:
    """Warping error and flicker against σ, one line per mode, dashed no-SEG baseline; averaged over prompts."""
    matplotlib = require("matplotlib", "the video-quality plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from seg_rt.images import write_atomic

    sigmas = sorted({r["sigma"] for r in rows if r["mode"] != "none"}, key=parse_sigma)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("warping_error", "flicker"), strict=True):
        base = np.mean([r[metric] for r in rows if r["mode"] == "none"])
        ax.axhline(base, linestyle="--", color="gray", label="no SEG")
        for mode in MODES:
            ys = [np.mean([r[metric] for r in rows if r["mode"] == mode and r["sigma"] == s]) for s in sigmas]
            ax.plot(range(len(sigmas)), ys, marker="o", label=mode)
        ax.set_xticks(range(len(sigmas)), [str(s) for s in sigmas])
        ax.set_xlabel("SEG sigma")
        ax.set_title(metric.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
        fig.savefig(tmp.name, dpi=100)
        plt.close(fig)
        return write_atomic(path, Path(tmp.name).read_bytes())
