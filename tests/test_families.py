"""The family contract is all a model needs: a family defined only in this file, registered with
one line, runs end to end through ``seg_rt.generate`` with SEG on (and provably on), and equals the
same networks run through the built-in demo family."""

from __future__ import annotations

import pytest
import torch

import seg_rt
from seg_rt.attention import SEGAttention
from seg_rt.demo.model import build
from seg_rt.engines import TorchDenoiser
from seg_rt.families import REGISTRY, Family, Prepared, family_of, register


class PlainPipeline:
    """Not a diffusers pipeline: the demo model's networks in a class seg-rt has never seen."""

    def __init__(self, demo) -> None:
        self.unet, self.text_encoder, self.tokenizer = demo.unet, demo.text_encoder, demo.tokenizer
        self.scheduler, self.image_processor = demo.scheduler, demo.image_processor
        self._execution_device = torch.device("cpu")


class PlainFamily(Family):
    """Written from the contract (``seg_rt.families.base.Family``) alone."""

    name = "plain-test"

    def __init__(self) -> None:
        self.denoisers: list[TorchDenoiser] = []

    def pipeline_classes(self):
        return (PlainPipeline,)

    def net(self, pipe):
        return pipe.unet

    def size_factor(self, pipe):
        return 1

    def default_side(self, pipe):
        return int(pipe.unet.config.sample_size)

    def select_layers(self, pipe, selectors):
        from seg_rt.layers import select_layers

        return select_layers(pipe.unet, selectors)

    def _embed(self, pipe, prompt: str, n: int):
        ids = pipe.tokenizer(
            [prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return pipe.text_encoder(ids)[0].repeat_interleave(n, 0)

    def encode(self, pipe, request, n, **options):
        cond = {"encoder_hidden_states": self._embed(pipe, request.prompt, n)}
        uncond = {"encoder_hidden_states": self._embed(pipe, request.negative_prompt or "", n)}
        return Prepared(cond, uncond if request.cfg > 1 else None)

    def schedule(self, pipe, scheduler, steps, **shape):
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        return sched

    def initial_latents(self, pipe, scheduler, generators, *, height, width, dtype):
        c = pipe.unet.config.in_channels
        noise = torch.cat([torch.randn(1, c, height, width, generator=g, dtype=dtype) for g in generators])
        return noise * scheduler.init_noise_sigma

    def denoiser(self, pipe, *, compile=False):
        self.denoisers.append(TorchDenoiser(pipe.unet))
        return self.denoisers[-1]

    def decode(self, pipe, latents, output_type):
        return latents if output_type == "latent" else pipe.image_processor.postprocess(latents, output_type)


@pytest.fixture
def plain_family():
    family = register(PlainFamily())  # the one registry line
    yield family
    REGISTRY.unregister(family)


def test_a_family_defined_in_a_test_runs_end_to_end_with_seg_on(plain_family, monkeypatch):
    perturbed = []  # queries perturbed in each forward, as the after-forward check sees them
    check = SEGAttention.check
    monkeypatch.setattr(SEGAttention, "check", lambda seg: (perturbed.append(seg.perturbed), check(seg)))
    demo = build(seed=0)
    pipe = PlainPipeline(demo)
    assert family_of(pipe) is plain_family
    kw = {"steps": 3, "cfg": 3.0, "seg_sigma": 2.0, "seed": 7, "output_type": "latent"}
    with_seg = seg_rt.generate(pipe, "a red circle", **kw)
    assert len(perturbed) == 3 and min(perturbed) > 0  # every step perturbed the mid-block queries
    assert isinstance(plain_family.denoisers[-1], TorchDenoiser)  # the family's own denoiser ran
    without = seg_rt.generate(pipe, "a red circle", **{**kw, "seg_scale": 0.0})
    assert (with_seg - without).abs().max() > 1e-3  # SEG changed the result
    # the same networks through the built-in demo family: the same numbers (same math, other family)
    assert torch.equal(with_seg, seg_rt.generate(demo, "a red circle", **kw))
    images = seg_rt.generate(pipe, "a red circle", **{**kw, "output_type": "pil"})
    assert images[0].size == (pipe.unet.config.sample_size,) * 2


def test_registering_a_family_name_twice_is_an_error(plain_family):
    with pytest.raises(ValueError, match="a model family named 'plain-test' is registered already"):
        register(PlainFamily())


def test_every_built_in_family_is_found_by_class():
    from diffusers import StableDiffusion3Pipeline, WanPipeline

    assert REGISTRY.for_class(StableDiffusion3Pipeline).name == "sd3"
    assert REGISTRY.for_class(WanPipeline).name == "wan"  # video families register on first need
    assert {"demo", "sd15", "sdxl", "sdxl-controlnet", "sd3", "flux", "qwenimage"} <= set(
        REGISTRY.names("image")
    )
    assert set(REGISTRY.names("video")) == {"animatediff", "cogvideox", "wan", "ltx", "svd"}
    import diffusers

    for cls, family in {
        "CogVideoXImageToVideoPipeline": "cogvideox",
        "WanImageToVideoPipeline": "wan",
        "LTXImageToVideoPipeline": "ltx",
        "StableVideoDiffusionPipeline": "svd",
    }.items():  # image-to-video pipelines belong to their family
        assert REGISTRY.for_class(getattr(diffusers, cls)).name == family


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '{"_class_name": 3}'])
def test_a_folder_whose_model_index_is_not_an_object_has_no_family(tmp_path, text):
    """Read before loading (job specs check sizes this way): no family, no traceback; loading the
    folder then gives the one-line model-index error."""
    from seg_rt.errors import ModelLoadError
    from seg_rt.pipeline import folder_scale_factor, load_pipeline

    (tmp_path / "model_index.json").write_text(text)
    assert REGISTRY.for_folder(tmp_path) is None and folder_scale_factor(tmp_path) is None
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_pipeline(tmp_path, "cpu")
