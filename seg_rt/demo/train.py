"""Train the demo model on procedural data (``seg_rt.demo.data``); resumable.

    python -m seg_rt.demo.train --out seg_rt/demo/weights --work-dir .demo-train

Every ``--checkpoint-every`` steps the full training state (weights, EMA, AdamW moments, step) is
written atomically to ``WORK_DIR/checkpoint`` as safetensors + JSON; rerunning the same command
continues from there. At the end the EMA weights are saved as a diffusers pipeline folder in
``OUT`` (safetensors) with ``train_config.json`` (the config and the command line).
Step k's batch, captions, timesteps and noise are functions of (seed, k), so a resumed run sees
the data an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from seg_rt.artifacts import check_out_dir, staged_dir

from . import data
from .model import build

logger = logging.getLogger("seg_rt.demo.train")

TRAIN_SEED_BASE = 1_000_000  # data seeds of training images (the benchmark's real set uses others)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2800
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    min_lr_frac: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.01
    snr_gamma: float = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023)
    # "min-snr": Min-SNR-γ (little weight on high-noise steps: for v-prediction it falls as SNR there);
    # "flat": every timestep weight 1 in the prediction's own space (v-MSE for v-prediction)
    weighting: str = "min-snr"
    p_uncond: float = 0.1  # empty caption (so CFG has an unconditional model)
    p_partial: float = 0.2  # a caption naming only some attributes
    ema_max_decay: float = 0.9995
    precision: str = "bf16"  # autocast dtype of forward/backward on CPU ("fp32" to disable)
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.weighting not in ("min-snr", "flat"):
            raise ValueError(f"weighting must be min-snr or flat, got {self.weighting!r}")
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def caption_for(caption: str, partial: Sequence[str], rng: random.Random, cfg: TrainConfig) -> str:
    """The full ``caption``, or (``p_partial``) one of the ``partial`` ones naming only some
    attributes, or (``p_uncond``) none: the training captions of both demo models."""
    r = rng.random()
    if r < cfg.p_uncond:
        return ""
    if r < cfg.p_uncond + cfg.p_partial:
        return rng.choice(partial)
    return caption


def partial_captions(item: data.Item) -> tuple[str, str, str]:
    color, shape, texture = item.words
    return shape, f"{color} {shape}", f"{shape} on {texture}"


def training_batch(step: int, cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    seeds = [TRAIN_SEED_BASE + (cfg.seed * cfg.steps + step) * cfg.batch + i for i in range(cfg.batch)]
    x, items = data.batch(seeds)
    rng = random.Random(f"{cfg.seed}:{step}")
    return x, [caption_for(item.caption, partial_captions(item), rng, cfg) for item in items]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based ``step``: linear warm-up to ``lr`` over ``warmup`` steps, then cosine
    decay to ``min_lr_frac * lr`` at ``steps``.

    After warm-up this is transformers' ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=
    min_lr_frac)`` bit for bit; its warm-up is ``step / warmup`` (0 at step 0: a first step that
    learns nothing), ours ``(step + 1) / warmup``, and the shipped demo models were trained with
    ours, so it stays a pure function of the step (which also needs no scheduler state in the
    checkpoint). Both facts are tested (tests/test_demo_schedule.py)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def is_trained_folder(folder: Path) -> bool:
    """A folder this trainer wrote: ``model_index.json`` (or ``transformer/``) plus its ``train_config.json``."""
    info = _read_json(folder / "train_config.json")
    return (
        info is not None
        and {"config", "command", "steps_done"} <= set(info)
        # a pipeline folder, or a bare transformer's (seg_rt.demo.digits_dit)
        and ((folder / "model_index.json").is_file() or (folder / "transformer" / "config.json").is_file())
    )


def _is_checkpoint(folder: Path) -> bool:
    meta = _read_json(folder / "state.json")
    return meta is not None and {"step", "ema_step", "config"} <= set(meta)


def checkpoint_dir(work_dir: Path) -> Path:
    return work_dir / "checkpoint"


def checkpoint_meta(work_dir: Path, cfg: TrainConfig) -> dict | None:
    """The metadata of the checkpoint in ``work_dir`` (None when there is none); a ``ValueError`` when
    it was made with another config (read before any model is built)."""
    ckpt = checkpoint_dir(work_dir)
    if not (ckpt / "state.json").is_file():
        return None
    meta = json.loads((ckpt / "state.json").read_text())
    if meta["config"] != dataclasses.asdict(cfg):
        raise ValueError(
            f"checkpoint in {ckpt} was made with another config ({meta['config']}); "
            "use the same options or another --work-dir"
        )
    return meta


class Trainer:
    """Trains ``build``'s pipeline on ``batch``'s data; subclasses (``video_train``) change both."""

    what = "demo model"  # for messages

    def __init__(self, cfg: TrainConfig, work_dir: Path) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.cfg, self.work_dir = cfg, work_dir
        self.pipe = self.build()
        self.unet, self.text = self.pipe.unet.train(), self.pipe.text_encoder.train()
        self.params = self.trainable()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMAModel(self.params, decay=cfg.ema_max_decay, use_ema_warmup=True, power=2 / 3)
        self.noise_sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.step = 0

    def build(self):
        return build(self.cfg.seed)

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters trained (and checkpointed, in this order): every UNet and text weight."""
        return [p for m in (self.unet, self.text) for p in m.parameters()]

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        return training_batch(step, self.cfg)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, emb).sample

    # -- checkpoints: safetensors for tensors, JSON for the rest (nothing is unpickled) --------
    @property
    def ckpt(self) -> Path:
        return checkpoint_dir(self.work_dir)

    def save_checkpoint(self) -> None:
        opt_state = self.opt.state_dict()
        tensors = {f"param.{i}": p.detach().contiguous() for i, p in enumerate(self.params)}
        tensors |= {f"ema.{i}": p.contiguous() for i, p in enumerate(self.ema.shadow_params)}
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v.reshape(-1) if v.ndim == 0 else v.contiguous()
        meta = {
            "step": self.step,
            "ema_step": self.ema.optimization_step,
            "config": dataclasses.asdict(self.cfg),
        }
        with staged_dir(self.ckpt, _is_checkpoint, overwrite=True, what="trainer checkpoint") as tmp:
            save_file(tensors, tmp / "state.safetensors")
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))

    def load_checkpoint(self) -> bool:
        meta = checkpoint_meta(self.work_dir, self.cfg)
        if meta is None:
            return False
        tensors = load_file(self.ckpt / "state.safetensors")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
            for i, p in enumerate(self.ema.shadow_params):
                p.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = meta["ema_step"]
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
        opt_state = self.opt.state_dict()
        opt_state["state"] = state
        self.opt.load_state_dict(opt_state)
        self.step = meta["step"]
        return True

    # -- training -------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimiser step on ``loss`` (gradient clipping at 1, EMA update); the step's loss."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        loss = self.loss(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.ema.step(self.params)
        self.step += 1
        return loss.item()

    def loss(self, k: int) -> torch.Tensor:
        """Step ``k``'s loss: its batch, timesteps and noise are functions of (seed, k)."""
        from diffusers.training_utils import compute_snr

        cfg = self.cfg
        x, captions = self.batch(k)
        gen = torch.Generator().manual_seed(cfg.seed * 10_000_019 + k)
        t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (len(x),), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        noisy = self.noise_sched.add_noise(x, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            emb = self.text(self.pipe.tokenize(captions))[0]
            pred = self.denoise(noisy, t, emb)
        snr = compute_snr(self.noise_sched, t)
        if self.noise_sched.config.prediction_type == "v_prediction":
            target, weight = (
                self.noise_sched.get_velocity(x, noise, t),
                torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1),
            )
        else:
            target, weight = noise, torch.clamp(snr, max=cfg.snr_gamma) / snr
        if cfg.weighting == "flat":
            weight = torch.ones_like(weight)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return (per_sample * weight).mean()

    def modules(self) -> tuple[torch.nn.Module, ...]:
        """The trained modules (eval mode while exporting)."""
        return self.unet, self.text

    def save(self, folder: Path) -> None:
        """Write the model (EMA weights in place) into ``folder``: a diffusers pipeline folder."""
        self.pipe.save_pretrained(folder, safe_serialization=True)

    def export(self, out: Path, command: str, overwrite: bool = False, keep_training: bool = False) -> None:
        """Save the EMA weights (``save``) with ``train_config.json``, atomically; an existing ``out``
        is replaced only with ``overwrite`` and only if this trainer wrote it.
        ``keep_training``: put the training weights back afterwards (a snapshot mid-run)."""
        if keep_training:
            self.ema.store(self.params)
        self.ema.copy_to(self.params)
        for m in self.modules():
            m.eval()
        try:
            with staged_dir(out, is_trained_folder, overwrite=overwrite, what=self.what) as tmp:
                self.save(tmp)
                info = {"config": dataclasses.asdict(self.cfg), "command": command, "steps_done": self.step}
                (tmp / "train_config.json").write_text(json.dumps(info, indent=1) + "\n")
        finally:
            if keep_training:
                self.ema.restore(self.params)
                for m in self.modules():
                    m.train()


def main(
    argv: list[str] | None = None,
    *,
    config_cls=TrainConfig,
    trainer_cls=Trainer,
    prog: str = "python -m seg_rt.demo.train",
    doc: str = __doc__,
    work_dir: str = ".demo-train",
) -> int:
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="pipeline folder to write (EMA weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out written by this trainer")
    p.add_argument("--work-dir", type=Path, default=Path(work_dir), help="checkpoint folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--stop-now",
        action="store_true",
        help="train no further: export the checkpoint's EMA weights (steps_done records its step)",
    )
    p.add_argument("--weak-step", type=int, default=0, help="also export the EMA weights at this step ...")
    p.add_argument(
        "--weak-out", type=Path, default=None, help="... to this folder (an early, weak checkpoint)"
    )
    for f in dataclasses.fields(config_cls):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if (args.weak_out is None) != (args.weak_step == 0) or not 0 <= args.weak_step < cfg.steps:
            raise ValueError(
                f"--weak-step (got {args.weak_step}) and --weak-out go together, 0 < step < --steps {cfg.steps}"
            )
        check_out_dir(args.out, is_trained_folder, overwrite=args.overwrite, what=trainer_cls.what)
        # a weak checkpoint already written (a resumed run) is kept as it is
        weak_due = args.weak_out is not None and not is_trained_folder(args.weak_out)
        if weak_due:
            check_out_dir(args.weak_out, is_trained_folder, overwrite=args.overwrite, what=trainer_cls.what)
        if checkpoint_meta(args.work_dir, cfg) is None and args.stop_now:
            raise ValueError(f"--stop-now needs a checkpoint in {checkpoint_dir(args.work_dir)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    trainer = trainer_cls(cfg, args.work_dir)
    if trainer.load_checkpoint():
        logger.info("resumed from %s at step %d", trainer.ckpt, trainer.step)
    command = prog + " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if weak_due and trainer.step > args.weak_step:
        print(f"error: resumed at step {trainer.step}, past --weak-step {args.weak_step}", file=sys.stderr)
        return 2
    start, losses = time.time(), []
    while trainer.step < cfg.steps and not args.stop_now:
        losses.append(trainer.train_step())
        if trainer.step % 50 == 0:
            rate = (time.time() - start) / len(losses)
            logger.info(
                "step %d/%d loss %.4f (%.2f s/step)",
                trainer.step,
                cfg.steps,
                sum(losses[-50:]) / len(losses[-50:]),
                rate,
            )
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            trainer.save_checkpoint()
        if weak_due and trainer.step == args.weak_step:
            trainer.export(args.weak_out, command, overwrite=args.overwrite, keep_training=True)
            logger.info("wrote the weak checkpoint %s (%d steps)", args.weak_out, trainer.step)
    trainer.export(args.out, command, overwrite=args.overwrite)
    logger.info("wrote %s (%d steps)", args.out, trainer.step)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
