"""A small CNN trained on the demo model's data generator: labels and features for ``bench quality``.

It predicts a procedural image's shape, colour and texture; its 128-d pooled features are the
space the quality benchmark measures FID, precision / recall and distances in (the role
Inception-v3 plays for ImageNet-like data, which does not fit 32x32 synthetic shapes).

    python -m seg_rt.demo.classifier --out seg_rt/demo/classifier
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from seg_rt.artifacts import staged_dir

from . import data

logger = logging.getLogger("seg_rt.demo.classifier")

CLASSIFIER_SEED_BASE = 20_000_000  # training images; validation uses the next range
VAL_SEED_BASE = 30_000_000
HEADS = {"shape": len(data.SHAPES), "color": len(data.COLORS), "texture": len(data.TEXTURES)}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )  # fmt: skip


class Classifier(nn.Module):
    """3 conv stages (32x32 → 16x16 → 8x8) → global average pool → ``features`` (128-d) → 3 heads."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), heads: dict[str, int] | None = None) -> None:
        super().__init__()
        stages, cin = [], 3
        for i, w in enumerate(widths):
            stages.append(_block(cin, w))
            if i < len(widths) - 1:
                stages.append(nn.AvgPool2d(2))
            cin = w
        self.body = nn.Sequential(*stages)
        heads = HEADS if heads is None else heads  # another data set's labels (seg_rt.demo.digits)
        self.heads = nn.ModuleDict({name: nn.Linear(cin, n) for name, n in heads.items()})
        self.widths = tuple(widths)

    def features(self, x: Tensor) -> Tensor:
        """``x``: images ``[B, 3, 32, 32]`` in [-1, 1] → ``[B, 128]``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


def classifier_dir() -> Path:
    return Path(str(resources.files("seg_rt.demo") / "classifier"))


def load_classifier(path: str | Path | None = None) -> Classifier:
    """The shipped classifier (or one in ``path``), in eval mode; safetensors only."""
    path = Path(path) if path is not None else classifier_dir()
    cfg_path, weights = path / "config.json", path / "model.safetensors"
    if not weights.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"no classifier in {str(path)!r} (need config.json and model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    model = Classifier(tuple(cfg["widths"]), {name: len(labels) for name, labels in cfg["heads"].items()})
    model.load_state_dict(load_file(weights))
    return model.eval()


def _labels(items: list[data.Item]) -> dict[str, Tensor]:
    return {
        "shape": torch.tensor([i.shape for i in items]),
        "color": torch.tensor([i.color for i in items]),
        "texture": torch.tensor([i.texture for i in items]),
    }


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Small blur / noise, so features are not thrown by a generator's softer or grainier pixels."""
    n = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    blurred = F.conv2d(
        F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 3, 3), groups=3
    )
    amount = torch.rand(n, 1, 1, 1, generator=gen)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.3, x + amount * (blurred - x), x)
    return x + torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(n, 1, 1, 1, generator=gen)


@torch.no_grad()
def evaluate(model: Classifier, n: int = 2048) -> dict[str, float]:
    x, items = data.batch(range(VAL_SEED_BASE, VAL_SEED_BASE + n))
    out, labels = model(x), _labels(items)
    return {name: float((out[name].argmax(1) == labels[name]).float().mean()) for name in HEADS}


def train(steps: int = 1000, batch: int = 128, lr: float = 2e-3, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        seeds = range(CLASSIFIER_SEED_BASE + step * batch, CLASSIFIER_SEED_BASE + (step + 1) * batch)
        x, items = data.batch(seeds)
        out, labels = model(_augment(x, gen)), _labels(items)
        loss = sum(F.cross_entropy(out[k], labels[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            logger.info(
                "step %d/%d loss %.4f (%.2f s/step)",
                step + 1,
                steps,
                loss.item(),
                (time.time() - t0) / (step + 1),
            )
    return model.eval()


def _is_classifier_folder(folder: Path) -> bool:
    """A folder this script wrote: its ``config.json`` carries the training command and heads."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and {"widths", "heads", "command"} <= set(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m seg_rt.demo.classifier", description="train the benchmark classifier"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.steps < 1 or args.batch < 1:
        print(f"error: --steps and --batch must be >= 1, got {args.steps}, {args.batch}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    model = train(args.steps, args.batch, args.lr, args.seed)
    acc = evaluate(model)
    logger.info("validation accuracy %s", acc)
    command = "python -m seg_rt.demo.classifier " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    cfg = {"widths": list(model.widths), "heads": {"shape": list(data.SHAPES), "color": list(data.COLORS),
           "texture": list(data.TEXTURES)}, "validation_accuracy": acc, "command": command,
           "train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed}}  # fmt: skip
    with staged_dir(args.out, _is_classifier_folder, overwrite=True, what="classifier") as tmp:
        save_file(model.state_dict(), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
