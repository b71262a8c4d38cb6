"""Cheap SEG modes: ``SEGConfig.every`` (reuse the SEG delta between SEG steps) and
``SEGConfig.placement="uncond"`` (blur inside the unconditional row), checked against a loop
written here from their definitions, and their validation and records."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import seg_rt
from seg_rt.config import SEGConfig
from seg_rt.params import GenerationParams
from seg_rt.sampler import branches_at, build_batch, sample, seg_action

from .tolerance import assert_close


def test_seg_action_every_k_counts_from_the_window_start():
    cfg = SEGConfig(every=3, start=0.2, end=0.8)
    assert [seg_action(i, 10, cfg) for i in range(10)] == (
        ["off"] * 2 + ["run", "reuse", "reuse", "run", "reuse", "reuse"] + ["off"] * 2
    )
    assert [seg_action(i, 4, SEGConfig(every=2)) for i in range(4)] == ["run", "reuse", "run", "reuse"]
    assert [seg_action(i, 4, SEGConfig()) for i in range(4)] == ["run"] * 4
    assert [seg_action(i, 4, SEGConfig(scale=0, every=2)) for i in range(4)] == ["off"] * 4


def test_branches_for_each_mode():
    assert branches_at(0, 4, 5.0, SEGConfig(every=2)) == ["uncond", "cond", "seg"]
    assert branches_at(1, 4, 5.0, SEGConfig(every=2)) == ["uncond", "cond"]
    assert branches_at(0, 4, 5.0, SEGConfig(placement="uncond")) == ["seg_uncond", "cond"]
    assert branches_at(3, 4, 5.0, SEGConfig(placement="uncond", end=0.5)) == ["uncond", "cond"]


def test_uncond_placement_batch_marks_the_uncond_rows():
    x = torch.zeros(2, 4, 2, 2)
    cond = {"encoder_hidden_states": torch.ones(2, 3, 5)}
    uncond = {"encoder_hidden_states": torch.zeros(2, 3, 5)}
    b = build_batch(["seg_uncond", "cond"], x, torch.tensor(1.0), cond, uncond)
    assert b["seg_mask"].tolist() == [True, True, False, False]
    assert torch.equal(b["encoder_hidden_states"][:2], uncond["encoder_hidden_states"])
    assert b.layout.seg_rows == slice(0, 2) and b.layout.seg_source is None
    b = build_batch(["uncond", "cond", "seg"], x, torch.tensor(1.0), cond, uncond)
    assert b.layout.seg_rows == slice(4, 6) and b.layout.seg_source == slice(2, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "seg every must be an integer >= 1, got 0"),
        ({"every": 1.5}, "seg every must be an integer >= 1"),
        ({"placement": "cond"}, "seg placement must be one of batched, uncond, got 'cond'"),
        ({"every": 2, "placement": "uncond"}, "use every=1 or placement 'batched'"),
    ],
)
def test_bad_cheap_fields(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SEGConfig(**kwargs)


def test_uncond_placement_needs_cfg(sdxl):
    with pytest.raises(ValueError, match="needs cfg > 1, got cfg 1"):
        GenerationParams(cfg=1.0, seg=SEGConfig(placement="uncond"))
    with pytest.raises(ValueError, match="needs cfg > 1"):
        seg_rt.generate(sdxl, "x", cfg=1.0, seg_placement="uncond", steps=1)


def test_records_carry_cheap_fields_only_when_set():
    plain = GenerationParams().to_record()
    assert not any(k in plain for k in ("seg_every", "seg_placement"))
    assert "every" not in SEGConfig().to_dict()
    p = GenerationParams(seg=SEGConfig(every=2))
    assert p.to_record()["seg_every"] == 2 and "seg_placement" not in p.to_record()
    assert GenerationParams.from_record(p.to_record()) == p
    q = GenerationParams(seg=SEGConfig(placement="uncond"))
    assert GenerationParams.from_record(q.to_record()) == q


class Toy:
    """A denoiser whose prediction depends on the inputs and, for perturbed rows, on the mask."""

    def __init__(self):
        self.rows = []

    def __call__(self, inputs):
        self.rows.append(inputs["sample"].shape[0])
        x, e = inputs["sample"], inputs["encoder_hidden_states"].mean((1, 2)).view(-1, 1, 1, 1)
        blurred = inputs["seg_mask"].view(-1, 1, 1, 1)
        # the perturbation interacts with the conditioning (else the two placements coincide)
        return torch.where(blurred, 0.3 * x.mean((2, 3), keepdim=True) + 0.2 * e, 0.5 * x + e)


def _reference(mode, latents, cond, uncond, steps, cfg, s, every=1):
    """The cheap modes from their definitions: a loop over the toy model's branches."""
    sched = EulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    toy = Toy()

    def eps_of(x, e, blurred):
        mask = torch.full((x.shape[0],), blurred)
        return toy({"sample": x, "encoder_hidden_states": e, "seg_mask": mask})

    delta = None
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t)
        e_c = eps_of(x, cond, False)
        if mode == "uncond":  # eps = eps_u' + cfg (eps_c - eps_u')
            e_u = eps_of(x, uncond, True)
            eps = e_u + cfg * (e_c - e_u)
        else:
            e_u = eps_of(x, uncond, False)
            if i % every == 0:
                delta = e_c - eps_of(x, cond, True)
            eps = e_u + cfg * (e_c - e_u) + s * delta
        latents = sched.step(eps, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize(
    ("mode", "seg"), [("every", SEGConfig(every=2)), ("uncond", SEGConfig(placement="uncond"))]
)
def test_cheap_modes_follow_their_definition(mode, seg):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 5, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(2, 3, 5, generator=g)}
    sched = EulerDiscreteScheduler(num_train_timesteps=1000)
    toy = Toy()
    sched.set_timesteps(5)
    ours = sample(toy, sched, latents, cond, uncond, cfg=4.0, seg=seg, progress=False)
    ref = _reference(
        mode, latents, cond["encoder_hidden_states"], uncond["encoder_hidden_states"], 5, 4.0, 3.0, 2
    )
    assert_close(ours, ref, rel=1e-5, what=f"seg {mode} vs its definition")
    assert toy.rows == ([6, 4, 6, 4, 6] if mode == "every" else [4] * 5)
    sched.set_timesteps(5)
    exact = sample(Toy(), sched, latents, cond, uncond, cfg=4.0, seg=SEGConfig(), progress=False)
    assert (ours - exact).abs().max() > 1e-3  # the cheap mode is a different sampler


def test_cheap_modes_run_on_a_unet(sdxl):
    kw = {"steps": 3, "height": 64, "width": 64, "output_type": "latent", "seg_sigma": math.inf}
    every = seg_rt.generate(sdxl, "a", seg_every=2, **kw)
    uncond = seg_rt.generate(sdxl, "a", seg_placement="uncond", **kw)
    plain = seg_rt.generate(sdxl, "a", **kw)
    assert every.shape == plain.shape == uncond.shape
    assert torch.isfinite(every).all() and torch.isfinite(uncond).all()
    assert (every - plain).abs().max() > 1e-4 and (uncond - plain).abs().max() > 1e-4
