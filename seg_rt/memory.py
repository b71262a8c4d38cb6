"""A request's memory, estimated from the model and the size before sampling (#27 item 8).

Without it, ``seg-rt generate --height 4000 --width 4000`` on the demo model sampled for minutes
and was then killed by the kernel's out-of-memory killer, with no message. ``check_memory`` runs
in ``seg_rt.pipeline.run_params`` (the CLI, job workers and the server) once the model is loaded
and before anything is encoded or sampled, and refuses a request past the bound with one line.

The estimate is an upper bound (conservative: it may refuse a request that would just fit, never
the other way round by much). Per sampling run:

    rows     = images x 3                       (the [uncond | cond | perturbed] branches of CFG + SEG)
    maps     = max over the net's self-attention layers of
               rows x heads x tokens x min(tokens, 1024) x 2 x itemsize
               (scores and softmax of 1024 queries at a time against every key: more than the
               blocks that scaled_dot_product_attention's flash / memory-efficient kernels hold,
               which torch picks here on CPU float32 and on CUDA; its math fallback would hold whole
               tokens^2 maps. One layer at a time: a layer's maps are freed before the next)
    tokens   = UNets: the latent's pixels (H/vae x W/vae) / 4^level, level from the layer's block
               (down_blocks.i: i, mid_block: the deepest, up_blocks.j: deepest - j);
               transformers (DiT, SD3, Flux, ...): (H/size_factor) x (W/size_factor), the patch grid
    activations = rows x widest channel count x latent pixels x itemsize x 16 (the feature maps a
               block keeps alive: residuals, norms, skip connections)
    total    = parameters + maps + activations

The bound: ``SEG_RT_MAX_MEMORY_GB`` when set, else the memory available now (``psutil``'s
``available``, or the free memory of the CUDA device the model is on).
"""

from __future__ import annotations

import os
import re

import torch

from seg_rt.errors import RequestTooLarge

MAX_MEMORY_ENV = "SEG_RT_MAX_MEMORY_GB"
BRANCHES = 3  # uncond, cond, perturbed rows per image (CFG + SEG), the most a run has
ACTIVATION_COPIES = 16
QUERY_BLOCK = 1024
_LEVEL = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.|(mid_block)\.")


def _self_attention(net) -> list[tuple[str, int]]:
    """(name, heads) of every self-attention module of ``net`` (diffusers ``Attention``)."""
    found = []
    for name, module in net.named_modules():
        heads = getattr(module, "heads", None)
        if isinstance(heads, int) and not getattr(module, "is_cross_attention", False):
            found.append((name, heads))
    return found


def _level(name: str, deepest: int) -> int:
    m = _LEVEL.search(name)
    if m is None:
        return 0  # not in a block: assume the finest grid (an upper bound)
    if m.group(3):
        return deepest
    index = int(m.group(2))
    return index if m.group(1) == "down_blocks" else max(0, deepest - index)


def estimate_bytes(pipe, family, images: int, height: int, width: int) -> int:
    """The upper bound described in the module docstring, in bytes, for one sampling run."""
    net = family.net(pipe)
    itemsize = next(net.parameters()).element_size()
    rows = images * BRANCHES
    vae = int(getattr(pipe, "vae_scale_factor", 1) or 1)
    latent = (height // vae) * (width // vae)
    deepest = len(getattr(net, "down_blocks", [])) - 1
    patch_grid = (height // family.size_factor(pipe)) * (width // family.size_factor(pipe))
    maps = 0
    for name, heads in _self_attention(net):
        tokens = latent // 4 ** _level(name, deepest) if deepest >= 0 else patch_grid
        maps = max(maps, rows * heads * tokens * min(tokens, QUERY_BLOCK) * 2 * itemsize)
    channels = max((m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)), default=1)
    activations = rows * channels * latent * itemsize * ACTIVATION_COPIES
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    return params + maps + activations


def memory_limit(device: torch.device | str | None = None) -> tuple[int, str]:
    """(bytes, where the bound comes from)."""
    value = os.environ.get(MAX_MEMORY_ENV)
    if value:
        try:
            gb = float(value)
        except ValueError:
            raise ValueError(f"{MAX_MEMORY_ENV} must be a number of GB, got {value!r}") from None
        if not gb > 0:
            raise ValueError(f"{MAX_MEMORY_ENV} must be > 0 GB, got {value!r}")
        return int(gb * 2**30), MAX_MEMORY_ENV
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"the free memory of {device}"
    import psutil

    return int(psutil.virtual_memory().available), "the memory available on this machine"


def check_memory(pipe, family, images: int, height: int, width: int) -> None:
    """``RequestTooLarge`` (one line) when the run's estimate passes the bound."""
    need = estimate_bytes(pipe, family, images, height, width)
    device = next(family.net(pipe).parameters()).device
    limit, source = memory_limit(device)
    if need > limit:
        raise RequestTooLarge(
            f"{images} image(s) of {width}x{height} need about {_gb(need)} on this model "
            f"(an upper bound: seg_rt/memory.py), past the {_gb(limit)} of {source}: "
            f"lower --height / --width or --num-images, or set {MAX_MEMORY_ENV}"
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GB"
