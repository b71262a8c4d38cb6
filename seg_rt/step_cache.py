"""Step caches that keep the SEG branch right: a per-row first-block cache (DiTs) and DeepCache (UNets).

Both caches skip most of the network on some steps and reuse what an earlier full step computed.
The published caches (ParaAttention, DeepCache, diffusers' ``hooks.first_block_cache``) keep one
cache per forward and decide for the whole batch; a SEG batch holds ``[uncond, cond, perturbed]``
rows whose features differ, so here the cache and the decision are **per row**, keyed by the row's
branch and its image (``RowKey``: ``("seg", 0)`` is image 0's perturbed row). The perturbed (SEG /
PAG) rows keep their own entries and are never served the cond row's. A step skips the expensive part
of the network only when every row of the batch may reuse its own entry; otherwise the batch runs
whole and the rows whose own decision was "reuse" get their own cached values in place of the fresh
ones, so the result is what a per-row cache computes, however the rows are batched (sequential
branches, fused requests, dropped rows alike).

- ``FirstBlockCache`` (``cache="fbcache"``, image DiTs): ParaAttention's first-block cache
  (github.com/chengzeyi/ParaAttention, ``para_attn/first_block_cache/utils.py``; diffusers'
  ``FirstBlockCacheConfig``). With ``r1_t`` = first block output - its input at step t, and ``p`` the
  last full step of the row::

      skip at t  <=>  mean(|r1_t - r1_p|) / mean(|r1_p|) < threshold          (per row)
      skip:  out_t = first_out_t + (last_out_p - first_out_p)                  (hidden and text stream)
      full:  run every block; r1_p, (last_out_p - first_out_p) := this step's

  ``r1_p`` is refreshed on full steps only, as in ParaAttention. Threshold 0 never skips.
- ``DeepCache`` (``cache="deepcache"``, UNets): DeepCache (Ma et al., arXiv 2312.00858): every
  ``interval``-th step of a row is a full forward; in between the row reuses the hidden state that
  entered the last layers of ``up_blocks[-1]`` on its last full step, and only the shallow layers run:
  ``conv_in``, ``down_blocks[0]``'s first layer (resnet + attention), ``up_blocks[-1]``'s last two
  layers (fed ``conv_in``'s and that down layer's skip residuals), ``conv_out``: the reference's
  layer-level cut (github.com/horseee/DeepCache, ``DeepCache/sd/unet_2d_condition.py``,
  ``quick_replicate`` with ``cache_layer_id=0, cache_block_id=0``), the paper's choice for Stable
  Diffusion. (The repository's later ``DeepCacheSDHelper`` at ``cache_branch_id=0`` cuts deeper: it
  also serves ``down_blocks[0]``'s outputs and ``up_blocks[-1]``'s layers but the last from the
  cache.) Interval 1 never reuses.

SEG provably on (``seg_rt.attention.SEGPatch.check``): a perturbed row served from the cache counts as
perturbed only when its entry was filled by a forward that perturbed it (``Served``); a perturbed row
that ran needs a perturbed query in this forward, as without the cache.

The caches wrap the blocks' ``forward`` (instance attributes, removed by ``remove()``): forward hooks
cannot skip a module. The pre-hooks of ``seg_rt.prefix`` (shared prefix) still run around them, and
diffusers' own ``forward`` of the model is reused whole. Nothing changes while no cache view is set:
a run without a cache is bit-identical to one on a model that never had a cache installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import transformer_blocks

CACHE_MODES = ("none", "fbcache", "deepcache")
DEFAULT_THRESHOLD = 0.08  # ParaAttention's FLUX.1-dev example (residual_diff_threshold=0.08)
DEFAULT_INTERVAL = 3  # DeepCache's Stable Diffusion example (cache_interval=3, cache_branch_id=0)

CACHE_FIELDS = ("cache", "cache_threshold", "cache_interval")  # the request fields (wire names): image only
RowKey = tuple[str, int]  # (branch name, image id in the run)


@dataclass(frozen=True)
class CacheConfig:
    """The request's step cache: ``mode`` (``CACHE_MODES``), the first-block cache's ``threshold``
    and DeepCache's ``interval``."""

    mode: str = "none"
    threshold: float = DEFAULT_THRESHOLD
    interval: int = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        check_cache(self.mode, self.threshold, self.interval)

    @property
    def on(self) -> bool:
        return self.mode != "none"


def check_cache(mode, threshold, interval) -> None:
    """One line naming the field when a cache value is bad (before any model loads)."""
    if not isinstance(mode, str) or mode not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"cache threshold must be a number, got {threshold!r}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"cache threshold must be a finite number >= 0, got {threshold:g}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an integer >= 1, got {interval!r}")
    if threshold != DEFAULT_THRESHOLD and mode != "fbcache":
        raise ValueError(f"cache threshold applies to cache 'fbcache' only, got cache {mode!r}")
    if interval != DEFAULT_INTERVAL and mode != "deepcache":
        raise ValueError(f"cache interval applies to cache 'deepcache' only, got cache {mode!r}")


@dataclass
class Entry:
    """One row's cache: the tensors its last full step left (per mode) and whether that forward
    perturbed the row (``perturbed``), and how many steps it has reused them since (``reused``)."""

    tensors: dict[str, Tensor | None]
    perturbed: bool
    reused: int = 0


@dataclass
class RunCache:
    """The step cache of one sampling run (``seg_rt.sampler.sample`` makes one per run): entries by
    row key, and counts of full and served rows per branch."""

    config: CacheConfig
    entries: dict[RowKey, Entry] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)

    def view(self, keys: Sequence[RowKey], perturbed: Sequence[bool]) -> CacheView:
        return CacheView(self, tuple(keys), tuple(perturbed))

    def stats(self) -> dict:
        return {"full": dict(self.full), "served": dict(self.served)}


@dataclass
class CacheView:
    """The run cache as one denoiser call sees it: the key of each row of the batch, in batch order,
    and which rows are perturbed (host data, as ``seg_rt.sampler.RowLayout``)."""

    run: RunCache
    keys: tuple[RowKey, ...]
    perturbed: tuple[bool, ...]

    @property
    def config(self) -> CacheConfig:
        return self.run.config


@dataclass(frozen=True)
class Served:
    """What the cache did to the perturbed rows of one forward, for the SEG check: ``ran`` perturbed
    rows computed in this forward, ``proven`` served from entries a perturbed forward filled,
    ``unproven`` served from entries that no perturbed forward filled."""

    ran: int = 0
    proven: int = 0
    unproven: int = 0


def rel_l1(now: Tensor, prev: Tensor) -> float:
    """ParaAttention's ``are_two_tensors_similar`` for one row: mean|now - prev| / mean|prev|."""
    return ((now - prev).abs().mean() / prev.abs().mean()).item()


class _Wrapped:
    """A module whose ``forward`` is replaced by ``fn(original, *args, **kwargs)`` until ``remove``."""

    def __init__(self, module: nn.Module, fn) -> None:
        self.module, original = module, module.forward
        module.forward = lambda *args, **kwargs: fn(original, *args, **kwargs)

    def remove(self) -> None:
        del self.module.forward  # the class's forward again


class _RowCache:
    """What both caches share: the active view, the per-row decision of this forward, its report."""

    mode: str

    def __init__(self, seg, fork: Callable[[], object] | None) -> None:
        self.seg, self._fork = seg, fork
        self.view: CacheView | None = None
        self._wrapped: list[_Wrapped] = []
        self._reset()

    def _reset(self) -> None:
        self.reuse: list[bool] | None = None  # this forward's per-row decision (None: not decided yet)
        self.skipping = False  # every row reuses: the expensive blocks pass their inputs through
        self.fresh: list[tuple[int, RowKey, dict]] = []  # entries this forward filled, flagged in report()

    def begin(self, view: CacheView | None) -> None:
        if view is not None and view.config.mode != self.mode:
            raise ValueError(
                f"this denoiser runs cache {self.mode!r}, the batch asks for {view.config.mode!r}"
            )
        self.view = view
        self._reset()

    def end(self) -> None:
        self.view = None
        self._reset()

    def grow(self, v):
        """A tensor of the shared prefix's rows → the whole batch (the fork's source rows appended)."""
        fork = self._fork() if self._fork is not None else None
        return v if fork is None else fork.grow(v)

    def entries(self) -> list[Entry | None]:
        return [self.view.run.entries.get(k) for k in self.view.keys]

    def report(self) -> Served | None:
        """After the forward (before the SEG check): store the entries it filled, flagged perturbed
        when the row is perturbed and the forward perturbed a query, and count what was served."""
        if self.view is None or self.reuse is None:
            return None
        run, perturbed_any = self.view.run, self.seg.perturbed > 0
        for j, key, tensors in self.fresh:
            run.entries[key] = Entry(tensors, self.view.perturbed[j] and perturbed_any)
        ran = proven = unproven = 0
        for key, pert, reused in zip(self.view.keys, self.view.perturbed, self.reuse, strict=True):
            counts = run.served if reused else run.full
            counts[key[0]] = counts.get(key[0], 0) + 1
            if not pert:
                continue
            if not reused:
                ran += 1
            elif run.entries[key].perturbed:
                proven += 1
            else:
                unproven += 1
        self.fresh = []
        return Served(ran, proven, unproven)

    def remove(self) -> None:
        for w in self._wrapped:
            w.remove()
        self._wrapped.clear()


def _rows(values: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(values))


def _arg(name: str, index: int, args: tuple, kwargs: dict):
    return kwargs[name] if name in kwargs else args[index]


class FirstBlockCache(_RowCache):
    """Per-row first-block cache on an image DiT whose blocks (``seg_rt.prefix.transformer_blocks``:
    SD3's joint blocks; Flux's double- then single-stream blocks) take ``hidden_states`` /
    ``encoder_hidden_states`` and return ``(encoder_hidden_states, hidden_states)``."""

    mode = "fbcache"

    def __init__(self, model: nn.Module, seg, fork: Callable[[], object] | None = None) -> None:
        super().__init__(seg, fork)
        names = transformer_blocks(model)
        if len(names) < 2:
            raise ValueError(
                f"cache 'fbcache' needs >= 2 transformer blocks, {type(model).__name__} has {len(names)}"
            )
        modules = dict(model.named_modules())
        blocks = [modules[n] for n in names]
        self._wrapped = [_Wrapped(blocks[0], self._head)]
        self._wrapped += [_Wrapped(b, self._tail) for b in blocks[1:-1]]
        self._wrapped.append(_Wrapped(blocks[-1], self._last))

    def _head(self, forward, *args, **kwargs):
        if self.view is None:
            return forward(*args, **kwargs)
        h_in = _arg("hidden_states", 0, args, kwargs)
        enc, h = forward(*args, **kwargs)
        self.first = (self.grow(enc), self.grow(h))
        r1 = self.grow(h - h_in)
        threshold = self.view.config.threshold
        self.reuse = [
            e is not None and rel_l1(r1[j], e.tensors["first"]) < threshold
            for j, e in enumerate(self.entries())
        ]
        self.r1 = r1
        self.skipping = all(self.reuse)
        return enc, h

    def _tail(self, forward, *args, **kwargs):
        if self.skipping:  # pass the inputs through: (encoder_hidden_states, hidden_states)
            return _arg("encoder_hidden_states", 1, args, kwargs), _arg("hidden_states", 0, args, kwargs)
        return forward(*args, **kwargs)

    def _last(self, forward, *args, **kwargs):
        if self.view is None:
            return forward(*args, **kwargs)
        enc_first, h_first = self.first
        entries = self.entries()
        if self.skipping:
            enc, h = _arg("encoder_hidden_states", 1, args, kwargs), _arg("hidden_states", 0, args, kwargs)
            has_enc = entries[0].tensors["enc"] is not None
            out_h = h + _rows([e.tensors["hidden"] for e in entries])
            out_enc = enc + _rows([e.tensors["enc"] for e in entries]) if has_enc else None
            return out_enc, out_h
        enc, h = forward(*args, **kwargs)
        out_h, out_enc = list(h.unbind(0)), None if enc is None else list(enc.unbind(0))
        for j, (key, e) in enumerate(zip(self.view.keys, entries, strict=True)):
            if self.reuse[j]:  # this row's own decision: its cached remaining-blocks residual
                out_h[j] = h_first[j] + e.tensors["hidden"]
                if out_enc is not None:
                    out_enc[j] = enc_first[j] + e.tensors["enc"]
            else:
                tensors = {
                    "first": self.r1[j],
                    "hidden": h[j] - h_first[j],
                    "enc": None if enc is None else enc[j] - enc_first[j],
                }
                self.fresh.append((j, key, tensors))
        return (None if out_enc is None else _rows(out_enc)), _rows(out_h)


def _down_outputs(block: nn.Module) -> int:
    """How many skip residuals a diffusers down block returns: one per resnet, one per downsampler."""
    return len(block.resnets) + len(getattr(block, "downsamplers", None) or [])


def _layers(block: nn.Module) -> list[list[nn.Module]]:
    """A diffusers down / up block's layers in forward order: ``[resnets[k], attentions[k]]`` (the
    attention only in cross-attention blocks)."""
    attentions = list(getattr(block, "attentions", None) or [])
    return [[r, *attentions[k : k + 1]] for k, r in enumerate(block.resnets)]


class DeepCache(_RowCache):
    """Per-row DeepCache on a diffusers ``UNet2DConditionModel`` at the reference's layer-level cut
    (github.com/horseee/DeepCache, ``DeepCache/sd/unet_2d_condition.py``, ``quick_replicate`` with
    ``cache_layer_id`` = ``block``, ``cache_block_id`` = ``layer``): on a reused step a row computes
    ``conv_in``, ``down_blocks[:block]``, the layers ``0..layer`` of ``down_blocks[block]`` (resnet +
    attention), the last ``layer + 2`` layers of ``up_blocks[-1-block]`` (fed the skip residuals those
    down layers and the block before them left), the up blocks after it and ``conv_out``; the hidden
    state entering those up layers is the row's own from its last full step. ``block = layer = 0``:
    the shallowest cut, the reference's Stable Diffusion setting.
    With one layer per block the cut enters ``up_blocks[-1-block]`` at its input (the block-level cut)."""

    mode = "deepcache"

    def __init__(
        self, unet: nn.Module, seg, fork: Callable[[], object] | None = None, block: int = 0, layer: int = 0
    ) -> None:
        super().__init__(seg, fork)
        downs, ups = list(unet.down_blocks), list(unet.up_blocks)
        if not 0 <= block < len(downs) - 1:
            raise ValueError(f"DeepCache block must be in [0, {len(downs) - 2}], got {block}")
        down, up = downs[block], ups[len(ups) - 1 - block]
        n = len(down.resnets)
        if not 0 <= layer < n:
            raise ValueError(f"DeepCache layer must be in [0, {n - 1}] for down block {block}, got {layer}")
        # the down block's layers after the cut and its downsampler: skipped (placeholder outputs keep
        # the count of skip residuals the UNet hands the up blocks)
        passed = [m for ms in _layers(down)[layer + 1 :] for m in ms]
        passed += list(getattr(down, "downsamplers", None) or [])
        self._wrapped = [_Wrapped(m, self._pass) for m in passed]
        self._wrapped += [_Wrapped(b, self._skip_down) for b in downs[block + 1 :]]
        if unet.mid_block is not None:
            self._wrapped.append(_Wrapped(unet.mid_block, self._pass))
        self._wrapped += [_Wrapped(b, self._pass) for b in ups[: len(ups) - 1 - block]]
        enter = n - 1 - layer  # the first up layer that runs: it pops down layer ``layer``'s residual
        if enter == 0:  # the cached state enters the up block itself
            self._wrapped.append(_Wrapped(up, self._enter_block))
        else:  # ... or its layer ``enter``: the cached state is the output of layer ``enter - 1``
            skipped = [m for ms in _layers(up)[:enter] for m in ms]
            self._wrapped += [_Wrapped(m, self._pass) for m in skipped[:-1]]
            self._wrapped.append(_Wrapped(skipped[-1], self._enter_layer))

    def begin(self, view: CacheView | None) -> None:
        super().begin(view)
        if view is None:
            return
        interval = view.config.interval
        self.reuse = [e is not None and e.reused + 1 < interval for e in self.entries()]
        self.skipping = all(self.reuse)

    def _pass(self, forward, *args, **kwargs):
        """A skipped layer or block (mid, deeper up blocks): its hidden-state input passed through (a
        Transformer2DModel's as a tuple, as it returns with ``return_dict=False``)."""
        if not self.skipping:
            return forward(*args, **kwargs)
        h = _arg("hidden_states", 0, args, kwargs)
        return (h,) if kwargs.get("return_dict", True) is False else h

    def _skip_down(self, forward, *args, **kwargs):
        if not self.skipping:
            return forward(*args, **kwargs)
        h = _arg("hidden_states", 0, args, kwargs)  # placeholders: the up path's skipped layers take them
        return h, (h,) * _down_outputs(forward.__self__)

    def _state(self, state: Tensor | None) -> Tensor:
        """The hidden state entering the cut: per row, the row's cached one (reused rows) or this
        forward's (``state``, stored as the row's new entry); ``state`` is None when skipping."""
        entries = self.entries()
        rows = list(state.unbind(0)) if state is not None else [None] * len(entries)
        for j, (key, e) in enumerate(zip(self.view.keys, entries, strict=True)):
            if self.reuse[j]:
                rows[j] = e.tensors["deep"]
                e.reused += 1
            else:
                self.fresh.append((j, key, {"deep": state[j]}))
        return _rows(rows)

    def _enter_block(self, forward, *args, **kwargs):
        if self.view is None:
            return forward(*args, **kwargs)
        state = self._state(None if self.skipping else _arg("hidden_states", 0, args, kwargs))
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = state
        else:
            args = (state, *args[1:])
        return forward(*args, **kwargs)

    def _enter_layer(self, forward, *args, **kwargs):
        if self.view is None:
            return forward(*args, **kwargs)
        attention = kwargs.get("return_dict", True) is False  # a Transformer2DModel: (hidden,)
        out = None if self.skipping else forward(*args, **kwargs)
        state = self._state(None if out is None else out[0] if attention else out)
        return (state,) if attention else state
