"""The shared-prefix fork inside an exported graph, with the row layout as data.

A fork export takes the inputs of ``P`` prefix rows (every unperturbed row of the export's layout:
``[uncond, cond]``, or ``[cond]`` without CFG) plus ``fork_source`` (int64 ``[K]``) and ``seg_mask``
(``[P + K]``). The graph runs the blocks before the fork block (the first top-level block holding a SEG
layer, ``seg_rt.prefix``) on the ``P`` rows; at the fork block every prefix-row input grows by the rows
``fork_source`` picks (a ``Gather``), so which rows are copied is a runtime input like ``seg_mask``,
never a baked constant. ``seg_mask`` marks perturbed rows among all ``P + K`` rows, so a prefix row may be
perturbed too (uncond placement, a sequential SEG branch) and an unused fork row is a padding copy.
The engine side (``seg_rt.engines.base.fork_feed``) maps every sampler layout onto the ``P + K`` rows.

UNets (``SEGUNet``) are called with the prefix rows, as the eager shared prefix (``SharedPrefix``); the
DiTs (``SEGDiT``: SD3, Flux) gather every row's inputs first (the embeddings run on the whole batch,
a small share) and cut the blocks before the fork block to the prefix rows (``TransformerFork``), as
their eager shared prefix does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from seg_rt.artifacts import FORK_SOURCE
from seg_rt.denoiser import SEGUNet, SharedPrefix
from seg_rt.prefix import Fork, TransformerFork


class ForkPlan:
    """Where ``model`` (a ``SEGUNet`` or ``SEGDiT``) forks, and how its graph runs with a ``Fork``.

    Refuses (``ValueError``, one line) a model that cannot fork: its SEG layers sit in the first block
    (no prefix to share) or, with a ControlNet, inside the down path (its residuals join after it)."""

    def __init__(self, model: nn.Module, prefix: int, forked: int) -> None:
        self.model, self.prefix, self.forked = model, prefix, forked
        names = model.seg.layer_names
        if isinstance(model, SEGUNet):
            self.hooks = SharedPrefix(model.unet, names)
            block = self.hooks.fork_block
            if model.controlnet is not None and block is not None and block.startswith("down_blocks."):
                self.hooks.remove()
                raise ValueError(
                    f"--fork with a ControlNet needs SEG layers at or after the mid block, got {block}"
                )
            model.prefix = self.hooks
        else:
            self.hooks = TransformerFork(model.transformer, names)
            block = self.hooks.fork_block if self.hooks.hooks is not None else None
        if block is None or block == "down_blocks.0":  # a UNet's first block: nothing before it
            self.remove()
            raise ValueError(
                f"--fork: the SEG layers sit in the model's first block ({block or names[0]}), "
                "so no prefix is shared; export without --fork"
            )
        self.block = block

    def fork(self, source: Tensor) -> Fork:
        return Fork(self.prefix, source, self.prefix + self.forked)

    def __call__(self, inputs: Mapping[str, Tensor], source: Tensor) -> Tensor:
        """The model on ``inputs`` (prefix rows; ``seg_mask`` every row) forked by ``source``."""
        fork = self.fork(source)
        if isinstance(self.model, SEGUNet):
            return self.model(inputs, fork=fork)
        grown = {k: v if k == "seg_mask" else fork.grow(v) for k, v in inputs.items()}
        return self.hooks.run(grown, self.model, fork)

    def remove(self) -> None:
        self.hooks.remove()
        if isinstance(self.model, SEGUNet):
            self.model.prefix = None


class ForkGraph(nn.Module):
    """The traced function of a fork export: positional tensors by name (``fork_source`` among them)."""

    def __init__(self, plan: ForkPlan, input_names: Sequence[str], blur_lengths: Sequence[int]) -> None:
        super().__init__()
        self.model = plan.model
        self.plan = plan
        self.names = tuple(input_names)
        self.blur_lengths = tuple(blur_lengths)

    def forward(self, *args: Tensor) -> Tensor:
        inputs = dict(zip(self.names, args, strict=True))
        matrices = {n: inputs.pop(f"seg_blur_{n}") for n in self.blur_lengths} or None
        source = inputs.pop(FORK_SOURCE)
        with self.model.seg.runtime_blur(matrices):
            return self.plan(inputs, source)


def fork_inputs(inputs: dict[str, Tensor], prefix: int, batch: int) -> tuple[dict, dict]:
    """Full-batch export inputs → (the fork graph's inputs, the plain batch they stand for).

    The graph's per-row inputs are the first ``prefix`` rows; ``fork_source`` picks the last ``batch``
    prefix rows (the cond rows of the export layout); the plain batch appends those rows, so the
    validation reference is the unforked model on it."""
    source = torch.arange(prefix - batch, prefix, dtype=torch.int64)
    graph = {k: v if k == "seg_mask" else v[:prefix] for k, v in inputs.items()}
    graph[FORK_SOURCE] = source
    plain = {
        k: v if k == "seg_mask" else torch.cat([v[:prefix], v[:prefix].index_select(0, source)])
        for k, v in inputs.items()
    }
    return graph, plain


def twin_inputs(inputs: dict[str, Tensor], prefix: int) -> dict[str, Tensor]:
    """Full-batch export inputs → the unforked twin's (``ArtifactInfo.twin``): the ``prefix`` rows, the
    first one perturbed (as SEG in the uncond row or a sequential SEG branch would have it), so the
    twin's validation covers its blur."""
    twin = {k: v[:prefix] for k, v in inputs.items()}
    twin["seg_mask"] = torch.arange(prefix) == 0
    return twin
