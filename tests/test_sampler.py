"""The sampling loop: reference equality, diffusers equality, seeds, window, batching modes."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import seg_rt
from seg_rt.engines import Denoiser, TorchDenoiser
from seg_rt.params import GenerationParams
from seg_rt.pipeline import family_of, seed_generators
from seg_rt.sampler import sample

from .reference_seg import reference_sdxl_latents
from .tolerance import assert_close


@pytest.mark.parametrize(("cfg", "sigma"), [(5.0, 2.0), (5.0, math.inf), (1.0, 10.0), (3.0, 1.0)])
def test_final_latents_equal_reference_pipeline_square(sdxl, cfg, sigma):
    kw = {"seed": 3, "steps": 4, "cfg": cfg, "height": 64, "width": 64}
    ref = reference_sdxl_latents(
        sdxl, EulerDiscreteScheduler.from_config(sdxl.scheduler.config), "a red cube",
        seg_scale=3.0, sigma=sigma, **kw,
    )  # fmt: skip
    ours = seg_rt.generate(sdxl, "a red cube", seg_scale=3.0, seg_sigma=sigma, output_type="latent", **kw)
    assert_close(ours, ref, rel=1e-4, what="latents vs reference SEG pipeline")
    plain = seg_rt.generate(sdxl, "a red cube", seg_scale=0.0, output_type="latent", **kw)
    assert (ours - plain).abs().max() > 1e-3  # SEG changed the result


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_without_seg_equals_diffusers_pipeline(family, request):
    """seg_scale=0 is plain CFG sampling: same latents as the diffusers pipeline itself."""
    pipe = request.getfixturevalue(family)
    kw = {"height": 64, "width": 96}
    ours = seg_rt.generate(pipe, "a cat", steps=3, cfg=4.0, seg_scale=0.0, seed=7, output_type="latent", **kw)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(
        "a cat", num_inference_steps=3, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(7), **kw,
    ).images  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="latents vs diffusers pipeline")


def test_initial_noise_equals_diffusers_generator(sdxl):
    sched = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    sched.set_timesteps(10)
    gens = seed_generators([5, 6])
    lat = family_of(sdxl).initial_latents(sdxl, sched, gens, height=64, width=96, dtype=torch.float32)
    for i, s in enumerate([5, 6]):
        expected = torch.randn((1, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(s))
        assert torch.equal(lat[i : i + 1], expected * sched.init_noise_sigma)


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_image_i_of_a_batch_equals_its_seed_alone(sdxl, output_type):
    """Bit for bit: per-sample vector linears run row by row, the VAE decodes one image at a time."""
    kw = {"steps": 3, "height": 64, "width": 96, "seg_sigma": 2.0, "output_type": output_type}
    batch = torch.as_tensor(seg_rt.generate(sdxl, "a dog", seed=10, num_images=3, **kw))
    for i in range(3):
        alone = torch.as_tensor(seg_rt.generate(sdxl, "a dog", seed=10 + i, **kw))
        assert torch.equal(batch[i], alone[0])
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_rowwise_linears_are_installed_and_removed(sdxl):
    from torch import nn

    from seg_rt.denoiser import RowwiseLinear, SEGUNet

    model = SEGUNet(sdxl.unet, sigma=1.0)
    assert any(type(m) is RowwiseLinear for m in sdxl.unet.modules())
    x = torch.randn(5, 32)
    lin = next(m for m in sdxl.unet.modules() if type(m) is RowwiseLinear)
    assert torch.equal(lin(x[:1].repeat(5, 1))[3], lin(x[:1])[0])
    model.remove()
    assert not any(type(m) is RowwiseLinear for m in sdxl.unet.modules())
    assert any(type(m) is nn.Linear for m in sdxl.unet.modules())


def test_sequential_branches_equal_one_batch(sdxl):
    kw = {"steps": 3, "height": 64, "width": 64, "output_type": "latent", "seg_sigma": 1.0}
    a = seg_rt.generate(sdxl, "x", **kw)
    b = seg_rt.generate(sdxl, "x", sequential=True, **kw)
    assert_close(a, b, rel=1e-4, what="sequential vs batched branches")


class Recorder(Denoiser):
    """Wraps a denoiser and records each call's batch size and perturbed-row count."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def configure(self, sigma, layers=None):
        self.inner.configure(sigma, layers)

    def __call__(self, inputs):
        self.calls.append((inputs["sample"].shape[0], int(inputs["seg_mask"].sum())))
        return self.inner(inputs)

    def close(self):  # the wrapped denoiser belongs to the test
        self.closed = True


def test_seg_branch_not_computed_outside_window(sdxl):
    family = family_of(sdxl)
    prepared = family.encode(sdxl, GenerationParams(prompt="a", cfg=5.0), 2, height=64, width=64)
    sched = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    sched.set_timesteps(5)
    latents = family.initial_latents(
        sdxl, sched, seed_generators([0, 1]), height=64, width=64, dtype=torch.float32
    )
    with TorchDenoiser(sdxl.unet, sigma=2.0) as den:
        rec = Recorder(den)
        window = seg_rt.SEGConfig(start=0.2, end=0.6)
        sample(rec, sched, latents, prepared.cond, prepared.uncond, cfg=5.0, seg=window, progress=False)
    assert rec.calls == [(4, 0), (6, 2), (6, 2), (4, 0), (4, 0)]


def test_unconditional_seg_runs_two_rows(sdxl):
    with TorchDenoiser(sdxl.unet, sigma=math.inf) as den:
        rec = Recorder(den)
        img = seg_rt.generate(sdxl, "", cfg=1.0, steps=2, height=64, width=64, engine=rec)
    assert [rows for rows, _ in rec.calls] == [2, 2] and img[0].size == (64, 64)
    assert not rec.closed  # a denoiser passed in stays the caller's to close


def test_controlnet_family_runs_and_uses_the_control_image():
    from PIL import Image

    from seg_rt.tiny import tiny_pipeline

    pipe = tiny_pipeline("sdxl-controlnet")
    kw = {"steps": 2, "height": 64, "width": 96, "output_type": "latent", "seg_sigma": 2.0}
    black = seg_rt.generate(pipe, "a", control_image=Image.new("RGB", (96, 64)), **kw)
    white = seg_rt.generate(pipe, "a", control_image=Image.new("RGB", (96, 64), "white"), **kw)
    assert black.shape == (1, 4, 8, 12) and (black - white).abs().max() > 1e-4
    with pytest.raises(ValueError, match="control image"):
        seg_rt.generate(pipe, "a", **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 60}, "height must be a positive multiple of 8, got 60"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"cfg": 0.5}, "cfg must be a finite number >= 1"),
        ({"output_type": "jpg"}, "output_type must be one of"),
        ({"scheduler": "nope"}, "scheduler must be one of"),
        ({"seg_layers": ["nowhere"]}, "matches no self-attention layer"),
    ],
)
def test_generate_rejects_bad_input(sdxl, kwargs, message):
    with pytest.raises(ValueError, match=message):
        seg_rt.generate(sdxl, "a", **{"steps": 1, **kwargs})


def test_output_types(sdxl):
    kw = {"steps": 1, "height": 64, "width": 96}
    assert seg_rt.generate(sdxl, **kw, output_type="np").shape == (1, 64, 96, 3)
    assert seg_rt.generate(sdxl, **kw, output_type="latent").shape == (1, 4, 8, 12)
    assert seg_rt.generate(sdxl, **kw)[0].size == (96, 64)
