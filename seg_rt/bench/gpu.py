"""``seg-rt bench gpu``: the GPU step check, on one CUDA GPU.

Needs only torch (CUDA build) and diffusers: no TensorRT, no network, random weights. Under
8 minutes on one H100-class GPU. Measures, for an SDXL-shaped UNet (SDXL's full config, random
weights) in fp16 at 128x128 latents (1024x1024 images):

- the step-cost ratios of ``seg-rt bench step`` (vanilla, CFG+SEG batched / shared prefix, CFG+PAG,
  the cheap modes) against the CFG step, for SEG layers ``mid`` and ``up``;
- the CFG+SEG step in torch eager, ``torch.compile`` (batched SEG: a traced forward keeps the mask
  as data) and CUDA graphs (eager shared-prefix forward captured once: possible because the hot
  path reads nothing back from the device);
- exported engines (ONNX Runtime CUDA, TensorRT, where installed): CFG+SEG without and with the
  in-graph fork and SEG without CFG, as ratios to a CFG step (``step_onnx``);
- UNet-only images/s at batch 1 and 4 (25 steps of CFG+SEG), and peak GPU memory of each;
- on CUDA, correctness checks: one SEG step (batched and shared prefix) under
  ``torch.cuda.set_sync_debug_mode("error")`` (no host sync), shared prefix vs batched in fp16 and
  fp32, and image 0 of a batch of 2 vs the same image alone (bit-equal or not, max difference).

Each section is printed as one JSON line as soon as it is done (``{"section": ...}``), so a run cut
short still reports what it measured; the last line is the whole result.

``--device cpu --tiny`` is a dry run of the same code on a tiny UNet (fp32, no compile, no graphs):
what the tests run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from seg_rt.errors import EnvironmentUnavailable
from seg_rt.sampler import build_batch

from .models import move_inputs, sdxl_shaped_unet, step_inputs
from .step import STEP_MODES, bench_step_case

STEPS = 25  # images/s are for this many steps of CFG+SEG
DEVICE = "cuda"  # the defaults of ``run`` (and so of the CLI's flags)
LATENT = 128  # latent height = width: 1024 px images
PAIRS = 10  # alternating timing pairs per ratio


def check_options(latent: int, pairs: int) -> None:
    """The latent side and pair count ``run`` accepts; one line naming the bad value."""
    if latent < 8 or latent % 8:
        raise ValueError(f"--latent must be a multiple of 8 and >= 8, got {latent}")
    if pairs < 2:
        raise ValueError(f"--pairs must be >= 2, got {pairs}")


def check_device(device: str, tiny: bool) -> torch.device:
    """The device to run on; a clear one-line error when it cannot be used."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentUnavailable(
            "seg-rt bench gpu needs a CUDA GPU (torch.cuda.is_available() is False); for a CPU dry run use --device cpu --tiny"
        )
    if dev.type != "cuda" and not tiny:
        raise EnvironmentUnavailable(f"--device {device} is only for the dry run: add --tiny")
    return dev


def sdxl_unet(tiny: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """SDXL's UNet config with random weights (built directly on ``device``), or a tiny one."""
    from diffusers import UNet2DConditionModel

    if tiny:
        return sdxl_shaped_unet(width_scale=10).to(device, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048,
        )
    return unet.to(dtype).eval()


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device sync, so host timers measure the GPU work."""
    if device.type != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def cuda_graph_step(den, inputs, device: torch.device) -> Callable[[], object] | None:
    """Capture one eager (shared-prefix) SEG forward in a CUDA graph; replays it on static buffers."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture (blur matrices cached, kernels chosen)
            den(inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        den(inputs)
    return graph.replay


def engine_rows(unet: nn.Module, latent: int, device: torch.device, dtype, reps: int, compile: bool) -> dict:
    """CFG+SEG (mid) step: eager vs CUDA graph (or torch.compile alone with ``compile``); images/s
    at batch 1 and 4."""
    out: dict = {}
    for n in (1, 4):
        out |= engine_batch(unet, latent, n, device, dtype, reps, compile)
    if device.type != "cuda" and not compile:
        out["cuda_graph"] = "skipped: needs CUDA"
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(1, max|b|), in float64 (tests/tolerance.py's measure)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def gpu_checks(unet: nn.Module, latent: int, device: torch.device) -> dict:
    """Sync-free SEG step, shared prefix vs batched (fp16 and fp32), batch of 2 vs solo."""
    from seg_rt.engines import TorchDenoiser

    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    out: dict = {}
    t = torch.tensor(500.0, device=device)
    for dtype in (torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        unet.to(dtype)  # fp16 -> fp32 -> fp16 is lossless
        x, cond, uncond = move_inputs(step_inputs(unet, latent, 2), device, dtype)
        batch = build_batch(["uncond", "cond", "seg"], x, t, cond, uncond)
        solo = build_batch(
            ["uncond", "cond", "seg"],
            x[:1],
            t,
            {k: v[:1] for k, v in cond.items()},
            {k: v[:1] for k, v in uncond.items()},
        )
        with torch.no_grad(), TorchDenoiser(unet, sigma=10.0, layers=["mid"], shared_prefix=True) as den:
            batched = den(dict(batch))  # a plain dict: no host layout, every row runs the whole UNet
            shared = den(batch)
            one = den(solo)
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                den(batch)
                den(dict(batch))
                out[f"sync_free_{name}"] = True
            except RuntimeError as exc:
                out[f"sync_free_{name}"] = f"no: {str(exc).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out[f"shared_vs_batched_rel_{name}"] = relative(shared, batched)
        rows0 = shared[0::2]  # image 0's uncond, cond and perturbed rows
        out[f"batch_vs_solo_bit_equal_{name}"] = bool(torch.equal(rows0, one))
        out[f"batch_vs_solo_rel_{name}"] = relative(rows0, one)
    unet.to(torch.float16)
    return out


def engine_batch(
    unet: nn.Module, latent: int, n: int, device: torch.device, dtype, reps: int, compile: bool
) -> dict:
    """``engine_rows`` for ``n`` images: one CFG+SEG batch of 3n rows."""
    from seg_rt.engines import TorchDenoiser

    x, cond, uncond = move_inputs(step_inputs(unet, latent, n), device, dtype)
    batch = build_batch(["uncond", "cond", "seg"], x, torch.tensor(500.0, device=device), cond, uncond)
    out: dict = {}
    with torch.no_grad(), TorchDenoiser(unet, sigma=math.inf, layers=["mid"], shared_prefix=True) as den:
        variants = {"eager": synced(lambda: den(batch), device)}
        graph = None if compile else cuda_graph_step(den, batch, device)
        if graph is not None:
            variants["cuda_graph"] = synced(graph, device)
        if compile:  # traced: the fork is skipped, the mask stays data (batched SEG)
            compiled = torch.compile(den.model, dynamic=False)
            call = synced(lambda: compiled(dict(batch)), device)
            t0 = time.perf_counter()
            call()
            out[f"compile_warmup_s_batch{n}"] = round(time.perf_counter() - t0, 1)
            variants["compile"] = call
        for name, fn in variants.items():
            ms = median_ms(fn, reps)
            out[f"{name}_step_ms_batch{n}"] = ms
            out[f"{name}_images_per_s_batch{n}"] = round(n / (STEPS * ms / 1000), 3)
            out[f"{name}_peak_mib_batch{n}"] = peak_mib(fn, device)
    return out


def onnx_engine_rows(pairs: int) -> list[dict]:
    """``seg-rt bench step``'s exported-engine rows (``step_onnx``) on ONNX Runtime CUDA and TensorRT
    (fp16; a runtime not installed gives a ``skipped`` row): the SD1.5-shaped 1/5-width UNet at
    64x64 latents (512 px), so its exports and engine builds fit the bench's minutes."""
    from .models import sd15_shaped_pipeline
    from .step_onnx import bench_step_onnx

    name = "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch)"
    return [
        bench_step_onnx(sd15_shaped_pipeline(), name, size=512, pairs=pairs, runtime=runtime)
        for runtime in ("onnxruntime-cuda", "tensorrt")
    ]


def emit(section: str, data: object) -> None:
    """One section's result as a JSON line, at once (a run cut short keeps what it measured)."""
    print(json.dumps({"section": section, "data": data}), flush=True)


def run(
    device: str | torch.device = DEVICE,
    tiny: bool = False,
    latent: int = LATENT,
    pairs: int = PAIRS,
    skip_compile: bool = False,
) -> dict:
    """Every section (``emit`` prints each as it finishes); the whole result. ``tiny``: the CPU dry run."""
    check_options(latent, pairs)
    device = check_device(device, tiny)  # str -> torch.device
    dtype = torch.float32 if tiny else torch.float16
    latent = 8 if tiny else latent
    t0 = time.perf_counter()
    unet = sdxl_unet(tiny, device, dtype)
    result: dict = {
        "bench": "gpu-step",
        "model": "tiny SDXL-shaped UNet (dry run)" if tiny else "SDXL UNet config, random weights",
        "dtype": str(dtype).removeprefix("torch."),
        "latent": f"{latent}x{latent}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    emit("setup", result)
    if not tiny:
        result["checks"] = gpu_checks(unet, min(latent, 64), device)
        emit("checks", result["checks"])
    ratios = []
    for layers in ("mid", "up"):
        modes = ("cfg_seg", "cfg_seg_shared") if tiny else STEP_MODES  # the dry run: a few calls
        row = bench_step_case(unet, "SDXL", [layers], latent, pairs, device, dtype, modes)
        ratios.append(
            {k: v for k, v in row.items() if k.endswith(("_over_cfg", "_over_cfg_iqr", "ms", "layers"))}
        )
        emit(f"ratios_{layers}", ratios[-1])
    result["ratios"] = ratios
    reps = 1 if tiny else max(3, pairs)
    result["engines"] = engine_rows(unet, latent, device, dtype, reps=reps, compile=False)
    emit("engines", result["engines"])
    if not tiny:  # exported engines: ONNX Runtime CUDA and TensorRT, with and without the in-graph fork
        result["onnx_engines"] = onnx_engine_rows(pairs)
        emit("onnx_engines", result["onnx_engines"])
    if skip_compile or tiny:
        result["engines"]["compile"] = "skipped"
    else:  # last: its warm-up is minutes
        compiled = engine_rows(unet, latent, device, dtype, reps=reps, compile=True)
        emit("compile", compiled)  # its eager rows: the baseline measured next to the compiled ones
        result["engines"] |= {k: v for k, v in compiled.items() if not k.startswith("eager")}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
