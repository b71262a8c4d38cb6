"""``seg-rt bench video-quality``: video SEG modes measured.

On the demo video model (``run_video_quality``): video SEG modes against STG-style skipping.

Every method samples the same captions from the same seeds (one clip per caption, seed i for
caption i); the captions cycle through the motions. Each row scores the clips:
- temporal consistency: ``warping_error`` (Farnebäck flow-compensated frame error) and ``flicker``
  (mean frame difference), from ``seg_rt.video.metrics``;
- per-frame fidelity: ``frame_fid`` (Fréchet distance of the demo classifier's 128-d features of
  every frame against the frames of real clips of the same captions) and ``prompt_accuracy``
  (frames whose shape, colour and background the classifier reads as the caption names);
- motion: ``motion_accuracy`` (``seg_rt.demo.motion``'s estimate equals the caption's motion) and
  ``lost`` (clips where the named colour vanishes in some frame);
- ``diversity``: mean pairwise distance of the clips' mean frame features.
The last row scores held-out real clips of the same captions: what a perfect generator would get.

On any other AnimateDiff folder (``run_harness``, the proxy harness): one video per (prompt, mode, σ)
from the same seed plus a no-SEG baseline, scored by temporal consistency (flow warping error,
flicker) and per-frame proxies (sharpness, colorfulness). On the tiny random models the numbers
only prove the harness runs; with real AnimateDiff weights they answer the question.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seg_rt.bench.figure import figure
from seg_rt.bench.metrics import fid, mean_pairwise_distance
from seg_rt.config import parse_sigma, sigma_to_json
from seg_rt.demo import motion, video_data

from .attention import MODES
from .metrics import flicker, video_metrics, warping_error
from .sampling import generate_video

BENCH_SEED_BASE = 60_000_000  # real clips of the benchmark's captions
HELDOUT_SEED_BASE = 70_000_000  # other clips of the same captions: the floor


@dataclass(frozen=True)
class VideoMethod:
    name: str
    cfg: float = 1.0
    scale: float = 0.0
    mode: str = "spatiotemporal"
    sigma: float = math.inf
    sigma_time: float = 1.0
    perturbation: str = "blur"


def methods(cfg: float = 3.0, scale: float = 3.0) -> list[VideoMethod]:
    """No guidance, CFG, SEG per mode over a small σ / σ_time sweep, STG-style skipping per layer
    kind; SEG and STG without CFG (as the image benchmark compares SEG and PAG)."""
    return [
        VideoMethod("vanilla"),
        VideoMethod(f"CFG {cfg:g}", cfg=cfg),
        VideoMethod("SEG spatial σ=2", scale=scale, mode="spatial", sigma=2.0),
        VideoMethod("SEG spatial σ=inf", scale=scale, mode="spatial", sigma=math.inf),
        VideoMethod("SEG temporal σt=1", scale=scale, mode="temporal", sigma_time=1.0),
        VideoMethod("SEG temporal σt=inf", scale=scale, mode="temporal", sigma_time=math.inf),
        VideoMethod("SEG spatiotemporal σ=inf σt=1", scale=scale, mode="spatiotemporal", sigma_time=1.0),
        VideoMethod("STG spatial (skip)", scale=scale, mode="spatial", perturbation="identity"),
        VideoMethod("STG temporal (skip)", scale=scale, mode="temporal", perturbation="identity"),
    ]


def bench_items(samples: int) -> list[video_data.ClipItem]:
    """``samples`` captions, motion i % 8 for caption i (the first seed from ``BENCH_SEED_BASE`` on
    whose clip has that motion)."""
    out, seed = [], BENCH_SEED_BASE
    for i in range(samples):
        want = i % len(video_data.MOTIONS)
        while video_data.item_for(seed).motion != want:
            seed += 1
        out.append(video_data.item_for(seed))
        seed += 1
    return out


def _frames01(clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 clips ``[F, H, W, 3]`` → every frame ``[n·F, 3, H, W]`` in [-1, 1] (the classifier's input)."""
    x = torch.from_numpy(np.concatenate(clips)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def score(clf, clips: list[np.ndarray], items: list[video_data.ClipItem], real_feats: torch.Tensor) -> dict:
    frames = len(clips[0])
    feats = clf.features(_frames01(clips))
    logits = {name: head(feats).argmax(-1) for name, head in clf.heads.items()}
    want = {k: torch.tensor([getattr(it, k) for it in items]).repeat_interleave(frames) for k in logits}
    hits = torch.stack([logits[k] == want[k] for k in logits]).all(0).float()
    motion_acc, lost = motion.accuracy(clips, items)
    return {
        "warping_error": round(float(np.mean([warping_error(c) for c in clips])), 5),
        "flicker": round(float(np.mean([flicker(c) for c in clips])), 5),
        "frame_fid": round(fid(real_feats, feats), 3),
        "prompt_accuracy": round(float(hits.mean()), 4),
        "motion_accuracy": round(motion_acc, 4),
        "lost": round(lost, 4),
        "diversity": round(mean_pairwise_distance(feats.view(len(clips), frames, -1).mean(1)), 4),
    }


def run_video_quality(
    model=None,
    *,
    samples: int = 24,
    steps: int = 8,
    cfg: float = 3.0,
    scale: float = 3.0,
    method_names: Sequence[str] | None = None,
    classifier=None,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """One row per method (same captions and seeds), then the held-out real clips' row."""
    from tqdm.auto import tqdm

    from seg_rt.demo.classifier import load_classifier
    from seg_rt.demo.video_model import video_weights_dir
    from seg_rt.pipeline import load_pipeline

    from .io import to_uint8

    if samples < 2 or steps < 1:
        raise ValueError(f"need samples >= 2 and steps >= 1; got {samples}, {steps}")
    chosen = methods(cfg, scale)
    if method_names is not None:
        known = {m.name for m in chosen}
        bad = [n for n in method_names if n not in known]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; known: {', '.join(sorted(known))}")
        chosen = [m for m in chosen if m.name in method_names]
    pipe = load_pipeline(model or video_weights_dir(), device) if not hasattr(model, "unet") else model
    clf = load_classifier(classifier)
    items = bench_items(samples)
    real = [video_data.render_clip(BENCH_SEED_BASE + i, it)[0] for i, it in enumerate(items)]
    with torch.no_grad():
        real_feats = clf.features(_frames01(real))
    common = {
        "bench": "video-quality", "model": str(model or "demo-video") if not hasattr(model, "unet") else "demo-video",
        "samples": samples, "steps": steps, "frames": video_data.FRAMES, "threads": torch.get_num_threads(),
    }  # fmt: skip
    rows = []
    for m in chosen:
        t0 = time.perf_counter()
        clips = []
        for i, it in enumerate(tqdm(items, desc=m.name, disable=not progress, leave=False)):
            video = generate_video(
                pipe, it.caption, frames=video_data.FRAMES, steps=steps, cfg=m.cfg, seg_scale=m.scale,
                seg_mode=m.mode, seg_sigma=m.sigma, seg_sigma_time=m.sigma_time, seed=i,
                perturbation=m.perturbation,
            )[0]  # fmt: skip
            clips.append(to_uint8(video))
        seconds = time.perf_counter() - t0
        guided = m.scale > 0
        rows.append({
            **common, "method": m.name, "cfg": m.cfg, "scale": m.scale,
            "mode": m.mode if guided else None, "perturbation": m.perturbation if guided else None,
            "sigma": sigma_to_json(m.sigma) if guided and m.mode != "temporal" and m.perturbation == "blur" else None,
            "sigma_time": sigma_to_json(m.sigma_time) if guided and m.mode != "spatial" and m.perturbation == "blur" else None,
            **score(clf, clips, items, real_feats), "seconds": round(seconds, 1),
        })  # fmt: skip
    held = [video_data.render_clip(HELDOUT_SEED_BASE + i, it)[0] for i, it in enumerate(items)]
    rows.append(
        {**common, "method": "real held-out clips", "steps": None, **score(clf, held, items, real_feats)}
    )
    return rows


METRICS = ("warping_error", "flicker", "frame_fid", "prompt_accuracy", "motion_accuracy", "diversity")


def plot(rows: list[dict], path: str | Path) -> Path:
    """One horizontal bar chart per metric, a bar per method (the real clips' row hatched)."""
    names = [r["method"] for r in rows]
    size = (3.1 * len(METRICS), 0.32 * len(rows) + 1.4)
    with figure(path, "the video-quality plot", 1, len(METRICS), figsize=size, sharey=True) as (_, axes):
        for ax, metric in zip(axes, METRICS, strict=True):
            values = [r[metric] for r in rows]
            bars = ax.barh(
                range(len(rows)),
                values,
                color=["C0" if "SEG" in n else "C1" if "STG" in n else "C7" for n in names],
            )
            bars[-1].set_hatch("//")
            ax.set_title(
                metric.replace("_", " ") + (" ↑" if "accuracy" in metric or metric == "diversity" else " ↓"),
                fontsize=9,
            )
            ax.tick_params(labelsize=7)
        axes[0].set_yticks(range(len(rows)), names)
        axes[0].invert_yaxis()
    return Path(path)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (README)."""
    head = "| method | " + " | ".join(METRICS) + " | s |\n|---|" + "---:|" * (len(METRICS) + 1) + "\n"
    return head + "".join(
        f"| {r['method']} | " + " | ".join(f"{r[m]:g}" for m in METRICS) + f" | {r.get('seconds', '')} |\n"
        for r in rows
    )


# the proxy harness: any AnimateDiff folder

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
        plot_harness(rows, plot)
    return rows


def plot_harness(rows: list[dict], path: str | Path) -> Path:
    """Warping error and flicker against σ, one line per mode, dashed no-SEG baseline; averaged over prompts."""
    sigmas = sorted({r["sigma"] for r in rows if r["mode"] != "none"}, key=parse_sigma)
    with figure(path, "the video-quality plot", 1, 2, figsize=(9, 3.5)) as (_, axes):
        for ax, metric in zip(axes, ("warping_error", "flicker"), strict=True):
            base = np.mean([r[metric] for r in rows if r["mode"] == "none"])
            ax.axhline(base, linestyle="--", color="gray", label="no SEG")
            for mode in MODES:
                ys = [
                    np.mean([r[metric] for r in rows if r["mode"] == mode and r["sigma"] == s])
                    for s in sigmas
                ]
                ax.plot(range(len(sigmas)), ys, marker="o", label=mode)
            ax.set_xticks(range(len(sigmas)), [str(s) for s in sigmas])
            ax.set_xlabel("SEG sigma")
            ax.set_title(metric.replace("_", " "))
        axes[0].legend(fontsize=8)
    return Path(path)
