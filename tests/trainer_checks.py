"""A check shared by the trainers' tests (``seg_rt.demo.train.Trainer`` and its subclasses)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def assert_resumes_exactly(make, cfg, tmp_path):
    """``make(cfg, work_dir)`` trained ``cfg.steps`` steps straight and with a checkpoint / resume after
    step 2 leaves bit-identical checkpoints, which differ from a fresh trainer's weights. Returns the
    resumed trainer."""
    straight = make(cfg, tmp_path / "a")
    while straight.step < cfg.steps:
        straight.train_step()
    straight.save_checkpoint()
    first = make(cfg, tmp_path / "b")
    first.train_step(), first.train_step()
    first.save_checkpoint()
    resumed = make(cfg, tmp_path / "b")
    assert resumed.load_checkpoint() and resumed.step == 2
    while resumed.step < cfg.steps:
        resumed.train_step()
    resumed.save_checkpoint()
    a = load_file(tmp_path / "a/checkpoint/state.safetensors")
    b = load_file(tmp_path / "b/checkpoint/state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = make(cfg, tmp_path / "c").params
    assert any(not torch.equal(a[f"param.{i}"], p.detach()) for i, p in enumerate(fresh))
    return resumed
