"""Shared-prefix SEG and the sync-free hot path of the torch UNet denoiser.

The perturbed rows repeat the cond rows' inputs, so up to the first SEG layer they compute the same
numbers: ``SEGUNet(shared_prefix=True)`` runs that prefix once and forks the perturbed rows off the
cond rows. It must equal the plain batched forward (bit for bit on this CPU path; bounded relative
to the values' scale as the contract), and it must really skip the prefix rows.
"""

import pytest
import torch

import seg_rt
from seg_rt.denoiser import SEGUNet
from seg_rt.engines import TorchDenoiser
from seg_rt.families import REGISTRY
from seg_rt.sampler import build_batch

from .tolerance import assert_close


def _branches(pipe, n=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    c = unet.config.cross_attention_dim

    def one():
        d = {"encoder_hidden_states": torch.randn(n, 7, c, generator=g)}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
            d["text_embeds"] = torch.randn(n, pooled, generator=g)
            d["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n)
        return d

    return torch.randn(n, 4, size, size, generator=g), one(), one()


def _forward(pipe, layers, shared, batch):
    model = SEGUNet(pipe.unet, sigma=2.0, layers=layers, shared_prefix=shared)
    seen = []  # batch rows entering each top-level down block

    def record(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[0])

    hooks = [b.register_forward_pre_hook(record, with_kwargs=True) for b in pipe.unet.down_blocks]
    fork = model.prefix.fork_block if model.prefix is not None else None
    try:
        with torch.no_grad():
            return model(batch), seen, fork
    finally:
        for h in hooks:
            h.remove()
        model.remove()


FORKS = [(("mid",), "mid_block"), (("up",), "up_blocks.0"), (("down.1",), "down_blocks.1")]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("layers", "fork"), FORKS)
def test_shared_prefix_equals_batched(family, layers, fork, request):
    pipe = request.getfixturevalue(family)
    x, cond, uncond = _branches(pipe)
    batch = build_batch(["uncond", "cond", "seg"], x, torch.tensor(500.0), cond, uncond)
    plain, seen_plain, _ = _forward(pipe, layers, False, batch)
    shared, seen_shared, fork_block = _forward(pipe, layers, True, batch)
    assert fork_block == fork
    assert seen_plain == [6] * len(seen_plain)
    # the perturbed rows join at the fork block: the down blocks before it ran 4 rows, not 6
    first = int(fork.split(".")[1]) if fork.startswith("down_blocks.") else len(seen_shared)
    assert seen_shared == [4] * first + [6] * (len(seen_shared) - first)
    assert_close(shared, plain, rel=1e-5, what="shared-prefix vs batched SEG")
    assert torch.equal(shared, plain)  # the same kernels per row on this CPU path: bit-exact
    # the SEG rows really differ from the cond rows (the fork happened before the blur)
    assert (shared[4:] - shared[2:4]).abs().max() > 1e-4


def test_shared_prefix_without_cfg_and_plain_dicts(sd15):
    x, cond, _ = _branches(sd15)
    batch = build_batch(["cond", "seg"], x, torch.tensor(10.0), cond, None)
    plain, _, _ = _forward(sd15, ("mid",), False, batch)
    shared, seen, _ = _forward(sd15, ("mid",), True, batch)
    assert torch.equal(shared, plain) and seen[0] == 2
    # a plain dict carries no host layout: the full batch runs (same numbers)
    full, seen, _ = _forward(sd15, ("mid",), True, dict(batch))
    assert torch.equal(full, plain) and seen[0] == 4
    # one image without CFG: a 1-row prefix on the CPU runs the plain batch (seg_rt.prefix)
    one = build_batch(["cond", "seg"], x[:1], torch.tensor(10.0), {k: v[:1] for k, v in cond.items()}, None)
    _, seen, _ = _forward(sd15, ("mid",), True, one)
    assert seen[0] == 2


def test_shared_prefix_controlnet():
    from seg_rt.tiny import tiny_pipeline

    pipe = tiny_pipeline("sdxl-controlnet")
    x, cond, uncond = _branches(pipe)
    for d in (cond, uncond):
        d["controlnet_cond"] = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        d["conditioning_scale"] = torch.full((2,), 0.7)
    batch = build_batch(["uncond", "cond", "seg"], x, torch.tensor(500.0), cond, uncond)
    outs = {}
    for shared in (False, True):
        model = SEGUNet(pipe.unet, sigma=2.0, controlnet=pipe.controlnet, shared_prefix=shared)
        with torch.no_grad():
            outs[shared] = model(batch)
        model.remove()
    assert_close(outs[True], outs[False], rel=1e-5, what="shared-prefix vs batched SEG with ControlNet")


def test_generate_shared_engine_equals_unshared(sdxl):
    kw = {"steps": 3, "height": 64, "width": 64, "seg_sigma": 2.0, "output_type": "latent", "seed": 4}
    plain = seg_rt.generate(sdxl, "a cube", **kw)
    with TorchDenoiser(sdxl.unet, sigma=2.0, shared_prefix=True) as den:
        shared = seg_rt.generate(sdxl, "a cube", engine=den, **kw)
    assert torch.equal(shared, plain)


def _params(prompt, seed, cfg, negative=None):
    from seg_rt.params import GenerationParams

    return GenerationParams(
        prompt=prompt, negative_prompt=negative, seed=seed, cfg=cfg, steps=2, height=64, width=64
    )


@pytest.mark.parametrize(
    "requests",
    [
        # the soak test's served batch: concurrent no-CFG requests (cfg 1, a negative prompt) in one run
        [("", 6, 1.0, "blur")] * 3,
        [("a cat", 1, 1.0, None), ("a dog", 2, 1.0, None), ("", 3, 1.0, "blur")],
        [("a cat", 1, 5.0, None), ("a dog", 2, 5.0, "blur")],
    ],
    ids=["no-cfg-same", "no-cfg-mixed", "cfg"],
)
def test_shared_prefix_batch_equals_solo(sdxl, requests):
    """Regression: with shared prefix, a batch of requests equals each request run alone, bit for bit.
    A no-CFG request alone has one prefix row ([cond, seg]), and PyTorch's CPU Conv2d computes a
    1-row batch with another kernel than a larger one (~1e-7 apart): such a step runs the plain batch
    (``seg_rt.prefix.MIN_CPU_PREFIX_ROWS``), so every conv sees >= 2 rows on both sides."""
    from seg_rt.pipeline import run_params

    params = [_params(*r) for r in requests]

    def run(ps, shared):
        with TorchDenoiser(sdxl.unet, sigma=2.0, shared_prefix=shared) as den:
            return run_params(sdxl, ps, engine=den, output_type="latent")

    batch = run(params, True)
    solo = torch.cat([run([p], True) for p in params])
    assert torch.equal(batch, solo)
    assert torch.equal(batch, run(params, False))  # and the plain batch (the golden outputs' path)


def test_fork_layout_rules():
    from seg_rt.prefix import MIN_CPU_PREFIX_ROWS, fork_of

    x, cond, uncond = _branches_sd(2)
    t = torch.tensor(1.0)
    fork = fork_of(build_batch(["uncond", "cond", "seg"], x, t, cond, uncond))
    assert (fork.prefix, fork.source, fork.rows) == (4, slice(2, 4), 6)
    assert fork_of(build_batch(["cond", "seg"], x, t, cond, None)).prefix == 2
    one = build_batch(["cond", "seg"], x[:1], t, {k: v[:1] for k, v in cond.items()}, None)
    assert MIN_CPU_PREFIX_ROWS == 2 and fork_of(one) is None  # 1 prefix row on the CPU: plain batch
    assert fork_of(build_batch(["seg_uncond", "cond"], x, t, cond, uncond)) is None  # no source rows
    assert fork_of(build_batch(["uncond", "cond"], x, t, cond, uncond)) is None
    assert fork_of(dict(build_batch(["uncond", "cond", "seg"], x, t, cond, uncond))) is None
    # the fork's row ops: grow appends the source rows, cut keeps the prefix
    v = torch.arange(4.0)
    assert fork.grow(v).tolist() == [0, 1, 2, 3, 2, 3] and fork.cut(torch.arange(6.0)).tolist() == [
        0,
        1,
        2,
        3,
    ]


def _branches_sd(n):
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(n, 7, 8, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(n, 7, 8, generator=g)}
    return torch.randn(n, 4, 8, 8, generator=g), cond, uncond


class SyncCounter:
    """Counts calls that read a tensor's values back to the host (each one a device sync on GPU)."""

    NAMES = ("tolist", "item", "nonzero", "__bool__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            self.calls.append(name)
            return original(t, *args, **kwargs)

        return counted


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_seg_step_has_no_host_sync(family, request, monkeypatch):
    """One batched SEG forward on the torch path reads nothing back from the device: the sampler's
    batch carries the perturbed-row layout as host data."""
    pipe = request.getfixturevalue(family)
    x, cond, uncond = _branches(pipe)
    batch = build_batch(["uncond", "cond", "seg"], x, torch.tensor(500.0), cond, uncond)
    with TorchDenoiser(pipe.unet, sigma=2.0, layers=("mid", "up")) as den:
        den(batch)  # warm-up: blur matrices cached
        counter = SyncCounter(monkeypatch)
        den(batch)
        synced = list(counter.calls)
        den(dict(batch))  # a plain dict: the mask must be read back (the test can fail)
        monkeypatch.undo()
    assert synced == []
    assert "tolist" in counter.calls[len(synced) :]


def _count_rows(model, block_lists):
    """Batch rows entering each transformer block (in forward order), recorded by pre-hooks."""
    seen: list[int] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[0])

    hooks = [
        b.register_forward_pre_hook(record, with_kwargs=True)
        for attr in block_lists
        for b in getattr(model, attr, [])
    ]
    return seen, hooks


def _transformer_shared_vs_plain(make, model, inputs_of, block_lists, fork_index):
    """``make(shared)`` → a denoiser; its shared-prefix result equals its plain one (≤ 1e-5 of the
    values' scale) on CFG+SEG and no-CFG batches, and the blocks before the fork block ran the
    prefix rows only."""
    for branches, n in ((["uncond", "cond", "seg"], 1), (["cond", "seg"], 2)):
        x, cond, uncond = inputs_of(n)
        batch = build_batch(branches, x, torch.tensor(500.0), cond, uncond)
        outs, rows = {}, {}
        for shared in (False, True):
            den = make(shared)
            seen, hooks = _count_rows(model, block_lists)
            try:
                outs[shared] = den(batch)
            finally:
                for h in hooks:
                    h.remove()
                den.close()
            rows[shared] = seen
        total, prefix = batch["sample"].shape[0], batch.layout.seg_rows.start
        assert rows[False] == [total] * len(rows[False])
        assert rows[True] == [prefix] * fork_index + [total] * (len(rows[True]) - fork_index)
        assert_close(outs[True], outs[False], rel=1e-5, what=f"shared-prefix vs batched SEG {branches}")
        # not asserted bit for bit: token-major GEMMs and CPU SDPA round ~1e-7 differently per batch size
        seg = slice(batch.layout.seg_rows.start, total)
        assert (outs[True][seg] - outs[True][batch.layout.seg_source]).abs().max() > 1e-4


DIT_FORKS = [("sd3", ("mid",), 2), ("flux", ("mid",), 1), ("flux", ("single.0",), 2)]


@pytest.mark.parametrize(("family", "layers", "fork_index"), DIT_FORKS)
def test_dit_shared_prefix_equals_batched(family, layers, fork_index):
    from seg_rt.engines.dit_denoiser import DiTDenoiser
    from seg_rt.tiny import tiny_dit

    model = tiny_dit(family)
    config = model.config

    def inputs_of(n):
        g = torch.Generator().manual_seed(n)
        if family == "sd3":
            x = torch.randn(n, config.in_channels, 8, 12, generator=g)
        else:
            x = torch.randn(n, config.in_channels // 4, 8, 12, generator=g)

        def one():
            d = {
                "encoder_hidden_states": torch.randn(n, 7, config.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(n, config.pooled_projection_dim, generator=g),
            }
            if family == "flux":
                d["guidance"] = torch.full((n,), 3.5)
            return d

        return x, one(), one()

    def make(shared):
        return DiTDenoiser(model, REGISTRY.for_model(model), sigma=2.0, layers=layers, shared_prefix=shared)

    lists = ("transformer_blocks", "single_transformer_blocks")
    _transformer_shared_vs_plain(make, model, inputs_of, lists, fork_index)


VIDEO_FORKS = [("wan", "blocks.1"), ("cogvideox", "transformer_blocks.1"), ("ltx", "transformer_blocks.1")]


@pytest.mark.parametrize(("family", "layer"), VIDEO_FORKS)
def test_video_shared_prefix_equals_batched(family, layer):
    from seg_rt.tiny import tiny_video_denoiser
    from seg_rt.video.attention import VideoBlur
    from seg_rt.video.sampling import VideoDenoiser

    model = tiny_video_denoiser(family)

    def inputs_of(n):
        g = torch.Generator().manual_seed(n)
        shape = (n, 3, 4, 4, 6) if family == "cogvideox" else (n, 4, 3, 4, 6)  # Cog: [B, F, C, H, W]

        def one():
            d = {"encoder_hidden_states": torch.randn(n, 5, 32, generator=g)}
            if family == "ltx":
                d["encoder_attention_mask"] = torch.ones(n, 5)
            return d

        return torch.randn(*shape, generator=g), one(), one()

    def make(shared):
        return VideoDenoiser(model, VideoBlur("spatiotemporal", 2.0, 1.0), [layer], shared_prefix=shared)

    lists = ("transformer_blocks", "blocks")
    _transformer_shared_vs_plain(make, model, inputs_of, lists, 1)
