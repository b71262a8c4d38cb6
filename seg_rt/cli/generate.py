"""``seg-rt generate``: text-to-image, img2img and inpainting with SEG (one image, several, a grid, or a
comparison sheet)."""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from seg_rt.config import check_sigma, parse_sigma, sigma_label, sigma_to_json
from seg_rt.execution import parse_engine_spec
from seg_rt.params import GenerationParams, request_from_fields

from .common import (
    IMAGE_MODEL_HELP,
    add_parallel_args,
    add_request_args,
    check_local_size,
    demo_model,
    load_model,
    parallel_from_args,
    request_fields,
)

DEFAULT_COMPARE_SIGMAS = "1,2,5,10,inf"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags of every command that samples images (docs/design.md, "Contracts"): the request field
    table's image fields, defaults from ``GenerationParams`` / ``SEGConfig``."""
    add_request_args(p, IMAGE_MODEL_HELP, "image")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (results depend on it; match a server / job worker) (default: torch's)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="text-to-image, img2img and inpainting with SEG")
    add_model_args(g)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--control-image", default=None, help="control image for SD1.5 / SDXL ControlNet models")
    g.add_argument("--controlnet-scale", type=float, default=1.0)
    g.add_argument("--compare", action="store_true", help="one labelled grid: vanilla, CFG, SEG σ sweep")
    g.add_argument("--grid", action="store_true", help="with --num-images: one labelled grid PNG")
    g.add_argument("--compare-sigmas", default=DEFAULT_COMPARE_SIGMAS)
    g.add_argument("--out", default="seg.png", help="output PNG (several images: NAME-i.png)")
    g.add_argument("--json", action="store_true", help="print a JSON summary")
    g.add_argument("--engine", default="torch", help="torch (default), torch-compile, onnx:DIR, trt:DIR")
    add_parallel_args(g)
    g.set_defaults(func=cmd_generate)


def request_from_args(args) -> GenerationParams:
    """``seg-rt generate``'s flags as one request (validated by ``GenerationParams``)."""
    return request_from_fields(request_fields(args, "image"))


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


def compare_sigmas(text: str) -> list[float]:
    sigmas = [check_sigma(parse_sigma(s)) for s in text.split(",") if s.strip()]
    if not sigmas:
        raise ValueError(f"--compare-sigmas must list at least one σ, got {text!r}")
    return sigmas


def cmd_generate(args) -> int:
    with contextlib.ExitStack() as resources:  # closes the engine loaded for the run
        return _generate(args, resources)


def _generate(args, resources: contextlib.ExitStack) -> int:
    from seg_rt.images import check_png_path, grid, load_image, params_text, save_png
    from seg_rt.pipeline import run_params

    # every input is checked before the model loads
    request = request_from_args(args)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    out = check_png_path(args.out)
    parse_engine_spec(args.engine)
    parallel = parallel_from_args(args)
    columns = compare_columns(request, compare_sigmas(args.compare_sigmas)) if args.compare else None
    requests = [request.replace(seed=request.seed + i) for i in range(args.num_images)]
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    model = args.model or demo_model()
    check_local_size(model, request)
    control = load_image(args.control_image) if args.control_image else None
    t0 = time.perf_counter()
    pipe, engine = load_model(
        model, args.device, resources, engine=args.engine, threads=args.threads, parallel=parallel,
        model_config=args.model_config,
    )  # fmt: skip
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
