"""Step caches (seg_rt.step_cache): per-row first-block cache on the image DiTs, DeepCache on UNets.

The references are written here: the cached residual / deep feature is recomputed from hooks of the
test's own, the per-row result is checked against the same run with one call per branch (each row
alone, so no row can be served another's entry), and a cache deliberately shared between the cond
and SEG rows is built here to show that the checks catch it.
"""

from __future__ import annotations

import math

import pytest
import torch

from seg_rt.config import SEGConfig
from seg_rt.engines import TorchDenoiser
from seg_rt.engines.dit_denoiser import DiTDenoiser
from seg_rt.errors import SEGNotApplied
from seg_rt.families import family_of
from seg_rt.params import GenerationParams, request_from_fields
from seg_rt.pipeline import run_params
from seg_rt.sampler import build_batch
from seg_rt.step_cache import CacheConfig, RunCache

from .test_attention import unet_inputs
from .tolerance import assert_close


@pytest.fixture(scope="session")
def sd3():
    from seg_rt.tiny import tiny_dit_pipeline

    return tiny_dit_pipeline("sd3")


def _run(pipe, steps=3, **fields):
    base = GenerationParams(prompt="a red cat", steps=steps, height=32, width=32, seed=3)
    return run_params(pipe, [base.replace(**fields)], output_type="latent")


@pytest.mark.parametrize(
    ("family", "fields"),
    [
        ("sd3", {"cache": "fbcache", "cache_threshold": 0.0}),
        ("sd15", {"cache": "deepcache", "cache_interval": 1}),
    ],
)
def test_never_reusing_cache_equals_uncached(family, fields, request):
    """Threshold 0 never skips, interval 1 never reuses: the same numbers as no cache, bit for bit."""
    pipe = request.getfixturevalue(family)
    assert torch.equal(_run(pipe, **fields), _run(pipe))


def _dit_batch(pipe, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    branch = lambda: {  # noqa: E731
        "encoder_hidden_states": torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
    }
    cond, uncond = branch(), branch()
    x = torch.randn(1, 4, 8, 8, generator=g)
    return lambda t: build_batch(names, x, torch.tensor(float(t)), cond, uncond)


def test_fbcache_skip_adds_the_cached_residual(sd3):
    """A skipped step's hidden states after the last block = its first block's output + (last block
    output - first block output) of the previous full step, per row (recomputed from test hooks)."""
    net = sd3.transformer
    den = DiTDenoiser(net, family_of(sd3), sigma=2.0, layers=("transformer_blocks.2",))
    seen = {}
    first, last = net.transformer_blocks[0], net.transformer_blocks[-1]
    hooks = [
        first.register_forward_hook(lambda m, a, out: seen.__setitem__("first", out[1].clone())),
        last.register_forward_hook(lambda m, a, out: seen.__setitem__("last", out[1].clone())),
        net.norm_out.register_forward_hook(lambda m, a, out: seen.__setitem__("final", a[0].clone())),
    ]
    inner = net.transformer_blocks[1].attn.to_q
    calls = []
    hooks.append(inner.register_forward_hook(lambda *a: calls.append(1)))
    make = _dit_batch(sd3, ["uncond", "cond", "seg"])
    run = RunCache(CacheConfig("fbcache", threshold=1e9))  # every step after the first skips
    try:
        batch = make(900)
        batch.cache = run.view([(b, 0) for b in ("uncond", "cond", "seg")], [False, False, True])
        den(batch)
        full_first, full_last = seen["first"], seen["last"]
        calls.clear()
        batch = make(800)
        batch.cache = run.view([(b, 0) for b in ("uncond", "cond", "seg")], [False, False, True])
        den(batch)  # SEG's block 2 is skipped: proven by the perturbed entry, no SEGNotApplied
    finally:
        for h in hooks:
            h.remove()
        den.close()
    assert not calls  # the remaining blocks did not run
    expected = seen["first"] + (full_last - full_first)
    assert torch.allclose(seen["final"], expected, rtol=0, atol=1e-6)
    assert run.stats() == {
        "full": {"uncond": 1, "cond": 1, "seg": 1},
        "served": {"uncond": 1, "cond": 1, "seg": 1},
    }


def _up_inputs(unet, seen):
    """Record the deep feature the last up block consumes: its first resnet's input is
    ``cat([deep feature, skip residual])`` (diffusers' up blocks), the deep feature's channels first."""
    deep = unet.config.block_out_channels[1]

    def pre(_m, args):
        seen.append(args[0][:, :deep].clone())

    return unet.up_blocks[-1].resnets[0].register_forward_pre_hook(pre)


def _unet_batch(pipe, names):
    x, _, kw = unet_inputs(pipe, 2, 8, 8)
    cond = {"encoder_hidden_states": kw["encoder_hidden_states"][:1]}
    uncond = {"encoder_hidden_states": kw["encoder_hidden_states"][1:]}
    return lambda t: build_batch(names, x[:1], torch.tensor(float(t)), cond, uncond)


class SharedKeys(RunCache):
    """The bug the per-row cache prevents: the SEG rows and the cond rows share one entry."""

    def view(self, keys, perturbed):
        return super().view([("cond", i) if b == "seg" else (b, i) for b, i in keys], perturbed)


@pytest.mark.parametrize("variant", ["per_row", "shared", "seg_given_cond_entry"])
def test_deepcache_rows_reuse_their_own_deep_features(sd15, variant):
    """On a reused step each row's input to the last up block is its own deep feature of the last
    full step: the SEG row's, not the cond row's (they differ: the mid block is perturbed). The
    ``shared`` variant (one entry for cond and SEG) fails that check; a SEG row served the cond row's
    entry fails the SEG check (SEG provably on)."""
    names = ["uncond", "cond", "seg"]
    den = TorchDenoiser(sd15.unet, sigma=2.0, layers=("mid",))
    seen: list = []
    hook = _up_inputs(sd15.unet, seen)
    mid_calls = []
    mid_hook = sd15.unet.mid_block.resnets[0].register_forward_hook(lambda *a: mid_calls.append(1))
    make = _unet_batch(sd15, names)
    run = (SharedKeys if variant == "shared" else RunCache)(CacheConfig("deepcache", interval=2))
    keys = [(b, 0) for b in names]
    try:
        batch = make(900)
        batch.cache = run.view(keys, [False, False, True])
        den(batch)
        if variant == "seg_given_cond_entry":
            run.entries[("seg", 0)] = run.entries[("cond", 0)]
        mid_calls.clear()
        batch = make(800)
        batch.cache = run.view(keys, [False, False, True])
        if variant == "seg_given_cond_entry":
            with pytest.raises(
                SEGNotApplied, match="served from a step cache that no perturbed forward filled"
            ):
                den(batch)
            return
        den(batch)
    finally:
        hook.remove()
        mid_hook.remove()
        den.close()
    full, reused = seen
    assert not mid_calls  # the deep blocks were skipped
    assert not torch.allclose(full[2], full[1])  # SEG's deep feature is not cond's
    own = [torch.equal(reused[j], full[j]) for j in range(3)]
    assert own == ([True, False, True] if variant == "shared" else [True, True, True])


def _reference_deepcache(unet, x, t, kw, block=0, layer=0, state=None):
    """DeepCache's forward as its reference writes it (github.com/horseee/DeepCache,
    ``DeepCache/sd/unet_2d_condition.py`` and ``unet_2d_blocks.py``: ``quick_replicate`` with
    ``cache_layer_id=block``, ``cache_block_id=layer``), spelled out here on diffusers' modules.
    ``state`` None: the full forward, returning ``(out, the hidden state entering up layer
    n_up - 2 - layer of up_blocks[-1-block])``; else the cached forward: down to layer ``layer`` of
    ``down_blocks[block]`` (exist_block_number), no mid block, that up block from the entering layer
    on (enter_block_number, fed the last ``layer + 2`` skip residuals), the later up blocks."""
    ehs, added = kw["encoder_hidden_states"], kw.get("added_cond_kwargs") or {}
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
    emb = emb if aug is None else emb + aug

    def run_layer(blk, k, h):
        h = blk.resnets[k](h, emb)
        if getattr(blk, "attentions", None):
            h = blk.attentions[k](h, encoder_hidden_states=ehs, return_dict=False)[0]
        return h

    h = unet.conv_in(x)
    res = [h]
    for i, down in enumerate(unet.down_blocks):
        if state is not None and i > block:
            break
        for k in range(len(down.resnets)):
            h = run_layer(down, k, h)
            res.append(h)
            if state is not None and i == block and k == layer:
                break
        else:
            for ds in down.downsamplers or []:
                h = ds(h)
                res.append(h)
    if state is None:
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    chosen, captured = len(unet.up_blocks) - 1 - block, None
    for i, up in enumerate(unet.up_blocks):
        if state is not None and i < chosen:
            continue
        n_up = len(up.resnets)
        take = layer + 2 if state is not None and i == chosen else n_up
        skips, res = res[-take:], res[:-take]
        if state is not None and i == chosen:
            h = state
        for m in range(n_up - take, n_up):
            if state is None and i == chosen and m == n_up - 2 - layer:
                captured = h
            h = run_layer(up, m, torch.cat([h, skips.pop()], dim=1))
        for us in up.upsamplers or []:
            h = us(h)
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return out, captured


def _unet_variant(pipe, variant):
    """The session's tiny UNet (1 layer per block: the cut enters the last up block at its input) or
    a 2-layer-per-block one built from its config (the cut enters that block's second layer),
    SDXL-shaped with a first down block without attention (``DownBlock2D``) for the XL one."""
    from diffusers import UNet2DConditionModel

    if variant == "tiny":
        return pipe.unet
    extra = {"layers_per_block": 2}
    if pipe.unet.config.addition_embed_type == "text_time":
        extra |= {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                  "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}  # fmt: skip
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config({**pipe.unet.config, **extra}).eval()


class _NoSEG:
    perturbed = 0  # what DeepCache.report reads of the SEG patch


@pytest.mark.parametrize("variant", ["tiny", "two_layers"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_deepcache_equals_reference_cached_forward(family, variant, request):
    """seg-rt's DeepCache (default cut: block 0, layer 0) equals the reference's forward written out
    in this test: the full step bit for bit (and its cached state is the reference's), the reused
    step within float noise; the reused step skips the mid block and, on 2-layer blocks, the up
    block's first layer and the down block's second layer and downsampler."""
    from seg_rt.step_cache import DeepCache

    pipe = request.getfixturevalue(family)
    unet = _unet_variant(pipe, variant)
    x, t, kw = unet_inputs(pipe, 2, 8, 8)
    x2 = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    t2 = torch.tensor(420.0)
    calls: dict[str, int] = {}
    # convs inside the layers (the layers' own forward hooks fire even when the cache skips them)
    watched = {"mid": unet.mid_block.resnets[0], "up_first": unet.up_blocks[-1].resnets[0],
               "down_second": unet.down_blocks[0].resnets[-1], "up_last": unet.up_blocks[-1].resnets[-1]}  # fmt: skip
    hooks = [
        m.conv1.register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in watched.items()
    ]
    run = RunCache(CacheConfig("deepcache", interval=3))
    keys = [("uncond", 0), ("cond", 0)]
    cache = DeepCache(unet, _NoSEG())
    outs = []
    try:
        with torch.no_grad():
            ref_full, state = _reference_deepcache(unet, x, t, kw)
            ref_cached, _ = _reference_deepcache(unet, x2, t2, kw, state=state)
            uncached = unet(x2, t2, **kw).sample
            for xs, ts in ((x, t), (x2, t2)):
                calls.clear()
                cache.begin(run.view(keys, [False, False]))
                outs.append(unet(xs, ts, **kw).sample)
                cache.report()
                cache.end()
    finally:
        cache.remove()
        for h in hooks:
            h.remove()
    full, cached = outs
    assert torch.equal(full, ref_full)
    assert torch.equal(torch.stack([run.entries[k].tensors["deep"] for k in keys]), state)
    assert_close(cached, ref_cached, rel=1e-6, what="cached step vs reference")
    assert not torch.allclose(cached, uncached, atol=1e-3)  # the cached state really was used
    two = variant == "two_layers"
    assert calls == {"up_last": 1, **({} if two else {"up_first": 1, "down_second": 1})}
    assert run.stats() == {"full": {"uncond": 1, "cond": 1}, "served": {"uncond": 1, "cond": 1}}


def _sample_cached(pipe, family, den, cache, sequential, seg, steps, size):
    """The family's own recipe (seg_rt.pipeline.run_params) with a denoiser and cache of the test's."""
    from seg_rt.sampler import sample

    request = GenerationParams(prompt="a red cat", steps=steps, height=size, width=size, seed=3)
    prep = family.encode(pipe, request, 1, height=size, width=size)
    sched = family.schedule(pipe, None, steps, height=size, width=size)
    g = [torch.Generator().manual_seed(3)]
    latents = family.initial_latents(pipe, sched, g, height=size, width=size, dtype=torch.float32)
    run = RunCache(cache)
    out = sample(
        den, sched, latents, prep.cond, prep.uncond, cfg=5.0, seg=seg, sequential=sequential, progress=False,
        cache=run,
    )  # fmt: skip
    return out, run.stats()


@pytest.mark.parametrize(
    ("family_name", "cache"),
    [("sd3", CacheConfig("fbcache", threshold=0.35)), ("sd15", CacheConfig("deepcache", interval=2))],
)
def test_batched_cache_equals_one_call_per_branch(family_name, cache, request):
    """The per-row cache of a CFG+SEG batch gives what each row computes alone (``sequential``: one
    denoiser call per branch, so no row can see another's entry), also on steps where some rows
    reuse and others run: SD3's rows decide by their own residuals (threshold 0.35 splits them on
    this model); the UNet's SEG rows start one step after the cond rows (window from 1/5), so their
    full steps fall between the cond rows' (every step mixed). Bit for bit on the DiT; the UNet's
    one-row calls take another CPU conv kernel (seg_rt.prefix.MIN_CPU_PREFIX_ROWS), ~1e-7."""
    pipe = request.getfixturevalue(family_name)
    family = family_of(pipe)
    den = family.denoiser(pipe)
    # SD3: SEG in the first block, so the SEG rows' first-block residual (and decision) is their own
    den.configure(2.0, ("transformer_blocks.0",) if family_name == "sd3" else ("mid",))
    try:
        dit = family_name == "sd3"
        seg = SEGConfig(scale=3.0, sigma=2.0, start=0.0 if dit else 0.2)
        steps, size = (6, 64) if dit else (4, 32)
        batched, stats = _sample_cached(pipe, family, den, cache, False, seg, steps, size)
        alone, stats_alone = _sample_cached(pipe, family, den, cache, True, seg, steps, size)
    finally:
        den.close()
    assert stats == stats_alone
    assert sum(stats["served"].values()) > 0 and sum(stats["full"].values()) > 3  # both kinds of step
    if family_name == "sd3":
        assert torch.equal(batched, alone)
    else:
        assert stats["full"]["seg"] == 2 and stats["full"]["cond"] == 2  # seg: steps 1, 3; cond: 0, 2
        assert_close(batched, alone, rel=1e-5, what="batched vs one call per branch")


def test_cache_fields_checked_in_one_line():
    for values, match in [
        ({"cache": "teacache"}, "cache must be one of none, fbcache, deepcache"),
        ({"cache": "fbcache", "cache_threshold": -0.1}, "cache threshold must be a finite number >= 0"),
        ({"cache": "fbcache", "cache_threshold": math.inf}, "cache threshold must be a finite number"),
        ({"cache": "deepcache", "cache_interval": 0}, "cache interval must be an integer >= 1"),
        ({"cache": "deepcache", "cache_threshold": 0.2}, "cache threshold applies to cache 'fbcache' only"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            request_from_fields(values)
        assert "\n" not in str(err.value)
    record = request_from_fields({"cache": "deepcache", "cache_interval": 4}).to_record()
    assert (record["cache"], record["cache_interval"]) == ("deepcache", 4)
    assert "cache" not in GenerationParams().to_record()  # off: records stay byte-identical


def test_cache_refused_where_it_cannot_run(sd15, sd3):
    with pytest.raises(ValueError, match="runs on the torch engine only, got engine 'onnx:/nowhere'"):
        run_params("/nowhere", [GenerationParams(cache="deepcache")], engine="onnx:/nowhere")
    with pytest.raises(
        ValueError, match="cache 'fbcache' is not available for the sd15 family; it takes deepcache"
    ):
        _run(sd15, cache="fbcache")
    with pytest.raises(
        ValueError, match="cache 'deepcache' is not available for the sd3 family; it takes fbcache"
    ):
        _run(sd3, cache="deepcache")


def test_cache_fields_on_every_entry_point(sdxl_dir, tmp_path, capsys):
    """CLI flags, the HTTP body and job items take the cache fields (the field table); the PNG record
    carries them; a bad value is one line naming the field (CLI exit 2, HTTP 422)."""
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from seg_rt.cli import main
    from seg_rt.cluster.jobs.spec import item_params, parse_job, read_prompts
    from seg_rt.cluster.serving.config import ServeConfig
    from seg_rt.cluster.serving.core import ServingCore
    from seg_rt.cluster.serving.http import build_app
    from seg_rt.pipeline import load_pipeline

    out = tmp_path / "c.png"
    flags = ["generate", "--model", str(sdxl_dir), "--prompt", "a cube", "--steps", "3", "--height", "64",
             "--width", "64", "--cache", "deepcache", "--cache-interval", "2", "--threads", "1",
             "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(flags) == 0
    record = json.loads(Image.open(out).text["parameters"])
    assert (record["cache"], record["cache_interval"]) == ("deepcache", 2)
    assert main([*flags[:-1], str(tmp_path / "bad.png"), "--cache-interval", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache interval must be an integer >= 1" in err[0]

    client = TestClient(build_app(ServingCore(ServeConfig(model="tiny"), load_pipeline(sdxl_dir, "cpu"))))
    bad = client.post("/v1/generate", json={"prompt": "a", "cache": "teacache"})
    assert bad.status_code == 422 and "cache must be one of none, fbcache, deepcache" in bad.text
    ok = client.post(
        "/v1/generate", json={"prompt": "a", "steps": 3, "height": 64, "width": 64, "cache": "deepcache"}
    )
    assert ok.status_code == 200, ok.text
    assert json.loads(Image.open(io.BytesIO(ok.content)).text["parameters"])["cache"] == "deepcache"

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cube", "cache": "deepcache", "cache_interval": 4}) + "\n")
    spec = {"model": str(sdxl_dir), "prompts_file": str(prompts), "output": str(tmp_path / "job"),
            "resources_per_worker": {"num_cpus": 1}}  # fmt: skip
    job = parse_job(spec)
    items = [item_params(job, o, 0, 0) for o in read_prompts(job, tmp_path)]
    assert items[0].cache_config == CacheConfig("deepcache", interval=4)
