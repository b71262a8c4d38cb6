"""Build a TensorRT engine from a seg-rt ONNX export, with the TensorRT Python API.

Separate verbs: ``check`` (what TensorRT will refuse, runnable anywhere), ``build`` (needs TensorRT
and a GPU). The engine folder holds ``denoiser.plan`` and ``seg_rt.json``; the timing cache is kept
where the caller says, keyed by TensorRT's own versioning.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from seg_rt.artifacts import check_out_dir, is_export_folder, read_info, staged_dir
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.images import write_atomic
from seg_rt.optional import require

from .checks import tensorrt_unsupported

logger = logging.getLogger(__name__)

ENGINE_FILE = "denoiser.plan"
TWIN_ENGINE_FILE = "denoiser_twin.plan"  # a fork export's unforked twin (ArtifactInfo.twin_file)
PRECISIONS = ("fp32", "fp16", "bf16")


def check_onnx_for_tensorrt(onnx_dir: str | Path) -> None:
    """Raise ``ValueError`` naming every operator TensorRT cannot parse (in each graph of the folder:
    a fork export's twin too)."""
    info = read_info(onnx_dir)
    for name in info.files:
        bad = tensorrt_unsupported(Path(onnx_dir) / name)
        if bad:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(bad.items()))
            raise ValueError(f"ONNX graph {name} has operators TensorRT does not support: {listed}")


def build_engine(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "fp16",
    timing_cache: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """ONNX → serialized TensorRT engine + sidecar. seg-rt exports are fixed-shape, so the engine
    needs no optimization profile. ``timing_cache`` is read when it exists and written back."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_out_dir(out_dir, is_export_folder, overwrite=overwrite)  # before the (long) build
    info = read_info(onnx_dir)
    if info.kind != "onnx":
        raise ValueError(f"{str(onnx_dir)!r} holds a {info.kind} artifact; build engines from an ONNX export")
    check_onnx_for_tensorrt(onnx_dir)
    trt = require("tensorrt", "building TensorRT engines")
    torch = require("torch")
    if not torch.cuda.is_available():
        raise EnvironmentUnavailable("building a TensorRT engine needs an NVIDIA GPU; none is visible")

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(
        cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)

    def build(onnx_file: str) -> bytes:
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse_from_file(str(Path(onnx_dir) / onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT cannot parse the ONNX model {onnx_file}: {errors}")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(
                f"TensorRT failed to build the engine of {onnx_file} (see the TensorRT log above)"
            )
        return bytes(serialized)

    # a fork export's twin gets its own engine (the same builder config and timing cache)
    engines = {ENGINE_FILE: build(info.file)}
    if info.twin_file is not None:
        engines[TWIN_ENGINE_FILE] = build(info.twin_file)
    with staged_dir(out_dir, is_export_folder, overwrite=overwrite) as tmp:
        for name, data in engines.items():
            (tmp / name).write_bytes(data)
        extra = {
            "precision": precision,
            "gpu": torch.cuda.get_device_name(0),
            "onnx": str(Path(onnx_dir).resolve()),
        }
        versions = {**info.versions, "tensorrt": trt.__version__}
        twin = None if info.twin_file is None else TWIN_ENGINE_FILE
        dataclasses.replace(
            info, kind="tensorrt", file=ENGINE_FILE, twin_file=twin, versions=versions, extra=extra
        ).write(tmp)
    if cache_path:
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return Path(out_dir)
