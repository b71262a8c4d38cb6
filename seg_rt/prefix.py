"""Shared-prefix SEG: compute the perturbed rows' unperturbed prefix once (docs/design.md, "Shared prefix").

A batched SEG step's perturbed rows repeat the cond rows' inputs, so every layer before the first SEG
layer computes the same numbers for both. The denoisers run that prefix on the unperturbed rows only
and fork the perturbed rows off their source rows (the cond rows) at the block that holds the first
SEG layer: a ``Fork`` says where the rows are, a ``RowFork`` does it with forward pre-hooks on the
model's blocks, so the model's own ``forward`` (diffusers') is reused whole, never reimplemented.

- UNets (``seg_rt.denoiser.SEGUNet``) are called with the prefix rows only; the fork block and every
  later top-level block get the source rows appended to each prefix-row input (hidden states on entry
  to the fork block; the time and text embeddings and the skip residuals each later block consumes).
- Transformers (image DiTs, video DiTs) are called with every row: the patch and condition embeddings
  run on the whole batch (a small share of the compute), the blocks before the fork block run on the
  prefix rows (their inputs cut to them), and the fork block's prefix-row inputs (the image tokens and,
  in joint blocks, the text stream) grow by the source rows.

Per row the copied rows then hold what the batched forward computes for the perturbed rows (same
inputs, same unperturbed layers), so the result equals the batched forward (bit for bit on the CPU
path, tests/test_shared_prefix.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import tracing
from .layers import transformer_blocks
from .sampler import row_layout

MIN_CPU_PREFIX_ROWS = 2
"""PyTorch's CPU ``Conv2d`` runs a batch of one small input through its native kernel and a larger
batch through oneDNN (``ConvParams::use_mkldnn``): the same row differs by ~1e-7 between the two. The
plain SEG batch always has >= 2 rows, so a 1-row prefix (one image without CFG: rows [cond, seg])
would change the numbers; on the CPU such a step runs the plain batch (the same cost: 2 rows)."""

ROTARY_ARGS = frozenset({"image_rotary_emb", "rotary_emb", "freqs_cis"})
"""Block arguments holding RoPE tables: per token (``[S, D]``: Flux, CogVideoX, Qwen; ``[1, S, 1, D]``:
Wan), left alone, unless per row (``[B, S, D]``: LTX), cut and grown like the hidden states. A table
is per row when its tensors have >= 3 dims; a ``[1, ...]`` table grown for a 1-row prefix only
repeats identical rows."""


def _per_row(name: str | None, v) -> bool:
    if name not in ROTARY_ARGS:
        return True
    parts = v if isinstance(v, tuple) else (v,)
    return all(isinstance(x, Tensor) and x.ndim >= 3 for x in parts)


@dataclass(frozen=True)
class Fork:
    """The row layout of one shared-prefix forward: batch ``[prefix rows | perturbed rows]``."""

    prefix: int  # rows computed before the fork (every unperturbed row)
    # rows of the prefix whose hidden state the perturbed rows copy: a slice (the eager path's host
    # layout) or an int64 [perturbed] index tensor (an exported graph's ``fork_source`` input: a Gather)
    source: slice | Tensor
    rows: int  # the whole batch: prefix + perturbed

    def grow(self, v):
        """A prefix-row tensor (or tuple of them) → the whole batch: the source rows appended."""
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == self.prefix:
            if isinstance(self.source, Tensor):
                return torch.cat([v, v.index_select(0, self.source)])  # exported: ONNX Gather
            return torch.cat([v, v[self.source]])  # [prefix + perturbed, ...]
        if isinstance(v, tuple) and any(isinstance(x, Tensor) for x in v):
            return tuple(self.grow(x) for x in v)  # skip residuals (UNet up blocks)
        return v

    def cut(self, v):
        """A whole-batch tensor (or tuple of them) → its prefix rows."""
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == self.rows:
            return v[: self.prefix]
        if isinstance(v, tuple) and any(isinstance(x, Tensor) for x in v):
            return tuple(self.cut(x) for x in v)
        return v


def fork_of(inputs: Mapping[str, Tensor]) -> Fork | None:
    """The ``Fork`` of a batch when its prefix can be shared, else None: an eager call whose host layout
    (the sampler's ``RowLayout``) puts the perturbed rows last and their
    source rows before them, with at least ``MIN_CPU_PREFIX_ROWS`` prefix rows on the CPU."""
    layout = row_layout(inputs)
    rows, source = layout.seg_rows, layout.seg_source
    sample = inputs["sample"]
    if rows is None or source is None or tracing(sample):
        return None
    if (
        rows.stop != sample.shape[0]
        or source.stop > rows.start
        or rows.stop - rows.start != source.stop - source.start
    ):
        return None
    if sample.device.type == "cpu" and rows.start < MIN_CPU_PREFIX_ROWS:
        return None
    return Fork(rows.start, source, rows.stop)


def first_block(blocks: Sequence[str], layer_names: Sequence[str]) -> int | None:
    """Index of the first of ``blocks`` (module names in forward order) holding a SEG layer."""
    return min((i for i, b in enumerate(blocks) for n in layer_names if n.startswith(b + ".")), default=None)


class RowFork:
    """Forward pre-hooks that cut the inputs of ``cut`` blocks to the prefix rows and grow the inputs of
    ``grow`` blocks to the whole batch, while ``fork`` is set (one forward); per-token RoPE tables
    (``ROTARY_ARGS``) are left alone. Removable; no effect while ``fork`` is None."""

    def __init__(self, model: nn.Module, cut: Sequence[str] = (), grow: Sequence[str] = ()) -> None:
        self.fork: Fork | None = None
        modules = dict(model.named_modules())
        self._hooks = [
            modules[name].register_forward_pre_hook(self._hook(modules[name], how), with_kwargs=True)
            for names, how in ((cut, "cut"), (grow, "grow"))
            for name in names
        ]

    def _hook(self, module: nn.Module, how: str):
        names = list(inspect.signature(module.forward).parameters)  # positional argument names

        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            if self.fork is None:
                return None
            op = getattr(self.fork, how)
            args = tuple(
                op(a) if _per_row(names[i] if i < len(names) else None, a) else a for i, a in enumerate(args)
            )
            return args, {k: op(v) if _per_row(k, v) else v for k, v in kwargs.items()}

        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class TransformerFork:
    """Shared prefix for a DiT / video DiT called with every row: the blocks before the one holding the
    first SEG layer run on the prefix rows, the perturbed rows fork at that block (module docstring).

    ``run(inputs, forward)`` calls ``forward(inputs)`` with the fork active when ``fork_of(inputs)``
    allows it. A model without top-level transformer blocks (AnimateDiff's motion UNet) never forks.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]) -> None:
        blocks = transformer_blocks(model)
        first = first_block(blocks, layer_names)
        self.fork_block = None if first is None else blocks[first]
        self.hooks = None if not first else RowFork(model, cut=blocks[:first], grow=[blocks[first]])

    def run(self, inputs: Mapping[str, Tensor], forward, fork: Fork | None = None):
        """``forward(inputs)`` with the fork of ``inputs`` (``fork_of``), or ``fork`` when given (an
        export's in-graph fork: ``inputs`` hold every row, the source rows a Gather index)."""
        if self.hooks is None:
            return forward(inputs)
        self.hooks.fork = fork if fork is not None else fork_of(inputs)
        try:
            return forward(inputs)
        finally:
            self.hooks.fork = None

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
