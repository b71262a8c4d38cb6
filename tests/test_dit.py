"""SEG on image DiTs (SD3, Flux.1): model-level exactness and end-to-end behaviour on tiny models.

The expected blur is built here from the reference formula (Gaussian taps, reflect boundary via
``F.pad``) and applied with einsum; nothing of seg_rt's blur is used to check it.
"""

from __future__ import annotations

import json
import math

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_flux, transformer_qwenimage

from seg_rt import attention as seg_attention
from seg_rt.attention import SEGAttention
from seg_rt.cli import main
from seg_rt.errors import SEGNotApplied
from seg_rt.families import REGISTRY
from seg_rt.families.dit import pack
from seg_rt.families.flux import image_ids
from seg_rt.params import GenerationParams
from seg_rt.pipeline import generate
from seg_rt.tiny import save_tiny_dit_pipeline, tiny_dit, tiny_dit_pipeline
from tests.tolerance import assert_close, max_rel_error

GRID = (3, 5)  # non-square token grid: 48x80 pixels with an 8x VAE and 2x2 patches
TEXT = 7


def ref_matrix(n: int, sigma: float) -> torch.Tensor:
    """The reference 1D blur on n positions as a matrix: column j is the blurred unit impulse e_j."""
    if sigma > 9999:
        return torch.full((n, n), 1.0 / n, dtype=torch.float64)
    if sigma == 0:  # σ = 0 on an axis: that axis is not blurred
        return torch.eye(n, dtype=torch.float64)
    c6 = math.ceil(6 * sigma)
    k = min(c6 + 1 - c6 % 2, n - (n % 2 - 1))
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = taps / taps.sum()
    impulses = F.pad(torch.eye(n, dtype=torch.float64)[:, None], (k // 2, k // 2), mode="reflect")
    return F.conv1d(impulses, taps.view(1, 1, k))[:, 0].T  # [n, n]: M[i, j]


def einsum_blur(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """``q: [heads, H·W, d]`` blurred over the (H, W) grid, separably with einsum."""
    h, w = GRID
    x = q.double().reshape(q.shape[0], h, w, q.shape[-1])
    x = torch.einsum("ij,hjwd->hiwd", ref_matrix(h, sigma), x)
    x = torch.einsum("vw,hiwd->hivd", ref_matrix(w, sigma), x)
    return x.reshape(q.shape)


def model_inputs(family: str, model) -> dict:
    torch.manual_seed(1)
    h, w = GRID
    if family == "sd3":
        return {
            "hidden_states": torch.randn(2, 4, 2 * h, 2 * w),
            "encoder_hidden_states": torch.randn(2, TEXT, model.config.joint_attention_dim),
            "pooled_projections": torch.randn(2, model.config.pooled_projection_dim),
            "timestep": torch.tensor([500.0, 500.0]),
        }
    if family == "qwenimage":
        return {
            "hidden_states": torch.randn(2, h * w, model.config.in_channels),
            "encoder_hidden_states": torch.randn(2, TEXT, model.config.joint_attention_dim),
            "encoder_hidden_states_mask": torch.tensor([[True] * TEXT, [True] * (TEXT - 2) + [False] * 2]),
            "timestep": torch.tensor([0.5, 0.5]),
            "img_shapes": [[(1, h, w)]] * 2,
        }
    return {
        "hidden_states": torch.randn(2, h * w, model.config.in_channels),
        "encoder_hidden_states": torch.randn(2, TEXT, model.config.joint_attention_dim),
        "pooled_projections": torch.randn(2, model.config.pooled_projection_dim),
        "timestep": torch.tensor([0.5, 0.5]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": image_ids(h, w, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT, 3),
    }


@pytest.fixture(scope="module", params=["sd3", "flux", "qwenimage"])
def model(request):
    return request.param, tiny_dit(request.param)


def run(model, kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def all_layers(m) -> list[str]:
    return list(REGISTRY.for_model(m).adapter().layers(m))


def test_all_false_mask_equals_unpatched_and_unperturbed_rows_identical(model):
    """Installed on every layer: an all-false mask equals the unpatched model; with row 1 perturbed,
    row 0 equals it and row 1 changes (every layer perturbed it)."""
    family, m = model
    kw = model_inputs(family, m)
    plain = run(m, kw)
    layers = all_layers(m)
    with SEGAttention(m, 1.0, layers, adapter=REGISTRY.for_model(m).adapter()) as seg:
        seg.set_mask(torch.tensor([False, False]))
        unperturbed = run(m, kw)
        assert seg.perturbed == 0
        seg.set_mask(torch.tensor([False, True]))
        patched = run(m, kw)
        seg.check()
        assert seg.perturbed == len(layers)
    assert_close(unperturbed, plain, rel=1e-6)
    assert_close(patched[0], plain[0], rel=1e-6)
    assert max_rel_error(patched[1], plain[1]) > 1e-4


def _spy(family, monkeypatch, seen):
    if family == "sd3":  # JointAttnProcessor2_0 and its SEG copy call torch's sdpa: [B, h, N, d]
        real = F.scaled_dot_product_attention

        def spy(q, *a, **k):
            seen.append(q.detach().clone())
            return real(q, *a, **k)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        return
    real = seg_attention.dispatch_attention_fn  # Flux, Qwen-Image: diffusers' dispatch, [B, N, h, d]

    def spy(q, *a, **k):
        seen.append(q.detach().transpose(1, 2).clone())  # -> [B, h, N, d]
        return real(q, *a, **k)

    monkeypatch.setattr(seg_attention, "dispatch_attention_fn", spy)  # SEGProcessor.attend
    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    monkeypatch.setattr(transformer_qwenimage, "dispatch_attention_fn", spy)


CASES = {
    # (layer, image tokens first?) per family: joint attention, SD3.5's image-only attn2,
    # Flux's double-stream (text first) and single-stream ([text, image] concatenated) blocks
    "sd3": ["transformer_blocks.2.attn", "transformer_blocks.1.attn2"],
    "flux": ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"],
    "qwenimage": ["transformer_blocks.1.attn", "transformer_blocks.0.attn"],  # text first, joined after RoPE
}


@pytest.mark.parametrize("sigma", [1.0, math.inf])
@pytest.mark.parametrize("case", [0, 1])
def test_query_entering_attention_is_the_einsum_blur(model, case, sigma, monkeypatch):
    """Spy on the attention function (test-local): with SEG on one layer, the query reaching that
    layer's attention is the unpatched model's final query with the perturbed row's image tokens
    blurred over the non-square grid; text tokens and the other row are untouched."""
    family, m = model
    layer = CASES[family][case]
    order = all_layers(m)  # the attention calls run in module order
    index = order.index(layer)
    kw = model_inputs(family, m)
    plain: list[torch.Tensor] = []
    _spy(family, monkeypatch, plain)
    run(m, kw)
    monkeypatch.undo()
    patched: list[torch.Tensor] = []
    with SEGAttention(m, sigma, [layer], adapter=REGISTRY.for_model(m).adapter()) as seg:
        _spy(family, monkeypatch, patched)
        seg.set_mask(torch.tensor([False, True]))
        run(m, kw)
        monkeypatch.undo()
        seg.check()
    assert len(plain) == len(patched) == len(order)
    for i in range(index):
        assert torch.equal(plain[i], patched[i])
    p, q = plain[index], patched[index]
    n_img = GRID[0] * GRID[1]
    img_first = family == "sd3"
    image = slice(0, n_img) if img_first else slice(q.shape[2] - n_img, q.shape[2])
    text = slice(n_img, q.shape[2]) if img_first else slice(0, q.shape[2] - n_img)
    if ".attn2" not in layer:
        assert q.shape[2] - n_img >= TEXT  # joint attention: text tokens are in this query
    assert torch.equal(q[:, :, text], p[:, :, text])  # text tokens untouched
    assert torch.equal(q[0], p[0])  # unperturbed row untouched
    assert_close(q[1, :, image], einsum_blur(p[1, :, image], sigma), rel=1e-5)
    assert max_rel_error(q[1, :, image], p[1, :, image]) > 1e-3  # the blur did something


def test_layer_selectors(model):
    family, m = model
    adapter = REGISTRY.for_model(m).adapter()
    kind = {"sd3": "joint", "flux": "double", "qwenimage": "joint"}[family]  # "mid": middle block of it
    blocks = [n for n, k in adapter.layers(m).items() if k == kind]
    assert adapter.select(m, ["mid"]) == [blocks[len(blocks) // 2]]
    assert adapter.select(m, [f"{kind}.0-1"]) == blocks[:2]
    assert adapter.select(m, [f"{kind}.1"]) == [blocks[1]]
    with pytest.raises(ValueError, match=rf"seg layer '{kind}.9' matches no attention layer; available: mid"):
        adapter.select(m, [f"{kind}.9"])


def test_replaced_processors_raise_seg_not_applied():
    m = tiny_dit("sd3")
    kw = model_inputs("sd3", m)
    with SEGAttention(m, 1.0, ["mid"], adapter=REGISTRY.for_model(m).adapter()) as seg:
        m.set_attn_processor(diffusers.models.attention_processor.JointAttnProcessor2_0())
        seg.set_mask(torch.tensor([False, True]))
        run(m, kw)
        with pytest.raises(SEGNotApplied):
            seg.check()


# ---- end to end on the tiny pipelines ----


@pytest.fixture(scope="module", params=["sd3", "flux", "qwenimage"])
def pipe(request):
    return request.param, tiny_dit_pipeline(request.param)


def gen(p, **kw):
    args = {"steps": 3, "height": 48, "width": 80, "output_type": "np", "seed": 3}
    return generate(p, "a red fox", **{**args, **kw})


def test_seg_changes_image_and_runs_are_deterministic(pipe):
    _, p = pipe
    a, b = gen(p), gen(p)
    assert np.array_equal(a, b)
    assert a.shape == (1, 48, 80, 3)
    assert np.abs(a - gen(p, seg_scale=0.0)).max() > 1e-3


def test_image_i_of_a_batch_equals_its_seed_alone(pipe):
    """Bit for bit. At 64x96 (a 4x6 grid): on a 3x5 grid SD3.5's image-only attention has 15 query
    tokens, where torch's CPU scaled_dot_product_attention itself rounds ~6e-8 differently for
    another batch size (seen for N=15, not for N=24, 32, 365 or real sizes)."""
    _, p = pipe
    batch = gen(p, seed=5, num_images=2, height=64, width=96, output_type="latent")
    alone = gen(p, seed=6, height=64, width=96, output_type="latent")
    assert torch.equal(batch[1:], alone)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_without_seg_equals_the_diffusers_pipeline(pipe, cfg):
    """seg scale 0: the same latents as the family's diffusers pipeline with the same seed (noise,
    schedule, prompt encoding, guidance embedding, true CFG); SEG adds only its branch."""
    family, p = pipe
    if family == "qwenimage" and cfg > 1:
        pytest.skip(
            "QwenImagePipeline rescales its CFG prediction per token; seg-rt's CFG is the shared formula"
        )
    ours = gen(p, cfg=cfg, seg_scale=0.0, negative_prompt="blurry", output_type="latent")
    kw = {"num_inference_steps": 3, "height": 48, "width": 80, "output_type": "latent"}
    kw["generator"] = torch.Generator("cpu").manual_seed(3)
    if family == "sd3":
        theirs = p("a red fox", negative_prompt="blurry", guidance_scale=cfg, **kw).images
    elif family == "qwenimage":  # diffusers keeps the prompt's own length; seg-rt pads it, masked
        theirs = p("a red fox", true_cfg_scale=cfg, **kw).images
        ours = pack(ours)
    else:
        theirs = p(
            "a red fox",
            negative_prompt="blurry",
            true_cfg_scale=cfg,
            guidance_scale=GenerationParams.distilled_guidance,
            **kw,
        ).images
        ours = pack(ours)
    assert_close(ours, theirs, rel=1e-5)


def test_distilled_guidance_is_flux_dev_s_guidance_input(pipe):
    """Flux.1-dev: ``distilled_guidance`` is FluxPipeline's ``guidance_scale`` (seg off: the same
    latents) and changes the image; a model without a guidance input refuses another value."""
    family, p = pipe
    if family != "flux":
        with pytest.raises(ValueError, match=r"distilled guidance applies only to guidance-distilled models"):
            gen(p, distilled_guidance=2.0)
        return
    ours = gen(p, cfg=1.0, seg_scale=0.0, distilled_guidance=1.5, output_type="latent")
    kw = {"num_inference_steps": 3, "height": 48, "width": 80, "output_type": "latent"}
    theirs = p("a red fox", guidance_scale=1.5, generator=torch.Generator("cpu").manual_seed(3), **kw).images
    assert_close(pack(ours), theirs, rel=1e-5)
    assert not torch.equal(ours, gen(p, cfg=1.0, seg_scale=0.0, output_type="latent"))


def test_flux_dev_runs_the_base_request_checks(pipe, monkeypatch):
    """A guidance-embedding Flux (the tiny one, as Flux.1-dev) still gets every base check: here a
    task its family does not take is refused (before: skipped whenever the model embeds guidance)."""
    family, p = pipe
    if family != "flux":
        pytest.skip("Flux.1-dev's distilled guidance input")
    flux = REGISTRY.of(p)
    assert flux.takes_distilled_guidance(p)
    monkeypatch.setattr(type(flux), "tasks", ("txt2img",))
    from seg_rt.tasks import load_image

    image = load_image(np.zeros((48, 80, 3), np.uint8))
    request = GenerationParams(prompt="a", steps=3, init_image=image, strength=0.5, distilled_guidance=2.0)
    with pytest.raises(ValueError, match="img2img is not available for the flux family; it takes txt2img"):
        flux.check_request(p, request)
    flux.check_request(p, GenerationParams(prompt="a", distilled_guidance=2.0))  # its own value: fine


def test_sizes_must_fit_the_patches(pipe):
    """SD3: 8x VAE x 2x2 patches; Flux: 8x VAE x 2x2 packing: 16-pixel multiples (48x80 fits)."""
    _, p = pipe
    with pytest.raises(ValueError, match="height must be a positive multiple of 16, got 40"):
        gen(p, height=40)


def test_dit_refuses_other_schedulers(pipe):
    _, p = pipe
    with pytest.raises(ValueError, match="flow-matching Euler scheduler"):
        gen(p, scheduler="ddim")


def test_qwenimage_one_step_is_refused(pipe):
    """Qwen-Image's terminal shift cannot stretch a one-sigma schedule (diffusers divides by zero)."""
    family, p = pipe
    if family != "qwenimage":
        pytest.skip("no terminal shift")
    with pytest.raises(ValueError, match=r"qwenimage with a terminal shift .* needs steps >= 2, got 1"):
        gen(p, steps=1)


def test_qwenimage_rows_with_other_prompts_equal_their_runs_alone(pipe):
    """Qwen-Image prompts have their own token counts; padded to one length (masked), a row's
    result does not depend on the other prompts of its batch."""
    family, p = pipe
    if family != "qwenimage":
        pytest.skip("CLIP / T5 prompts have a fixed length")
    from seg_rt.pipeline import generate_batch

    kw = {"steps": 2, "height": 64, "width": 96, "output_type": "latent"}
    batch = generate_batch(p, ["a red fox", "a much longer prompt about a cat"], [1, 2], **kw)
    alone = generate_batch(p, ["a much longer prompt about a cat"], [2], **kw)
    assert torch.equal(batch[1:], alone)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage"])
def test_cli_generate_48x80(family, tmp_path):
    folder = save_tiny_dit_pipeline(family, tmp_path / family)
    out = tmp_path / "img.png"
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--height", "48", "--width", "80"]
    code = main([*args, "--steps", "2", "--seg-layers", "mid", "--out", str(out), "--no-progress"])
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (80, 48)
    sheet = tmp_path / "compare.png"
    args = ["generate", "--model", str(folder), "--height", "48", "--width", "80", "--steps", "2"]
    args += ["--compare", "--compare-sigmas", "1,inf", "--out", str(sheet), "--no-progress"]
    assert main(args) == 0
    assert Image.open(sheet).size[0] >= 4 * 80  # vanilla, CFG, SEG σ=1, SEG σ=inf
    flagged = tmp_path / "guided.png"
    args = ["generate", "--model", str(folder), "--height", "48", "--width", "80", "--steps", "2"]
    args += ["--distilled-guidance", "2", "--out", str(flagged), "--no-progress"]
    if family != "flux":  # no guidance input: refused, one line
        assert main(args) != 0 and not flagged.exists()
        return
    assert main(args) == 0
    assert json.loads(Image.open(flagged).text["parameters"])["distilled_guidance"] == 2.0


# ---- LTX-Video: the fourth video family (pre-patchified tokens + num_frames / height / width) ----

LTX_GRID = (2, 3, 5)  # latent (frames, height, width): 9 frames at 48x80 with the 8x/8x tiny VAE


def ltx_inputs(model) -> dict:
    torch.manual_seed(2)
    f, h, w = LTX_GRID
    return {
        "hidden_states": torch.randn(2, f * h * w, model.config.in_channels),
        "encoder_hidden_states": torch.randn(2, TEXT, model.config.caption_channels),
        "encoder_attention_mask": torch.ones(2, TEXT),
        "timestep": torch.tensor([500.0, 500.0]),
        "num_frames": f,
        "height": h,
        "width": w,
        "rope_interpolation_scale": (8 / 25, 8, 8),
    }


def einsum_blur_3d(q: torch.Tensor, sigma: float, sigma_time: float) -> torch.Tensor:
    """``q: [F·H·W, heads, d]`` (frame-major) blurred over (F, H, W) separably with einsum."""
    f, h, w = LTX_GRID
    x = q.double().reshape(f, h, w, -1)
    x = torch.einsum("st,thwc->shwc", ref_matrix(f, sigma_time), x)
    x = torch.einsum("gh,thwc->tgwc", ref_matrix(h, sigma), x)
    x = torch.einsum("vw,thwc->thvc", ref_matrix(w, sigma), x)
    return x.reshape(q.shape)


def test_ltx_all_false_mask_equals_unpatched_and_rows_independent():
    from seg_rt.tiny import tiny_video_denoiser
    from seg_rt.video.attention import VideoBlur, VideoSEG

    m = tiny_video_denoiser("ltx")
    kw = ltx_inputs(m)
    plain = run(m, kw)
    with VideoSEG(m, VideoBlur("spatiotemporal", 1.0, 1.0)) as seg:
        assert list(seg.kinds) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        seg.set_mask(torch.tensor([False, False]))
        assert_close(run(m, kw), plain, rel=1e-6)
        seg.set_mask(torch.tensor([False, True]))
        patched = run(m, kw)
        seg.check()
    assert_close(patched[0], plain[0], rel=1e-6)
    assert max_rel_error(patched[1], plain[1]) > 1e-4


@pytest.mark.parametrize("mode", ["spatial", "temporal", "spatiotemporal"])
def test_ltx_query_entering_attention_is_the_3d_einsum_blur(mode, monkeypatch):
    """Spy on diffusers' attention dispatch (test-local): with SEG on block 1's self-attention, the
    query reaching it is the unpatched final query (after norm_q and RoPE) blurred over the
    non-square (F, H, W) grid on the perturbed row only."""
    from diffusers.models.transformers import transformer_ltx

    from seg_rt.tiny import tiny_video_denoiser
    from seg_rt.video.attention import VideoBlur, VideoSEG

    m = tiny_video_denoiser("ltx")
    kw = ltx_inputs(m)
    real = seg_attention.dispatch_attention_fn
    seen: list[torch.Tensor] = []

    def spy(q, *a, **k):
        seen.append(q.detach().clone())  # [B, N, heads, d]
        return real(q, *a, **k)

    blur = VideoBlur(mode, 1.0, 1.0)
    for where in (seg_attention, transformer_ltx):
        monkeypatch.setattr(where, "dispatch_attention_fn", spy)
    run(m, kw)
    plain = list(seen)
    seen.clear()
    with VideoSEG(m, blur, ["transformer_blocks.1"]) as seg:
        seg.set_mask(torch.tensor([False, True]))
        run(m, kw)
        seg.check()
    monkeypatch.undo()
    index = 2  # calls: block 0 attn1, attn2 (cross), block 1 attn1
    for i in range(index):
        assert torch.equal(plain[i], seen[i])
    p, q = plain[index], seen[index]
    assert torch.equal(q[0], p[0])
    assert_close(q[1], einsum_blur_3d(p[1], blur.space, blur.time), rel=1e-5)
    assert max_rel_error(q[1], p[1]) > 1e-3


@pytest.fixture(scope="module")
def ltx_pipe():
    from seg_rt.tiny import tiny_video_pipeline

    return tiny_video_pipeline("ltx")


def test_ltx_video_seg_changes_video_deterministic_and_batch_rows(ltx_pipe):
    from seg_rt.video.sampling import generate_video

    kw = {"frames": 9, "height": 48, "width": 80, "steps": 2, "seg_sigma": 2.0, "output_type": "latent"}
    a, b = generate_video(ltx_pipe, "a cat", **kw), generate_video(ltx_pipe, "a cat", **kw)
    assert torch.equal(a, b)
    assert max_rel_error(a, generate_video(ltx_pipe, "a cat", **{**kw, "seg_scale": 0.0})) > 1e-3
    batch = generate_video(ltx_pipe, "a cat", **{**kw, "seed": 4, "num_videos": 2})
    alone = generate_video(ltx_pipe, "a cat", **{**kw, "seed": 5})
    assert_close(batch[1:], alone, rel=1e-6)  # video: to float rounding (see video.sampling)


def test_ltx_without_seg_equals_the_diffusers_pipeline(ltx_pipe):
    """seg scale 0: LTXPipeline's latents for the same seed (noise, sigmas + mu schedule, T5 mask,
    RoPE scale, CFG). 64x96: LTXPipeline insists on multiples of 32 (its real VAE's factor)."""
    from seg_rt.video.families.ltx import ltx_pack
    from seg_rt.video.sampling import generate_video

    same = {"negative_prompt": "dull", "height": 64, "width": 96, "output_type": "latent"}
    ours = generate_video(ltx_pipe, "a cat", frames=9, steps=2, cfg=3.0, seg_scale=0.0, **same)
    generator = torch.Generator("cpu").manual_seed(0)
    theirs = ltx_pipe(
        "a cat", num_frames=9, num_inference_steps=2, guidance_scale=3.0, generator=generator, **same
    ).frames
    assert_close(ltx_pack(ours, 1, 1), theirs, rel=1e-5)


def test_cli_video_ltx(tmp_path):
    from seg_rt.tiny import save_tiny_video_pipeline

    folder = save_tiny_video_pipeline("ltx", tmp_path / "ltx")
    out = tmp_path / "v.mp4"
    args = ["video", "--model", str(folder), "--prompt", "a cat", "--frames", "9", "--height", "48"]
    code = main(
        [*args, "--width", "80", "--steps", "2", "--seg-sigma", "2", "--out", str(out), "--no-progress"]
    )
    assert code == 0 and out.stat().st_size > 0


# ---- ONNX export of the image DiTs (SD3, Flux) ----


@pytest.fixture(scope="module", params=["sd3", "flux"])
def export_pipe(request):
    return request.param, tiny_dit_pipeline(request.param)


@pytest.fixture(scope="module")
def dit_exports(export_pipe, tmp_path_factory):
    """sigma -> export folder (None: runtime σ), 48x80, CFG rows [uncond, cond, seg]."""
    from seg_rt.export import export_onnx

    family, pipe = export_pipe
    made: dict = {}

    def get(sigma):
        if sigma not in made:
            out = tmp_path_factory.mktemp(f"{family}onnx") / "engine"
            made[sigma] = export_onnx(pipe, out, height=48, width=80, sigma=sigma)
        return made[sigma]

    return get


@pytest.mark.parametrize("sigma", [2.0, None])
def test_dit_onnx_export_validates_and_passes_the_tensorrt_op_check(export_pipe, dit_exports, sigma):
    """Flux's grid (3x5) comes from its img_ids, read eagerly before the trace (``flux_grid``)."""
    from seg_rt.export.tensorrt import check_onnx_for_tensorrt

    family, _ = export_pipe
    result = dit_exports(sigma)
    assert result.validation["max_rel_error"] < 1e-4  # export_onnx raises above its own bound
    assert result.info.family == family and result.info.latent_height == 6 and result.info.latent_width == 10
    assert ("seg_blur_3" in result.info.input_names) == (sigma is None)
    assert ("seg_blur_5" in result.info.input_names) == (sigma is None)
    assert ("guidance" in result.info.input_names) == (family == "flux")  # Flux-dev's runtime input
    check_onnx_for_tensorrt(result.folder)


@pytest.mark.parametrize("sigma", [2.0, None])
def test_dit_onnx_engine_image_equals_torch(export_pipe, dit_exports, sigma):
    """``engine="onnx:DIR"`` (baked σ 2, or runtime σ set to 2) gives torch's latents within the
    UNet exports' bound; the SEG window makes some steps run 2 of the engine's 3 rows (padding)."""
    _, pipe = export_pipe
    kw = {"steps": 3, "height": 48, "width": 80, "seg_sigma": 2.0, "seg_end": 0.5, "output_type": "latent"}
    ours = generate(pipe, "a red fox", **kw)
    onnx = generate(pipe, "a red fox", engine=f"onnx:{dit_exports(sigma).folder}", **kw)
    assert_close(onnx, ours, rel=1e-4, what="ONNX Runtime vs torch latents")


def test_flux_onnx_distilled_guidance_is_a_runtime_input(export_pipe, dit_exports):
    family, pipe = export_pipe
    if family != "flux":
        pytest.skip("Flux-dev only")
    kw = {"steps": 2, "height": 48, "width": 80, "seg_sigma": 2.0, "output_type": "latent"}
    kw["distilled_guidance"] = 1.5
    ours = generate(pipe, "a red fox", **kw)
    onnx = generate(pipe, "a red fox", engine=f"onnx:{dit_exports(2.0).folder}", **kw)
    assert_close(onnx, ours, rel=1e-4, what="ONNX Runtime vs torch latents")


def test_qwenimage_export_is_refused_with_one_line(tmp_path):
    from seg_rt.export import export_onnx

    with pytest.raises(ValueError, match=r"ONNX export supports the families .*sd3, flux, got qwenimage"):
        export_onnx(tiny_dit_pipeline("qwenimage"), tmp_path / "x", height=48, width=80)
