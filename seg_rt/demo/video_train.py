"""Train the demo video model on procedural clips (``seg_rt.demo.video_data``); resumable.

    python -m seg_rt.demo.video_train --out seg_rt/demo/video_weights --work-dir .demo-video-train

The image trainer (``seg_rt.demo.train``) with another model and data: ``video_model.build`` (the
bundled image model plus zero-output motion modules), every weight trained (the motion modules
from zero, the image UNet and text encoder fine-tuned so that motion words reach the frames through
cross-attention). Checkpoints, resume, EMA export and ``train_config.json`` work as there; step
k's clips, captions, timesteps and noise are functions of (seed, k).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from . import video_data
from .train import TrainConfig, Trainer, caption_for
from .train import main as train_main
from .video_model import build

TRAIN_SEED_BASE = 3_000_000  # data seeds of training clips (the benchmark's real clips use others)


@dataclass(frozen=True)
class VideoTrainConfig(TrainConfig):
    steps: int = 1200
    batch: int = 6  # clips (of video_data.FRAMES frames) per step
    lr: float = 3e-4
    warmup: int = 50
    p_partial: float = 0.25
    ema_max_decay: float = 0.999
    checkpoint_every: int = 100
    frames: int = video_data.FRAMES  # per clip
    precision: str = "fp32"  # bf16 autocast is no faster for this model on CPU
    train: str = "motion"  # "motion": motion modules, cross-attention and text encoder; "all": every weight
    # motion is decided at high noise, where Min-SNR weighting of a v-prediction loss puts ~no weight
    weighting: str = "flat"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train not in ("motion", "all"):
            raise ValueError(f"train must be motion or all, got {self.train!r}")


def partial_captions(item: video_data.ClipItem) -> tuple[str, str, str]:
    color, shape, _ = item.image_item.words
    motion = video_data.motion_phrase(video_data.MOTIONS[item.motion])
    return f"{shape} {motion}", f"{color} {shape} {motion}", f"{color} {shape} on {item.background}"


def training_batch(step: int, cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    seeds = [TRAIN_SEED_BASE + (cfg.seed * cfg.steps + step) * cfg.batch + i for i in range(cfg.batch)]
    x, items = video_data.batch(seeds, frames=cfg.frames)
    rng = random.Random(f"video:{cfg.seed}:{step}")
    return x, [caption_for(item.caption, partial_captions(item), rng, cfg) for item in items]


class VideoTrainer(Trainer):
    what = "demo video model"

    def build(self):
        return build(self.cfg.seed)

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        return training_batch(step, self.cfg)

    def trainable(self) -> list[torch.nn.Parameter]:
        """``train="motion"``: the motion modules (new), the spatial cross-attention and the text
        encoder (so motion words reach the frames); the image UNet's other weights stay frozen
        (fewer weight gradients: a CPU step is dominated by the backward pass)."""
        if self.cfg.train == "all":
            return super().trainable()
        chosen = [p for n, p in self.unet.named_parameters() if "motion_modules." in n or ".attn2." in n]
        chosen += list(self.text.parameters())
        keep = {id(p) for p in chosen}
        for p in self.unet.parameters():
            p.requires_grad_(id(p) in keep)
        return chosen

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # UNetMotionModel: noisy [B, C, F, H, W]; the caption per frame (as seg-rt samples it)
        return self.unet(noisy, t, emb.repeat_interleave(noisy.shape[2], dim=0)).sample


def main(argv: list[str] | None = None) -> int:
    return train_main(
        argv, config_cls=VideoTrainConfig, trainer_cls=VideoTrainer, prog="python -m seg_rt.demo.video_train",
        doc=__doc__, work_dir=".demo-video-train",
    )  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
