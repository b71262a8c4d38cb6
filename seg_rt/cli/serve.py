"""``seg-rt serve``: the HTTP server (Ray Serve + FastAPI) for SEG generation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import IMAGE_MODEL_HELP, add_ray_args, demo_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="HTTP server (Ray Serve + FastAPI) for SEG generation")
    sv.add_argument(
        "--model",
        default=None,
        help=IMAGE_MODEL_HELP.removesuffix(")")
        + "); or a video model (AnimateDiff / CogVideoX / Wan / LTX folder or hub id; "
        "seg-rt-demo-video: the bundled demo video model), served at /v1/videos",
    )
    sv.add_argument("--engine", default=None, help="torch (default), onnx:DIR, trt:DIR")
    sv.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="port (default 8000)")
    sv.add_argument("--config", default=None, help="YAML server config (replicas, batching, limits)")
    add_ray_args(sv)
    sv.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="require 'Authorization: Bearer KEY' for the keys in PATH (one per line); or env "
        "SEG_RT_API_KEY (comma-separated); a key is needed to bind a non-loopback --host",
    )
    sv.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="an API key on the command line (repeatable): other local users can read it in the "
        "process list; prefer SEG_RT_API_KEY or --api-key-file",
    )
    sv.add_argument(
        "--max-body-bytes", type=int, default=None, help="larger request bodies: HTTP 413 (1000000)"
    )
    sv.add_argument(
        "--model-config",
        default=None,
        metavar="DIR",
        help="single-file --model: the folder of its component configs",
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
    sv.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help='preload a LoRA (safetensors) that requests pick by NAME (loras: ["NAME:WEIGHT"]); repeatable',
    )
    sv.add_argument(
        "--state-dir",
        default=None,
        help="folder for jobs and their results (default: ~/.local/state/seg-rt/serve)",
    )
    sv.set_defaults(func=cmd_serve)


def _demo_video() -> str:
    from seg_rt.demo.video_model import video_weights_dir

    return str(video_weights_dir())


def _demo_image() -> str:
    from seg_rt.demo.model import weights_dir

    return str(weights_dir())


BUNDLED = {"seg-rt-demo": _demo_image, "seg-rt-demo-video": _demo_video}


def read_key_file(path: str) -> list[str]:
    """The API keys in ``path``: one per line, blank lines and ``#`` comments skipped. A file other
    users can read gets one warning (the keys are as readable as the file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--api-key-file {path!r} does not exist")
    if p.stat().st_mode & 0o077:
        print(
            f"seg-rt: warning: --api-key-file {path!r} is readable by other users "
            f"(mode {p.stat().st_mode & 0o777:04o}); chmod 600 it",
            file=sys.stderr,
        )
    keys = [line.strip() for line in p.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path!r} holds no key")
    return keys


def cmd_serve(args) -> int:
    from seg_rt.cluster.serving.config import API_KEY_ENV, load_config
    from seg_rt.demo.model import weights_dir
    from seg_rt.lora import parse_named

    if args.api_key:
        print(
            f"seg-rt: warning: --api-key is readable by every local user (/proc/<pid>/cmdline); "
            f"use {API_KEY_ENV} or --api-key-file",
            file=sys.stderr,
        )
    keys = list(args.api_key or []) + [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    if args.api_key_file:
        keys += read_key_file(args.api_key_file)
    demo = str(weights_dir())
    if args.model in BUNDLED:  # the bundled demo models by the names clients see of them
        args.model = BUNDLED[args.model]()
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
        single_file_config=args.model_config,
        branch_parallel=args.branch_parallel,
        branch_parallel_device=args.parallel_device,
        loras=parse_named(args.lora) if args.lora else None,
        state_dir=args.state_dir,
    )  # the whole config is valid before Ray starts
    from seg_rt.cluster.serving.deployment import serve_forever

    if cfg.model == demo:
        demo_model()  # the note on what the demo model is (and that it is there)

    def ready() -> None:  # once the server answers, not when it starts loading
        print(
            f"seg-rt: serving {cfg.public_model} on http://{cfg.host}:{cfg.port} (playground at /, OpenAPI at /docs)",
            file=sys.stderr,
        )

    serve_forever(cfg, address=args.address, ray_temp_dir=args.ray_temp_dir, ready=ready)
    return 0
