"""The Ray worker: loads the model once, turns micro-batches of items into PNG bytes.

Kept Ray-free (the driver wraps it with ``ray.remote``) so it runs and tests in-process too.
Outputs are returned as bytes and written by the driver, which owns the output folder.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from itertools import groupby

import torch

from seg_rt.errors import allocation_failure
from seg_rt.images import params_text, png_bytes
from seg_rt.memory import check_memory
from seg_rt.models import open_model
from seg_rt.params import check_size
from seg_rt.pipeline import run_params

from .spec import Item, JobSpec

logger = logging.getLogger(__name__)


class SEGWorker:
    """One per GPU (or CPU slot). ``run(items)`` → one result dict per item, in order."""

    def __init__(self, spec: dict, worker_id: str) -> None:
        self.spec = JobSpec.model_validate(spec)
        self.worker_id = worker_id
        # Thread count from the worker's resources only (never from the worker count), so every
        # worker computes bit-identical results for the same item.
        threads = max(1, int(self.spec.resources_per_worker.num_cpus))
        device = (
            "cuda" if self.spec.resources_per_worker.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        )
        if self.spec.video is not None:  # the output's writer (PyAV) before the model loads
            from seg_rt.video.io import check_writer

            check_writer("item.mp4")
        t0 = time.perf_counter()
        # a URL: fetched once per node; the engine loaded once and used by every batch
        self.model = open_model(
            self.spec.model, self.spec.engine, device, threads, model_config=self.spec.single_file_config
        )
        self.pipe, self.engine = self.model.pipe, self.model.engine
        try:
            # a hub model's scale factor is known only now (a local folder's was checked with the
            # spec); so is whether it takes a distilled guidance value
            family = self.model.family
            check_size(self.spec.height, self.spec.width, family.size_factor(self.pipe))
            family.check_request(self.pipe, self.spec.base_params())
            if self.spec.video is None:  # a batch's memory, before any item samples (seg_rt/memory.py)
                height, width = family.size(self.pipe, self.spec.height, self.spec.width)
                check_memory(self.pipe, family, self.spec.batch_size, height, width)
        except BaseException:
            self.model.close()
            raise
        self.load_seconds = time.perf_counter() - t0
        self.batches = 0

    def close(self) -> None:
        """Close the engine loaded for this worker (its process ending frees it too)."""
        self.model.close()

    def ready(self) -> dict:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "load_seconds": self.load_seconds,
            "node": _ray_node(),
        }

    def _generate_video(self, item: Item) -> bytes:
        """One video item → H.264 mp4 bytes (its ``params.video``: frames, fps, mode, σ_time, layers)."""
        from seg_rt.video.io import mp4_bytes
        from seg_rt.video.sampling import generate_video

        frames = generate_video(self.pipe, params=item.params)[0]
        return mp4_bytes(frames, fps=item.params.video.fps)

    def _generate(self, items: Sequence[Item]) -> list:
        return run_params(self.pipe, [i.params for i in items], engine=self.engine)

    @staticmethod
    def _groups(items: Sequence[Item], fused: bool) -> list[list[Item]]:
        """fused: runs of items with equal ``params.batch_key()`` go through one sampling run."""
        if not fused:
            return [[i] for i in items]
        return [list(run) for _, run in groupby(items, key=lambda i: i.params.batch_key())]

    def _outputs(self, group: list[Item]) -> tuple[str, list[bytes]]:
        """One sampling run → ("mp4", [video bytes]) or ("png", [image bytes]) for the group's items."""
        if self.spec.video is not None:
            return "mp4", [self._generate_video(group[0])]
        images = self._generate(group)
        return "png", [
            png_bytes(im, params_text(self.spec.model, it.params.to_record()))
            for im, it in zip(images, group, strict=True)
        ]

    def run(self, items: Sequence[Item]) -> list[dict]:
        t_batch = time.perf_counter()
        self.batches += 1
        fused = self.spec.batch_mode == "fused" and self.spec.video is None  # videos: one per run
        results = []
        for group in self._groups(items, fused):
            t0 = time.perf_counter()
            try:
                kind, outputs = self._outputs(group)
            except Exception as exc:  # reported per item; the driver retries or records it
                err = allocation_failure(exc) or f"{type(exc).__name__}: {exc}"  # out of memory: one line
                results += [{"item": i.id, "error": err, "worker": self.worker_id} for i in group]
                continue
            seconds = (time.perf_counter() - t0) / len(group)
            for item, data in zip(group, outputs, strict=True):
                results.append({"item": item.id, kind: data, "seconds": seconds, "worker": self.worker_id})
        if results:
            results[0]["batch_seconds"] = time.perf_counter() - t_batch
        return results


def _ray_node() -> str | None:
    """The Ray node this worker runs on (the driver's restart summary names it); None outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()
