"""What the ``seg-rt`` sub-commands share: the parser class, the request flags (every default and its
``--help`` text from ``seg_rt.params``), branch-parallel and Ray flags, loading the model and its
engine, the bundled models' notes, and turning errors into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from seg_rt.config import parse_sigma
from seg_rt.errors import SegRtError, allocation_failure
from seg_rt.execution import BranchParallel
from seg_rt.params import GenerationParams, fields_for

logger = logging.getLogger("seg_rt")

REQUEST = GenerationParams()  # every request flag's default is the request type's: one default per field
IMAGE_MODEL_HELP = (
    "local diffusers folder, hub id or single-file .safetensors checkpoint "
    "(default: the bundled 32x32 demo model, offline)"
)


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def sigma_arg(value: str) -> float:
    """``--seg-sigma`` and friends: a number or ``inf``."""
    try:
        return parse_sigma(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def shown(value: Any) -> str:
    """A default as ``--help`` shows it: ``5`` for 5.0, ``inf``, ``mid,up`` for a tuple, ``''`` for
    the empty string, ``off`` / ``on`` for a flag."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if value == "":
        return "''"
    return str(value)


def with_default(text: str, value: Any, none: str | None = None) -> str:
    """``text (default: VALUE)``; ``none`` says what a default of ``None`` means."""
    if value is None and none is None:
        raise ValueError(f"the default of {text!r} is None: say what that means")
    return f"{text} (default: {none if value is None else shown(value)})"


# what a default of None means, per request field (the help text says it instead of "None")
NONE_MEANS = {
    "negative_prompt": "none",
    "height": "the model's default size",
    "width": "the model's default size",
    "init_image": "none: text-to-image",
    "mask": "none: img2img when an init image is given",
    "image": "none: text-to-video",
}
ARG_TYPES = {int: int, float: float, "optional_int": int, "sigma": sigma_arg}


def add_request_args(
    p: argparse.ArgumentParser, model_help: str, kind: str, *, own: Mapping[str, dict] | None = None
) -> None:
    """The model, device and progress flags, then one flag per request field of ``kind`` (the request
    field table, ``seg_rt.params.FIELDS``: ``--seg-scale`` for ``seg_scale``), each help showing the
    request type's default. ``own``: a field's flag spelled by the command (its ``default`` and
    ``help``), e.g. video's ``--frames``, whose default depends on the model."""
    p.add_argument("--model", default=None, help=model_help)
    if kind == "image":  # single-file checkpoints are image models (seg_rt.singlefile)
        p.add_argument(
            "--model-config",
            default=None,
            metavar="DIR",
            help="for a single-file --model FILE.safetensors: the diffusers folder whose component configs it "
            "takes (default: the configs seg-rt ships for the family its keys show)",
        )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true")
    for f in fields_for(kind):
        if own and f.key in own:
            p.add_argument(f.flag, type=ARG_TYPES.get(f.type), **own[f.key])
            continue
        default = f.default
        none = NONE_MEANS.get(f.key) or (
            "all video self-attention" if f.path == ("video", "layers") else None
        )
        choices = f" ({', '.join(f.choices)})" if f.choices else ""
        if f.type is bool:
            p.add_argument(f.flag, action="store_true", default=default, help=with_default(f.help, default))
            continue
        if f.type == "loras":  # repeatable --lora PATH[:WEIGHT] (seg_rt.lora)
            p.add_argument("--lora", dest=f.key, action="append", default=[], metavar="PATH[:WEIGHT]",
                           help=f"{f.help}; repeat for several (default: none)")  # fmt: skip
            continue
        shown_default = ",".join(default) if f.type == "layers" and default is not None else default
        p.add_argument(
            f.flag,
            type=ARG_TYPES.get(f.type),
            default=shown_default,
            help=with_default(f.help + choices, default, none),
        )


def request_fields(args, kind: str) -> dict:
    """The request fields of a namespace made by ``add_request_args`` (by wire name)."""
    return {f.key: getattr(args, f.key) for f in fields_for(kind)}


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """Where the Ray commands (run, serve) find or start Ray (``cluster.jobs.driver.start_ray``)."""
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    p.add_argument("--ray-temp-dir", default=None, help="parent of the private temp dir of a local Ray")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Branch-parallel SEG flags (``seg_rt.execution.BranchParallel``; its defaults)."""
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
        ranks=args.branch_parallel,
        launcher=args.parallel_launcher,
        device=args.parallel_device,
        strategy=args.placement,
        address=args.ray_address,
    )
    if spec.ranks == 1:
        return None
    if args.device is not None:
        raise ValueError("--device does not apply with --branch-parallel: give --parallel-device cpu or cuda")
    return spec


def load_model(
    model: str,
    device: str | None,
    resources: contextlib.ExitStack,
    *,
    engine: str | None = None,
    threads: int | None = None,
    parallel: BranchParallel | None = None,
    model_config: str | None = None,
) -> tuple[Any, Any]:
    """(pipeline, engine) a command samples with, opened by ``seg_rt.models.open_model`` (``threads``
    CPU threads set first; the engine, when one is asked for, closed with ``resources``). With
    ``parallel`` nothing is loaded here: every rank opens the model and engine itself, so
    ``(model, engine)`` come back as given."""
    if parallel is not None and model_config is not None:
        raise ValueError("--model-config does not apply with --branch-parallel")
    from seg_rt.model_refs import check_model_url

    check_model_url(model)  # every rank would fetch it: refuse a credential-bearing URL here, once
    if parallel is not None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return model, engine
    from seg_rt.models import open_model

    opened = resources.enter_context(open_model(model, engine, device, threads, model_config=model_config))
    return opened.pipe, opened.engine


def check_local_size(model: str, request: GenerationParams) -> None:
    """A local model folder's scale factor is in its config files: check the size before loading it."""
    from seg_rt.params import check_size
    from seg_rt.pipeline import folder_scale_factor

    factor = folder_scale_factor(model) if Path(model).is_dir() else None
    if factor is not None:
        init = request.init_image
        height = request.height or (init.height if init is not None else None)
        width = request.width or (init.width if init is not None else None)
        check_size(height, width, factor)
    if request.task != "txt2img" and Path(model).is_dir():  # the family's tasks, before it loads
        from seg_rt.families import REGISTRY

        family = REGISTRY.for_folder(Path(model))
        if family is not None:
            family.check_task(request.task)


def bundled(path: Path, found: bool, what: str, note: str) -> str:
    """``path`` of a model bundled with seg-rt, with the one stderr line saying it is used; a clear
    error when the install lacks it."""
    if not found:
        raise FileNotFoundError(
            f"the bundled {what} is missing from {path}; reinstall seg-rt or pass --model"
        )
    print(f"seg-rt: no --model: using the bundled 32x32 {what} ({note}", file=sys.stderr)
    return str(path)


def demo_model() -> str:
    from seg_rt.demo.model import is_demo_folder, weights_dir

    path = weights_dir()
    note = "procedural shapes, see README); for SDXL pass --model stabilityai/stable-diffusion-xl-base-1.0 "
    return bundled(path, is_demo_folder(path), "demo model", note + "or a local SDXL folder")


def quiet_libraries() -> None:
    """Keep stderr for our progress bar and errors: no library loading bars or deprecation chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command (``args.func``). Bad input (usage, ``ValueError``,
    ``OSError``, ``ImportError``, seg-rt's own errors) ends in one line on stderr and exit code 2."""
    try:
        args = parser.parse_args(argv)
        quiet_libraries()
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
        )
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, SegRtError) as exc:
        print(f"seg-rt: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:  # an allocation failure is one line, anything else a bug
        line = allocation_failure(exc)
        if line is None:
            raise
        print(f"seg-rt: error: {line}", file=sys.stderr)
        return 2
