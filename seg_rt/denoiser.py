"""A diffusers UNet (and optional ControlNet) with SEG installed, called with named denoiser inputs.

This is the computation every engine runs: ``seg_rt.engines.TorchDenoiser`` calls it eagerly and
``seg_rt.export`` traces it into ONNX. Inputs follow docs/design.md ("The contracts") / the TensorRT-demo names.

Shared prefix (``shared_prefix=True``, ``TorchDenoiser``'s default): the perturbed rows of a batched
SEG step repeat the cond rows' inputs, so every layer before the first perturbed layer computes the
same numbers for both. With the default ``mid`` layers that is the whole down path and its skip
connections. The eager path then runs the UNet on the unperturbed rows only and forks the perturbed
rows off the cond rows at the top-level block that holds the first SEG layer (``SharedPrefix``, built
on ``seg_rt.prefix``): ~1/3 less down-path compute per SEG step.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SEGAttention, tracing
from .prefix import Fork, RowFork, first_block, fork_of
from .sampler import row_layout

BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states")
SDXL_INPUTS = ("text_embeds", "time_ids")
CONTROLNET_INPUTS = ("controlnet_cond", "conditioning_scale")


class RowwiseLinear(nn.Linear):
    """``nn.Linear`` that multiplies a 2D input ``[B, C]`` one row at a time in eager mode.

    CPU GEMM picks different kernels for small row counts, so the UNet's per-sample vector
    linears (time / text-time embeddings, resnet time projections) gave row i of a batch of 6 a
    result ~1e-7 off the same row in a batch of 3, which grows to changed PNG bytes. Row by row
    (M = 1 always) makes every sample's result independent of the batch it is in, so batched
    serving and fused job batches equal solo runs bit for bit. These layers are a negligible
    share of the compute; 3D (token) inputs keep one GEMM. CPU tensors only: on CUDA other kernels
    differ by batch size anyway (TF32 convolutions, ~1e-3; docs/design.md §6), so the split would
    buy nothing there and cost a kernel launch per row.
    """

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if x.ndim == 2 and x.shape[0] > 1 and x.device.type == "cpu" and not tracing(x):
            return torch.cat([F.linear(x[i : i + 1], self.weight, self.bias) for i in range(x.shape[0])])
        return F.linear(x, self.weight, self.bias)


class RowwiseConv3d(nn.Conv3d):
    """``nn.Conv3d`` run one sample at a time in eager mode: CPU Conv3d picks another algorithm
    for another batch size (seen in Wan's patch embedding), so batched rows drifted ~1e-7 from
    solo runs. Video DiTs use it only to patchify, a small share of their compute. CPU tensors only,
    as ``RowwiseLinear``."""

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[0] > 1 and input.device.type == "cpu" and not tracing(input):
            return torch.cat(
                [super(RowwiseConv3d, self).forward(input[i : i + 1]) for i in range(input.shape[0])]
            )
        return super().forward(input)


class RowwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` run one sample at a time in eager mode: CPU Conv2d picks another algorithm for
    another batch size, so SD3's patch embedding gave batched rows results ~1e-7 off solo runs (as
    ``RowwiseConv3d`` for Wan). Only the DiT's patchify conv uses it. Unlike ``RowwiseConv3d`` it
    splits on every device (as it always has: outputs stay as they were)."""

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[0] > 1 and not tracing(input):
            return torch.cat(
                [super(RowwiseConv2d, self).forward(input[i : i + 1]) for i in range(input.shape[0])]
            )
        return super().forward(input)


ROWWISE: Mapping[type, type] = MappingProxyType({nn.Linear: RowwiseLinear, nn.Conv3d: RowwiseConv3d})
"""The default batch-invariance swaps: plain class -> its per-sample variant (exact type match)."""

# module -> [its class before the first swap, number of live holders]; weak: a model that is
# dropped leaves no entry, and nothing is stored on the (diffusers) modules themselves
_SWAPPED: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_SWAP_LOCK = threading.Lock()


class BatchInvariant:
    """Per-sample (batch-invariant) layers in ``roots``, reference-counted per module.

    Every module under ``roots`` whose exact type is a key of ``swaps`` becomes its per-sample
    variant on the first ``acquire`` (of any holder) and gets its exact original class back on the
    last ``release``, so two users of one model (two denoisers over one pipeline, one closing while
    the other runs) never undo each other's swap. A module another holder already swapped is
    counted, not swapped again. Use as a context manager, or ``acquire()`` / ``release()`` as a pair
    (objects with ``close()``); each holder acquires at most once, and releasing twice is allowed.
    """

    def __init__(self, roots: Iterable[nn.Module | None], swaps: Mapping[type, type] = ROWWISE) -> None:
        self.roots = [r for r in roots if r is not None]
        self.swaps = dict(swaps)
        self._held: list[nn.Module] = []
        self.acquired = False

    def acquire(self) -> BatchInvariant:
        if self.acquired:
            raise RuntimeError("this BatchInvariant is already acquired; build another holder")
        with _SWAP_LOCK:
            seen: set[int] = set()
            for root in self.roots:
                for m in root.modules():
                    if id(m) in seen:
                        continue
                    seen.add(id(m))
                    entry = _SWAPPED.get(m)
                    if entry is not None:
                        entry[1] += 1
                    elif type(m) in self.swaps:
                        _SWAPPED[m] = [type(m), 1]
                        m.__class__ = self.swaps[type(m)]
                    else:
                        continue
                    self._held.append(m)
            self.acquired = True
        return self

    def release(self) -> None:
        with _SWAP_LOCK:
            for m in self._held:
                entry = _SWAPPED[m]
                entry[1] -= 1
                if entry[1] == 0:
                    m.__class__ = entry[0]
                    del _SWAPPED[m]
            self._held.clear()
            self.acquired = False

    def __enter__(self) -> BatchInvariant:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def batch_invariant(*roots: nn.Module | None, swaps: Mapping[type, type] = ROWWISE) -> BatchInvariant:
    """``BatchInvariant(roots, swaps)``, not yet acquired: ``with batch_invariant(unet, controlnet):``
    or ``holder = batch_invariant(model).acquire()`` ... ``holder.release()``. ``None`` roots are
    skipped. SD3's patchify conv: ``batch_invariant(proj, swaps={nn.Conv2d: RowwiseConv2d})``."""
    return BatchInvariant(roots, swaps)


def _top_blocks(unet: nn.Module) -> list[str]:
    """The UNet's top-level blocks in forward order (``UNet2DConditionModel.forward``)."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


class SharedPrefix:
    """Fork the perturbed rows off their source rows at the top-level block holding the first SEG layer
    (``seg_rt.prefix``): the UNet is called with the prefix rows only, and a forward pre-hook on the
    fork block and on every later top-level block appends the source rows to each prefix-row input
    (hidden states on entry to the fork block; the time embedding, text embeddings and the skip
    residuals each later block consumes). diffusers' ``UNet2DConditionModel.forward`` is reused whole."""

    def __init__(self, unet: nn.Module, layer_names: Sequence[str]) -> None:
        blocks = _top_blocks(unet)
        first = first_block(blocks, layer_names)
        self.fork_block = None if first is None else blocks[first]
        self.hooks = RowFork(unet, grow=[] if first is None else blocks[first:])

    @property
    def fork(self) -> Fork | None:
        return self.hooks.fork

    @fork.setter
    def fork(self, value: Fork | None) -> None:
        self.hooks.fork = value

    def remove(self) -> None:
        self.hooks.remove()


class SEGUNet(nn.Module):
    """``forward(inputs)`` → the model's prediction; ``inputs["seg_mask"]`` marks perturbed rows."""

    def __init__(
        self,
        unet: nn.Module,
        *,
        sigma: float,
        layers: Sequence[str] = ("mid",),
        controlnet: nn.Module | None = None,
        perturbation: str = "blur",
        shared_prefix: bool = False,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.seg = SEGAttention(unet, sigma, layers, perturbation).install()
        self.prefix = SharedPrefix(unet, self.seg.layer_names) if shared_prefix else None
        self.invariant = batch_invariant(unet, controlnet).acquire()  # per-sample results, any batch
        self.step_cache = None  # seg_rt.step_cache.DeepCache, installed by the eager denoiser

    @property
    def input_names(self) -> tuple[str, ...]:
        names = BASE_INPUTS
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            names += SDXL_INPUTS
        if self.controlnet is not None:
            names += CONTROLNET_INPUTS
        return (*names, "seg_mask")

    def grids(self) -> list[tuple[int, int]]:
        """Token grids of the SEG layers seen in the last forward (distinct, sorted)."""
        return sorted({p.grid for p in self.seg.processors.values() if p.grid is not None})

    def _fork(self, inputs: Mapping[str, Tensor]) -> Fork | None:
        """The shared-prefix layout of this call (``seg_rt.prefix.fork_of``), or None: plain batch."""
        if self.prefix is None or self.prefix.fork_block is None:
            return None
        if self.controlnet is not None and self.prefix.fork_block.startswith("down_blocks."):
            return None  # ControlNet's down residuals are added after the down path: no fork inside it
        return fork_of(inputs)

    def forward(self, inputs: Mapping[str, Tensor], fork: Fork | None = None) -> Tensor:
        """``fork``: an explicit shared-prefix layout (an export's in-graph fork, ``seg_rt.export``:
        ``inputs`` hold the prefix rows, ``seg_mask`` every row); else the batch's own (``_fork``)."""
        missing = [n for n in self.input_names if n not in inputs and n != "seg_mask"]
        if missing:
            raise ValueError(f"denoiser inputs missing {', '.join(missing)}")
        if fork is not None and self.prefix is None:
            raise ValueError("an explicit fork needs the shared prefix (SEGUNet(shared_prefix=True))")
        fork = fork if fork is not None else self._fork(inputs)
        mask, rows = inputs.get("seg_mask"), row_layout(inputs).seg_rows
        if fork is not None:  # the UNet runs on the prefix rows; SharedPrefix appends the rest
            inputs = {k: fork.cut(v) for k, v in inputs.items() if k != "seg_mask"}
        sample = inputs["sample"]
        added = None
        if "text_embeds" in self.input_names:
            added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        extra = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(
                sample,
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                controlnet_cond=inputs["controlnet_cond"],
                conditioning_scale=1.0,
                added_cond_kwargs=added,
                return_dict=False,
            )
            # per-row scale, so one graph serves every scale: [B] -> [B, 1, 1, 1]
            scale = inputs["conditioning_scale"].to(sample.dtype).view(-1, 1, 1, 1)
            extra = {
                "down_block_additional_residuals": [d * scale for d in down],
                "mid_block_additional_residual": mid * scale,
            }
            if fork is not None and self.prefix.fork_block == "mid_block":  # added after the mid block
                extra["mid_block_additional_residual"] = fork.grow(mid * scale)
        self.seg.set_mask(mask, rows)
        if fork is not None:
            self.prefix.fork = fork
        try:
            # a dedicated inpainting UNet: [latents, mask, masked-image latents] along channels, after
            # the scheduler's input scaling (diffusers' inpaint pipelines); the ControlNet sees the latents
            unet_sample = (
                sample if "inpaint_cond" not in inputs else torch.cat([sample, inputs["inpaint_cond"]], 1)
            )
            out = self.unet(
                unet_sample,
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=added,
                return_dict=False,
                **extra,
            )[0]
            # SEG active but no query perturbed: an error, never a CFG-only result; rows served from
            # the step cache count only when their entry came from a perturbed forward
            self.seg.check() if self.step_cache is None else self.seg.check(self.step_cache.report())
            return out
        finally:
            self.seg.set_mask(None)
            if self.prefix is not None:
                self.prefix.fork = None

    def remove(self) -> None:
        """Restore the UNet's own attention processors and linear layers."""
        if self.step_cache is not None:
            self.step_cache.remove()
            self.step_cache = None
        self.seg.remove()
        if self.prefix is not None:
            self.prefix.remove()
        self.invariant.release()
