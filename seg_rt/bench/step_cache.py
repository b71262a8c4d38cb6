"""``seg-rt bench step``'s step-cache rows (``seg_rt.step_cache``): speed-up of a cached CFG+SEG
sampling loop over the uncached one (one process, alternating pairs), and the quality change on the
bundled demo model (distance of the cached image to the uncached one at the same seed, FID delta).

The speed rows time whole step loops (``seg_rt.sampler.sample``: CFG 5 + SEG 3, Euler), since a cache
saves on some steps only. DeepCache's saving is fixed by its schedule; the first-block cache's depends
on how much the model's first-block residual changes per step, which for random weights (the bench
models) is far more than for trained ones: its rows say what share of the rows it served.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence

import torch

from seg_rt.config import SEGConfig
from seg_rt.step_cache import DEFAULT_INTERVAL, DEFAULT_THRESHOLD, CacheConfig, RunCache

from .timing import alternating_ratio

CFG, SEG_SCALE = 5.0, 3.0


def _loop(den, make_scheduler, latents, cond, uncond, steps: int, cache: CacheConfig | None, seg: SEGConfig):
    """A callable running one sampling loop; ``.stats`` after a call: the run cache's counts."""
    from seg_rt.sampler import sample

    def call():
        sched = make_scheduler(steps)
        run = RunCache(cache) if cache is not None else None
        out = sample(
            den, sched, latents * getattr(sched, "init_noise_sigma", 1.0), cond, uncond, cfg=CFG, seg=seg, progress=False,
            cache=run,
        )  # fmt: skip
        call.stats = None if run is None else run.stats()
        return out

    return call


def _served_share(stats: dict | None) -> float:
    if not stats:
        return 0.0
    full, served = sum(stats["full"].values()), sum(stats["served"].values())
    return round(served / max(1, full + served), 4)


def bench_cache_case(
    den, model: str, make_scheduler, latents, cond, uncond, cache: CacheConfig, steps: int, pairs: int,
    seg: SEGConfig,
) -> dict:  # fmt: skip
    """One cache row: uncached vs cached loop, alternating ``pairs`` pairs, one loop per timing."""
    base = _loop(den, make_scheduler, latents, cond, uncond, steps, None, seg)
    cached = _loop(den, make_scheduler, latents, cond, uncond, steps, cache, seg)
    with torch.no_grad():
        r = alternating_ratio(base, cached, pairs, calls=1)
        ref, out = base(), cached()
    rel = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    return {
        "bench": "step_cache",
        "model": model,
        "cache": cache.mode,
        "threshold": cache.threshold if cache.mode == "fbcache" else None,
        "interval": cache.interval if cache.mode == "deepcache" else None,
        "default": cache == CacheConfig(cache.mode),
        "steps": steps,
        "rows": "cfg+seg",
        "seg_layers": list(seg.layers),
        "pairs": pairs,
        "speedup": round(1 / r["ratio_median"], 4),
        "speedup_iqr": [round(1 / r["ratio_p75"], 4), round(1 / r["ratio_p25"], 4)],
        "uncached_loop_ms": r["baseline_ms_median"],
        "served_share": _served_share(cached.stats),
        "served": cached.stats["served"],
        "latents_max_rel_diff": round(rel, 5),
    }


def _euler(config: dict | None = None):
    from diffusers import EulerDiscreteScheduler

    def make(steps: int):
        s = EulerDiscreteScheduler(**(config or {}))
        s.set_timesteps(steps)
        return s

    return make


def unet_rows(pairs: int = 3, steps: int = 12) -> list[dict]:
    """DeepCache on the SD1.5-shaped 1/5-width UNet (32x32 latents), SEG on ``mid``, interval 3."""
    from seg_rt.engines import TorchDenoiser

    from .models import sd15_shaped_pipeline, step_inputs

    unet = sd15_shaped_pipeline().unet
    x, cond, uncond = step_inputs(unet, 32)
    den = TorchDenoiser(unet, sigma=math.inf, layers=("mid",))
    seg = SEGConfig(scale=SEG_SCALE, layers=("mid",))
    try:
        return [
            bench_cache_case(
                den, "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch), 32x32 latents", _euler(), x, cond,
                uncond, CacheConfig("deepcache"), steps, pairs, seg,
            )
        ]  # fmt: skip
    finally:
        den.close()


def _changes(den, make, x, cond, uncond, steps, seg) -> list[float]:
    """The per-row relative first-block residual changes of an (almost) never-skipping run."""
    import seg_rt.step_cache as sc

    seen, original = [], sc.rel_l1
    sc.rel_l1 = lambda now, prev: seen.append(original(now, prev)) or seen[-1]
    try:
        with torch.no_grad():
            _loop(den, make, x, cond, uncond, steps, CacheConfig("fbcache", 1e-12), seg)()
    finally:
        sc.rel_l1 = original
    return sorted(seen)


def _change_spread(changes: list[float]) -> dict:
    """A row's record of the sorted per-row first-block changes: their median, and min / median / max."""
    median = round(changes[len(changes) // 2], 3)
    spread = {"min": round(changes[0], 3), "median": median, "max": round(changes[-1], 3)}
    return {"first_block_change_median": median, "first_block_change": spread}


def dit_rows(pairs: int = 3, steps: int = 12) -> list[dict]:
    """The first-block cache on a random-weight SD3-shaped DiT (12 joint blocks, 4 heads x 32,
    32x32 latents = 256 tokens), SEG on block 6: at the default threshold, and at a threshold set to
    the median per-step change this model shows (random weights change far more per step than
    trained ones; the row records that median), so about half the rows can be served."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from seg_rt.engines.dit_denoiser import DiTDenoiser
    from seg_rt.families import REGISTRY

    torch.manual_seed(0)
    net = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=12, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=64,
        pos_embed_max_size=32,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    branch = lambda: {  # noqa: E731
        "encoder_hidden_states": torch.randn(1, 77, 128, generator=g),
        "pooled_projections": torch.randn(1, 64, generator=g),
    }
    cond, uncond = branch(), branch()
    x = torch.randn(1, 4, 32, 32, generator=g)

    def make(n: int):
        s = FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(n)
        return s

    layers = ("transformer_blocks.6",)
    den = DiTDenoiser(net, REGISTRY.for_model(net), sigma=math.inf, layers=layers)
    seg = SEGConfig(scale=SEG_SCALE, layers=layers)
    name = "SD3-shaped DiT, random weights (12 joint blocks, 128 wide), 32x32 latents"
    try:
        changes = _changes(den, make, x, cond, uncond, steps, seg)
        spread = _change_spread(changes)  # 0 rows can be served at a threshold under its min
        return [
            bench_cache_case(den, name, make, x, cond, uncond, CacheConfig("fbcache", t), steps, pairs, seg)
            | spread
            for t in (DEFAULT_THRESHOLD, spread["first_block_change_median"])
        ]
    finally:
        den.close()


def _digits_dit():
    """The bundled trained digits DiT (``seg_rt.demo.digits_dit``): (transformer, text pipeline,
    scheduler factory, SEG layers)."""
    from seg_rt.demo import digits_dit

    def make(n: int):
        s = digits_dit.scheduler()
        s.set_timesteps(n)
        return s

    return digits_dit.load_transformer(), digits_dit.text_encoder(), make, digits_dit.SEG_LAYERS


DIGITS_DIT = "digits DiT, trained (SD3-shaped, 6 joint blocks, 64 wide), 16x16 pixels = 64 tokens"


def trained_dit_rows(pairs: int = 3, steps: Sequence[int] = (28, 50)) -> list[dict]:
    """The first-block cache at its default threshold on a trained DiT: the bundled digits DiT, SEG on
    its middle block, one image of "digit 3", at each of ``steps`` Euler steps (28: SD3's default; the
    fewer the steps, the more the first block changes per step). Its first-block change per step is
    what the threshold was made for (trained weights), unlike the random DiT's."""
    from seg_rt.demo.digits_dit import condition
    from seg_rt.engines.dit_denoiser import DiTDenoiser
    from seg_rt.families import REGISTRY

    net, text, make, layers = _digits_dit()
    cond, uncond = condition(text, ["digit 3"]), condition(text, [""])
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    den = DiTDenoiser(net, REGISTRY.for_model(net), sigma=math.inf, layers=layers)
    seg = SEGConfig(scale=SEG_SCALE, layers=layers)
    rows = []
    try:
        for n in steps:
            changes = _changes(den, make, x, cond, uncond, n, seg)
            row = bench_cache_case(
                den, DIGITS_DIT, make, x, cond, uncond, CacheConfig("fbcache"), n, pairs, seg
            )
            rows.append(row | _change_spread(changes))
        return rows
    finally:
        den.close()


def dit_quality_row(samples: int = 200, steps: int = 28, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The first-block cache on the trained digits DiT: per seed the distance of the cached image to
    the uncached one (mean / max |Δ| of [0, 1] pixels, PSNR), the FID change against the held-out
    digits of the same captions and the classifier accuracy (the digits classifier,
    ``seg_rt.bench.guidance.features``); CFG 5 + SEG 3 as the speed rows, all images in one batch."""
    from seg_rt.bench.metrics import fid
    from seg_rt.demo import digits
    from seg_rt.demo.digits_dit import condition
    from seg_rt.engines.dit_denoiser import DiTDenoiser
    from seg_rt.families import REGISTRY

    from .guidance import _digits_real, features

    net, text, make, layers = _digits_dit()
    real_x, labels, captions = _digits_real(samples)
    cond, uncond = condition(text, captions), condition(text, [""] * samples)
    x = torch.cat(
        [torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(samples)]
    )
    den = DiTDenoiser(net, REGISTRY.for_model(net), sigma=math.inf, layers=layers)
    seg = SEGConfig(scale=SEG_SCALE, layers=layers)
    clf = digits.load_classifier()
    try:
        with torch.no_grad():
            ref = _loop(den, make, x, cond, uncond, steps, None, seg)()
            cached_loop = _loop(den, make, x, cond, uncond, steps, CacheConfig("fbcache", threshold), seg)
            cached = cached_loop()
    finally:
        den.close()
    ref, cached = ref.clamp(-1, 1), cached.clamp(-1, 1)
    to01 = lambda t: (t + 1) / 2  # noqa: E731
    d = (to01(cached) - to01(ref)).abs()
    mse = (to01(cached) - to01(ref)).pow(2).flatten(1).mean(1)
    real = features(clf, real_x, "digit", labels)
    f_ref, f_cached = features(clf, ref, "digit", labels), features(clf, cached, "digit", labels)
    return {
        "bench": "step_cache_quality",
        "model": "digits-dit",
        "cache": "fbcache",
        "threshold": threshold,
        "samples": samples,
        "steps": steps,
        "cfg": CFG,
        "seg_scale": SEG_SCALE,
        "served_share": _served_share(cached_loop.stats),
        "mean_abs_diff": round(float(d.mean()), 5),
        "max_abs_diff": round(float(d.max()), 5),
        "psnr_db_median": round(float((10 * torch.log10(1 / mse.clamp(min=1e-12))).median()), 2),
        "seed_to_seed_mean_abs_diff": round(float((to01(ref[1:]) - to01(ref[:-1])).abs().mean()), 5),
        "fid_uncached": round(fid(real["features"], f_ref["features"]), 3),
        "fid_cached": round(fid(real["features"], f_cached["features"]), 3),
        "accuracy_uncached": round(float(f_ref["correct"].mean()), 4),
        "accuracy_cached": round(float(f_cached["correct"].mean()), 4),
    }


def quality_row(samples: int = 16, steps: int = 12, interval: int = DEFAULT_INTERVAL) -> dict:
    """DeepCache on the bundled demo model: per seed, the distance of the cached image to the uncached
    one (mean / max |Δ| of [0, 1] pixels, PSNR), and the FID change against real images of the same
    captions (the demo classifier's features, ``seg_rt.bench.quality``); the distance between two
    seeds' uncached images gives the scale."""
    from seg_rt.bench.metrics import fid
    from seg_rt.demo import data
    from seg_rt.demo.classifier import load_classifier
    from seg_rt.demo.model import weights_dir
    from seg_rt.params import GenerationParams
    from seg_rt.pipeline import load_pipeline, run_params

    from .quality import BENCH_SEED_BASE, describe_set

    pipe = load_pipeline(weights_dir(), "cpu")
    clf = load_classifier()
    real_x, items = data.batch([BENCH_SEED_BASE + s for s in range(samples)])
    base = [GenerationParams(prompt=it.caption, seed=s, steps=steps) for s, it in enumerate(items)]

    def images(cache: str) -> torch.Tensor:
        fields = {"cache": cache, "cache_interval": interval} if cache != "none" else {}
        outs = [run_params(pipe, [p.replace(**fields)], output_type="pt") for p in base]
        return torch.cat(outs)  # [n, 3, H, W] in [0, 1]

    ref, cached = images("none"), images("deepcache")
    d = (cached - ref).abs()
    mse = (cached - ref).pow(2).flatten(1).mean(1)
    feats = lambda x: describe_set(clf, x * 2 - 1)["features"]  # noqa: E731
    real = describe_set(clf, real_x)["features"]
    return {
        "bench": "step_cache_quality",
        "model": "demo",
        "cache": "deepcache",
        "interval": interval,
        "samples": samples,
        "steps": steps,
        "cfg": GenerationParams.cfg,
        "seg_scale": SEGConfig.scale,
        "mean_abs_diff": round(float(d.mean()), 5),
        "max_abs_diff": round(float(d.max()), 5),
        "psnr_db_median": round(float((10 * torch.log10(1 / mse.clamp(min=1e-12))).median()), 2),
        "seed_to_seed_mean_abs_diff": round(float((ref[1:] - ref[:-1]).abs().mean()), 5),
        "fid_uncached": round(fid(real, feats(ref)), 3),
        "fid_cached": round(fid(real, feats(cached)), 3),
    }


def run(pairs: int = 3, steps: int = 6) -> list[dict]:
    """The cache rows of ``seg-rt bench step``: DeepCache (UNet), first-block cache (DiT), quality."""
    rows = unet_rows(pairs, steps) + dit_rows(pairs, steps) + trained_dit_rows(pairs) + [quality_row()]
    rows.append(dit_quality_row())
    env = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    return [r | env for r in rows]


def describe(row: dict) -> str:
    if row["bench"] == "step_cache_quality":
        knob = (
            f"interval {row['interval']}" if row["cache"] == "deepcache" else f"threshold {row['threshold']}"
        )
        return (
            f"{row['model']} {row['cache']} ({knob}): cached vs uncached image mean |Δ| "
            f"{row['mean_abs_diff']:.4f} (seed to seed {row['seed_to_seed_mean_abs_diff']:.4f}), PSNR "
            f"{row['psnr_db_median']:.1f} dB, FID {row['fid_uncached']:.2f} -> {row['fid_cached']:.2f}"
        )
    knob = f"threshold {row['threshold']}" if row["cache"] == "fbcache" else f"interval {row['interval']}"
    return (
        f"{row['model']}, {row['cache']} {knob}: {row['speedup']:.2f}x over uncached "
        f"({row['served_share']:.0%} of rows served from cache)"
    )
