"""SEG is provably on: a forward with perturbed rows in which no query was perturbed is an error.

The SEG processors count the queries they perturb; the denoisers check the count after each forward
(``SEGNotApplied``), so bypassed processors can never pass a CFG-only prediction off as SEG.
"""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from seg_rt.denoiser import SEGUNet
from seg_rt.errors import SEGNotApplied, SegRtError
from seg_rt.tiny import tiny_video_denoiser
from seg_rt.video.attention import VideoBlur
from seg_rt.video.sampling import VideoDenoiser

from .test_attention import unet_inputs


def _image_inputs(pipe, mask):
    x, t, kw = unet_inputs(pipe, len(mask), 8, 8)
    inputs = {
        "sample": x,
        "timestep": t.expand(len(mask)),
        "encoder_hidden_states": kw["encoder_hidden_states"],
    }
    inputs.update(kw.get("added_cond_kwargs", {}))
    return {**inputs, "seg_mask": torch.tensor(mask)}


@pytest.mark.parametrize("perturbation", ["blur", "identity"])
def test_image_seg_bypassed_is_an_error(sd15, perturbation):
    model = SEGUNet(sd15.unet, sigma=2.0, layers=("mid", "up.0"), perturbation=perturbation)
    try:
        with torch.no_grad():
            model(_image_inputs(sd15, [False, True]))  # installed: fine
            assert model.seg.perturbed == 0  # reset after the forward
            sd15.unet.set_attn_processor(AttnProcessor2_0())  # someone puts the default processors back
            with pytest.raises(SEGNotApplied, match="no query was perturbed") as err:
                model(_image_inputs(sd15, [False, True]))
            assert isinstance(err.value, SegRtError)
            model(_image_inputs(sd15, [False, False]))  # no perturbed row: nothing to prove
    finally:
        model.remove()


def test_image_seg_counts_every_layer(sd15):
    model = SEGUNet(sd15.unet, sigma=2.0, layers=("mid", "up.0"))
    counts = []
    check = model.seg.check
    model.seg.check = lambda: (counts.append(model.seg.perturbed), check())
    try:
        with torch.no_grad():
            model(_image_inputs(sd15, [True, False, True]))  # non-contiguous rows
            model(_image_inputs(sd15, [False, False]))
    finally:
        model.remove()
    assert counts == [len(model.seg.layer_names), 0] and counts[0] >= 2


def _video_inputs(family, mask):
    g = torch.Generator().manual_seed(0)
    b, fr, h, w = len(mask), 3, 6, 10
    shape = (b, fr, 4, h, w) if family == "cogvideox" else (b, 4, fr, h, w)
    return {
        "sample": torch.randn(*shape, generator=g),
        "timestep": torch.tensor([500] * b),
        "encoder_hidden_states": torch.randn(b, 5, 32, generator=g),
        "seg_mask": torch.tensor(mask),
    }


@pytest.mark.parametrize("family", ["animatediff", "cogvideox", "wan"])
def test_video_seg_bypassed_is_an_error(family):
    net = tiny_video_denoiser(family)
    denoiser = VideoDenoiser(net, VideoBlur("spatiotemporal", 2.0, 1.0))
    modules = dict(net.named_modules())
    try:
        out = denoiser(_video_inputs(family, [False, True]))  # installed: fine
        assert torch.isfinite(out).all()
        default = {
            "animatediff": "AttnProcessor2_0",
            "cogvideox": "CogVideoXAttnProcessor2_0",
            "wan": "WanAttnProcessor",
        }
        for name in denoiser.seg.layer_names:  # the family's default processors, set back after install
            proc = _diffusers_processor(default[family])
            modules[name].set_processor(proc)
        with pytest.raises(SEGNotApplied, match="no query was perturbed"):
            denoiser(_video_inputs(family, [False, True]))
        denoiser(_video_inputs(family, [False, False]))  # no perturbed row: nothing to prove
    finally:
        denoiser.close()


def _diffusers_processor(name: str):
    import diffusers.models.attention_processor as ap
    import diffusers.models.transformers.transformer_wan as wan

    return getattr(ap, name, None)() if hasattr(ap, name) else getattr(wan, name)()


def test_cached_seg_rows_count_only_from_a_perturbed_entry():
    """A step cache (seg_rt.step_cache) that serves the SEG rows: proven when their own entry came
    from a perturbed forward; an entry filled by the cond row (never perturbed) is SEGNotApplied,
    even though the skipped blocks hold every SEG layer (nothing ran that could be counted)."""
    from seg_rt.engines.dit_denoiser import DiTDenoiser
    from seg_rt.families import REGISTRY
    from seg_rt.sampler import build_batch
    from seg_rt.step_cache import CacheConfig, RunCache
    from seg_rt.tiny import tiny_dit

    net = tiny_dit("sd3")
    den = DiTDenoiser(net, REGISTRY.for_model(net), sigma=2.0, layers=("transformer_blocks.2",))
    g = torch.Generator().manual_seed(0)
    cond = {
        "encoder_hidden_states": torch.randn(1, 7, net.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, net.config.pooled_projection_dim, generator=g),
    }
    x = torch.randn(1, 4, 8, 8, generator=g)
    run = RunCache(CacheConfig("fbcache", threshold=1e9))  # every step after the first skips

    def step(t):
        batch = build_batch(["cond", "seg"], x, torch.tensor(float(t)), cond, None)
        batch.cache = run.view([("cond", 0), ("seg", 0)], [False, True])
        return den(batch)

    try:
        step(900)  # full: fills both entries, SEG's perturbed
        step(800)  # skipped: the SEG row's own perturbed entry proves it
        assert run.entries[("seg", 0)].perturbed and not run.entries[("cond", 0)].perturbed
        run.entries[("seg", 0)] = run.entries[("cond", 0)]  # the bug: SEG served the cond row's cache
        with pytest.raises(SEGNotApplied, match="no perturbed forward filled"):
            step(700)
    finally:
        den.close()
