"""``seg-rt bench WHAT``: one sub-command per benchmark, each with the flags it uses (docs/benchmarks.md).

The benches themselves live in ``seg_rt.bench`` (blur, engines, step, gpu, quality),
``seg_rt.video.bench`` (video-quality) and ``seg_rt.cluster.bench`` (cluster, serve); this module only
parses flags and prints rows (one JSON object per line with ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seg_rt.config import parse_layers, parse_sigma

from .common import Parser

SPEED = {  # bench -> (module with run / describe, what it measures)
    "blur": ("seg_rt.bench.blur", "one SDXL mid-block self-attention layer with SEG vs without"),
    "engines": ("seg_rt.bench.engines", "one SEG denoiser step: ONNX Runtime CPU settings vs torch eager"),
    "step": ("seg_rt.bench.step", "time per denoising step of each guidance mode, as a ratio to CFG"),
}
ORDER = (
    "blur",
    "engines",
    "cluster",
    "serve",
    "video-quality",
    "quality",
    "guidance",
    "step",
    "gpu",
)  # in --help
RAY = {
    "cluster": "seg-rt run images/s with 1 and 2 workers, 1 vs 2 nodes, node loss, branch-parallel SEG",
    "serve": "HTTP requests/s and p50/p95 latency at 1 and 8 clients, server overhead",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks (JSON output)")
    bsub = b.add_subparsers(dest="what", required=True, parser_class=Parser)
    for name in ORDER:
        if name in SPEED:
            p = bsub.add_parser(name, help=SPEED[name][1])
            _json(p)
            p.add_argument("--pairs", type=int, default=None, help="alternating timing pairs per case")
            p.set_defaults(func=cmd_speed)
        elif name in RAY:
            p = bsub.add_parser(name, help=RAY[name])
            _json(p)
            p.set_defaults(func=cmd_ray)
        else:
            {"quality": _add_quality, "video-quality": _add_video_quality, "gpu": _add_gpu,
             "guidance": _add_guidance}[name](bsub)  # fmt: skip


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object per line")


def _add_sampling(p: argparse.ArgumentParser, model_help: str, samples: str, steps: str) -> None:
    """The flags the two quality benches share; ``None`` leaves a value to the bench's own default."""
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--plot", default=None, help=f"plot PNG path (default: {p.prog.split()[-1]}.png)")
    p.add_argument("--samples", type=int, default=None, help=samples)
    p.add_argument("--steps", type=int, default=None, help=steps)
    p.add_argument("--cfg", type=float, default=3.0, help="scale of the CFG row")
    p.add_argument("--seg-scale", type=float, default=3.0, help="scale of the SEG rows (no CFG)")
    p.add_argument("--classifier", default=None, help="feature classifier folder (default: the shipped one)")
    p.add_argument("--device", default=None)
    _json(p)


def _add_quality(bsub: argparse._SubParsersAction) -> None:
    q = bsub.add_parser(
        "quality", help="demo model: vanilla, CFG, PAG-style, SEG σ sweep (FID, precision, ...)"
    )
    _add_sampling(
        q,
        "demo-model folder (default: the bundled one)",
        "samples per method, same prompts and seeds (default 160)",
        "sampling steps (default 12)",
    )
    q.add_argument("--pag-scale", type=float, default=3.0, help="scale of the PAG-style row (no CFG)")
    q.add_argument("--sigmas", default="1,2,5,10,inf", help="SEG σ values")
    q.add_argument("--seg-layers", default="mid")
    q.add_argument("--batch", type=int, default=64, help="images per sampling batch")
    q.add_argument("--unconditional", action="store_true", help="empty prompts (the paper's main setting)")
    q.add_argument(
        "--cheap",
        action="store_true",
        help="add the cheap SEG rows: every 2nd step, uncond placement, a window",
    )
    q.set_defaults(func=cmd_quality)


def _add_guidance(bsub: argparse._SubParsersAction) -> None:
    from seg_rt.bench import guidance as g

    p = bsub.add_parser(
        "guidance",
        help="each guidance method vs CFG at matched NFE and effective strength, both bundled models",
    )
    p.add_argument(
        "--models", default="digits,demo", help="bundled models: digits, demo (each final and weak)"
    )
    p.add_argument("--checkpoints", default="final,weak", help="final, weak (the early-step export) or both")
    p.add_argument("--cases", default=",".join(g.CASES), help=f"of {', '.join(g.CASES)}")
    p.add_argument("--methods", default=",".join(g.DEFAULT_METHODS), help=f"of {', '.join(g.METHODS)}")
    p.add_argument("--samples", type=int, default=64, help="images per row, same prompts and seeds")
    p.add_argument("--steps", type=int, default=6, help="sampling steps of the method rows")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in g.SCALES), help="method scales")
    p.add_argument("--sigmas", default="1,2,5,10,inf", help="SEG σ values, unconditional case")
    p.add_argument("--case-sigmas", default="10,inf", help="SEG σ values, prompt cases")
    p.add_argument("--cfg-scales", default=",".join(f"{s:g}" for s in g.CFG_SCALES), help="the CFG sweep")
    p.add_argument(
        "--modifier-scales",
        default=",".join(f"{s:g}" for s in g.MODIFIER_SCALES),
        help="the CFG scales of the CFG-delta modifiers (apg, cfgzero, fresca; conditional case)",
    )
    p.add_argument("--cfg", type=float, default=3.0, help="CFG scale under the methods (conditional case)")
    p.add_argument("--seg-layers", default="mid")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--seed-base", type=int, default=0, help="image i's seed is SEED_BASE + i (a repeat on other seeds)"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--report",
        default=None,
        metavar="ROWS.jsonl",
        help="measure nothing: print the per-case verdict table of these rows (and --plot them)",
    )
    p.add_argument(
        "--tie",
        type=float,
        default=None,
        help="the verdict table's ties: FID differences below this (default: the model's seed-to-seed "
        f"spread where the rows repeat seeds, else {g.TIE_FID:g})",
    )
    p.add_argument(
        "--tie-acc",
        type=float,
        default=None,
        help=f"... and accuracy differences below this (default: as --tie, else {g.TIE_ACC:g})",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="plot PNG path (default: guidance.png; with --report: no plot unless given)",
    )
    p.add_argument(
        "--out", default=None, help="also append each row to this JSON-lines file as it is measured"
    )
    _json(p)
    p.set_defaults(func=cmd_guidance)


def _floats(value: str, what: str) -> list[float]:
    try:
        return [parse_sigma(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {value!r}") from None


def cmd_guidance(args) -> int:
    from seg_rt.bench import guidance as g

    for name, value in (("--tie", args.tie), ("--tie-acc", args.tie_acc)):
        if value is not None and not value >= 0:
            print(f"error: {name} must be >= 0, got {value:g}", file=sys.stderr)
            return 2
    if args.report is not None:
        try:
            rows = g.read_rows(args.report)
            g.check_rows(rows)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"error: --report {args.report}: {exc}", file=sys.stderr)
            return 2
        if args.plot is not None:
            g.plot(rows, args.plot)
        print(g.verdict_table(rows, args.tie, args.tie_acc))
        return 0
    try:
        kw = {
            "cases": [c.strip() for c in args.cases.split(",") if c.strip()],
            "methods": g.check_methods([m.strip() for m in args.methods.split(",") if m.strip()]),
            "scales": _floats(args.scales, "--scales"),
            "sigmas": _floats(args.sigmas, "--sigmas"),
            "case_sigmas": _floats(args.case_sigmas, "--case-sigmas"),
            "cfg_scales": _floats(args.cfg_scales, "--cfg-scales"),
            "modifier_scales": _floats(args.modifier_scales, "--modifier-scales"),
        }
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        checkpoints = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
        g.subjects(models, checkpoints)
        bad = [c for c in kw["cases"] if c not in g.CASES]
        if bad:
            raise ValueError(f"unknown case {bad[0]!r}; known: {', '.join(g.CASES)}")
        if args.samples < 8 or args.steps < 2:
            raise ValueError(f"need --samples >= 8 and --steps >= 2; got {args.samples}, {args.steps}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    sink = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed below)

    def emit(row: dict) -> None:
        if args.json:
            print(json.dumps(row), flush=True)
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    try:
        rows = g.run_guidance(
            models, samples=args.samples, steps=args.steps, cfg=args.cfg, layers=parse_layers(args.seg_layers),
            checkpoints=checkpoints, seed_base=args.seed_base, device=args.device, emit=emit, **kw,
        )  # fmt: skip
    finally:
        if sink is not None:
            sink.close()
    g.plot(rows, args.plot or "guidance.png")
    print(g.table(rows), file=sys.stderr if args.json else sys.stdout)
    print(g.verdict_table(rows, args.tie, args.tie_acc), file=sys.stderr if args.json else sys.stdout)
    return 0


def _add_video_quality(bsub: argparse._SubParsersAction) -> None:
    v = bsub.add_parser("video-quality", help="demo video model: video SEG modes vs STG-style skipping")
    _add_sampling(
        v,
        "demo video model folder (default: the bundled one) or any AnimateDiff folder (the proxy-metric harness)",
        "clips per method, same captions and seeds (default 24)",
        "sampling steps (default 8)",
    )
    v.set_defaults(func=cmd_video_quality)


def _add_gpu(bsub: argparse._SubParsersAction) -> None:
    from seg_rt.bench import gpu

    g = bsub.add_parser(
        "gpu", help="SDXL fp16 step ratios, eager vs torch.compile vs CUDA graphs, images/s (one CUDA GPU)"
    )
    g.add_argument(
        "--device",
        default=gpu.DEVICE,
        help=f"cuda (default: {gpu.DEVICE}), cuda:N, or cpu with --tiny (dry run)",
    )
    g.add_argument("--tiny", action="store_true", help="a tiny SDXL-shaped UNet, fp32, 8x8 latents")
    g.add_argument(
        "--latent",
        type=int,
        default=gpu.LATENT,
        help=f"latent height = width (default: {gpu.LATENT}: 1024 px)",
    )
    g.add_argument(
        "--pairs",
        type=int,
        default=gpu.PAIRS,
        help=f"alternating timing pairs per ratio (default: {gpu.PAIRS})",
    )
    g.add_argument(
        "--skip-compile", action="store_true", help="leave out torch.compile (its warm-up is minutes)"
    )
    g.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    g.set_defaults(func=cmd_gpu)


def _given(args, *names: str) -> dict:
    """The flags the user gave; the others are left to the bench's own defaults (one place each)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _print_rows(rows: list[dict], as_json: bool, describe=str) -> None:
    for row in rows:
        print(json.dumps(row) if as_json else describe(row))


def cmd_speed(args) -> int:
    import importlib

    module = importlib.import_module(SPEED[args.what][0])
    rows = module.run(**_given(args, "pairs"))
    _print_rows(rows, args.json, module.describe)
    return 0


def cmd_ray(args) -> int:
    from seg_rt.cluster import bench

    rows = bench.bench_cluster() if args.what == "cluster" else bench.bench_serve()
    _print_rows(rows, args.json, bench.describe)
    return 0


def cmd_quality(args) -> int:
    from seg_rt.bench import quality

    sigmas = [parse_sigma(s) for s in args.sigmas.split(",") if s.strip()]
    rows = quality.run_quality(
        args.model,
        **_given(args, "samples", "steps"),
        cfg=args.cfg,
        seg_scale=args.seg_scale,
        pag_scale=args.pag_scale,
        sigmas=sigmas,
        layers=parse_layers(args.seg_layers),
        batch=args.batch,
        unconditional=args.unconditional,
        classifier=args.classifier,
        device=args.device,
        cheap=args.cheap,
    )
    quality.plot(rows, args.plot or "quality.png")
    if args.json:
        _print_rows(rows, True)
    print(quality.table(rows), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_video_quality(args) -> int:
    from seg_rt.video import bench

    if args.model is not None and not _is_demo_video(args.model):
        rows = bench.run_harness(args.model, plot=args.plot or "video-quality.png")
        _print_rows(rows, args.json)
        return 0
    rows = bench.run_video_quality(
        args.model,
        **_given(args, "samples", "steps"),
        cfg=args.cfg,
        scale=args.seg_scale,
        classifier=args.classifier,
        device=args.device,
    )
    bench.plot(rows, args.plot or "video-quality.png")
    _print_rows(rows, args.json)
    if not args.json:
        print(bench.table(rows))
    return 0


def _is_demo_video(model: str) -> bool:
    from seg_rt.demo.video_model import is_demo_video_folder

    return Path(model).is_dir() and is_demo_video_folder(model)


def cmd_gpu(args) -> int:
    from seg_rt.bench import gpu
    from seg_rt.images import write_atomic

    result = gpu.run(args.device, args.tiny, args.latent, args.pairs, args.skip_compile)
    text = json.dumps(result)
    print(text)
    if args.out:
        write_atomic(Path(args.out), (text + "\n").encode())
    return 0
