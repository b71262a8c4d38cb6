"""``seg-rt bench quality`` on the demo model: vanilla, CFG, PAG-style and SEG at a σ sweep (and
the cheap SEG modes), scored by ``seg_rt.bench.metrics`` on the demo classifier's features."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from seg_rt.config import sigma_label, sigma_to_json

from .figure import figure
from .metrics import fid, mean_pairwise_distance, precision_recall


@dataclass(frozen=True)
class Method:
    name: str
    cfg: float = 1.0
    scale: float = 0.0  # SEG / PAG guidance scale
    sigma: float = math.inf
    perturbation: str = "blur"
    every: int = 1  # cheap modes (SEGConfig.every / placement / window)
    placement: str = "batched"
    start: float = 0.0
    end: float = 1.0


CHEAP_SIGMA = math.inf  # σ of the cheap-mode rows: SEGConfig's default
CHEAP_WINDOW = (0.0, 0.5)  # the window row: SEG on the first half of the steps


def cheap_methods(cfg: float, seg_scale: float) -> list[Method]:
    """The cheap SEG modes at the default σ: every 2nd step (delta reused), the blur inside the
    unconditional row (needs CFG: at the CFG row's scale), and SEG on a window of the steps."""
    start, end = CHEAP_WINDOW
    return [
        Method("SEG σ=inf every 2", scale=seg_scale, sigma=CHEAP_SIGMA, every=2),
        Method("SEG uncond-placement", cfg=cfg, scale=seg_scale, sigma=CHEAP_SIGMA, placement="uncond"),
        Method(
            f"SEG σ=inf window {start:g}-{end:g}", scale=seg_scale, sigma=CHEAP_SIGMA, start=start, end=end
        ),
    ]


def methods(
    cfg: float, seg_scale: float, pag_scale: float, sigmas: Sequence[float], cheap: bool = False
) -> list[Method]:
    """vanilla, CFG, PAG-style (identity attention), SEG at each σ; SEG and PAG without CFG; with
    ``cheap`` the cheap SEG modes after them (``cheap_methods``)."""
    out = [
        Method("vanilla"),
        Method(f"CFG {cfg:g}", cfg=cfg),
        Method(f"PAG {pag_scale:g}", scale=pag_scale, perturbation="identity"),
    ]
    for s in sigmas:
        out.append(Method(f"SEG σ={sigma_label(s)}", scale=seg_scale, sigma=s))
    return out + (cheap_methods(cfg, seg_scale) if cheap else [])


BENCH_SEED_BASE = 40_000_000  # prompt i names the item of data seed BENCH_SEED_BASE + i
HELDOUT_SEED_BASE = 50_000_000  # a second real set (same captions): the metrics' floor for this count
SIGMAS = (1.0, 2.0, 5.0, 10.0, math.inf)


def to_classifier_input(images: Tensor) -> Tensor:
    """``[n, 3, H, W]`` in [0, 1] → quantised to 8 bits like a saved PNG → [-1, 1]."""
    return (images.clamp(0, 1) * 255).round() / 127.5 - 1.0


@torch.no_grad()
def describe_set(clf, x: Tensor, items=None) -> dict[str, Tensor]:
    """Classifier features and per-sample scores of images ``x`` in [-1, 1]."""
    out = {"features": clf.features(x)}
    logits = {name: head(out["features"]) for name, head in clf.heads.items()}
    probs = {k: v.softmax(-1) for k, v in logits.items()}
    out["confidence"] = probs["shape"].max(-1).values
    if items is not None:
        hits = [probs[k].argmax(-1) == torch.tensor([getattr(i, k) for i in items]) for k in probs]
        out["correct"] = torch.stack(hits).all(0).float()
        out["shape_correct"] = hits[0].float()
    return out


def score(real: dict, fake: dict, vanilla: dict | None, k: int = 3) -> dict:
    precision, recall = precision_recall(real["features"], fake["features"], k)
    row = {
        "fid": round(fid(real["features"], fake["features"]), 3),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "diversity": round(mean_pairwise_distance(fake["features"]), 4),
        "confidence": round(float(fake["confidence"].mean()), 4),
        "accuracy": round(float(fake["correct"].mean()), 4) if "correct" in fake else None,
        "shape_accuracy": round(float(fake["shape_correct"].mean()), 4) if "shape_correct" in fake else None,
    }
    if vanilla is not None:
        row["dist_to_vanilla"] = round(float((fake["features"] - vanilla["features"]).norm(dim=1).mean()), 4)
        row["pixel_rmse_to_vanilla"] = round(
            float((fake["pixels"] - vanilla["pixels"]).pow(2).mean().sqrt()), 4
        )
    return row


def run_quality(
    model=None,
    *,
    samples: int = 160,
    steps: int = 12,
    cfg: float = 3.0,
    seg_scale: float = 3.0,
    pag_scale: float = 3.0,
    sigmas: Sequence[float] = SIGMAS,
    layers: Sequence[str] = ("mid",),
    batch: int = 64,
    unconditional: bool = False,
    classifier=None,
    device=None,
    progress: bool = True,
    cheap: bool = False,
) -> list[dict]:
    """Sample ``samples`` images per method with the same prompts and seeds and score them
    against real images of the same items. One JSON-able row per method, then the held-out
    real set's row (what a perfect generator would score with this many samples)."""
    import time

    from tqdm.auto import tqdm

    from seg_rt.demo import data
    from seg_rt.demo.classifier import load_classifier
    from seg_rt.demo.model import weights_dir
    from seg_rt.engines.torch_denoiser import TorchDenoiser
    from seg_rt.pipeline import generate_batch, load_pipeline

    if samples < 8 or batch < 1 or steps < 1:
        raise ValueError(f"need samples >= 8, batch >= 1, steps >= 1; got {samples}, {batch}, {steps}")
    pipe = load_pipeline(model or weights_dir(), device)
    clf = load_classifier(classifier)
    seeds = list(range(samples))
    real_x, items = data.batch([BENCH_SEED_BASE + s for s in seeds])
    prompts = ["" if unconditional else it.caption for it in items]
    real = describe_set(clf, real_x, items)
    # other pictures of the same captions: what a perfect generator would score
    held_x, held_items = data.batch([HELDOUT_SEED_BASE + s for s in seeds], items)
    common = {
        "bench": "quality", "model": str(model or "demo"), "samples": samples, "steps": steps,
        "prompts": "empty" if unconditional else "captions", "layers": list(layers),
        "threads": torch.get_num_threads(), "device": str(pipe._execution_device),
    }  # fmt: skip
    rows, vanilla = [], None
    # empty prompts: the CFG rows' cond and uncond rows are the same, so CFG equals vanilla; left out
    chosen = [
        m for m in methods(cfg, seg_scale, pag_scale, sigmas, cheap) if not (unconditional and m.cfg > 1)
    ]
    for m in chosen:
        t0 = time.perf_counter()
        engine = TorchDenoiser(pipe.unet, sigma=m.sigma, layers=layers, perturbation=m.perturbation)
        chunks = []
        try:
            for lo in tqdm(range(0, samples, batch), desc=m.name, disable=not progress, leave=False):
                chunks.append(
                    generate_batch(
                        pipe, prompts[lo : lo + batch], seeds[lo : lo + batch], steps=steps, cfg=m.cfg,
                        seg_scale=m.scale, seg_sigma=m.sigma, seg_layers=layers, engine=engine, output_type="pt",
                        seg_every=m.every, seg_placement=m.placement, seg_start=m.start, seg_end=m.end,
                    ).cpu().float()
                )  # fmt: skip
        finally:
            engine.close()
        x = to_classifier_input(torch.cat(chunks))
        fake = describe_set(clf, x, None if unconditional else items)
        fake["pixels"] = x
        vanilla = vanilla or fake
        row = {**common, "method": m.name, "cfg": m.cfg, "scale": m.scale,
               "sigma": sigma_to_json(m.sigma), "perturbation": m.perturbation if m.scale else None,
               **({"every": m.every, "placement": m.placement, "window": [m.start, m.end]} if cheap else {}),
               **score(real, fake, None if fake is vanilla else vanilla), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if fake is vanilla:
            row |= {"dist_to_vanilla": 0.0, "pixel_rmse_to_vanilla": 0.0}
        rows.append(row)
    held = describe_set(clf, held_x, None if unconditional else held_items)
    rows.append({**common, "method": "real (held-out)", **score(real, held, None)})
    return rows


COLUMNS = ("fid", "precision", "recall", "diversity", "accuracy", "confidence", "dist_to_vanilla")


def table(rows: list[dict]) -> str:
    """Markdown table of the rows' metrics."""
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [
            "–" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols
        ]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """One bar chart per metric, methods on the x axis; the held-out real set as a dashed line."""
    gen = [r for r in rows if r["method"] != "real (held-out)"]
    real = next((r for r in rows if r["method"] == "real (held-out)"), None)
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in gen)]
    half = (len(cols) + 1) // 2
    with figure(path, "the quality plot", 2, half, figsize=(4 * half, 7)) as (fig, axes):
        for ax, col in zip(axes.flat, cols, strict=False):
            ax.bar(
                range(len(gen)),
                [r[col] or 0.0 for r in gen],
                color=["#888", "#c66", "#69c"] + ["#4a4"] * (len(gen) - 3),
            )
            if real is not None and real.get(col) is not None:
                ax.axhline(real[col], linestyle="--", color="black", linewidth=1, label="real (held-out)")
            ax.set_xticks(range(len(gen)), [r["method"] for r in gen], rotation=60, ha="right", fontsize=8)
            ax.set_title(col.replace("_", " "))
        for ax in list(axes.flat)[len(cols) :]:
            ax.axis("off")
        first = gen[0]
        fig.suptitle(
            f"seg-rt bench quality: {first['samples']} samples, {first['steps']} steps, prompts: {first['prompts']}"
        )
