"""Video SEG: spatial / temporal / spatio-temporal query blur for AnimateDiff, CogVideoX and Wan."""

import diffusers.models.attention_dispatch
import diffusers.models.transformers.transformer_wan as transformer_wan
import pytest
import torch
import torch.nn.functional as F

import seg_rt.attention as seg_attention
from seg_rt.blur import blur_matrix
from seg_rt.tiny import tiny_video_denoiser
from seg_rt.video.attention import VideoBlur, VideoSEG, blur_rows

from .tolerance import assert_close

B, FR, H, W = 2, 3, 6, 10  # odd frame count, non-square latents


def inputs(family):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(B, 5, 32, generator=g)
    if family == "cogvideox":
        return {"hidden_states": torch.randn(B, FR, 4, H, W, generator=g), "encoder_hidden_states": text,
                "timestep": torch.tensor([500] * B)}  # fmt: skip
    if family == "wan":
        return {"hidden_states": torch.randn(B, 4, FR, H, W, generator=g), "encoder_hidden_states": text,
                "timestep": torch.tensor([500] * B)}  # fmt: skip
    return {"sample": torch.randn(B, 4, FR, H, W, generator=g), "encoder_hidden_states": text.repeat_interleave(FR, 0),
            "timestep": torch.tensor(500)}  # fmt: skip


@pytest.fixture(scope="module", params=["animatediff", "cogvideox", "wan"])
def model(request):
    return request.param, tiny_video_denoiser(request.param)


def run(m, kw):
    with torch.no_grad():
        return m(**kw, return_dict=False)[0]


@pytest.mark.parametrize("mode", ["spatial", "temporal", "spatiotemporal"])
def test_every_mode_perturbs_only_masked_rows(model, mode):
    family, m = model
    kw = inputs(family)
    base = run(m, kw)
    with VideoSEG(m, VideoBlur(mode, 2.0, 1.0)) as seg:
        seg.set_mask(torch.tensor([False, False]))
        zero = run(m, kw)
        seg.set_mask(torch.tensor([False, True]))
        out = run(m, kw)
        again = run(m, kw)
    assert_close(zero, base, rel=1e-6)
    assert torch.equal(out[0], base[0]) and (out[1] - base[1]).abs().max() > 1e-3
    assert torch.equal(out, again)
    assert torch.equal(run(m, kw), base)  # removed: the model is as it was


def _direct_3d(video, f, h, w, s_space, s_time):
    """Independent: blur each axis in turn on [rows, F, H, W, C] with einsum."""
    x = video.reshape(video.shape[0], f, h, w, -1)
    x = torch.einsum("st,bthwc->bshwc", blur_matrix(f, s_time), x)
    x = torch.einsum("gh,bthwc->btgwc", blur_matrix(h, s_space), x)
    x = torch.einsum("vw,bthwc->bthvc", blur_matrix(w, s_space), x)
    return x.reshape(video.shape)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
@pytest.mark.parametrize("mode", ["spatial", "temporal", "spatiotemporal"])
def test_dit_query_entering_attention_is_the_3d_blur(family, mode, monkeypatch):
    """Spy on the attention function (test-local): the query entering attention with SEG is the
    direct 3D blur of the one without (after norm_q and RoPE) on the masked row's video tokens;
    text tokens are untouched."""
    m = tiny_video_denoiser(family)
    kw = inputs(family)
    blur = VideoBlur(mode, 1.5, 1.0)
    seen: list[torch.Tensor] = []
    if family == "cogvideox":  # the processor calls torch's F.scaled_dot_product_attention
        real = F.scaled_dot_product_attention
        where, name = torch.nn.functional, "scaled_dot_product_attention"
    else:  # the processor calls diffusers' dispatch_attention_fn
        real = seg_attention.dispatch_attention_fn  # SEGProcessor.attend
        where, name = seg_attention, "dispatch_attention_fn"

    def spy(q, *a, **k):
        seen.append(q.detach().clone())
        return real(q, *a, **k)

    monkeypatch.setattr(where, name, spy)
    with VideoSEG(m, blur) as seg:
        seg.set_mask(None)
        run(m, kw)
        n_plain = len(seen)
        seg.set_mask(torch.tensor([False, True]))
        run(m, kw)
    monkeypatch.undo()
    text = 5 if family == "cogvideox" else 0
    f, h, w = FR, H // 2, W // 2
    plain, patched = seen[0], seen[n_plain]  # first SEG layer: same inputs up to here
    if family == "cogvideox":  # [B, heads, N, d] -> [B, N, heads*d]
        plain, patched = (t.transpose(1, 2).flatten(2) for t in (plain, patched))
    else:  # [B, N, heads, d]
        plain, patched = plain.flatten(2), patched.flatten(2)
    expect = _direct_3d(plain[1:, text:], f, h, w, blur.space, blur.time)
    assert_close(patched[1:, text:], expect, rel=1e-5)
    assert torch.equal(patched[:, :text], plain[:, :text])  # text tokens unchanged
    assert torch.equal(patched[0], plain[0])  # unperturbed row unchanged


def test_zero_time_sigma_keeps_frames_independent():
    q = torch.randn(1, 2, 7 + FR * 3 * 5, 4)  # [B, heads, text + F·H·W, d]
    mats = (blur_matrix(FR, 0.0), blur_matrix(3, 2.0), blur_matrix(5, 2.0))
    q2 = q.clone()
    q2[:, :, 7 : 7 + 15] += 3.0  # change frame 0's queries
    a, b = blur_rows(q, [0], 2, 7, mats), blur_rows(q2, [0], 2, 7, mats)
    frame = lambda t, i: t[:, :, 7 + 15 * i : 7 + 15 * (i + 1)]  # noqa: E731
    assert torch.equal(frame(a, 2), frame(b, 2)) and torch.equal(frame(a, 1), frame(b, 1))
    assert not torch.allclose(frame(a, 0), frame(b, 0))
    assert torch.equal(a[:, :, :7], q[:, :, :7])


def test_no_module_level_replacement(model):
    """SEG lives in the processors only: during a SEG forward torch's scaled_dot_product_attention and
    diffusers' dispatch_attention_fn (where Wan's module uses it) are the original objects, the SEG
    layers run SEG processors, and removing SEG puts the very same original processors back."""
    family, m = model
    originals = {
        "sdpa": torch.nn.functional.scaled_dot_product_attention,
        "dispatch": diffusers.models.attention_dispatch.dispatch_attention_fn,
        "wan_dispatch": transformer_wan.dispatch_attention_fn,
    }
    seen = []
    modules = dict(m.named_modules())
    plain = {n: mod.processor for n, mod in modules.items() if hasattr(mod, "processor")}
    with VideoSEG(m, VideoBlur("spatiotemporal", 2.0, 1.0)) as seg:
        before = {n: modules[n].processor for n in seg.layer_names}
        real = seg.perturb

        def spy(proc, q, token_dim, text=0):
            seen.append(
                {
                    "sdpa": torch.nn.functional.scaled_dot_product_attention,
                    "dispatch": diffusers.models.attention_dispatch.dispatch_attention_fn,
                    "wan_dispatch": transformer_wan.dispatch_attention_fn,
                }
            )
            return real(proc, q, token_dim, text)

        seg.perturb = spy
        seg.set_mask(torch.tensor([True, False]))
        run(m, inputs(family))
        assert seg.perturbed == len(seg.layer_names) and seg.perturbed > 0
        assert all(type(p).__name__.startswith("SEG") for p in before.values())
    assert len(seen) == len(seg.layer_names)
    assert all(s[k] is originals[k] for s in seen for k in originals)
    assert all(modules[n].processor is p for n, p in plain.items())  # the same objects restored


def test_modes_choose_layers_and_validate():
    m = tiny_video_denoiser("animatediff")
    kinds = lambda mode: set(VideoSEG(m, VideoBlur(mode, 2.0, 1.0)).kinds.values())  # noqa: E731
    assert kinds("spatial") == {"spatial"} and kinds("temporal") == {"temporal"}
    assert kinds("spatiotemporal") == {"spatial", "temporal"}
    with pytest.raises(ValueError, match="seg mode must be one of"):
        VideoBlur("sideways", 1.0)
    with pytest.raises(ValueError, match="blurs nothing"):
        VideoBlur("temporal", 2.0, 0.0)
    with pytest.raises(ValueError, match="seg sigma must be > 0 or inf"):
        VideoBlur("spatial", 0.0)
    with pytest.raises(ValueError, match="seg sigma time must be >= 0"):
        VideoBlur("spatiotemporal", 2.0, -1.0)
    with pytest.raises(ValueError, match="no video SEG support"):
        VideoSEG(torch.nn.Linear(2, 2), VideoBlur())
    with pytest.raises(ValueError, match="match no video self-attention layer"):
        VideoSEG(m, VideoBlur(), layers=["nowhere"])
    with pytest.raises(
        ValueError, match=r"seg mode .spatial. uses none of the chosen layers down_blocks\.0\.motion"
    ):
        VideoSEG(m, VideoBlur("spatial", 2.0), layers=["down_blocks.0.motion_modules"])
