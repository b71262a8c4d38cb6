"""The Ray worker: loads the model once, turns micro-batches of items into PNG bytes.

Kept Ray-free (the driver wraps it with ``ray.remote``) so it runs and tests in-process too.
Outputs are returned as bytes and written by the driver, which owns the output folder.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence

import torch

from seg_rt.images import params_text, png_bytes
from seg_rt.pipeline import generate_batch, load_pipeline

from .spec import Item, JobSpec

logger = logging.getLogger(__name__)

# Test hook: crash (os._exit) on the Nth micro-batch if the marker file does not exist yet,
# creating it first, so the restarted worker does not crash again.
FAULT_FILE_ENV = "SEG_RT_FAULT_FILE"
FAULT_AFTER_ENV = "SEG_RT_FAULT_AFTER"


class SEGWorker:
    """One per GPU (or CPU slot). ``run(items)`` → one result dict per item, in order."""

    def __init__(self, spec: dict, worker_id: str) -> None:
        self.spec = JobSpec.model_validate(spec)
        self.worker_id = worker_id
        # Thread count from the worker's resources only (never from the worker count), so every
        # worker computes bit-identical results for the same item.
        torch.set_num_threads(max(1, int(self.spec.resources_per_worker.num_cpus)))
        device = (
            "cuda" if self.spec.resources_per_worker.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        )
        t0 = time.perf_counter()
        self.pipe = load_pipeline(self.spec.model, device)
        self.engine = None
        if self.spec.engine != "torch":
            from seg_rt.engines import load_engine

            self.engine = load_engine(self.spec.engine, self.pipe, device)
        self.load_seconds = time.perf_counter() - t0
        self.batches = 0

    def close(self) -> None:
        """Close the engine loaded for this worker (its process ending frees it too)."""
        if self.engine is not None:
            self.engine.close()

    def ready(self) -> dict:
        return {"worker": self.worker_id, "pid": os.getpid(), "load_seconds": self.load_seconds}

    def _maybe_crash(self) -> None:
        marker, after = os.environ.get(FAULT_FILE_ENV), os.environ.get(FAULT_AFTER_ENV)
        if marker and after and self.batches == int(after) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    def _generate_video(self, item: Item) -> bytes:
        """One video item → H.264 mp4 bytes (spec.video: frames, fps, mode, σ_time)."""
        from seg_rt.video.io import mp4_bytes
        from seg_rt.video.sampling import generate_video

        v, seg = self.spec.video, item.seg
        frames = generate_video(
            self.pipe, item.prompt, negative_prompt=item.negative_prompt, frames=v.frames, height=self.spec.height,
            width=self.spec.width, steps=item.steps, cfg=item.cfg, seg_scale=seg["scale"], seg_mode=v.mode,
            seg_sigma=math.inf if seg["sigma"] == "inf" else float(seg["sigma"]), seg_sigma_time=v.sigma_time,
            seg_start=seg["start"], seg_end=seg["end"], seed=item.seed, scheduler=self.spec.scheduler,
        )[0]  # fmt: skip
        return mp4_bytes(frames, fps=v.fps)

    def _generate(self, items: Sequence[Item]) -> list:
        seg = items[0].seg
        sigma = math.inf if seg["sigma"] == "inf" else float(seg["sigma"])
        return generate_batch(
            self.pipe, [i.prompt for i in items], [i.seed for i in items],
            negative_prompts=[i.negative_prompt for i in items], steps=items[0].steps, cfg=items[0].cfg,
            seg_scale=seg["scale"], seg_sigma=sigma, seg_layers=seg["layers"], seg_start=seg["start"],
            seg_end=seg["end"], height=self.spec.height, width=self.spec.width,
            scheduler=self.spec.scheduler, engine=self.engine,
        )  # fmt: skip

    @staticmethod
    def _groups(items: Sequence[Item], fused: bool) -> list[list[Item]]:
        """fused: runs of items sharing cfg / steps / SEG settings go through one sampling run."""
        if not fused:
            return [[i] for i in items]
        groups: list[list[Item]] = []
        for item in items:
            if groups and (item.cfg, item.steps, item.seg) == (
                groups[-1][0].cfg,
                groups[-1][0].steps,
                groups[-1][0].seg,
            ):
                groups[-1].append(item)
            else:
                groups.append([item])
        return groups

    def _outputs(self, group: list[Item]) -> tuple[str, list[bytes]]:
        """One sampling run → ("mp4", [video bytes]) or ("png", [image bytes]) for the group's items."""
        if self.spec.video is not None:
            return "mp4", [self._generate_video(group[0])]
        images = self._generate(group)
        return "png", [
            png_bytes(im, params_text(self.spec.model, it.params()))
            for im, it in zip(images, group, strict=True)
        ]

    def run(self, items: Sequence[Item]) -> list[dict]:
        t_batch = time.perf_counter()
        self.batches += 1
        self._maybe_crash()
        fused = self.spec.batch_mode == "fused" and self.spec.video is None  # videos: one per run
        results = []
        for group in self._groups(items, fused):
            t0 = time.perf_counter()
            try:
                kind, outputs = self._outputs(group)
            except Exception as exc:  # reported per item; the driver retries or records it
                err = f"{type(exc).__name__}: {exc}"
                results += [{"item": i.id, "error": err, "worker": self.worker_id} for i in group]
                continue
            seconds = (time.perf_counter() - t0) / len(group)
            for item, data in zip(group, outputs, strict=True):
                results.append({"item": item.id, kind: data, "seconds": seconds, "worker": self.worker_id})
        if results:
            results[0]["batch_seconds"] = time.perf_counter() - t_batch
        return results
