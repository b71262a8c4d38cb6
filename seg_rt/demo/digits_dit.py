"""The digits DiT: an SD3-shaped transformer trained on the same MNIST digits, for the step caches.

The first-block cache (``seg_rt.step_cache.FirstBlockCache``) decides per step from how much the first
block's residual changes, and that change is a property of trained weights: on random-weight DiTs it
is 0.14-0.56 per step, far above any usable threshold (ParaAttention's 0.08 is tuned on FLUX.1). This
module trains a small ``SD3Transformer2DModel`` (diffusers' MM-DiT, 6 joint blocks) in pixel space on
the digits model's training split (``seg_rt.demo.digits``), with SD3's rectified-flow objective, so
``seg-rt bench step`` can measure the cache where it is meant to work.

- Data: the 3,500 training digits, ``[3, 16, 16]`` in [-1, 1] (``digits.to_pixels``), captions
  ``"digit k"`` or the empty caption (``p_uncond``).
- Conditioning: the bundled digits pipeline's text encoder, frozen: its last hidden states are the
  joint stream (``encoder_hidden_states``), its pooled output ``pooled_projections``.
- Objective (SD3, Esser et al. 2024, and diffusers' ``train_dreambooth_sd3.py``): ``x_s = (1 - s) x +
  s n`` with ``s`` logit-normal (``compute_density_for_timestep_sampling``), target ``n - x``, timestep
  ``1000 s``; sampled with ``FlowMatchEulerDiscreteScheduler(shift=1)`` (``scheduler()``).

    python -m seg_rt.demo.digits_dit train --out seg_rt/demo/digits_dit --work-dir .digits-dit-train

The trainer is ``seg_rt.demo.train``'s (resumable safetensors checkpoints, EMA export, step k's batch
and noise functions of (seed, k)); the folder holds ``transformer/`` (diffusers' ``save_pretrained``,
safetensors) and ``train_config.json``.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from . import digits
from .train import TrainConfig, Trainer
from .train import main as train_main

DIT_CONFIG = {
    "sample_size": digits.SIZE,
    "patch_size": 2,  # 8x8 = 64 image tokens
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": digits.TEXT_CONFIG["hidden_size"],
    "caption_projection_dim": 64,
    "pooled_projection_dim": digits.TEXT_CONFIG["projection_dim"],
    "pos_embed_max_size": 16,
}
SEG_LAYERS = ("transformer_blocks.3",)  # the bench's SEG block: the middle of the six


def weights_dir() -> Path:
    """The bundled digits DiT folder (``transformer/`` + ``train_config.json``)."""
    return Path(str(resources.files("seg_rt.demo") / "digits_dit"))


def scheduler():
    """The sampling scheduler the model was trained for: rectified flow, no shift (16x16 pixels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def load_transformer(folder: str | Path | None = None):
    """The trained transformer (eval mode, safetensors only)."""
    from diffusers import SD3Transformer2DModel

    folder = Path(folder) if folder else weights_dir()
    return SD3Transformer2DModel.from_pretrained(folder / "transformer", use_safetensors=True).eval()


def text_encoder():
    """The frozen conditioning: the bundled digits pipeline (its tokenizer and text encoder)."""
    from seg_rt.pipeline import load_pipeline

    return load_pipeline(digits.weights_dir(), "cpu")


@torch.no_grad()
def condition(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """The transformer's text inputs for ``captions``: hidden states ``[n, 16, 64]``, pooled ``[n, 64]``."""
    out = pipe.text_encoder(pipe.tokenize(captions))
    return {"encoder_hidden_states": out[0], "pooled_projections": out[1]}


@dataclass(frozen=True)
class DiTTrainConfig(TrainConfig):
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50
    p_uncond: float = 0.2
    p_partial: float = 0.0
    ema_max_decay: float = 0.999
    precision: str = "fp32"
    checkpoint_every: int = 100


class DigitsDiTTrainer(Trainer):
    what = "digits DiT"

    def __init__(self, cfg: DiTTrainConfig, work_dir: Path) -> None:
        # not Trainer.__init__: the model is a bare transformer (no pipeline, no DDPM schedule) and
        # the text encoder is frozen; the checkpoint, EMA and main loop are Trainer's
        from diffusers import SD3Transformer2DModel
        from diffusers.training_utils import EMAModel

        self.cfg, self.work_dir = cfg, work_dir
        torch.manual_seed(cfg.seed)
        self.net = SD3Transformer2DModel(**DIT_CONFIG).train()
        self.text_pipe = text_encoder()
        self.images, self.labels = digits.train_set()
        self.params = list(self.net.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMAModel(self.params, decay=cfg.ema_max_decay, use_ema_warmup=True, power=2 / 3)
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        gen = torch.Generator().manual_seed(7_000_003 * self.cfg.seed + step)
        idx = torch.randint(0, len(self.images), (self.cfg.batch,), generator=gen)
        rng = random.Random(f"digits-dit:{self.cfg.seed}:{step}")
        captions = ["" if rng.random() < self.cfg.p_uncond else digits.caption(self.labels[i]) for i in idx]
        return digits.to_pixels(self.images[idx]), captions

    def loss(self, k: int) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        x, captions = self.batch(k)
        gen = torch.Generator().manual_seed(self.cfg.seed * 10_000_019 + k)
        torch.manual_seed(self.cfg.seed * 10_000_019 + k)  # compute_density_... draws from the global RNG
        s = compute_density_for_timestep_sampling("logit_normal", len(x), logit_mean=0.0, logit_std=1.0)
        noise = torch.randn(x.shape, generator=gen)
        s4 = s.view(-1, 1, 1, 1)
        noisy = (1 - s4) * x + s4 * noise
        pred = self.net(noisy, timestep=s * 1000, **condition(self.text_pipe, captions)).sample
        return F.mse_loss(pred, noise - x)

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.net,)

    def save(self, folder: Path) -> None:
        self.net.save_pretrained(folder / "transformer", safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    what, rest = (argv[0], argv[1:]) if argv else ("", [])
    if what == "train":
        return train_main(
            rest, config_cls=DiTTrainConfig, trainer_cls=DigitsDiTTrainer,
            prog="python -m seg_rt.demo.digits_dit train", doc=__doc__, work_dir=".digits-dit-train",
        )  # fmt: skip
    print(f"error: unknown command {what!r}; use train", file=sys.stderr)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
