"""ONNX Runtime denoiser over a seg-rt ONNX export (``seg-rt export onnx``).

CPU provider by default; CUDA / TensorRT providers when asked for and present, with IO binding of
torch CUDA tensors. A requested provider that the session did not actually activate is an error,
never a silent CPU fallback. The sidecar, shape checks, row padding and runtime-σ blur inputs are
``FixedShapeDenoiser``'s (shared with TensorRT).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seg_rt.artifacts import ArtifactInfo
from seg_rt.errors import EnvironmentUnavailable, first_line
from seg_rt.optional import require

from .base import FixedShapeDenoiser

logger = logging.getLogger(__name__)

_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
}
_TORCH = {np.float32: torch.float32, np.float16: torch.float16, np.bool_: torch.bool, np.int64: torch.int64}


class OnnxRuntimeDenoiser(FixedShapeDenoiser):
    """Run an exported SEG denoiser with ONNX Runtime.

    ``threads`` sets intra-op threads (default: ONNX Runtime's choice); ``optimization`` is the
    graph optimisation level name (``disable``, ``basic``, ``extended``, ``all``).
    """

    kind = "onnx"
    file_label = "ONNX model"

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        optimization: str = "all",
        info: ArtifactInfo | None = None,
    ) -> None:
        ort = require("onnxruntime", "ONNX Runtime engines")
        super().__init__(folder, info)
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
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail / InvalidProtobuf / ... types
            first = first_line(exc)
            raise ValueError(f"cannot load ONNX model {str(self.path)!r}: {first[:300]}") from None
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
        self._blur: dict[str, np.ndarray] = {}
        self._open_twin(providers=providers, threads=threads, optimization=optimization)
        self.configure(self.sigma)

    def _set_blur(self, matrices: Mapping[str, Tensor]) -> None:
        self._blur = {k: v.numpy().astype(self.input_types[k]) for k, v in matrices.items()}

    def _run(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """One session run on exactly the engine's shapes."""
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

    def _release(self) -> None:
        self.session = None
        self._blur = {}
