"""Perturbation kinds that act around an attention layer rather than on its query (next to the SEG
processors of ``seg_rt.attention``; the rows they touch are the same ``seg_mask`` rows).

- ``shuffle`` (TPG, Rajabi et al. 2025, arXiv 2506.10036): the perturbed rows' tokens enter the
  layer's transformer block in a shuffled order, a permutation matrix (norm-preserving: every token
  kept, only its position changes). The permutation is a fixed function of (layer name, token count)
  (``token_permutation``) rather than a fresh draw per call, so a sample is a function of its seed and
  parameters, and a traced graph holds it as a constant.
- ``skip`` (SLG / STG's attention skip, Hyung et al. 2024, arXiv 2411.18664): the perturbed rows'
  attention output is zero, so the block's residual carries them past the layer.

Both are module hooks installed by ``PerturbationHooks`` on the layers a ``SEGPatch`` chose; they
count themselves in the patch's ``perturbed`` counter, so ``SEGPatch.check`` still proves the
perturbation ran.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

HOOK_KINDS = ("shuffle", "skip")


def token_permutation(layer_name: str, n: int) -> Tensor:
    """The TPG permutation of ``n`` tokens for ``layer_name``: ``torch.randperm`` from a generator seeded
    by the layer name's CRC-32 and ``n`` (a non-identity permutation for n > 1)."""
    gen = torch.Generator().manual_seed(zlib.crc32(layer_name.encode()) * 65_537 + n)
    perm = torch.randperm(n, generator=gen)
    if n > 1 and torch.equal(perm, torch.arange(n)):  # identity shuffles nothing: rotate by one
        perm = torch.roll(perm, 1)
    return perm


def _rows_where(patch, x: Tensor, changed: Tensor) -> Tensor:
    """``x`` with the patch's perturbed rows taken from ``changed`` (eager: a contiguous slice; else
    the mask as data, repeated per sample where the layer's batch is sample-major, as AnimateDiff's)."""
    rows = patch.rows
    if isinstance(rows, slice) and patch.mask.shape[0] == x.shape[0]:
        out = x.clone()
        out[rows] = changed[rows]
        return out
    mask = patch.mask.to(x.device)
    if x.shape[0] != mask.shape[0]:  # video UNets: each sample owns x.shape[0] / B consecutive rows
        if x.shape[0] % mask.shape[0]:
            raise ValueError(
                f"{x.shape[0]} attention rows are not a multiple of the {mask.shape[0]}-row seg mask"
            )
        mask = mask.repeat_interleave(x.shape[0] // mask.shape[0])
    return torch.where(mask.view(-1, *[1] * (x.ndim - 1)), changed, x)


class PerturbationHooks:
    """The ``shuffle`` or ``skip`` hooks of ``patch`` on ``layer_names`` (attention module names) of
    ``model``: shuffle as a forward pre-hook on each layer's parent block, skip as a forward hook on
    the attention module. ``remove()`` takes them off."""

    def __init__(self, patch, model: nn.Module, layer_names: Sequence[str], kind: str) -> None:
        if kind not in HOOK_KINDS:
            raise ValueError(f"hook perturbation must be one of {', '.join(HOOK_KINDS)}, got {kind!r}")
        self.patch, self.kind = patch, kind
        modules = dict(model.named_modules())
        self._perms: dict[tuple[str, int, torch.device], Tensor] = {}
        self._handles = []
        for name in layer_names:
            if kind == "shuffle":
                block = name.rpartition(".")[0]
                self._handles.append(
                    modules[block].register_forward_pre_hook(self._shuffle_hook(name), with_kwargs=True)
                )
            else:
                self._handles.append(modules[name].register_forward_hook(self._skip_hook))

    def _perm(self, name: str, n: int, device: torch.device) -> Tensor:
        key = (name, n, device)
        if key not in self._perms:
            self._perms[key] = token_permutation(name, n).to(device)
        return self._perms[key]

    def _shuffle_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            patch = self.patch
            if patch.mask is None:
                return None
            in_args = bool(args)
            hidden = args[0] if in_args else kwargs.get("hidden_states")
            if hidden is None or hidden.ndim != 3:  # [B, N, C] token input
                raise ValueError(f"{name}: token shuffle needs the block's [B, N, C] hidden states")
            shuffled = hidden[:, self._perm(name, hidden.shape[1], hidden.device)]
            hidden = _rows_where(patch, hidden, shuffled)
            patch.count()
            if in_args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _skip_hook(self, module: nn.Module, args: tuple, output):
        patch = self.patch
        if patch.mask is None:
            return None
        patch.count()
        if isinstance(output, tuple):
            return tuple(None if o is None else _rows_where(patch, o, torch.zeros_like(o)) for o in output)
        return _rows_where(patch, output, torch.zeros_like(output))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
