"""The SEG sampling loop: one plain loop over a denoiser callable and any diffusers scheduler.

Each step builds one batch ``[uncond, cond, perturbed]`` (``[cond, perturbed]`` without CFG) whose
perturbed rows are marked by ``seg_mask`` (docs/design.md, "Batching"), calls the denoiser once (or
once per branch with ``sequential=True`` to save memory), and combines the predictions with
``seg_rt.guidance.combine`` (the one formula of every guidance term). Outside the SEG window (a
term's window) the perturbed rows (the unconditional rows) are simply not in the batch.

The batch is a ``DenoiserBatch``: the named tensors plus their ``RowLayout``, host data (which rows
are perturbed, which rows' inputs they copy), so a denoiser never reads ``seg_mask`` back from the
device (no host sync per forward) and can share the perturbed rows' unperturbed prefix.

Cheap modes (``SEGConfig.every``, ``SEGConfig.placement``) are decided by ``seg_action`` and
``branches_at``, pure functions of (step, num_steps, config). The perturbed rows are SEG's, or the
guidance list's perturbed term's (PAG, TPG, SLG: ``Guidance.rows_config``); which perturbation the
denoiser applies to them is its ``set_perturbation``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import SEGConfig
from .guidance import NO_GUIDANCE, Guidance, combine

logger = logging.getLogger(__name__)

Conditioning = Mapping[str, Tensor]  # per-row model inputs for one branch, batch n
# (step, timestep, latents) -> None, or the rows (indices into this step's latents) to drop from
# the run: a cancelled request frees its rows, the others go on as if sampled alone (rows are
# independent: per-row seeds and generators, batch-invariant denoisers)
StepCallback = Callable[[int, Tensor, Tensor], "Sequence[int] | None"]


SEG_ACTIONS = ("off", "run", "reuse")


def seg_action(step: int, num_steps: int, seg: SEGConfig) -> str:
    """What SEG does at ``step``: ``"run"`` (compute the perturbed prediction), ``"reuse"`` (inside
    the window, ``every`` > 1: reuse the last computed delta ``eps_cond - eps_seg``) or ``"off"``."""
    if not seg.active(step, num_steps):
        return "off"
    return "run" if seg.runs_branch(step, num_steps) else "reuse"


# Branch name -> (inputs it takes, whether its rows are perturbed). "seg_uncond" is the unconditional
# row with the blur inside (placement "uncond"); it stands in for "uncond" in the guidance.
BRANCHES = {
    "uncond": ("uncond", False),
    "cond": ("cond", False),
    "seg": ("cond", True),
    "seg_uncond": ("uncond", True),
}


def branches_at(
    step: int, num_steps: int, cfg: float, seg: SEGConfig, guidance: Guidance = NO_GUIDANCE
) -> list[str]:
    """Branch names computed at ``step``: a function of (step, num_steps, config) only. ``seg`` is
    the perturbed rows' config (``Guidance.rows_config``); ``guidance`` gives CFG its window."""
    run = seg_action(step, num_steps, seg) == "run"
    if seg.placement == "uncond":
        return ["seg_uncond" if run else "uncond", "cond"]
    names = ["uncond"] if cfg > 1.0 and guidance.cfg_active(step, num_steps) else []
    names.append("cond")
    if run:
        names.append("seg")
    return names


def nfe_at(step: int, num_steps: int, cfg: float, seg: SEGConfig, guidance: Guidance = NO_GUIDANCE) -> int:
    """Forward passes per image at ``step`` (the batch's rows per image) for a request's ``cfg``,
    SEG config and guidance list: 1 (cond) + CFG's + the perturbed term's, each inside its window."""
    return len(branches_at(step, num_steps, cfg, guidance.rows_config(seg), guidance))


@dataclass(frozen=True)
class RowLayout:
    """A batch's row layout as host data, known when the batch is built:

    - ``seg_rows``: the perturbed rows (contiguous), or None when no row is perturbed;
    - ``seg_source``: rows of the batch whose inputs the perturbed rows repeat (the cond branch for
      a batched SEG row), or None. A denoiser may compute the rows' shared unperturbed prefix once.
    """

    seg_rows: slice | None = None
    seg_source: slice | None = None


NO_LAYOUT = RowLayout()


class DenoiserBatch(dict):
    """The denoiser's named input tensors (a plain ``dict[str, Tensor]`` to every engine) with their
    ``RowLayout``. A dict subclass so that engines that only need the tensors take it as they are."""

    def __init__(self, tensors: Mapping[str, Tensor], layout: RowLayout = NO_LAYOUT, cache=None) -> None:
        super().__init__(tensors)
        self.layout = layout
        self.cache = cache  # the run's step cache as this call sees it (seg_rt.step_cache.CacheView)


def row_layout(inputs: Mapping[str, Tensor]) -> RowLayout:
    """The host row layout of a denoiser's inputs; a plain mapping has none (a denoiser then reads
    ``seg_mask`` itself)."""
    return inputs.layout if isinstance(inputs, DenoiserBatch) else NO_LAYOUT


def build_batch(
    branches: Sequence[str], x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None
) -> DenoiserBatch:
    """Concatenate the branches' inputs along the batch; ``seg_mask`` marks the perturbed rows."""
    n = x.shape[0]
    per_branch = [uncond if BRANCHES[b][0] == "uncond" else cond for b in branches]
    tensors = {k: torch.cat([c[k] for c in per_branch]) for k in cond}
    tensors["sample"] = torch.cat([x] * len(branches))
    tensors["timestep"] = t.reshape(1).to(x.device).expand(n * len(branches))
    tensors["seg_mask"] = torch.cat(
        [torch.full((n,), BRANCHES[b][1], dtype=torch.bool, device=x.device) for b in branches]
    )
    layout = NO_LAYOUT
    perturbed = [i for i, b in enumerate(branches) if BRANCHES[b][1]]
    if perturbed:  # one perturbed branch at most (branches_at)
        i = perturbed[0]
        source = None
        if branches[i] == "seg" and "cond" in branches:
            j = branches.index("cond")
            source = slice(j * n, (j + 1) * n)
        layout = RowLayout(slice(i * n, (i + 1) * n), source)
    return DenoiserBatch(tensors, layout)


def _step_kwargs(scheduler, generators: Sequence[torch.Generator] | None) -> dict:
    accepts = set(inspect.signature(scheduler.step).parameters)
    return {"generator": list(generators)} if generators and "generator" in accepts else {}


@torch.no_grad()
def sample(
    denoiser: Callable[[Mapping[str, Tensor]], Tensor],
    scheduler,
    latents: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    *,
    cfg: float,
    seg: SEGConfig,
    cfg_scale: Tensor | None = None,
    guidance_rescale: float = 0.0,
    sequential: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    timesteps: Tensor | None = None,
    blend: Callable[[int, Tensor], Tensor] | None = None,
    guidance: Guidance = NO_GUIDANCE,
    cache=None,
) -> Tensor:
    """Run SEG(+CFG) sampling from initial ``latents`` (already scaled by ``init_noise_sigma``) over
    ``scheduler.timesteps``: the caller (the model family) has called ``set_timesteps`` once, with
    the pipeline's schedule options; the loop only calls ``scale_model_input`` and ``step``.

    ``cond`` / ``uncond`` hold the per-row model inputs of the conditional / unconditional branch
    (``encoder_hidden_states``, and for SDXL ``text_embeds``, ``time_ids``; for ControlNet
    ``controlnet_cond``, ``conditioning_scale``); the perturbed branch reuses ``cond``.
    ``generators`` (one per row) feed stochastic schedulers, so row i depends only on its own seed.
    Tasks (``seg_rt.families.tasks``): ``timesteps`` the steps to run when not all of
    ``scheduler.timesteps`` (img2img's truncated schedule; the scheduler's begin index is set);
    ``blend(i, latents)`` after each ``scheduler.step`` (inpainting's known-region blend; its
    ``rows(keep)`` gives the blend of the rows left when the callback drops rows).
    ``guidance``: the request's guidance list (``seg_rt.guidance``); the denoiser must already
    perturb its ``seg_mask`` rows the list's way (``Denoiser.set_perturbation``).
    ``cfg_scale``: the CFG scale per latent element where it is not one number (Stable Video
    Diffusion's per-frame ramp, shared by every row), in the combine in place of ``cfg``; ``cfg``
    still decides whether the CFG branch runs.
    ``cache``: a ``seg_rt.step_cache.CacheConfig`` (or a fresh ``RunCache``), or None: this run's step
    cache, one entry per row (branch, image), handed to the denoiser with each batch
    (``DenoiserBatch.cache``).
    """
    if cfg > 1.0 and uncond is None:
        raise ValueError(f"cfg {cfg:g} > 1 needs unconditional inputs")
    seg.check_cfg(cfg)
    guidance.check(cfg, seg)
    guidance.check_model(flow="FlowMatch" in type(scheduler).__name__, latent_ndim=latents.ndim)
    seg = guidance.rows_config(seg)  # the perturbed rows: SEG's, or the perturbed term's
    memory: dict = {}  # the modifiers' state across steps (APG's momentum)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    num = len(timesteps)
    extra = _step_kwargs(scheduler, generators)
    n = latents.shape[0]
    delta: Tensor | None = None  # seg every > 1: the last computed eps_cond - eps_seg
    run_cache = _run_cache(cache)
    ids = list(range(n))  # each row's image id in the run (kept when rows are dropped): cache keys
    for i, t in enumerate(tqdm(timesteps, desc="seg-rt", disable=not progress, leave=False)):
        # flow-matching schedulers (Wan) have no input scaling
        x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        names = branches_at(i, num, cfg, seg, guidance)
        if sequential:
            preds = {
                b: denoiser(_cached(build_batch([b], x, t, cond, uncond), [b], ids, run_cache)) for b in names
            }
        else:
            out = denoiser(_cached(build_batch(names, x, t, cond, uncond), names, ids, run_cache))
            preds = dict(zip(names, out.split(n), strict=True))
        eps_seg, seg_delta = preds.get("seg"), None
        if seg.every > 1:
            action = seg_action(i, num, seg)
            if action == "run":
                delta = preds["cond"] - eps_seg
            if action != "off":
                eps_seg, seg_delta = None, delta
        eps = combine(
            preds["cond"],
            preds.get("uncond", preds.get("seg_uncond")),
            eps_seg,
            seg_delta=seg_delta,
            cfg=cfg if cfg_scale is None else cfg_scale,
            scale=seg.scale,
            rescale=guidance_rescale,
            modifiers=guidance.modifiers,
            step=i,
            num_steps=num,
            memory=memory,
        )
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        if blend is not None:
            latents = blend(i, latents)
        if callback is not None:
            drop = callback(i, t, latents)
            if drop:
                keep = [r for r in range(n) if r not in set(drop)]
                if not keep:  # every row dropped: nothing left to sample
                    return latents[:0]
                latents, delta = _rows(latents, keep, n), _rows(delta, keep, n)
                memory = _rows(memory, keep, n)  # per-row guidance state (APG's momentum)
                blend = blend.rows(keep) if blend is not None else None  # per-row init latents, masks
                cond, uncond = _rows(cond, keep, n), _rows(uncond, keep, n)
                generators = [generators[r] for r in keep] if generators else generators
                extra = _step_kwargs(scheduler, generators)
                _drop_scheduler_rows(scheduler, keep, n, latents.shape[1:])
                n = len(keep)
                ids = [ids[r] for r in keep]
    return latents


def _run_cache(cache):
    """A fresh run cache for a ``CacheConfig`` that is on; a ``RunCache`` given is used as it is (the
    caller reads its counts after the run)."""
    from .step_cache import RunCache

    if cache is None or isinstance(cache, RunCache):
        return cache
    return RunCache(cache) if cache.on else None


def _cached(batch: DenoiserBatch, names: Sequence[str], ids: list[int], run_cache) -> DenoiserBatch:
    """``batch`` with the run cache's view: one key (branch, image id) per row, in batch order."""
    if run_cache is not None:
        keys = [(b, i) for b in names for i in ids]
        batch.cache = run_cache.view(keys, [BRANCHES[b][1] for b in names for _ in ids])
    return batch


def _rows(value, keep: list[int], n: int):
    """``value`` (a tensor, a mapping of tensors or None) with only the ``keep`` rows of its first
    dimension where that dimension is the run's ``n`` rows (anything else is shared by all rows)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _rows(v, keep, n) for k, v in value.items()}
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[keep]
    return value


def _drop_scheduler_rows(scheduler, keep: list[int], n: int, row_shape) -> None:
    """Multistep schedulers keep per-row history (DPM-Solver's ``model_outputs``, ``last_sample``...):
    keep the same rows of every tensor shaped like the latents (``n`` rows of ``row_shape``)."""

    def cut(v):
        if (
            isinstance(v, Tensor)
            and v.ndim == 1 + len(row_shape)
            and v.shape[0] == n
            and v.shape[1:] == row_shape
        ):
            return v[keep]
        if isinstance(v, list):
            return [cut(x) for x in v]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, (Tensor, list, tuple)):
            setattr(scheduler, name, cut(value))
