"""SEG processors, layer selection and installation on tiny random-weight UNets."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from seg_rt.attention import SEGAttention
from seg_rt.bench.reference import ReferenceSEGProcessor
from seg_rt.layers import select_layers, self_attention_layers

from .tolerance import assert_close


def unet_inputs(pipe, batch, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = pipe.unet.config.cross_attention_dim
    kwargs = {"encoder_hidden_states": torch.randn(batch, 5, dim, generator=g)}
    if pipe.unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g).abs() * 64,
        }
    return torch.randn(batch, 4, h, w, generator=g), torch.tensor(500.0), kwargs


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_zero_mask_equals_unpatched_model(family, request):
    pipe = request.getfixturevalue(family)
    x, t, kw = unet_inputs(pipe, 2, 8, 12)
    with torch.no_grad():
        before = pipe.unet(x, t, **kw).sample
        with SEGAttention(pipe.unet, 2.0, ["mid", "up", "down"]) as seg:
            seg.set_mask(torch.zeros(2, dtype=torch.bool))
            patched = pipe.unet(x, t, **kw).sample
            seg.set_mask(None)
            unmasked = pipe.unet(x, t, **kw).sample
    assert_close(patched, before, rel=1e-6)
    assert_close(unmasked, before, rel=1e-6)


def test_install_is_reversible(sdxl):
    layers = self_attention_layers(sdxl.unet)
    originals = {n: m.processor for n, m in layers.items()}
    seg = SEGAttention(sdxl.unet, 1.0, ["mid", "up.0"]).install()
    assert {type(layers[n].processor).__name__ for n in seg.layer_names} == {"SEGAttnProcessor"}
    seg.remove()
    assert all(layers[n].processor is originals[n] for n in layers)
    assert not any(m._forward_pre_hooks for m in sdxl.unet.modules())


def _two_rows_mid(sdxl, h: int, w: int):
    """UNet inputs of one sample at latent ``h`` x ``w`` doubled into two rows; the mid block's
    self-attention layer names, the UNet's modules and their current processors."""
    x, t, kw = unet_inputs(sdxl, 1, h, w)
    kw = {
        "encoder_hidden_states": kw["encoder_hidden_states"].repeat(2, 1, 1),
        "added_cond_kwargs": {k: v.repeat(2, 1) for k, v in kw["added_cond_kwargs"].items()},
    }
    mid = [n for n in self_attention_layers(sdxl.unet) if n.startswith("mid")]
    modules = dict(sdxl.unet.named_modules())
    return torch.cat([x, x]), t, kw, mid, modules, {n: modules[n].processor for n in mid}


@pytest.mark.parametrize("sigma", [1.0, 2.0, 10.0, float("inf")])
def test_perturbed_rows_match_reference_processor_square(sdxl, sigma):
    """Rows [cond, perturbed]: our mask-driven processor equals the reference chunk processor."""
    x, t, kw, mid, modules, saved = _two_rows_mid(sdxl, 8, 8)
    with torch.no_grad():
        for n in mid:
            modules[n].processor = ReferenceSEGProcessor(sigma, chunks=2)
        ref = sdxl.unet(x, t, **kw).sample
        for n in mid:
            modules[n].processor = saved[n]
        with SEGAttention(sdxl.unet, sigma, ["mid"]) as seg:
            seg.set_mask(torch.tensor([False, True]))
            ours = sdxl.unet(x, t, **kw).sample
            seg.set_mask(torch.tensor([False, True]))
            seg.rows = None  # the traced (torch.where) path must agree with the eager one
            ours_where = sdxl.unet(x, t, **kw).sample
    assert_close(ours, ref, rel=1e-5)
    assert_close(ours_where, ref, rel=1e-5)
    assert (ours[1] - ours[0]).abs().max() > 1e-4  # the perturbation does something


def test_non_square_grid_comes_from_input_shape(sdxl):
    """64x96 px -> latent 8x12 -> mid grid 4x6 (the reference's isqrt would crash)."""
    x, t, kw, mid, modules, saved = _two_rows_mid(sdxl, 8, 12)
    with torch.no_grad():
        for n in mid:
            modules[n].processor = ReferenceSEGProcessor(3.0, chunks=2, grid=(4, 6))
        ref = sdxl.unet(x, t, **kw).sample
        for n in mid:
            modules[n].processor = saved[n]
        with SEGAttention(sdxl.unet, 3.0, ["mid"]) as seg:
            seg.set_mask(torch.tensor([False, True]))
            ours = sdxl.unet(x, t, **kw).sample
            assert {p.grid for p in seg.processors.values()} == {(4, 6)}
    assert_close(ours, ref, rel=1e-5)


def test_layer_selection(sdxl):
    names = list(self_attention_layers(sdxl.unet))
    mid = [n for n in names if n.startswith("mid_block")]
    assert select_layers(sdxl.unet, ["mid"]) == mid
    assert select_layers(sdxl.unet, ["mid.1"]) == [mid[1]]
    up0 = next(n for n in names if n.startswith("up_blocks"))
    assert select_layers(sdxl.unet, ["up.0"]) == [up0]
    assert select_layers(sdxl.unet, ["down_blocks.1"]) == [n for n in names if n.startswith("down_blocks.1.")]
    assert select_layers(sdxl.unet, [mid[0], "mid"]) == mid  # no duplicates, module order
    assert all(n.endswith("attn1") for n in names)  # cross-attention (attn2) never eligible


@pytest.mark.parametrize(
    "bad", ["middle", "mid.7", "down_blocks.1.attentions.0.transformer_blocks.0.attn2", "up.x"]
)
def test_unknown_layer_lists_what_exists(sdxl, bad):
    with pytest.raises(
        ValueError, match=r"matches no self-attention layer; available: .*mid \(2: mid.0-mid.1\)"
    ):
        SEGAttention(sdxl.unet, 1.0, [bad])


def test_blur_is_applied_after_norm_q():
    """With qk-norm the final query (after norm_q) is blurred, computed here by hand."""
    holder = torch.nn.Module()
    holder.attn1 = Attention(query_dim=16, heads=2, dim_head=8, qk_norm="rms_norm").eval()
    torch.nn.init.normal_(holder.attn1.norm_q.weight)
    attn, (h, w) = holder.attn1, (3, 4)
    x = torch.randn(1, h * w, 16)
    seg = SEGAttention(holder, 1.0, ["attn1"]).install()
    seg.processors["attn1"].grid = (h, w)
    seg.set_mask(torch.tensor([True]))
    with torch.no_grad():
        ours = attn(x)
        q = attn.norm_q(attn.to_q(x).view(1, -1, 2, 8).transpose(1, 2))  # [1, 2, N, 8]
        k = attn.norm_k(attn.to_k(x).view(1, -1, 2, 8).transpose(1, 2))
        v = attn.to_v(x).view(1, -1, 2, 8).transpose(1, 2)
        qmap = q.permute(0, 1, 3, 2).reshape(1, 16, h, w)
        from seg_rt.bench.reference import gaussian_blur_2d

        q = gaussian_blur_2d(qmap, 7, 1.0).reshape(1, 2, 8, h * w).permute(0, 1, 3, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, 16)
        ref = attn.to_out[0](out)
    seg.remove()
    assert isinstance(attn.processor, AttnProcessor2_0)
    assert_close(ours, ref, rel=1e-5)


class _IdentityAttention:
    """Independent PAG perturbation (arXiv 2403.17377): the attention map is the identity, so the
    layer's output is to_out(to_v(x)); only for self-attention, as in diffusers' PAG processors."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def test_identity_perturbation_matches_pag_reference(sd15):
    x, t, kw = unet_inputs(sd15, 1, 8, 8)
    x, kw = torch.cat([x, x]), {"encoder_hidden_states": kw["encoder_hidden_states"].repeat(2, 1, 1)}
    mid = [n for n in self_attention_layers(sd15.unet) if n.startswith("mid")]
    modules = dict(sd15.unet.named_modules())
    saved = {n: modules[n].processor for n in mid}
    with torch.no_grad():
        plain = sd15.unet(x, t, **kw).sample
        for n in mid:
            modules[n].processor = _IdentityAttention()
        ref = sd15.unet(x, t, **kw).sample
        for n in mid:
            modules[n].processor = saved[n]
        with SEGAttention(sd15.unet, 1.0, ["mid"], perturbation="identity") as seg:
            seg.set_mask(torch.tensor([False, True]))
            ours = sd15.unet(x, t, **kw).sample
            seg.set_mask(torch.tensor([False, True]))
            seg.rows = None  # traced path
            ours_where = sd15.unet(x, t, **kw).sample
    assert_close(ours[0], plain[0], rel=1e-5)
    assert_close(ours[1], ref[1], rel=1e-5)
    assert_close(ours_where, ours, rel=1e-6)
    assert (ref[1] - plain[1]).abs().max() > 1e-4


def test_unknown_perturbation_is_rejected(sd15):
    with pytest.raises(ValueError, match="perturbation must be one of blur, identity"):
        SEGAttention(sd15.unet, 1.0, ["mid"], perturbation="pag")
