"""ONNX Runtime denoiser over a seg-rt ONNX export (``seg-rt export onnx``).

CPU provider by default; CUDA / TensorRT providers when asked for and present, with IO binding of
torch CUDA tensors. A requested provider that the session did not actually activate is an error,
never a silent CPU fallback. Requests with fewer rows than the fixed engine batch are padded
(extra rows unperturbed) and the padding is cut off the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seg_rt.artifacts import ArtifactInfo, read_info
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.optional import require

from .base import ShapeSpec, blur_inputs, check_artifact_config, pad_rows

logger = logging.getLogger(__name__)

_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
}
_TORCH = {np.float32: torch.float32, np.float16: torch.float16, np.bool_: torch.bool, np.int64: torch.int64}


class OnnxRuntimeDenoiser:
    """Run an exported SEG denoiser with ONNX Runtime.

    ``threads`` sets intra-op threads (default: ONNX Runtime's choice); ``optimization`` is the
    graph optimisation level name (``disable``, ``basic``, ``extended``, ``all``).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        optimization: str = "all",
    ) -> None:
        ort = require("onnxruntime", "ONNX Runtime engines")
        self.folder = Path(folder)
        self.info: ArtifactInfo = read_info(self.folder)
        if self.info.kind != "onnx":
            raise ValueError(f"{str(self.folder)!r} holds a {self.info.kind} artifact, not an ONNX model")
        path = self.folder / self.info.file
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {str(path)!r} is missing")
        options = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
        options.graph_optimization_level = levels[optimization]
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(
                f"ONNX Runtime provider(s) {', '.join(missing)} not available here (available: {', '.join(available)})"
            )
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail / InvalidProtobuf / ... types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot load ONNX model {str(path)!r}: {first[:300]}") from None
        active = self.session.get_providers()
        inactive = [p for p in providers if p not in active]
        if inactive:
            raise EnvironmentUnavailable(
                f"requested ONNX Runtime provider(s) {', '.join(inactive)} did not activate (active: {', '.join(active)})"
            )
        self.providers = tuple(active)
        self.device = torch.device(
            "cuda" if providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        )
        self.input_types = {i.name: _NP.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.shapes = ShapeSpec(self.info.rows, self.info.latent_height, self.info.latent_width)
        self._blur: dict[str, np.ndarray] = {}
        self.sigma = math.inf if self.info.dynamic_sigma else float(self.info.sigma)
        if self.info.dynamic_sigma:
            self.configure(self.sigma, None)

    def configure(self, sigma: float, layers: Sequence[str] | None) -> None:
        """Set σ (runtime-σ exports only) and check the SEG layers match the export."""
        check_artifact_config(self.info, sigma, layers)
        self._blur = {
            k: v.numpy().astype(self.input_types[k]) for k, v in blur_inputs(self.info, sigma).items()
        }
        self.sigma = float(sigma)

    def run_raw(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """One session run on exactly the engine's shapes (no padding)."""
        missing = [n for n in self.input_types if n not in self._blur and n not in inputs]
        if missing:
            raise ValueError(f"engine input(s) {', '.join(missing)} missing from the request")
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feed = {
            name: self._blur[name]
            if name in self._blur
            else np.ascontiguousarray(inputs[name].detach().cpu().numpy().astype(dtype))
            for name, dtype in self.input_types.items()
        }
        return torch.from_numpy(self.session.run(list(self.info.output_names), feed)[0])

    def _run_bound(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """CUDA: bind torch tensors by address (no host copies); output allocated by torch."""
        binding = self.session.io_binding()
        keep = []  # tensors must outlive the run
        for name, dtype in self.input_types.items():
            src = torch.from_numpy(self._blur[name]) if name in self._blur else inputs[name]
            t = src.to(device=self.device, dtype=_TORCH[dtype]).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", t.device.index or 0, dtype, tuple(t.shape), t.data_ptr())
        sample = inputs["sample"]
        out = torch.empty(tuple(sample.shape), dtype=_TORCH[self.input_types["sample"]], device=self.device)
        binding.bind_output(
            self.info.output_names[0],
            "cuda",
            out.device.index or 0,
            self.input_types["sample"],
            tuple(out.shape),
            out.data_ptr(),
        )
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return out

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        sample = inputs["sample"]
        rows, want = sample.shape[0], self.info.rows
        self.shapes.check(max(rows, want), sample.shape[-2], sample.shape[-1])
        out = self.run_raw(pad_rows(inputs, want))[:rows]  # fixed shape: pad, then cut the padding off
        return out.to(device=sample.device, dtype=sample.dtype)

    def close(self) -> None:
        self.session = None
