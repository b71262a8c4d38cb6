"""``seg-rt video``: text-to-video with SEG on video attention (AnimateDiff, CogVideoX, Wan, LTX-Video)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

from seg_rt.params import GenerationParams, VideoParams, request_from_fields

from .common import (
    add_parallel_args,
    add_request_args,
    bundled,
    check_local_size,
    load_model,
    parallel_from_args,
    request_fields,
)

VIDEO = VideoParams()  # every video flag's default is the request type's
DEMO_FRAMES = 8  # seg_rt.demo.video_data.FRAMES, the demo video model's clip length (no torch import here)
MODEL_HELP = (
    "diffusers AnimateDiff / CogVideoX / Wan / LTX-Video folder or hub id (default: the bundled 32x32 "
    "demo video model, offline)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "video", help="text-to-video with SEG on video attention (AnimateDiff, CogVideoX, Wan, LTX-Video)"
    )
    frames = {
        "default": None,
        "help": f"output frames (default: {VIDEO.frames}; {DEMO_FRAMES} for the demo video model, its clip length)",
    }
    add_request_args(v, MODEL_HELP, "video", own={"frames": frames})
    v.add_argument("--gif", action="store_true", help="write an animated GIF instead of mp4")
    v.add_argument("--compare", action="store_true", help="one side-by-side video: no SEG | each SEG mode")
    v.add_argument("--out", default="seg.mp4")
    v.add_argument(
        "--engine",
        default=None,
        help="onnx:DIR or trt:DIR: a seg-rt export video folder of this model and request",
    )
    add_parallel_args(v)
    v.set_defaults(func=cmd_video)


def video_request_from_args(args) -> GenerationParams:
    """``seg-rt video``'s flags as one request; ``--seg-layers`` are video layers (``VideoParams.layers``)."""
    fields = request_fields(args, "video")
    if fields["frames"] is None:  # the demo video model's clip length, else the request type's default
        fields["frames"] = DEMO_FRAMES if args.model is None else VIDEO.frames
    return request_from_fields(fields, "video")


def demo_video_model() -> str:
    from seg_rt.demo.video_model import is_demo_video_folder, video_weights_dir

    path = video_weights_dir()
    note = "procedural shapes in motion, see README); for real video pass --model with an AnimateDiff / "
    return bundled(
        path, is_demo_video_folder(path), "demo video model", note + "CogVideoX / Wan / LTX folder"
    )


def check_engine_args(engine: str, compare: bool, parallel, request: GenerationParams) -> None:
    """``--engine``'s refusals, before the model loads: what a video export cannot run, a folder
    that is not a video export (its sidecar read, nothing loaded)."""
    from seg_rt.artifacts import read_info
    from seg_rt.execution import parse_engine_spec
    from seg_rt.video.sampling import check_engine_request

    if compare:
        raise ValueError(
            "--compare runs every SEG mode; an exported engine serves the mode it was exported for"
        )
    check_engine_request(engine, parallel, "blur", request.video)
    info = read_info(parse_engine_spec(engine)[1])
    if info.frames is None:
        raise ValueError(
            f"--engine {engine!r} is an image export; export the video model with seg-rt export video"
        )


def cmd_video(args) -> int:
    from seg_rt.video.attention import MODES
    from seg_rt.video.io import check_writer, side_by_side, write_video
    from seg_rt.video.sampling import generate_video

    out = Path(args.out)
    if args.gif:
        out = out.with_suffix(".gif")
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"--out must end in .mp4 or .gif, got {str(out)!r}")
    check_writer(out)  # PyAV for mp4: at once, not after sampling
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
    if args.engine is not None:
        check_engine_args(args.engine, args.compare, parallel, request)
    model = args.model or demo_video_model()  # after the checks: bad input gets its one line only
    check_local_size(model, request)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as resources:
        pipe, _ = load_model(model, args.device, resources, parallel=parallel)
        videos = [
            generate_video(
                pipe, params=r, progress=not args.no_progress, parallel=parallel, engine=args.engine
            )[0]
            for _, r in runs
        ]
    frames = side_by_side(videos, [label for label, _ in runs]) if args.compare else videos[0]
    write_video(frames, out, fps=request.video.fps)
    print(json.dumps({"out": str(out), "frames": len(frames), "seconds": round(time.perf_counter() - t0, 2)}))
    return 0
