"""The demo trainers' learning-rate schedule (``seg_rt.demo.train.lr_at``): equal to its formula at
every step of both shipped configs, and how it relates to transformers' cosine schedule (the
reason it is not replaced by it: the warm-up differs, and the shipped models were trained with it)."""

import itertools
import math

import pytest
import torch

from seg_rt.demo.train import TrainConfig, lr_at
from seg_rt.demo.video_train import VideoTrainConfig

CONFIGS = [TrainConfig(), VideoTrainConfig(), TrainConfig(steps=30, warmup=7, lr=1e-3, min_lr_frac=0.25)]


def formula(k: int, lr: float, warmup: int, steps: int, floor: float) -> float:
    if k < warmup:
        return lr * (k + 1) / warmup
    progress = (k - warmup) / max(1, steps - warmup)  # 0 -> 1 over the decay
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (floor + (1 - floor) * cosine)


def transformers_lrs(cfg) -> list[float]:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, cfg.warmup, cfg.steps, min_lr_rate=cfg.min_lr_frac
    )
    out = []
    for _ in range(cfg.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=["image", "video", "small"])
def test_schedule_is_its_formula_and_transformers_after_warmup(cfg):
    ours = [lr_at(k, cfg) for k in range(cfg.steps)]
    assert ours == [formula(k, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_frac) for k in range(cfg.steps)]
    assert ours[cfg.warmup - 1] == pytest.approx(cfg.lr, rel=1e-12)
    decay = ours[cfg.warmup - 1 :]
    assert all(a >= b for a, b in itertools.pairwise(decay)) and decay[-1] >= cfg.lr * cfg.min_lr_frac
    theirs = transformers_lrs(cfg)
    assert ours[cfg.warmup :] == theirs[cfg.warmup :]  # the cosine part: bit for bit
    # the warm-up: transformers' starts at 0 (step / warmup), ours one step ahead ((step + 1) / warmup)
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(cfg.lr / cfg.warmup, rel=1e-12)
    for k in range(cfg.warmup - 1):
        assert ours[k] == pytest.approx(theirs[k + 1], rel=1e-12)
