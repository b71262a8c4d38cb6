"""Export a SEG-patched diffusers denoiser to a fixed-shape ONNX model, then validate it.

The graph takes the docs/design.md §5 inputs (``sample``, ``timestep``, ``encoder_hidden_states``, SDXL's
``text_embeds`` / ``time_ids``, ControlNet's ``controlnet_cond`` / ``conditioning_scale``) plus
``seg_mask`` (which rows are perturbed) and returns ``out_sample``. The SEG blur is the fixed-shape
separable op: MatMuls with blur matrices that are initializers (σ baked) or graph inputs
``seg_blur_<n>`` (``dynamic_sigma``: one model serves every σ, inf included).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_rt.artifacts import RUNTIME_SIGMA, ArtifactInfo, is_export_folder, staged_dir
from seg_rt.blur import blur_matrix
from seg_rt.config import check_sigma
from seg_rt.denoiser import SEGUNet
from seg_rt.errors import ExportValidationError
from seg_rt.families import REGISTRY, family_of
from seg_rt.optional import require
from seg_rt.params import check_size

from .fork import ForkGraph, ForkPlan, fork_inputs, twin_inputs

logger = logging.getLogger(__name__)

ONNX_FILE = "denoiser.onnx"
TWIN_FILE = "denoiser_twin.onnx"  # a fork export's unforked twin (ArtifactInfo.twin_file)
OUTPUT_NAME = "out_sample"
TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    info: ArtifactInfo
    validation: dict | None
    seconds: float


class SEGGraph(nn.Module):
    """The traced function: positional tensors by name → SEGUNet; blur matrices as inputs if dynamic."""

    def __init__(self, model: SEGUNet, input_names: Sequence[str], blur_lengths: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(input_names)
        self.blur_lengths = tuple(blur_lengths)

    def forward(self, *args: Tensor) -> Tensor:
        inputs = dict(zip(self.names, args, strict=True))
        matrices = {n: inputs[f"seg_blur_{n}"] for n in self.blur_lengths} or None
        with self.model.seg.runtime_blur(matrices):
            return self.model(inputs)


def export_onnx(
    pipe,
    out_dir: str | Path,
    *,
    height: int,
    width: int,
    batch: int = 1,
    with_cfg: bool = True,
    sigma: float | None = math.inf,
    layers: Sequence[str] = ("mid",),
    fp16: bool = False,
    opset: int = 18,
    validate: bool = True,
    overwrite: bool = False,
    model_name: str = "",
    fork: bool = False,
    twin: bool = True,
) -> ExportResult:
    """Export ``pipe``'s SEG-patched denoiser for ``batch`` images per branch at ``height`` x ``width``.

        ``with_cfg`` selects the row layout ``[uncond, cond, seg]`` (else ``[cond, seg]``); ``sigma=None``
        makes σ a runtime input. ``fork`` puts the shared-prefix fork in the graph (``export.fork``): the
        per-row inputs hold the unperturbed rows only, ``fork_source`` picks the rows the perturbed ones
        copy, at the fork block (recorded in the sidecar with the prefix and fork row counts); ``twin`` (with
    ``fork``) also writes the unforked twin graph that runs the batches with no row to fork
    (``ArtifactInfo.twin_file``). The folder gets ``denoiser.onnx`` (+ ``.onnx.data`` when over 2 GB)
        and ``seg_rt.json``; it is written to a temp folder and renamed, so nothing half-written stays.
    """
    from seg_rt import __version__

    t0 = time.perf_counter()
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    f = pipe.vae_scale_factor
    family = family_of(pipe, "image")
    check_size(height, width, family.size_factor(pipe))
    if sigma is not None:
        check_sigma(sigma)
    twin = fork and twin
    if not family.exportable:
        exportable = [f.name for f in REGISTRY.families("image") if f.exportable]
        raise ValueError(f"ONNX export supports the families {', '.join(exportable)}, got {family.name}")
    dtype = torch.float16 if fp16 else torch.float32
    branches = ("uncond", "cond", "seg") if with_cfg else ("cond", "seg")
    rows = batch * len(branches)
    seg_sigma = math.inf if sigma is None else sigma
    net = family.net(pipe)
    model = family.export_model(pipe, sigma=seg_sigma, layers=layers)  # the same SEG denoiser interface
    original_dtype = net.dtype
    try:
        prefix = rows - batch  # every unperturbed row of the layout
        fork_block = fork_block_of(model, prefix, batch) if fork else None
        model.to(dtype)
        full = family.export_inputs(pipe, model, rows, batch, height, width, dtype)
        with torch.no_grad():
            model(full)  # records each SEG layer's token grid at these shapes
        blur_lengths = sorted({n for grid in model.grids() for n in grid}) if sigma is None else []
        blurs = {f"seg_blur_{n}": blur_matrix(n, 1.0).to(dtype) for n in blur_lengths}
        feeds = ExportFeeds.of(full, prefix, batch, fork=fork, twin=twin, extra=blurs)
        info = ArtifactInfo(
            kind="onnx",
            family=family.name,
            model=model_name or str(getattr(pipe, "name_or_path", "") or ""),
            height=height,
            width=width,
            latent_height=height // f,
            latent_width=width // f,
            batch=batch,
            branches=branches,
            input_names=tuple(feeds.inputs),
            output_names=(OUTPUT_NAME,),
            dtype=str(dtype).removeprefix("torch."),
            sigma=RUNTIME_SIGMA if sigma is None else float(sigma),
            layers=tuple(layers),
            layer_names=tuple(model.seg.layer_names),
            blur_lengths=tuple(blur_lengths),
            opset=opset,
            file=ONNX_FILE,
            versions=versions(__version__),
            fork_block=fork_block,
            prefix_rows=prefix if fork else None,
            fork_rows=batch if fork else None,
            twin_file=TWIN_FILE if twin else None,
        )
        validation = write_export(out_dir, model, info, feeds, validate=validate, overwrite=overwrite)
    finally:
        model.remove()
        net.to(original_dtype)
        if model.controlnet is not None:
            model.controlnet.to(original_dtype)
    return ExportResult(Path(out_dir), info, validation, time.perf_counter() - t0)


def fork_block_of(model: nn.Module, prefix: int, forked: int) -> str:
    """The block a fork export of ``model`` forks at; refuses (one line) a model that cannot fork,
    before any tracing. The plan is removed again: ``write_export`` installs it after the twin."""
    check = ForkPlan(model, prefix, forked)
    check.remove()
    return check.block


@dataclass
class ExportFeeds:
    """The example inputs of an export's graphs: the main graph's (``inputs``), the plain batch a fork
    graph's stand for (``reference``, its validation input), the twin's (``twin``)."""

    inputs: dict[str, Tensor]
    reference: dict[str, Tensor] | None = None
    twin: dict[str, Tensor] | None = None

    @classmethod
    def of(cls, full: dict, prefix: int, batch: int, *, fork: bool, twin: bool, extra: dict) -> ExportFeeds:
        """From the full-batch inputs ``full`` (``prefix`` unperturbed rows, then ``batch`` perturbed),
        plus the inputs every graph takes unchanged (``extra``: runtime blur matrices)."""
        if not fork:
            return cls({**full, **extra})
        inputs, reference = fork_inputs(full, prefix, batch)
        return cls(
            {**inputs, **extra},
            {**reference, **extra},
            {**twin_inputs(full, prefix), **extra} if twin else None,
        )


def write_export(
    out_dir, model: nn.Module, info: ArtifactInfo, feeds: ExportFeeds, *, validate: bool, overwrite: bool
):
    """Trace ``model`` into ``out_dir`` as ``info`` says (the twin first, while no fork hooks are
    installed; then the fork graph, or the plain one), write the sidecar and validate each graph against
    torch; in a temp folder renamed at the end. Returns the validation report (None without it). The fork
    hooks are removed whatever happens."""
    names, lengths = list(info.input_names), list(info.blur_lengths)
    plan = None
    try:
        with staged_dir(out_dir, is_export_folder, overwrite=overwrite) as tmp:
            if feeds.twin is not None:
                twin = SEGGraph(model, list(feeds.twin), lengths).eval()
                trace_and_save(twin, feeds.twin, list(feeds.twin), info.twin(), tmp / info.twin_file)
            if info.fork_rows is not None:
                plan = ForkPlan(model, info.prefix_rows, info.fork_rows)
                graph = ForkGraph(plan, names, lengths)
            else:
                graph = SEGGraph(model, names, lengths)
            trace_and_save(graph.eval(), feeds.inputs, names, info, tmp / info.file)
            info.write(tmp)
            if not validate:
                return None
            validation = validate_onnx(tmp, model, feeds.inputs, info, feeds.reference)
            if feeds.twin is not None:
                plan.remove()  # the twin's reference is the plain model
                plan = None
                validation = {**validation, "twin": validate_onnx(tmp, model, feeds.twin, info.twin())}
            return validation
    finally:
        if plan is not None:
            plan.remove()


def versions(seg_rt_version: str) -> dict:
    import diffusers
    import onnx

    return {
        "seg_rt": seg_rt_version,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnx": onnx.__version__,
    }


def trace_and_save(graph: nn.Module, inputs: dict, names: list[str], info: ArtifactInfo, path: Path) -> None:
    args = tuple(inputs[n] for n in names)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            args,
            input_names=names,
            output_names=[OUTPUT_NAME],
            opset_version=info.opset,
            dynamo=True,
            optimize=True,
        )
    program.model.metadata_props["seg_rt"] = info.to_json()
    program.model.producer_name = "seg-rt"
    size = sum(p.numel() * p.element_size() for p in graph.parameters())
    program.save(path, external_data=size >= TWO_GB)


def validate_onnx(
    folder: Path,
    model: SEGUNet,
    inputs: dict[str, Tensor],
    info: ArtifactInfo,
    reference: dict[str, Tensor] | None = None,
) -> dict:
    """Run ONNX Runtime on ``inputs`` and torch on the same batch (``reference``: the plain batch a
    fork graph's inputs stand for, run unforked); raise when they disagree.

    Tolerance: ``|ort - torch| <= atol + rtol * max|torch|`` with 1e-4 / 1e-4 in fp32 and
    1e-2 / 1e-2 in fp16 (fp16 is validated where a provider runs it, else reported as skipped).
    """
    import numpy as np

    ort = require("onnxruntime", "validating the export")
    matrices = {n: inputs[f"seg_blur_{n}"] for n in info.blur_lengths} or None
    plain = inputs if reference is None else reference
    with torch.no_grad(), model.seg.runtime_blur(matrices):
        ref = model({k: v for k, v in plain.items() if not k.startswith("seg_blur_")}).float()
    fp16 = info.dtype == "float16"
    providers = (
        ["CUDAExecutionProvider"]
        if fp16 and "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )
    try:
        session = ort.InferenceSession(str(folder / info.file), providers=providers)
        out = session.run([OUTPUT_NAME], {k: np.ascontiguousarray(v.numpy()) for k, v in inputs.items()})[0]
        out = torch.from_numpy(out).float()
    except Exception as exc:
        if not fp16:
            raise
        logger.warning("fp16 validation skipped: %s", exc)
        return {"skipped": f"fp16 on {providers[0]}: {type(exc).__name__}"}
    diff = (out - ref).abs()
    scale = ref.abs().max().item()
    atol = rtol = 1e-2 if fp16 else 1e-4
    report = {
        "max_abs_error": diff.max().item(),
        "max_rel_error": diff.max().item() / max(scale, 1e-12),
        "tolerance": f"atol {atol:g} + rtol {rtol:g} * max|ref|",
        "provider": providers[0],
    }
    if diff.max().item() > atol + rtol * scale:
        raise ExportValidationError(f"ONNX Runtime disagrees with torch: {json.dumps(report)}")
    logger.info("validation: %s", report)
    return report
