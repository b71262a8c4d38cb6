"""``seg-rt bench step``'s video-engine row: the SEG step cost of a video DiT export (``seg_rt.video.export``)
on ONNX Runtime CPU, with and without the in-graph fork, as ratios to a CFG step, in one process.

The model is a Wan-shaped random-weight transformer (8 blocks, 4 heads x 32) in the tiny Wan pipeline
(its text encoder and VAE), 9 frames at 256x256 (3 x 16 x 16 = 768 video tokens), SEG spatio-temporal
on the middle block. The CFG step is the unforked no-CFG export (two rows) fed ``[uncond, cond]``
unperturbed (the blur's MatMuls masked out), as ``bench gpu`` does for its engines (an export with CFG
would pad a CFG step to its three rows); the PyTorch path's shared-prefix ratio (``VideoDenoiser``) is measured beside it.
"""

from __future__ import annotations

import math
import platform
import tempfile
from pathlib import Path

import torch

from seg_rt.bench.timing import alternating_ratio
from seg_rt.sampler import build_batch

WAN_SHAPED = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
    "freq_dim": 64,
    "ffn_dim": 512,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
FRAMES, SIZE = 9, 256


def wan_shaped_pipeline(seed: int = 0, num_layers: int = WAN_SHAPED["num_layers"]):
    """The tiny Wan pipeline with the bench's Wan-shaped transformer (random weights, seeded)."""
    from diffusers import WanTransformer3DModel

    from seg_rt.tiny import tiny_video_pipeline

    pipe = tiny_video_pipeline("wan", seed)
    torch.manual_seed(seed)
    text_dim = pipe.transformer.config.text_dim
    config = WAN_SHAPED | {"num_layers": num_layers, "text_dim": text_dim}
    pipe.transformer = WanTransformer3DModel(**config).eval()
    return pipe


def bench_video_step_onnx(
    pairs: int = 5,
    threads: int | None = None,
    frames: int = FRAMES,
    size: int = SIZE,
    num_layers: int = WAN_SHAPED["num_layers"],
) -> dict:
    """One row: CFG+SEG on the unforked and the fork export, a CFG step on the fork engine (its twin),
    SEG without CFG forked, each over the CFG step; and the PyTorch shared-prefix CFG+SEG / CFG. SEG
    on the middle block (``blocks.{num_layers // 2}``)."""
    from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
    from seg_rt.params import request_from_fields
    from seg_rt.pipeline import seed_generators

    from .attention import VideoBlur
    from .export import export_video_onnx
    from .families import video_family_of
    from .sampling import VideoDenoiser

    pipe = wan_shaped_pipeline(num_layers=num_layers)
    layers = (f"blocks.{num_layers // 2}",)
    family = video_family_of(pipe)
    request = request_from_fields(
        {"prompt": "bench", "frames": frames, "height": size, "width": size, "cfg": 5.0}, "video"
    )
    latent = family.latent_frames(pipe, frames)
    with torch.no_grad():
        prepared = family.encode(pipe, request, 1)
    sched = family.schedule(pipe, None, 2, frames=latent, height=size, width=size)
    x = family.initial_latents(
        pipe, sched, seed_generators([0]), frames=latent, height=size, width=size, dtype=torch.float32
    )
    t = sched.timesteps[0]
    batch = {
        names: build_batch(list(names), x, t, prepared.cond, prepared.uncond)
        for names in (("uncond", "cond"), ("uncond", "cond", "seg"), ("cond", "seg"))
    }
    common = {"frames": frames, "height": size, "width": size, "sigma": math.inf, "layers": layers}
    row = {
        "bench": "step",
        "engine": "onnxruntime-cpu",
        "model": f"Wan-shaped video DiT, random weights ({num_layers} blocks, 4 heads x 32), {frames} frames {size}x{size}",
        "layers": list(layers),
        "seg_mode": "spatiotemporal",
        "pairs": pairs,
        "baseline": "unforked no-CFG video export, [uncond, cond] unperturbed",
    }
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        engines = {}
        try:
            for key, kw in {
                "plain": {"fork": False},
                "plain_no_cfg": {"fork": False, "with_cfg": False},  # 2 rows: the CFG step's graph
                "fork": {"fork": True},
                "fork_no_cfg": {"fork": True, "with_cfg": False},
            }.items():
                export_video_onnx(pipe, Path(tmp) / key, **common, **kw)
                engines[key] = OnnxRuntimeDenoiser(Path(tmp) / key, threads=threads)
            cfg = lambda: engines["plain_no_cfg"](batch[("uncond", "cond")])  # noqa: E731
            modes = {
                "cfg_seg": ("plain", ("uncond", "cond", "seg")),
                "cfg_seg_fork": ("fork", ("uncond", "cond", "seg")),
                "cfg_on_fork_engine": ("fork", ("uncond", "cond")),
                "seg_no_cfg_fork": ("fork_no_cfg", ("cond", "seg")),
            }
            for mode, (key, rows) in modes.items():
                r = alternating_ratio(cfg, lambda e=engines[key], i=batch[rows]: e(i), pairs, calls=1)
                row[f"{mode}_over_cfg"] = r["ratio_median"]
                row[f"{mode}_over_cfg_iqr"] = [r["ratio_p25"], r["ratio_p75"]]
                row["cfg_step_ms"] = r["baseline_ms_median"]
            row["fork_block"] = engines["fork"].info.fork_block
        finally:
            for engine in engines.values():
                engine.close()
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        shared = family.shared_inputs(pipe, frames=latent, height=size, width=size)
        den = VideoDenoiser(
            pipe.transformer, VideoBlur("spatiotemporal", math.inf), layers, shared, shared_prefix=True
        )
        try:
            r = alternating_ratio(
                lambda: den(batch[("uncond", "cond")]),
                lambda: den(batch[("uncond", "cond", "seg")]),
                pairs,
                calls=1,
            )
        finally:
            den.close()
            torch.set_num_threads(before)
    import onnxruntime

    return row | {
        "torch_cfg_seg_shared_over_cfg": r["ratio_median"],
        "torch_cfg_seg_shared_over_cfg_iqr": [r["ratio_p25"], r["ratio_p75"]],
        "torch_cfg_step_ms": r["baseline_ms_median"],
        "ort_threads": threads or "default",
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
