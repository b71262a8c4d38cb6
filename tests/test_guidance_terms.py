"""Guidance terms (seg_rt.guidance): each method's combine against diffusers' guiders or its paper's
formula written here, its forward passes per step, its perturbation against an independent
implementation on a tiny UNet, combinations in one forward, and the request edges."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import (
    ClassifierFreeZeroStarGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

import seg_rt
from seg_rt import SEGConfig
from seg_rt.attention import SEGAttention
from seg_rt.engines import Denoiser, TorchDenoiser
from seg_rt.guidance import REGISTRY, Guidance, combine
from seg_rt.guidance.fresca import frequency_scale
from seg_rt.layers import self_attention_layers
from seg_rt.params import GenerationParams, request_from_fields
from seg_rt.perturbations import token_permutation
from seg_rt.sampler import branches_at, nfe_at

from .test_attention import unet_inputs
from .tolerance import assert_close


def preds(seed=0, shape=(2, 4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


# ---- the combine of each term vs an implementation seg-rt did not write -----------------------


def test_no_list_is_the_seg_formula_bit_for_bit():
    c, u, p = preds()
    ours = combine(c, u, p, cfg=5.0, scale=3.0)
    assert torch.equal(ours, c + 4.0 * (c - u) + 3.0 * (c - p))
    assert torch.equal(seg_rt.seg_guidance(c, eps_uncond=u, eps_seg=p, cfg=5.0, seg_scale=3.0), ours)


@pytest.mark.parametrize("guider", [PerturbedAttentionGuidance, SkipLayerGuidance])
def test_perturbed_term_combine_equals_diffusers_guider(guider):
    """PAG / SLG / TPG share diffusers' PAG / SLG combine: u + w(c - u) + s(c - perturbed)."""
    c, u, p = preds(1)
    if guider is PerturbedAttentionGuidance:
        kw = {"perturbed_guidance_scale": 2.0, "perturbed_guidance_start": 0.0, "perturbed_guidance_stop": 1.0,
              "perturbed_guidance_layers": [0]}  # fmt: skip
    else:
        kw = {"skip_layer_guidance_scale": 2.0, "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0,
              "skip_layer_guidance_layers": [0]}  # fmt: skip
    g = guider(guidance_scale=5.0, **kw)
    g.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(500))
    theirs = g.forward(c, u, p).pred
    assert_close(combine(c, u, p, cfg=5.0, scale=2.0), theirs, rel=1e-6)


def test_apg_equals_diffusers_normalized_guidance_with_momentum():
    """APG's paper form c + (w-1)(Δ⊥ + ηΔ∥) is diffusers' original formulation at scale w - 1."""
    term = Guidance.parse("apg:eta=0.3:threshold=2").get("apg")
    buffer, memory = MomentumBuffer(term.momentum), {}
    for step in range(3):
        c, u, _ = preds(10 + step)
        theirs = normalized_guidance(
            c, u, 4.0, buffer, term.eta, term.threshold, use_original_formulation=True
        )
        ours = combine(c, u, cfg=5.0, modifiers=[term], step=step, num_steps=3, memory=memory)
        assert_close(ours, theirs, rel=1e-6, what=f"APG step {step}")
    plain = combine(c, u, cfg=5.0)
    assert (ours - plain).abs().max() > 1e-2  # the projection changed it


def test_apg_defaults_are_the_papers():
    apg = REGISTRY["apg"]()
    assert (apg.eta, apg.momentum, apg.threshold) == (0.0, -0.5, 15.0)


def test_cfg_zero_star_equals_diffusers_guider():
    term = Guidance.parse("cfgzero").get("cfgzero")
    g = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    for step in range(3):
        c, u, _ = preds(20 + step)
        g.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(500))
        ours = combine(c, u, cfg=4.0, modifiers=[term], step=step, num_steps=3)
        assert_close(ours, g.forward(c, u).pred, rel=1e-6, what=f"CFG-Zero* step {step}")
    assert torch.equal(combine(c, u, cfg=4.0, modifiers=[term], step=0, num_steps=3), torch.zeros_like(c))


def _fresca_reference(x, low, high, cutoff):
    """FreSca's filter from integer frequencies (no fftshift): low where both |k| index offsets sit
    inside the centred square [-cutoff, cutoff) of the shifted spectrum."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.fft2(x.double())

    def low_band(n):
        k = torch.fft.fftfreq(n, d=1.0 / n).round().long()  # 0, 1, .., -n/2 (-(n//2)), ..
        k = torch.where(k == -(n // 2), torch.full_like(k, -(n // 2)), k)  # fftshift's centre is n//2
        return (k >= -cutoff) & (k < cutoff)

    band = low_band(h)[:, None] & low_band(w)[None, :]
    scale = torch.where(band, torch.tensor(low, dtype=torch.double), torch.tensor(high, dtype=torch.double))
    return torch.fft.ifft2(spectrum * scale).real.float()


@pytest.mark.parametrize(("h", "w", "cutoff"), [(8, 8, 2), (7, 10, 3), (6, 6, 20)])
def test_fresca_filter_equals_the_formula(h, w, cutoff):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    assert_close(frequency_scale(x, 0.5, 1.25, cutoff), _fresca_reference(x, 0.5, 1.25, cutoff), rel=1e-5)
    assert_close(frequency_scale(x, 1.0, 1.0, cutoff), x, rel=1e-5)  # no scaling: identity


def test_fresca_scales_the_cfg_delta():
    c, u, _ = preds(3, (1, 4, 8, 8))
    term = Guidance.parse("fresca:low=0.8:high=1.5:cutoff=2").get("fresca")
    expected = c + 4.0 * _fresca_reference(c - u, 0.8, 1.5, 2)
    assert_close(combine(c, u, cfg=5.0, modifiers=[term]), expected, rel=1e-5)
    with pytest.raises(ValueError, match="spatial latent"):
        combine(c.flatten(2), u.flatten(2), cfg=5.0, modifiers=[term])


def test_cfg_plus_seg_plus_apg_is_the_sum_of_the_terms():
    c, u, p = preds(4)
    term = Guidance.parse("apg").get("apg")
    projected = normalized_guidance(c, u, 1.0, MomentumBuffer(-0.5), 0.0, 15.0, True) - c
    ours = combine(c, u, p, cfg=5.0, scale=3.0, modifiers=[term], memory={})
    assert_close(ours, c + 4.0 * projected + 3.0 * (c - p), rel=1e-6)


# ---- windows and forward passes per step --------------------------------------------------------


NFE = {"cfg": 1, "seg": 1, "pag": 1, "tpg": 1, "slg": 1, "cfgzero": 0, "fresca": 0, "apg": 0}


def test_each_terms_stated_nfe():
    assert {name: t.NFE for name, t in REGISTRY.items()} == NFE
    off = SEGConfig(scale=0.0)
    assert nfe_at(0, 10, 5.0, off) == 2  # cond + uncond
    assert nfe_at(0, 10, 5.0, SEGConfig()) == 3  # + SEG
    for name in ("pag", "tpg"):
        assert nfe_at(0, 10, 5.0, off, Guidance.parse(name)) == 3
        assert nfe_at(0, 10, 1.0, off, Guidance.parse(name)) == 2
    slg = Guidance.parse("slg")  # SLG's window 0.01-0.2 (diffusers' defaults)
    assert [nfe_at(i, 10, 5.0, off, slg) for i in range(4)] == [2, 3, 2, 2]
    for name in ("apg", "cfgzero", "fresca"):
        assert nfe_at(0, 10, 5.0, off, Guidance.parse(name)) == 2
    assert nfe_at(0, 10, 5.0, SEGConfig(), Guidance.parse("apg,fresca")) == 3
    assert nfe_at(0, 10, 5.0, off, Guidance.parse("cfg:start=0.5")) == 1


def test_window_per_term():
    g = Guidance.parse("cfg:start=0.2:end=0.6,pag=2:start=0.5")
    seg = g.rows_config(SEGConfig(scale=0.0))
    assert [branches_at(i, 10, 5.0, seg, g) for i in (0, 2, 5, 7)] == [
        ["cond"],
        ["uncond", "cond"],
        ["uncond", "cond", "seg"],
        ["cond", "seg"],
    ]
    apg = Guidance.parse("apg:end=0.5").get("apg")
    c, u, _ = preds(5)
    assert torch.equal(combine(c, u, cfg=3.0, modifiers=[apg], step=6, num_steps=10), combine(c, u, cfg=3.0))


# ---- the perturbations on a tiny UNet vs an independent implementation ---------------------------


class _ZeroAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class _ShuffledBlock(torch.nn.Module):
    """TPG as the reference ComfyUI node does it: a wrapper module shuffling the block's input."""

    def __init__(self, block, perm):
        super().__init__()
        self.block, self.perm = block, perm

    def forward(self, hidden_states, *args, **kwargs):
        return self.block(hidden_states[:, self.perm], *args, **kwargs)


def _swap(root, name, module):
    parent, _, child = name.rpartition(".")
    holder = root.get_submodule(parent)
    old = getattr(holder, child)
    setattr(holder, child, module)
    return old


@pytest.mark.parametrize("kind", ["skip", "shuffle"])
def test_hook_perturbations_equal_module_swaps(sd15, kind):
    x, t, kw = unet_inputs(sd15, 1, 8, 8)
    x, kw = torch.cat([x, x]), {"encoder_hidden_states": kw["encoder_hidden_states"].repeat(2, 1, 1)}
    unet = sd15.unet
    mid = [n for n in self_attention_layers(unet) if n.startswith("mid")]
    with torch.no_grad():
        plain = unet(x, t, **kw).sample
        swapped = {}
        for n in mid:
            if kind == "skip":
                swapped[n] = _swap(unet, n, _ZeroAttention())
            else:
                block = n.rpartition(".")[0]
                tokens = 4 * 4  # the mid block's grid at 8x8 latents
                swapped[block] = _swap(
                    unet, block, _ShuffledBlock(unet.get_submodule(block), token_permutation(n, tokens))
                )
        ref = unet(x, t, **kw).sample
        for n, m in swapped.items():
            _swap(unet, n, m)
        with SEGAttention(unet, 1.0, ["mid"], perturbation=kind) as seg:
            seg.set_mask(torch.tensor([False, True]))
            ours = unet(x, t, **kw).sample
            seg.check()
            seg.set_mask(torch.tensor([False, True]))
            seg.rows = None  # the traced path: the mask as data
            ours_where = unet(x, t, **kw).sample
        assert_close(unet(x, t, **kw).sample, plain, rel=1e-6)  # hooks removed with the patch
    assert_close(ours[0], plain[0], rel=1e-5)
    assert_close(ours[1], ref[1], rel=1e-5)
    assert_close(ours_where, ours, rel=1e-6)
    assert (ref[1] - plain[1]).abs().max() > 1e-4


def test_token_permutation_is_fixed_and_not_identity():
    p = token_permutation("mid_block.attentions.0.transformer_blocks.0.attn1", 16)
    assert torch.equal(p, token_permutation("mid_block.attentions.0.transformer_blocks.0.attn1", 16))
    assert sorted(p.tolist()) == list(range(16)) and not torch.equal(p, torch.arange(16))
    assert torch.equal(token_permutation("a", 2), torch.tensor([1, 0]))


# ---- whole runs: one forward per step, rows, and an independent loop ------------------------------


class Counting(Denoiser):
    """Wraps a denoiser; records each call's row count."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def configure(self, sigma, layers=None):
        self.inner.configure(sigma, layers)

    def set_perturbation(self, perturbation):
        return self.inner.set_perturbation(perturbation)

    def __call__(self, inputs):
        self.rows.append(inputs["sample"].shape[0])
        return self.inner(inputs)

    def close(self):
        self.inner.close()
        self.closed = True


def test_cfg_seg_apg_in_one_forward_equals_an_independent_loop(sd15):
    kw = {"steps": 3, "cfg": 4.0, "seg_scale": 2.0, "seg_sigma": 2.0, "height": 64, "width": 64, "seed": 1}
    engine = Counting(TorchDenoiser(sd15.unet, sigma=2.0, layers=["mid"]))
    try:
        ours = seg_rt.generate(sd15, "a cat", guidance="apg", output_type="latent", engine=engine, **kw)
        assert engine.rows == [3, 3, 3]  # [uncond, cond, seg] in one forward every step
        # the loop again, written here: diffusers' APG (original formulation, scale w - 1) + SEG
        from seg_rt.pipeline import family_of, seed_generators

        params = request_from_fields({"prompt": "a cat", **kw})
        fam = family_of(sd15, "image")
        prep = fam.encode(sd15, params, 1, height=64, width=64, control_image=None, controlnet_scale=None)
        sched = fam.schedule(sd15, "euler", 3, height=64, width=64)
        lat = fam.initial_latents(sd15, sched, seed_generators([1]), height=64, width=64, dtype=torch.float32)
        buffer = MomentumBuffer(-0.5)
        inner = engine.inner
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.scale_model_input(lat, t)
                rows = {}
                for name, cond, perturbed in (
                    ("u", prep.uncond, False),
                    ("c", prep.cond, False),
                    ("p", prep.cond, True),
                ):
                    inputs = {
                        **cond,
                        "sample": x,
                        "timestep": t.reshape(1).expand(1),
                        "seg_mask": torch.tensor([perturbed]),
                    }
                    rows[name] = inner(inputs)
                guided = normalized_guidance(rows["c"], rows["u"], 3.0, buffer, 0.0, 15.0, True)
                eps = guided + 2.0 * (rows["c"] - rows["p"])
                lat = sched.step(eps, t, lat, return_dict=False)[0]
    finally:
        engine.inner.close()
    assert_close(ours, lat, rel=1e-4, what="CFG+SEG+APG vs the loop written here")


@pytest.mark.parametrize(
    ("spec", "rows"), [("pag=2", [3, 3]), ("tpg=2", [3, 3]), ("slg=2:start=0:end=0.5", [3, 2])]
)
def test_perturbed_terms_run_in_the_one_forward(sd15, spec, rows):
    kw = {
        "steps": 2,
        "cfg": 3.0,
        "seg_scale": 0.0,
        "height": 64,
        "width": 64,
        "seed": 2,
        "output_type": "latent",
    }
    engine = Counting(TorchDenoiser(sd15.unet, layers=["mid"]))
    try:
        ours = seg_rt.generate(sd15, "a dog", guidance=spec, engine=engine, **kw)
        assert engine.rows == rows
        assert engine.inner.model.seg.perturbation == "blur"  # the engine's own kind back after the run
        again = seg_rt.generate(sd15, "a dog", guidance=spec, engine=engine, **kw)
    finally:
        engine.inner.close()
    plain = seg_rt.generate(sd15, "a dog", **kw)
    assert torch.equal(ours, again)  # a function of seed and parameters
    assert (ours - plain).abs().max() > 1e-4


def test_batch_equals_solo_with_guidance(sd15):
    kw = {"steps": 2, "cfg": 3.0, "seg_scale": 0.0, "height": 64, "width": 64, "output_type": "latent"}
    batch = seg_rt.generate(sd15, "a dog", guidance="tpg,apg", seed=4, num_images=2, **kw)
    solo = seg_rt.generate(sd15, "a dog", guidance="tpg,apg", seed=5, **kw)
    assert torch.equal(batch[1:], solo)


def test_cfg_zero_star_needs_a_flow_model(sd15):
    with pytest.raises(ValueError, match="cfgzero is defined for flow-matching models"):
        seg_rt.generate(
            sd15, "a", guidance="cfgzero", steps=1, cfg=3.0, height=64, width=64, output_type="latent"
        )


def test_cfg_zero_star_on_a_flow_scheduler():
    with pytest.raises(ValueError, match="packed tokens: leave fresca out"):
        Guidance.parse("fresca").check_model(flow=True, latent_ndim=3)
    g = Guidance.parse("cfgzero")
    g.check_model(flow="FlowMatch" in FlowMatchEulerDiscreteScheduler.__name__)
    with pytest.raises(ValueError, match="flow-matching"):
        g.check_model(flow="FlowMatch" in EulerDiscreteScheduler.__name__)


# ---- the request edges ----------------------------------------------------------------------------


def test_record_carries_the_canonical_list_and_old_records_are_unchanged():
    assert "guidance" not in GenerationParams().to_record()
    p = request_from_fields({"guidance": "fresca:high=1.25, apg:eta=0,cfg:start=0.1", "cfg": 3.0})
    assert p.guidance == "cfg:start=0.1,fresca,apg"  # registry order, defaults left out
    assert p.to_record()["guidance"] == "cfg:start=0.1,fresca,apg"
    assert GenerationParams.from_record(p.to_record()) == p
    assert p.batch_key() != p.replace(guidance="").batch_key()


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        (
            "nag",
            {},
            "unknown guidance 'nag'; the guidance list takes cfg, pag, tpg, slg, cfgzero, fresca, apg",
        ),
        ("seg=3", {}, "guidance 'seg' is set by its own fields"),
        ("cfg=5", {}, "guidance cfg takes the cfg field"),
        ("apg:beta=1", {}, "guidance apg option 'beta=1' is not one of start=VALUE, end=VALUE, eta=VALUE"),
        ("apg:eta=x", {}, "guidance apg option eta must be a number, got 'x'"),
        ("pag,tpg", {"seg_scale": 0}, "one perturbed term per request"),
        ("pag", {}, "give seg_scale 0 with pag"),
        ("apg", {"cfg": 1.0}, "needs cfg > 1"),
        ("pag=2:start=0.5:end=0.5", {"seg_scale": 0}, "guidance pag window must satisfy"),
        ("apg,apg", {}, "guidance names apg twice"),
        ("fresca:cutoff=2.5", {}, "cutoff must be an integer"),
    ],
)
def test_bad_guidance_is_one_line(spec, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        request_from_fields({"guidance": spec, **extra})


def test_cli_http_and_job_carry_the_list(sd15, tmp_path):
    """--guidance (a table field: CLI flag, HTTP body key, job key), into the PNG record."""
    import json

    from PIL import Image

    from seg_rt.cli import main
    from seg_rt.tiny import save_tiny_pipeline

    folder = str(save_tiny_pipeline("sd15", tmp_path / "sd15"))
    out = tmp_path / "g.png"
    flags = ["generate", "--model", folder, "--prompt", "a cube", "--steps", "2", "--height", "64",
             "--width", "64", "--seg-scale", "0", "--cfg", "3", "--guidance", "pag=2,apg:eta=0.5",
             "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(flags) == 0
    record = json.loads(Image.open(out).text["parameters"])
    assert record["guidance"] == "pag=2,apg:eta=0.5"
    bad = main([*flags[:-2], "--guidance", "nag", "--out", str(tmp_path / "bad.png")])
    assert bad == 2 and not (tmp_path / "bad.png").exists()

    pytest.importorskip("pydantic")
    from seg_rt.cluster.jobs.spec import parse_job
    from seg_rt.cluster.serving.request import make_request

    req = make_request(prompt="a", guidance="tpg", seg_scale=0, cfg=3)
    assert req.guidance == "tpg=3"  # canonical: the scale written out
    with pytest.raises(Exception, match="unknown guidance 'nag'"):
        make_request(prompt="a", guidance="nag")
    job = parse_job({"model": folder, "prompts": ["a"], "guidance": "apg", "output": str(tmp_path / "job")})
    assert job.guidance == "apg"


def test_video_slg_and_tpg_in_the_one_forward():
    """The video path takes the list: SLG / TPG on a video DiT's attention layers (Wan), batch = solo."""
    from seg_rt.tiny import tiny_video_pipeline
    from seg_rt.video.sampling import generate_video

    pipe = tiny_video_pipeline("wan")
    kw = {"frames": 5, "steps": 2, "cfg": 3.0, "seg_scale": 0.0, "output_type": "latent"}
    plain = generate_video(pipe, "a cat", **kw)
    for spec in ("slg=2:start=0:end=1", "tpg=2"):
        assert (generate_video(pipe, "a cat", guidance=spec, **kw) - plain).abs().max() > 1e-4, spec
    batch = generate_video(pipe, "a cat", guidance="slg=2:end=1,apg", num_videos=2, seed=4, **kw)
    alone = generate_video(pipe, "a cat", guidance="slg=2:end=1,apg", seed=5, **kw)
    assert torch.equal(batch[1:], alone)


def test_sample_major_rows_take_the_mask_per_sample():
    """AnimateDiff's layers see B·r attention rows, sample i owning r consecutive ones."""
    from types import SimpleNamespace

    from seg_rt.perturbations import _rows_where

    x, changed = torch.zeros(6, 2), torch.ones(6, 2)
    patch = SimpleNamespace(rows=[1], mask=torch.tensor([False, True]))
    assert _rows_where(patch, x, changed)[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    patch = SimpleNamespace(rows=slice(1, 2), mask=torch.tensor([False, True]))
    assert _rows_where(patch, x[:2], changed[:2])[:, 0].tolist() == [0, 1]


def test_paper_defaults():
    assert REGISTRY["slg"]().scale == 2.8 and (REGISTRY["slg"]().start, REGISTRY["slg"]().end) == (0.01, 0.2)
    assert REGISTRY["cfgzero"]().zero_steps == 1
    f = REGISTRY["fresca"]()
    assert (f.low, f.high, f.cutoff) == (1.0, 1.25, 20)
    assert REGISTRY["pag"]().scale == 3.0 and REGISTRY["tpg"]().scale == 3.0
    assert math.isclose(REGISTRY["seg"]().scale, SEGConfig().scale)


# ---- image DiTs: the same perturbations on joint attention, CFG-Zero* on a flow model -------------


class _ZeroJointAttention(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return torch.zeros_like(hidden_states)
        return torch.zeros_like(hidden_states), torch.zeros_like(encoder_hidden_states)


@pytest.mark.parametrize("kind", ["skip", "shuffle"])
def test_dit_hook_perturbations_equal_module_swaps(kind):
    from seg_rt.families import REGISTRY as FAMILIES

    from .test_dit import GRID, model_inputs, run, tiny_dit

    m = tiny_dit("sd3")
    kw = model_inputs("sd3", m)
    layer = "transformer_blocks.1.attn"
    plain = run(m, kw)
    if kind == "skip":
        old = _swap(m, layer, _ZeroJointAttention())
        ref = run(m, kw)
        _swap(m, layer, old)
    else:
        block = layer.rpartition(".")[0]
        perm = token_permutation(layer, GRID[0] * GRID[1])
        old = _swap(m, block, _ShuffledBlock(m.get_submodule(block), perm))
        ref = run(m, kw)
        _swap(m, block, old)
    with SEGAttention(m, 1.0, [layer], kind, adapter=FAMILIES.for_model(m).adapter()) as seg:
        seg.set_mask(torch.tensor([False, True]))
        ours = run(m, kw)
        seg.check()
    assert_close(ours[0], plain[0], rel=1e-5)
    assert_close(ours[1], ref[1], rel=1e-5)
    assert (ref[1] - plain[1]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def sd3_pipe():
    from seg_rt.tiny import tiny_dit_pipeline

    return tiny_dit_pipeline("sd3")


def test_dit_terms_and_cfg_zero_star_zero_init(sd3_pipe):
    kw = {
        "steps": 2,
        "height": 48,
        "width": 80,
        "seed": 3,
        "cfg": 3.0,
        "seg_scale": 0.0,
        "output_type": "latent",
    }
    plain = seg_rt.generate(sd3_pipe, "a fox", **kw)
    for spec in ("slg=2:start=0", "tpg=2", "cfgzero:zero_steps=0", "fresca:high=2:cutoff=1"):
        ours = seg_rt.generate(sd3_pipe, "a fox", guidance=spec, **kw)
        assert (ours - plain).abs().max() > 1e-4, spec
    # zero-init over every step: velocity 0, so the latents stay the initial noise
    from seg_rt.pipeline import family_of, seed_generators

    fam = family_of(sd3_pipe, "image")
    sched = fam.schedule(sd3_pipe, "euler", 2, height=48, width=80)
    noise = fam.initial_latents(
        sd3_pipe, sched, seed_generators([3]), height=48, width=80, dtype=torch.float32
    )
    still = seg_rt.generate(sd3_pipe, "a fox", guidance="cfgzero:zero_steps=2", **kw)
    assert torch.equal(still, noise)
