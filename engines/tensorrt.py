"""TensorRT denoiser: ``execute_async_v3`` on torch CUDA tensors bound by address, optional CUDA graph.

Lifecycle as in TensorRT's demo: load (deserialize) → allocate (static torch buffers) → infer.
The sidecar, shape checks, row padding and runtime-σ blur inputs are ``FixedShapeDenoiser``'s
(shared with ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from seg_rt.artifacts import ArtifactInfo
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.optional import require

from .base import BLUR_INPUT_PREFIX, FixedShapeDenoiser


class TensorRTDenoiser(FixedShapeDenoiser):
    """Run a seg-rt TensorRT engine. ``cuda_graph=True`` captures one launch and replays it."""

    kind = "tensorrt"
    file_label = "TensorRT engine"

    def __init__(
        self,
        folder: str | Path,
        *,
        cuda_graph: bool = False,
        device: int = 0,
        info: ArtifactInfo | None = None,
    ) -> None:
        trt = require("tensorrt", "TensorRT engines")
        if not torch.cuda.is_available():
            raise EnvironmentUnavailable("TensorRT engines need an NVIDIA GPU; none is visible")
        super().__init__(folder, info)
        self.device = torch.device("cuda", device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ValueError(
                f"cannot load TensorRT engine {str(self.path)!r}: corrupted, or built for another TensorRT version or GPU"
            )
        self.context = self.engine.create_execution_context()
        self.buffers: dict[str, Tensor] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._open_twin(cuda_graph=cuda_graph, device=device)
        self.configure(self.sigma)

    def _set_blur(self, matrices: Mapping[str, Tensor]) -> None:
        for name, m in matrices.items():
            self.buffers[name].copy_(m)  # static buffers: a captured CUDA graph sees the new σ

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _run(self, inputs: Mapping[str, Tensor]) -> Tensor:
        for name in self.info.input_names:
            if name.startswith(BLUR_INPUT_PREFIX):
                continue
            self.buffers[name].copy_(inputs[name])  # static buffers: addresses never change
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if self.cuda_graph and self._graph is None:
                self._launch()  # warm-up outside capture
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=self.stream):
                    self._launch()
            if self._graph is not None:
                self._graph.replay()
            else:
                self._launch()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return self.buffers[self.info.output_names[0]].clone()  # the next run overwrites the buffer

    def _release(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None
        self.buffers = {}


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bool: torch.bool,
        trt.int64: torch.int64,
    }
    if hasattr(trt, "bfloat16"):  # TensorRT >= 9 only
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]
