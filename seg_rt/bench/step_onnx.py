"""``seg-rt bench step``'s ONNX Runtime rows: the SEG step cost of exported engines, with and without
the in-graph shared-prefix fork (``seg-rt export onnx --fork``), as ratios to a CFG step.

The CFG baseline is the plain diffusers UNet exported to ONNX (two rows ``[uncond, cond]``, no SEG
processors), so every ratio is against what a CFG-only engine costs. The SEG engines are the seg-rt
exports of the same UNet: ``[uncond, cond, seg]`` without the fork (every row runs the whole UNet),
with it (the SEG row forks off the cond row at the first SEG block), and the no-CFG layouts. All are
timed in this process as alternating pairs against the CFG engine (``timing.alternating_ratio``).
"""

from __future__ import annotations

import math
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from seg_rt.sampler import build_batch

from .timing import alternating_ratio

ONNX_MODES = (
    "cfg_seg", "cfg_seg_fork", "cfg_on_fork_engine", "seg_no_cfg", "seg_no_cfg_fork", "torch_cfg_seg_shared",
)  # fmt: skip
"""``cfg_seg``: [uncond, cond, seg] on the unforked export; ``cfg_seg_fork``: the same rows on the
fork export; ``cfg_on_fork_engine``: a CFG step (outside the SEG window) on that fork engine (its
unforked twin runs it); ``seg_no_cfg`` / ``seg_no_cfg_fork``: [cond, seg] on the no-CFG exports;
``torch_cfg_seg_shared`` (CPU only): the PyTorch path in this process for comparison, its shared-prefix
CFG+SEG step over its own CFG step (``TorchDenoiser``, torch at the ONNX Runtime thread count)."""


class _PlainUNet(nn.Module):
    """The diffusers UNet as a plain (CFG) ONNX graph: sample, timestep, text states → prediction."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def _plain_session(unet: nn.Module, inputs: dict, path: Path, threads: int | None):
    import onnxruntime as ort

    names = ("sample", "timestep", "encoder_hidden_states")
    with torch.no_grad():
        program = torch.onnx.export(
            _PlainUNet(unet).eval(),
            tuple(inputs[n] for n in names),
            input_names=list(names),
            output_names=["out_sample"],
            opset_version=18,
            dynamo=True,
            optimize=True,
        )
    program.save(path)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {n: inputs[n].numpy() for n in names}
    return lambda: session.run(None, feed)


RUNTIMES = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


def runtime_available(runtime: str) -> str | None:
    """None when ``runtime`` can run here, else why not (one line)."""
    import importlib.util

    if runtime == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "skipped: TensorRT is not installed"
        return None if torch.cuda.is_available() else "skipped: needs CUDA"
    import onnxruntime as ort

    if runtime == "onnxruntime-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "skipped: onnxruntime has no CUDAExecutionProvider here"
    return None


def _engine(runtime: str, folder: Path, threads: int | None):
    """A seg-rt engine over the export ``folder`` on ``runtime`` (TensorRT: built next to it, fp16)."""
    if runtime == "tensorrt":
        from seg_rt.engines.tensorrt import TensorRTDenoiser
        from seg_rt.export.tensorrt import build_engine

        trt_dir = folder.with_name(folder.name + "-trt")
        build_engine(folder, trt_dir, precision="fp16")
        return TensorRTDenoiser(trt_dir)
    from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser

    providers = ("CUDAExecutionProvider",) if runtime == "onnxruntime-cuda" else ("CPUExecutionProvider",)
    return OnnxRuntimeDenoiser(folder, providers=providers, threads=threads)


def bench_step_onnx(
    pipe,
    model: str,
    *,
    size: int = 256,
    pairs: int = 5,
    layers: Sequence[str] = ("mid",),
    threads: int | None = None,
    modes: Sequence[str] = ONNX_MODES,
    runtime: str = "onnxruntime-cpu",
) -> dict:
    """One row: each ``modes`` step on ``runtime`` as a ratio to a CFG step. On ONNX Runtime CPU the
    CFG step is the plain UNet graph; on the GPU runtimes (fp16 exports) it is the unforked no-CFG
    seg-rt export fed ``[uncond, cond]`` with no row perturbed (a TensorRT-buildable seg-rt folder:
    the same two UNet rows plus the masked-out blur MatMuls)."""
    from seg_rt.export.onnx import export_onnx
    from seg_rt.families import family_of

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    why = runtime_available(runtime)
    if why is not None:
        return {"bench": "step", "engine": runtime, "model": model, "skipped": why}
    gpu = runtime != "onnxruntime-cpu"

    family = family_of(pipe)
    probe = family.export_model(pipe, sigma=math.inf, layers=layers)
    try:
        raw = family.export_inputs(pipe, probe, 2, 1, size, size, torch.float32, seed=1)
    finally:
        probe.remove()
    cond = {"encoder_hidden_states": raw["encoder_hidden_states"][1:]}
    uncond = {"encoder_hidden_states": raw["encoder_hidden_states"][:1]}
    x, t = raw["sample"][1:], torch.tensor(500.0)
    batch = {
        names: build_batch(list(names), x, t, cond, uncond)
        for names in (("uncond", "cond"), ("uncond", "cond", "seg"), ("cond", "seg"))
    }
    exports = {  # mode -> (with_cfg, fork, rows)
        "cfg_seg": (True, False, ("uncond", "cond", "seg")),
        "cfg_seg_fork": (True, True, ("uncond", "cond", "seg")),
        "cfg_on_fork_engine": (True, True, ("uncond", "cond")),
        "seg_no_cfg": (False, False, ("cond", "seg")),
        "seg_no_cfg_fork": (False, True, ("cond", "seg")),
    }
    row = {
        "bench": "step",
        "engine": runtime,
        "model": model,
        "layers": list(layers),
        "latent": f"{size // 8}x{size // 8}",
        "dtype": "float16" if gpu else "float32",
        "pairs": pairs,
        "baseline": "unforked no-CFG export, [uncond, cond] unperturbed"
        if gpu
        else "plain UNet ONNX graph, [uncond, cond]",
    }
    engines: dict[tuple, object] = {}

    def engine_for(with_cfg: bool, fork: bool):
        if (with_cfg, fork) not in engines:
            out = Path(tmp) / f"seg-{int(with_cfg)}{int(fork)}"
            export_onnx(
                pipe,
                out,
                height=size,
                width=size,
                with_cfg=with_cfg,
                sigma=2.0,
                layers=layers,
                fork=fork,
                fp16=gpu,
            )
            engines[with_cfg, fork] = _engine(runtime, out, threads)
        return engines[with_cfg, fork]

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        try:
            if gpu:
                base, cfg_inputs = engine_for(False, False), batch[("uncond", "cond")]
                cfg = lambda: base(cfg_inputs)  # noqa: E731
            else:
                cfg = _plain_session(
                    pipe.unet, dict(batch[("uncond", "cond")]), Path(tmp) / "cfg.onnx", threads
                )
            for mode in modes:
                if mode == "torch_cfg_seg_shared":
                    if not gpu:
                        row |= _torch_shared(pipe.unet, batch, layers, pairs, threads)
                    continue
                with_cfg, fork, rows = exports[mode]
                engine, inputs = engine_for(with_cfg, fork), batch[rows]
                if fork:
                    row["fork_block"] = engine.info.fork_block
                r = alternating_ratio(cfg, lambda e=engine, i=inputs: e(i), pairs, calls=1)
                row[f"{mode}_over_cfg"] = r["ratio_median"]
                row[f"{mode}_over_cfg_iqr"] = [r["ratio_p25"], r["ratio_p75"]]
                row["cfg_step_ms"] = r["baseline_ms_median"]
        finally:
            for engine in engines.values():
                engine.close()
    import onnxruntime

    if gpu:
        torch.cuda.synchronize()  # the engines return synchronised outputs; nothing left in flight
    row |= {
        "ort_threads": threads or "default",
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    return row


def _torch_shared(unet, batch, layers, pairs: int, threads: int | None) -> dict:
    """The PyTorch shared-prefix CFG+SEG step over the PyTorch CFG step, alternating (same inputs)."""
    from seg_rt.engines import TorchDenoiser

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    den = TorchDenoiser(unet, sigma=2.0, layers=layers, shared_prefix=True)
    try:
        cfg, seg = batch[("uncond", "cond")], batch[("uncond", "cond", "seg")]
        r = alternating_ratio(lambda: den(cfg), lambda: den(seg), pairs, calls=1)
    finally:
        den.close()
        torch.set_num_threads(before)
    return {
        "torch_cfg_seg_shared_over_cfg": r["ratio_median"],
        "torch_cfg_seg_shared_over_cfg_iqr": [r["ratio_p25"], r["ratio_p75"]],
        "torch_cfg_step_ms": r["baseline_ms_median"],
        "torch_threads": threads or before,
    }


def describe(row: dict) -> str:
    if "skipped" in row:
        return f"{row['model']} on {row['engine']}: {row['skipped']}"
    return (
        f"{row['model']} on {row['engine']}, SEG {','.join(row['layers'])}: CFG step {row['cfg_step_ms']:.0f} ms; "
        + ", ".join(f"{m} {row[f'{m}_over_cfg']:.2f}x" for m in ONNX_MODES if f"{m}_over_cfg" in row)
    )
