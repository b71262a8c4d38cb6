"""``seg-rt export onnx`` (SEG-patched denoiser → fixed-shape ONNX) and ``seg-rt export trt``
(ONNX → TensorRT engine)."""

from __future__ import annotations

import argparse
import contextlib
import json

from seg_rt.config import SEGConfig, check_sigma, parse_layers
from seg_rt.params import VIDEO_MODES, VideoParams

from .common import Parser, load_model, sigma_arg

VIDEO = VideoParams()  # the video flags' defaults are the request type's


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="export the SEG denoiser: ONNX, then TensorRT")
    esub = e.add_subparsers(dest="format", required=True, parser_class=Parser)
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
        "--seg-sigma", type=sigma_arg, default=SEGConfig.sigma, help="σ baked into the graph (default inf)"
    )
    sigma.add_argument(
        "--dynamic-sigma", action="store_true", help="σ as a runtime input (one model, every σ)"
    )
    eo.add_argument("--seg-layers", default="mid")
    eo.add_argument(
        "--fork",
        action="store_true",
        help="shared-prefix fork in the graph: the perturbed rows fork off at the first SEG block, "
        "the rows they copy a runtime input (fork_source); serves every sampler layout; also writes the "
        "unforked twin graph that runs the steps without perturbed rows (twice the weight memory)",
    )
    eo.add_argument(
        "--no-twin",
        action="store_true",
        help="with --fork: no twin graph (half the memory; steps without perturbed rows then run the "
        "fork graph's padding fork rows)",
    )
    eo.add_argument("--fp16", action="store_true", help="float16 weights and inputs (for GPU use)")
    eo.add_argument("--opset", type=int, default=18)
    eo.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check")
    eo.add_argument("--out", required=True, help="output folder (new or empty)")
    eo.add_argument("--overwrite", action="store_true", help="replace an existing seg-rt export in --out")
    eo.add_argument("--json", action="store_true")
    eo.set_defaults(func=cmd_export_onnx)

    ev = esub.add_parser(
        "video", help="SEG-patched video DiT (CogVideoX, Wan, LTX-Video) -> fixed-shape ONNX (validated)"
    )
    ev.add_argument(
        "--model", required=True, help="local diffusers CogVideoX / Wan / LTX-Video folder or hub id"
    )
    ev.add_argument("--frames", type=int, required=True, help="output frames of the videos it serves")
    ev.add_argument("--height", type=int, default=None, help="pixels (default: the family's)")
    ev.add_argument("--width", type=int, default=None, help="pixels (default: the family's)")
    ev.add_argument(
        "--no-cfg", action="store_true", help="row layout [cond, seg] instead of [uncond, cond, seg]"
    )
    ev.add_argument("--seg-mode", default=VIDEO.mode, choices=VIDEO_MODES, help=f"default {VIDEO.mode}")
    ev.add_argument(
        "--seg-sigma", type=sigma_arg, default=SEGConfig.sigma, help="σ baked into the graph (default inf)"
    )
    ev.add_argument(
        "--seg-sigma-time",
        type=sigma_arg,
        default=VIDEO.sigma_time,
        help=f"σ along time, baked (default {VIDEO.sigma_time:g})",
    )
    ev.add_argument(
        "--seg-layers", default=None, help="video self-attention layers (default: every one the mode uses)"
    )
    ev.add_argument(
        "--fork", action="store_true", help="shared-prefix fork in the graph, as export onnx --fork"
    )
    ev.add_argument("--no-twin", action="store_true", help="with --fork: no unforked twin graph")
    ev.add_argument("--opset", type=int, default=18)
    ev.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check")
    ev.add_argument("--out", required=True, help="output folder (new or empty)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing seg-rt export in --out")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_export_video)

    et = esub.add_parser("trt", help="ONNX export -> TensorRT engine (needs TensorRT and a GPU)")
    et.add_argument("--onnx", required=True, help="folder written by seg-rt export onnx")
    et.add_argument("--out", required=True, help="output folder (new or empty)")
    et.add_argument("--overwrite", action="store_true", help="replace an existing seg-rt export in --out")
    et.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    et.add_argument("--timing-cache", default=None, help="timing cache file (read and updated)")
    et.add_argument("--check-only", action="store_true", help="only check TensorRT operator support")
    et.set_defaults(func=cmd_export_trt)


def cmd_export_onnx(args) -> int:
    from seg_rt.artifacts import check_out_dir, is_export_folder
    from seg_rt.export import export_onnx

    layers = parse_layers(args.seg_layers)
    sigma = None if args.dynamic_sigma else check_sigma(args.seg_sigma)
    if args.no_twin and not args.fork:
        raise ValueError("--no-twin applies to --fork exports only; add --fork or drop --no-twin")
    check_out_dir(args.out, is_export_folder, overwrite=args.overwrite)  # before the model loads
    with contextlib.ExitStack() as resources:
        pipe, _ = load_model(args.model, "cpu" if not args.fp16 else None, resources)
        result = export_onnx(
            pipe,
            args.out,
            height=args.height,
            width=args.width,
            batch=args.batch,
            with_cfg=not args.no_cfg,
            sigma=sigma,
            layers=layers,
            fp16=args.fp16,
            opset=args.opset,
            validate=not args.no_validate,
            model_name=str(args.model),
            overwrite=args.overwrite,
            fork=args.fork,
            twin=not args.no_twin,
        )
    return _summary(args, result)


def _summary(args, result) -> int:
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


def cmd_export_video(args) -> int:
    from seg_rt.artifacts import check_out_dir, is_export_folder

    layers = parse_layers(args.seg_layers) if args.seg_layers else None
    sigma = check_sigma(args.seg_sigma)
    VideoParams(mode=args.seg_mode, sigma_time=args.seg_sigma_time, frames=args.frames)  # one line if bad
    if args.no_twin and not args.fork:
        raise ValueError("--no-twin applies to --fork exports only; add --fork or drop --no-twin")
    check_out_dir(args.out, is_export_folder, overwrite=args.overwrite)  # before the model loads
    with contextlib.ExitStack() as resources:
        pipe, _ = load_model(args.model, "cpu", resources)
        from seg_rt.video.export import export_video_onnx

        result = export_video_onnx(
            pipe, args.out, frames=args.frames, height=args.height, width=args.width, with_cfg=not args.no_cfg,
            mode=args.seg_mode, sigma=sigma, sigma_time=args.seg_sigma_time, layers=layers, opset=args.opset,
            validate=not args.no_validate, overwrite=args.overwrite, model_name=str(args.model), fork=args.fork,
            twin=not args.no_twin,
        )  # fmt: skip
    return _summary(args, result)


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
