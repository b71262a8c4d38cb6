"""The ``seg-rt`` command line. Errors in what the user passed end in one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import SEGConfig, check_sigma, parse_layers, parse_sigma, sigma_label, sigma_to_json
from .errors import SegRtError
from .params import SCHEDULERS, BranchParallel, GenerationParams, VideoParams, parse_engine_spec

logger = logging.getLogger("seg_rt")

DEFAULT_COMPARE_SIGMAS = "1,2,5,10,inf"
# every sampling flag's default is the request type's (seg_rt.params): one default per field
_REQUEST = GenerationParams()
_VIDEO = VideoParams()
_DEMO_FRAMES = 8  # seg_rt.demo.video_data.FRAMES, the demo video model's clip length (no torch import here)


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _sigma(value: str) -> float:
    try:
        return parse_sigma(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_IMAGE_MODEL_HELP = "local diffusers folder or hub id (default: the bundled 32x32 demo model, offline)"


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    """Where the Ray commands (run, serve) find or start Ray (``cluster.driver.start_ray``)."""
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    p.add_argument("--ray-temp-dir", default=None, help="parent of the private temp dir of a local Ray")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that samples images (docs/design.md, "Contracts")."""
    _add_request_args(p, _IMAGE_MODEL_HELP)
    p.add_argument(
        "--seg-layers",
        default=",".join(_REQUEST.seg.layers),
        help="comma list: mid, down, up, mid.0, module names",
    )
    p.add_argument(
        "--seg-start", type=float, default=_REQUEST.seg.start, help="SEG window start, fraction of steps"
    )
    p.add_argument(
        "--seg-end", type=float, default=_REQUEST.seg.end, help="SEG window end, fraction of steps"
    )
    p.add_argument(
        "--seg-every",
        type=int,
        default=_REQUEST.seg.every,
        help="cheap SEG: run the SEG branch every k-th step, reuse its delta in between",
    )
    p.add_argument(
        "--seg-placement",
        default=_REQUEST.seg.placement,
        help="batched (default: an extra perturbed row) or uncond (cheap: blur inside the uncond row)",
    )
    p.add_argument("--guidance-rescale", type=float, default=_REQUEST.guidance_rescale)
    p.add_argument(
        "--distilled-guidance",
        type=float,
        default=_REQUEST.distilled_guidance,
        help="guidance value a guidance-distilled model embeds (Flux.1-dev; not CFG)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        default=_REQUEST.sequential,
        help="run CFG/SEG branches one at a time",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (results depend on it; match a server / job worker)",
    )


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Branch-parallel SEG flags (``seg_rt.params.BranchParallel``; its defaults)."""
    b = p.add_argument_group("branch-parallel SEG (one image's latency over several processes / GPUs)")
    b.add_argument(
        "--branch-parallel", type=int, default=1, metavar="N", help="split each step's rows over N ranks"
    )
    b.add_argument("--parallel-launcher", default=BranchParallel.launcher, help="processes (default) or ray")
    b.add_argument(
        "--parallel-device", default=BranchParallel.device, help="cpu (gloo, default) or cuda (NCCL)"
    )
    b.add_argument("--placement", default=BranchParallel.strategy, help="Ray placement strategy (PACK)")
    b.add_argument("--ray-address", default=None, help="Ray address (default: start a local Ray)")


def parallel_from_args(args) -> BranchParallel | None:
    """The ``BranchParallel`` of ``--branch-parallel N`` (N > 1), validated before any model loads."""
    if args.branch_parallel < 1:
        raise ValueError(f"--branch-parallel must be >= 1, got {args.branch_parallel}")
    spec = BranchParallel(
        ranks=args.branch_parallel, launcher=args.parallel_launcher, device=args.parallel_device,
        strategy=args.placement, address=args.ray_address,
    )  # fmt: skip
    if spec.ranks == 1:
        return None
    if args.device is not None:
        raise ValueError("--device does not apply with --branch-parallel: give --parallel-device cpu or cuda")
    return spec


def _add_request_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """The flags images and videos share: the model, the request (defaults from ``GenerationParams``),
    the device and progress bars."""
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--prompt", default=_REQUEST.prompt, help="text prompt ('' for unconditional SEG)")
    p.add_argument("--negative-prompt", default=_REQUEST.negative_prompt)
    p.add_argument(
        "--seg-scale", type=float, default=_REQUEST.seg.scale, help="SEG guidance scale s (0 = off)"
    )
    p.add_argument(
        "--seg-sigma", type=_sigma, default=_REQUEST.seg.sigma, help="blur σ in tokens, or 'inf' (default)"
    )
    p.add_argument("--cfg", type=float, default=_REQUEST.cfg, help="CFG scale (1 = no CFG)")
    p.add_argument("--steps", type=int, default=_REQUEST.steps)
    p.add_argument("--height", type=int, default=_REQUEST.height)
    p.add_argument("--width", type=int, default=_REQUEST.width)
    p.add_argument("--seed", type=int, default=_REQUEST.seed)
    p.add_argument(
        "--scheduler",
        default=_REQUEST.scheduler,
        help=f"{', '.join(SCHEDULERS)} (default {_REQUEST.scheduler})",
    )


def request_from_args(args) -> GenerationParams:
    """``seg-rt generate``'s flags as one request (validated by ``GenerationParams``)."""
    seg = SEGConfig(
        args.seg_scale,
        args.seg_sigma,
        parse_layers(args.seg_layers),
        args.seg_start,
        args.seg_end,
        args.seg_every,
        args.seg_placement,
    )
    return GenerationParams(
        **_shared_fields(args),
        seg=seg,
        guidance_rescale=args.guidance_rescale,
        sequential=args.sequential,
        distilled_guidance=args.distilled_guidance,
    )


def _shared_fields(args) -> dict:
    """The ``GenerationParams`` fields that ``generate`` and ``video`` take from like-named flags."""
    names = ("prompt", "negative_prompt", "seed", "steps", "cfg", "height", "width", "scheduler")
    return {name: getattr(args, name) for name in names}


def video_request_from_args(args) -> GenerationParams:
    """``seg-rt video``'s flags as one request; ``--seg-layers`` are video layers (``VideoParams.layers``)."""
    frames = args.frames
    if frames is None:  # the demo video model's clip length, else the request type's default
        frames = _DEMO_FRAMES if args.model is None else _VIDEO.frames
    video = VideoParams(
        frames=frames,
        fps=args.fps,
        mode=args.seg_mode,
        sigma_time=args.seg_sigma_time,
        layers=parse_layers(args.seg_layers) if args.seg_layers else None,
    )
    seg = SEGConfig(scale=args.seg_scale, sigma=args.seg_sigma)
    return GenerationParams(**_shared_fields(args), seg=seg, video=video)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seg-rt", description="Smoothed Energy Guidance for diffusers models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="text-to-image with SEG")
    add_model_args(g)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--control-image", default=None, help="control image for SDXL ControlNet models")
    g.add_argument("--controlnet-scale", type=float, default=1.0)
    g.add_argument("--compare", action="store_true", help="one labelled grid: vanilla, CFG, SEG σ sweep")
    g.add_argument("--grid", action="store_true", help="with --num-images: one labelled grid PNG")
    g.add_argument("--compare-sigmas", default=DEFAULT_COMPARE_SIGMAS)
    g.add_argument("--out", default="seg.png", help="output PNG (several images: NAME-i.png)")
    g.add_argument("--json", action="store_true", help="print a JSON summary")
    g.add_argument("--engine", default="torch", help="torch (default), torch-compile, onnx:DIR, trt:DIR")
    _add_parallel_args(g)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser(
        "video", help="text-to-video with SEG on video attention (AnimateDiff, CogVideoX, Wan, LTX-Video)"
    )
    _add_request_args(
        v,
        "diffusers AnimateDiff / CogVideoX / Wan / LTX-Video folder or hub id (default: the bundled 32x32 "
        "demo video model, offline)",
    )
    v.add_argument(
        "--frames",
        type=int,
        default=None,
        help=f"output frames (default {_VIDEO.frames}; {_DEMO_FRAMES} for the demo video model, its clip length)",
    )
    v.add_argument("--seg-mode", default=_VIDEO.mode, help="spatial, temporal or spatiotemporal")
    v.add_argument(
        "--seg-sigma-time",
        type=_sigma,
        default=_VIDEO.sigma_time,
        help="temporal blur σ (0: frames independent)",
    )
    v.add_argument("--seg-layers", default=None, help="comma list of module names / prefixes (default: all)")
    v.add_argument("--fps", type=int, default=_VIDEO.fps)
    v.add_argument("--gif", action="store_true", help="write an animated GIF instead of mp4")
    v.add_argument("--compare", action="store_true", help="one side-by-side video: no SEG | each SEG mode")
    v.add_argument("--out", default="seg.mp4")
    _add_parallel_args(v)
    v.set_defaults(func=cmd_video)

    e = sub.add_parser("export", help="export the SEG denoiser: ONNX, then TensorRT")
    esub = e.add_subparsers(dest="format", required=True, parser_class=_Parser)
    eo = esub.add_parser(
        "onnx", help="SEG-patched denoiser -> fixed-shape ONNX (validated with ONNX Runtime)"
    )
    eo.add_argument("--model", required=True, help="local diffusers folder or hub id")
    eo.add_argument("--height", type=int, required=True)
    eo.add_argument("--width", type=int, required=True)
    eo.add_argument("--batch", type=int, default=1, help="images per branch")
    eo.add_argument(
        "--no-cfg", action="store_true", help="row layout [cond, seg] instead of [uncond, cond, seg]"
    )
    sigma = eo.add_mutually_exclusive_group()
    sigma.add_argument(
        "--seg-sigma", type=_sigma, default=SEGConfig.sigma, help="σ baked into the graph (default inf)"
    )
    sigma.add_argument(
        "--dynamic-sigma", action="store_true", help="σ as a runtime input (one model, every σ)"
    )
    eo.add_argument("--seg-layers", default="mid")
    eo.add_argument("--fp16", action="store_true", help="float16 weights and inputs (for GPU use)")
    eo.add_argument("--opset", type=int, default=18)
    eo.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check")
    eo.add_argument("--out", required=True, help="output folder (new or empty)")
    eo.add_argument("--overwrite", action="store_true", help="replace an existing seg-rt export in --out")
    eo.add_argument("--json", action="store_true")
    eo.set_defaults(func=cmd_export_onnx)
    et = esub.add_parser("trt", help="ONNX export -> TensorRT engine (needs TensorRT and a GPU)")
    et.add_argument("--onnx", required=True, help="folder written by seg-rt export onnx")
    et.add_argument("--out", required=True, help="output folder (new or empty)")
    et.add_argument("--overwrite", action="store_true", help="replace an existing seg-rt export in --out")
    et.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    et.add_argument("--timing-cache", default=None, help="timing cache file (read and updated)")
    et.add_argument("--check-only", action="store_true", help="only check TensorRT operator support")
    et.set_defaults(func=cmd_export_trt)

    r = sub.add_parser("run", help="run a batch job (YAML) over Ray workers; resumable")
    r.add_argument("job", help="job YAML file")
    _add_ray_args(r)
    r.add_argument("--workers", type=int, default=None, help="override the job's worker count")
    r.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        help="seconds to wait for every worker to be placed and load the model (default 300)",
    )
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.set_defaults(func=cmd_run)

    sb = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    sb.add_argument("job", help="job YAML file")
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    sb.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    sb.set_defaults(func=cmd_submit)

    sv = sub.add_parser("serve", help="HTTP server (Ray Serve + FastAPI) for SEG generation")
    sv.add_argument("--model", default=None, help=_IMAGE_MODEL_HELP)
    sv.add_argument("--engine", default=None, help="torch (default), onnx:DIR, trt:DIR")
    sv.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="port (default 8000)")
    sv.add_argument("--config", default=None, help="YAML server config (replicas, batching, limits)")
    _add_ray_args(sv)
    sv.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY' (repeatable; also env SEG_RT_API_KEY, comma-separated); "
        "needed to bind a non-loopback --host",
    )
    sv.add_argument(
        "--max-body-bytes", type=int, default=None, help="larger request bodies: HTTP 413 (1000000)"
    )
    sv.add_argument("--model-name", default=None, help="model name shown to clients (default: folder name)")
    sv.add_argument(
        "--branch-parallel",
        type=int,
        default=None,
        metavar="N",
        help="latency mode: each run's steps split over N ranks per replica (branch-parallel SEG)",
    )
    sv.add_argument("--parallel-device", default=None, help="latency mode ranks: cpu (gloo) or cuda (NCCL)")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks (JSON output)")
    b.add_argument(
        "what", choices=["blur", "engines", "cluster", "serve", "video-quality", "quality", "step"]
    )
    b.add_argument(
        "--model",
        default=None,
        help="video-quality: demo video model folder (default: the bundled one) or any AnimateDiff folder "
        "(the proxy-metric harness); quality: demo-model folder",
    )
    b.add_argument("--plot", default=None, help="plot PNG path (default: WHAT.png)")
    q = b.add_argument_group("quality (demo model: vanilla, CFG, PAG-style, SEG σ sweep)")
    q.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per method, same prompts and seeds (default 160; video-quality: 24 clips)",
    )
    q.add_argument("--steps", type=int, default=None, help="sampling steps (default 12; video-quality: 8)")
    q.add_argument("--cfg", type=float, default=3.0, help="scale of the CFG row")
    q.add_argument("--seg-scale", type=float, default=3.0, help="scale of the SEG rows (no CFG)")
    q.add_argument("--pag-scale", type=float, default=3.0, help="scale of the PAG-style row (no CFG)")
    q.add_argument("--sigmas", default="1,2,5,10,inf", help="SEG σ values")
    q.add_argument("--seg-layers", default="mid")
    q.add_argument("--batch", type=int, default=64, help="images per sampling batch")
    q.add_argument("--unconditional", action="store_true", help="empty prompts (the paper's main setting)")
    q.add_argument("--classifier", default=None, help="feature classifier folder (default: the shipped one)")
    q.add_argument("--device", default=None)
    q.add_argument(
        "--cheap",
        action="store_true",
        help="add the cheap SEG rows: every 2nd step, uncond placement, a window",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object per line")
    b.add_argument("--pairs", type=int, default=None, help="alternating timing pairs per case")
    b.set_defaults(func=cmd_bench)
    return parser


def _quiet_libraries() -> None:
    """Keep stderr for our progress bar and errors: no library loading bars or deprecation chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def cmd_generate(args) -> int:
    with contextlib.ExitStack() as resources:  # closes the engine loaded for the run
        return _generate(args, resources)


def _generate(args, resources: contextlib.ExitStack) -> int:
    from .images import check_png_path, grid, load_image, params_text, save_png
    from .pipeline import load_pipeline, run_params

    # every input is checked before the model loads
    request = request_from_args(args)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    out = check_png_path(args.out)
    engine_kind, _ = parse_engine_spec(args.engine)
    parallel = parallel_from_args(args)
    columns = compare_columns(request, _compare_sigmas(args.compare_sigmas)) if args.compare else None
    requests = [request.replace(seed=request.seed + i) for i in range(args.num_images)]
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    model = args.model or _demo_model()
    _check_local_size(model, request)
    control = load_image(args.control_image) if args.control_image else None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if parallel is not None:  # every rank loads the model and engine itself
        pipe, engine = model, args.engine
    else:
        pipe = load_pipeline(model, args.device)
        engine = None
        if engine_kind != "torch":
            from seg_rt.engines import load_engine

            engine = resources.enter_context(load_engine(args.engine, pipe, pipe._execution_device))
    common = {
        "parallel": parallel,
        "engine": engine,
        "control_image": control,
        "controlnet_scale": args.controlnet_scale,
        "progress": not args.no_progress,
    }
    if columns is not None:
        images = [run_params(pipe, [column], **common)[0] for _, column in columns]
        sheet = grid(images, [label for label, _ in columns])
        sigmas = [sigma_to_json(column.seg.sigma) for _, column in columns[2:]]
        save_png(sheet, out, params_text(model, {**request.to_record(), "compare_sigmas": sigmas}))
        paths = [out]
    elif args.grid:
        images = run_params(pipe, requests, **common)
        labels = [f"seed {r.seed}" for r in requests]
        sheet = grid(images, labels, columns=min(len(images), 4))
        save_png(sheet, out, params_text(model, {**request.to_record(), "num_images": args.num_images}))
        paths = [out]
    else:
        images = run_params(pipe, requests, **common)
        paths = (
            [out]
            if len(images) == 1
            else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
        )
        for img, path, r in zip(images, paths, requests, strict=True):
            save_png(img, path, params_text(model, r.to_record()))
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"outputs": [str(p) for p in paths], "seconds": round(seconds, 3)}))
    else:
        for p in paths:
            print(p)
    return 0


def _check_local_size(model: str, request: GenerationParams) -> None:
    """A local model folder's scale factor is in its config files: check the size before loading it."""
    from .pipeline import check_size, folder_scale_factor

    factor = folder_scale_factor(model) if Path(model).is_dir() else None
    if factor is not None:
        check_size(request.height, request.width, factor)


def _compare_sigmas(text: str) -> list[float]:
    sigmas = [check_sigma(parse_sigma(s)) for s in text.split(",") if s.strip()]
    if not sigmas:
        raise ValueError(f"--compare-sigmas must list at least one σ, got {text!r}")
    return sigmas


def _bundled(path: Path, found: bool, what: str, note: str) -> str:
    """``path`` of a model bundled with seg-rt, with the one stderr line saying it is used; a clear
    error when the install lacks it."""
    if not found:
        raise FileNotFoundError(
            f"the bundled {what} is missing from {path}; reinstall seg-rt or pass --model"
        )
    print(f"seg-rt: no --model: using the bundled 32x32 {what} ({note}", file=sys.stderr)
    return str(path)


def _demo_model() -> str:
    from seg_rt.demo.model import is_demo_folder, weights_dir

    path = weights_dir()
    note = "procedural shapes, see README); for SDXL pass --model stabilityai/stable-diffusion-xl-base-1.0 "
    return _bundled(path, is_demo_folder(path), "demo model", note + "or a local SDXL folder")


def _is_demo_video(model: str) -> bool:
    from seg_rt.demo.video_model import is_demo_video_folder

    return Path(model).is_dir() and is_demo_video_folder(model)


def _demo_video_model() -> str:
    from seg_rt.demo.video_model import is_demo_video_folder, video_weights_dir

    path = video_weights_dir()
    note = "procedural shapes in motion, see README); for real video pass --model with an AnimateDiff / "
    return _bundled(
        path, is_demo_video_folder(path), "demo video model", note + "CogVideoX / Wan / LTX folder"
    )


def compare_columns(request: GenerationParams, sigmas: list[float]) -> list[tuple[str, GenerationParams]]:
    """vanilla (no guidance), CFG only, then SEG (with the given CFG) at each σ; one seed."""
    cfg = request.cfg
    cols = [
        ("vanilla", request.replace(cfg=1.0).with_seg(scale=0.0)),
        (f"CFG {cfg:g}", request.with_seg(scale=0.0)),
    ]
    for s in sigmas:
        label = f"SEG sigma={sigma_label(s)}"
        cols.append((label + (f"\n+CFG {cfg:g}" if cfg > 1 else ""), request.with_seg(sigma=s)))
    return cols


def cmd_video(args) -> int:
    from seg_rt.pipeline import load_pipeline
    from seg_rt.video.attention import MODES
    from seg_rt.video.io import side_by_side, write_video
    from seg_rt.video.sampling import generate_video

    out = Path(args.out)
    if args.gif:
        out = out.with_suffix(".gif")
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"--out must end in .mp4 or .gif, got {str(out)!r}")
    request = video_request_from_args(args)  # validated before the model loads
    runs = [("", request)]
    if args.compare:
        runs = [(f"no SEG\nCFG {args.cfg:g}", request.with_seg(scale=0.0))]
        for mode in MODES:
            try:
                runs.append(
                    (f"SEG {mode}", request.replace(video=dataclasses.replace(request.video, mode=mode)))
                )
            except ValueError as exc:  # e.g. temporal with sigma time 0
                raise ValueError(f"--compare, mode {mode}: {exc}") from None
    parallel = parallel_from_args(args)
    model = args.model or _demo_video_model()  # after the checks: bad input gets its one line only
    _check_local_size(model, request)
    t0 = time.perf_counter()
    pipe = model if parallel is not None else load_pipeline(model, args.device)
    videos = [
        generate_video(pipe, params=r, progress=not args.no_progress, parallel=parallel)[0] for _, r in runs
    ]
    frames = side_by_side(videos, [label for label, _ in runs]) if args.compare else videos[0]
    write_video(frames, out, fps=request.video.fps)
    print(json.dumps({"out": str(out), "frames": len(frames), "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


def cmd_export_onnx(args) -> int:
    from seg_rt.export import export_onnx

    from .artifacts import check_out_dir, is_export_folder
    from .pipeline import load_pipeline

    layers = parse_layers(args.seg_layers)
    sigma = None if args.dynamic_sigma else check_sigma(args.seg_sigma)
    check_out_dir(args.out, is_export_folder, overwrite=args.overwrite)  # before the model loads
    pipe = load_pipeline(args.model, "cpu" if not args.fp16 else None)
    result = export_onnx(
        pipe, args.out, height=args.height, width=args.width, batch=args.batch, cfg=not args.no_cfg,
        sigma=sigma, layers=layers, fp16=args.fp16, opset=args.opset, validate=not args.no_validate,
        model_name=str(args.model), overwrite=args.overwrite,
    )  # fmt: skip
    summary = {
        "out": str(result.folder),
        "seconds": round(result.seconds, 2),
        "validation": result.validation,
    }
    print(
        json.dumps(summary)
        if args.json
        else f"{result.folder} ({result.seconds:.1f} s) validation: {result.validation}"
    )
    return 0


def cmd_export_trt(args) -> int:
    from seg_rt.export.tensorrt import build_engine, check_onnx_for_tensorrt

    if args.check_only:
        check_onnx_for_tensorrt(args.onnx)
        print(f"{args.onnx}: every operator is supported by TensorRT")
        return 0
    engine = build_engine(
        args.onnx,
        args.out,
        precision=args.precision,
        timing_cache=args.timing_cache,
        overwrite=args.overwrite,
    )
    print(engine)
    return 0


def cmd_run(args) -> int:
    from seg_rt.cluster.jobs.driver import START_TIMEOUT_S, run_job
    from seg_rt.cluster.jobs.spec import load_job

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.start_timeout is not None and not args.start_timeout > 0:
        raise ValueError(f"--start-timeout must be > 0 seconds, got {args.start_timeout}")
    spec, base = load_job(args.job)
    result = run_job(
        spec, base, address=args.address, workers=args.workers, progress=not args.no_progress,
        ray_temp_dir=args.ray_temp_dir, start_timeout=args.start_timeout or START_TIMEOUT_S,
    )  # fmt: skip
    summary = {
        "total": result.total, "done": result.done, "skipped": result.skipped, "failed": result.failed,
        "restarts": result.restarts, "seconds": round(result.seconds, 2),
    }  # fmt: skip
    print(
        json.dumps(summary)
        if args.json
        else f"{result.done} done, {result.skipped} already there, {len(result.failed)} failed"
    )
    if result.failed:
        print(f"seg-rt: error: {len(result.failed)} item(s) failed; see manifest.jsonl", file=sys.stderr)
        return 1
    return 0


def cmd_submit(args) -> int:
    from seg_rt.cluster.jobs.submit import submit

    job_id, status = submit(args.job, args.address, follow=args.follow)
    print(job_id if status is None else f"{job_id} {status}")
    return 0 if status in (None, "SUCCEEDED") else 1


def cmd_serve(args) -> int:
    from seg_rt.cluster.serving.config import API_KEY_ENV, load_config
    from seg_rt.demo.model import weights_dir

    keys = list(args.api_key or []) + [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    demo = str(weights_dir())
    cfg = load_config(
        args.config,
        defaults={"model": demo},  # no --model and none in the config: the demo model, as in generate
        model=args.model,
        engine=args.engine,
        host=args.host,
        port=args.port,
        api_keys=keys or None,
        max_body_bytes=args.max_body_bytes,
        model_name=args.model_name,
        branch_parallel=args.branch_parallel,
        branch_parallel_device=args.parallel_device,
    )  # the whole config is valid before Ray starts
    from seg_rt.cluster.serving.deployment import serve_forever

    if cfg.model == demo:
        _demo_model()  # the note on what the demo model is (and that it is there)
    print(
        f"seg-rt: serving {cfg.public_model} on http://{cfg.host}:{cfg.port} (playground at /, OpenAPI at /docs)",
        file=sys.stderr,
    )
    serve_forever(cfg, address=args.address, ray_temp_dir=args.ray_temp_dir)
    return 0


def cmd_bench(args) -> int:
    from . import bench

    # --samples / --steps as given; otherwise the quality benches' own defaults (one place each)
    given = {k: v for k, v in (("samples", args.samples), ("steps", args.steps)) if v is not None}
    if args.what == "video-quality" and (args.model is None or _is_demo_video(args.model)):
        from seg_rt.demo import video_bench

        rows = video_bench.run_video_quality(
            args.model,
            **given,
            cfg=args.cfg,
            scale=args.seg_scale,
            classifier=args.classifier,
            device=args.device,
        )
        video_bench.plot(rows, args.plot or "video-quality.png")
        for row in rows:
            print(json.dumps(row) if args.json else row)
        if not args.json:
            print(video_bench.table(rows))
        return 0
    if args.what == "video-quality":
        from seg_rt.video.harness import run_harness

        results = run_harness(args.model, plot=args.plot or "video-quality.png")
        for row in results:
            print(json.dumps(row) if args.json else row)
        return 0
    if args.what == "quality":
        from . import quality

        sigmas = [parse_sigma(s) for s in args.sigmas.split(",") if s.strip()]
        rows = quality.run_quality(
            args.model, **given, cfg=args.cfg, seg_scale=args.seg_scale,
            pag_scale=args.pag_scale, sigmas=sigmas, layers=parse_layers(args.seg_layers), batch=args.batch,
            unconditional=args.unconditional, classifier=args.classifier, device=args.device, cheap=args.cheap,
        )  # fmt: skip
        quality.plot(rows, args.plot or "quality.png")
        if args.json:
            for row in rows:
                print(json.dumps(row))
        print(quality.table(rows), file=sys.stderr if args.json else sys.stdout)
        return 0
    results = bench.run(args.what, pairs=args.pairs)
    for row in results:
        print(json.dumps(row) if args.json else bench.describe(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _quiet_libraries()
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
        )
        return args.func(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, SegRtError) as exc:
        print(f"seg-rt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
