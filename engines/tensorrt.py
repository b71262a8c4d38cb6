"""TensorRT denoiser: ``execute_async_v3`` on torch CUDA tensors bound by address, optional CUDA graph.

Lifecycle as in TensorRT's demo: load (deserialize) → allocate (static torch buffers) → infer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from seg_rt.artifacts import read_info
from seg_rt.errors import EnvironmentUnavailable
from seg_rt.optional import require

from .base import ShapeSpec, blur_inputs, check_artifact_config, pad_rows


class TensorRTDenoiser:
    """Run a seg-rt TensorRT engine. ``cuda_graph=True`` captures one launch and replays it."""

    def __init__(self, folder: str | Path, *, cuda_graph: bool = False, device: int = 0) -> None:
        trt = require("tensorrt", "TensorRT engines")
        if not torch.cuda.is_available():
            raise EnvironmentUnavailable("TensorRT engines need an NVIDIA GPU; none is visible")
        self.folder = Path(folder)
        self.info = read_info(self.folder)
        if self.info.kind != "tensorrt":
            raise ValueError(f"{str(self.folder)!r} holds a {self.info.kind} artifact, not a TensorRT engine")
        path = self.folder / self.info.file
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine {str(path)!r} is missing")
        self.device = torch.device("cuda", device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(
                f"cannot load TensorRT engine {str(path)!r}: corrupted, or built for another TensorRT version or GPU"
            )
        self.context = self.engine.create_execution_context()
        self.shapes = ShapeSpec(self.info.rows, self.info.latent_height, self.info.latent_width)
        self.sigma = float("inf") if self.info.dynamic_sigma else float(self.info.sigma)
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
        self.configure(self.sigma, None)

    def configure(self, sigma: float, layers: Sequence[str] | None) -> None:
        check_artifact_config(self.info, sigma, layers)
        for name, m in blur_inputs(self.info, sigma).items():
            self.buffers[name].copy_(m)
        self.sigma = float(sigma)

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        sample = inputs["sample"]
        rows, want = sample.shape[0], self.info.rows
        self.shapes.check(max(rows, want), sample.shape[-2], sample.shape[-1])
        padded = pad_rows(inputs, want)
        for name in self.info.input_names:
            if name.startswith("seg_blur_"):
                continue
            self.buffers[name].copy_(padded[name])  # static buffers: addresses never change
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
        out = self.buffers[self.info.output_names[0]][:rows].clone()
        return out.to(sample.dtype)

    def close(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bool: torch.bool,
        trt.int64: torch.int64,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]
