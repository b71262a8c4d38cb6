"""img2img and inpainting (seg_rt.families.tasks) against diffusers' own pipelines on the tiny models.

With SEG off the latents equal diffusers' img2img / inpaint pipelines (scale-relative bounds); with
PAG's identity perturbation they equal diffusers' independent PAG img2img / inpaint pipelines; with
SEG on, the reference loop of tests/reference_seg.py (its own blur) started from diffusers'
``prepare_latents``. Rows of a batch equal their runs alone, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

import seg_rt
from seg_rt.tasks import load_image
from seg_rt.tiny import tiny_dit_pipeline, tiny_pipeline

from .reference_seg import reference_sdxl_latents
from .tolerance import assert_close

H, W = 64, 96
STEPS = 4


def picture(seed: int = 0, h: int = H, w: int = W):
    """A smooth colour picture (an init image)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.RandomState(seed)
    a, b, c = rng.rand(3) * 6
    rgb = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y))], -1)
    return load_image(((rgb * 0.5 + 0.5) * 255).astype(np.uint8))


def square_mask(h: int = H, w: int = W):
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : w // 2] = 255
    return load_image(m, mode="L")


def gen(pipe, prompt="a red fox", **kw):
    args = {"steps": STEPS, "cfg": 4.0, "seed": 3, "output_type": "latent", "negative_prompt": "blurry"}
    return seg_rt.generate(pipe, prompt, **{**args, **kw})


def euler(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def diffusers_call(cls, pipe, **kw):
    """diffusers' ``cls`` over ``pipe``'s components, seed 3, same prompts and steps."""
    other = cls(**{k: v for k, v in pipe.components.items() if k in cls._get_signature_keys(cls)[0]})
    other.set_progress_bar_config(disable=True)
    args = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "num_inference_steps": STEPS,
        "guidance_scale": 4.0,
        "output_type": "latent",
        "generator": torch.Generator("cpu").manual_seed(3),
    }
    return other, other(**{**args, **kw}).images


@pytest.fixture(scope="module")
def sdxl_inpaint():
    return tiny_pipeline("sdxl-inpaint")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_img2img_equals_diffusers(family, request):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    pipe = euler(request.getfixturevalue(family))
    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    ours = gen(pipe, image=picture(), strength=0.6, seg_scale=0.0)
    _, theirs = diffusers_call(cls, pipe, image=picture().pil(), strength=0.6)
    assert_close(ours, theirs, rel=1e-5, what=f"{family} img2img vs diffusers")
    # strength changes the result; the init image steers it
    assert (ours - gen(pipe, image=picture(), strength=0.9, seg_scale=0.0)).abs().max() > 1e-3
    assert (ours - gen(pipe, image=picture(1), strength=0.6, seg_scale=0.0)).abs().max() > 1e-3


@pytest.mark.parametrize(("strength", "blur"), [(0.75, 3)])
def test_sdxl_inpaint_any_model_equals_diffusers(sdxl, strength, blur):
    """A 4-channel SDXL: the known region blended back each step, as StableDiffusionXLInpaintPipeline
    does; mask blur is diffusers' ``mask_processor.blur`` before the pipeline."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = euler(sdxl)
    mask = square_mask()
    ours = gen(pipe, image=picture(), mask=mask, strength=strength, mask_blur=blur, seg_scale=0.0)
    other = StableDiffusionXLInpaintPipeline(**pipe.components)
    mask_pil = other.mask_processor.blur(mask.pil(), blur_factor=blur) if blur else mask.pil()
    _, theirs = diffusers_call(
        StableDiffusionXLInpaintPipeline, pipe, image=picture().pil(), mask_image=mask_pil,
        strength=strength, height=H, width=W,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SDXL inpaint vs diffusers")


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_sdxl_inpainting_checkpoint_equals_diffusers(sdxl_inpaint, strength):
    """A dedicated 9-channel inpainting UNet: [latents, mask, masked-image latents] every step."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = euler(sdxl_inpaint)
    ours = gen(pipe, image=picture(), mask=square_mask(), strength=strength, seg_scale=0.0)
    _, theirs = diffusers_call(
        StableDiffusionXLInpaintPipeline, pipe, image=picture().pil(), mask_image=square_mask().pil(),
        strength=strength, height=H, width=W,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SDXL inpainting checkpoint vs diffusers")
    if strength == 1.0:
        seg = gen(pipe, image=picture(), mask=square_mask(), strength=strength, seg_scale=3.0)
        assert (seg - ours).abs().max() > 1e-3  # SEG on changes it


def test_inpainting_checkpoint_refuses_txt2img(sdxl_inpaint):
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        gen(sdxl_inpaint)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_pag_identity_equals_diffusers_pag_pipelines(sdxl, task):
    """PAG's identity perturbation on the mid block equals diffusers' independent PAG pipelines."""
    from diffusers import StableDiffusionXLPAGImg2ImgPipeline, StableDiffusionXLPAGInpaintPipeline

    from seg_rt.engines import TorchDenoiser

    pipe = euler(sdxl)
    extra = {"mask": square_mask()} if task == "inpaint" else {}
    engine = TorchDenoiser(pipe.unet, perturbation="identity", layers=("mid",))
    try:
        ours = gen(pipe, image=picture(), strength=0.75, seg_scale=2.0, engine=engine, **extra)
    finally:
        engine.close()
    cls = StableDiffusionXLPAGInpaintPipeline if task == "inpaint" else StableDiffusionXLPAGImg2ImgPipeline
    other = cls(**pipe.components, pag_applied_layers=["mid"])
    other.set_progress_bar_config(disable=True)
    kw = {"mask_image": square_mask().pil(), "height": H, "width": W} if task == "inpaint" else {}
    processors = dict(pipe.unet.attn_processors)  # diffusers' PAG pipeline leaves its own installed
    try:
        theirs = other(
            prompt="a red fox", negative_prompt="blurry", image=picture().pil(), strength=0.75,
            num_inference_steps=STEPS, guidance_scale=4.0, pag_scale=2.0, output_type="latent",
            generator=torch.Generator("cpu").manual_seed(3), **kw,
        ).images  # fmt: skip
    finally:  # the session's shared SDXL must leave as it came
        pipe.unet.set_attn_processor(processors)
    assert_close(ours, theirs, rel=1e-5, what=f"PAG {task} vs diffusers' PAG pipeline")


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_seg_on_equals_the_reference_loop(sdxl, task):
    """SEG on (σ = 2): the reference loop with its own blur, started where diffusers' img2img /
    inpaint ``prepare_latents`` starts, blending the known region as the inpaint pipeline does."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    pipe = euler(sdxl)
    strength, H, W = 0.75, 64, 64  # the reference blur takes a square grid
    extra = {"mask": square_mask(H, W)} if task == "inpaint" else {}
    ours = gen(
        pipe,
        image=picture(h=H, w=W),
        strength=strength,
        seg_scale=3.0,
        seg_sigma=2.0,
        negative_prompt=None,
        **extra,
    )  # the reference loop encodes no negative prompt
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cls = StableDiffusionXLInpaintPipeline if task == "inpaint" else StableDiffusionXLImg2ImgPipeline
    other = cls(**{**pipe.components, "scheduler": sched})
    sched.set_timesteps(STEPS)
    timesteps, _ = other.get_timesteps(STEPS, strength, "cpu")
    g = torch.Generator("cpu").manual_seed(3)
    image = other.image_processor.preprocess(picture(h=H, w=W).pil(), height=H, width=W)
    after_step = None
    if task == "img2img":
        latents = other.prepare_latents(image, timesteps[:1], 1, 1, torch.float32, "cpu", g)
    else:
        latents, noise, image_latents = other.prepare_latents(
            1, 4, H, W, torch.float32, "cpu", g, image=image, timestep=timesteps[:1],
            is_strength_max=False, return_noise=True, return_image_latents=True,
        )  # fmt: skip
        mask = other.mask_processor.preprocess(square_mask(H, W).pil(), height=H, width=W)
        mask = torch.nn.functional.interpolate(mask, size=(H // 8, W // 8))

        def after_step(i, x):  # the inpaint pipeline's blend, written out
            known = image_latents
            if i < len(timesteps) - 1:
                known = sched.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            return (1 - mask) * known + mask * x

    ref = reference_sdxl_latents(
        pipe, sched, ["a red fox"], seed=3, steps=STEPS, cfg=4.0, seg_scale=3.0, sigma=2.0,
        height=H, width=W, start=(latents, timesteps), after_step=after_step,
    )  # fmt: skip
    assert_close(ours, ref, rel=1e-4, what=f"SEG {task} vs the reference loop")


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_batch_rows_with_their_own_images_equal_their_runs_alone(sdxl, task):
    from seg_rt.params import GenerationParams
    from seg_rt.pipeline import run_params

    extra = {"mask": square_mask()} if task == "inpaint" else {}
    base = GenerationParams(prompt="a red fox", steps=3, strength=0.7, init_image=picture(), **extra)
    rows = [base.replace(seed=5), base.replace(seed=6, init_image=picture(2), prompt="a cat")]
    batch = run_params(sdxl, rows, output_type="latent")
    alone = run_params(sdxl, rows[1:], output_type="latent")
    assert torch.equal(batch[1:], alone)
    assert rows[0].batch_key() == rows[1].batch_key()
    assert rows[0].batch_key() != rows[0].replace(strength=0.5).batch_key()


# ---- image DiTs ----


@pytest.fixture(scope="module")
def dits():
    return {family: tiny_dit_pipeline(family) for family in ("sd3", "flux")}


def dit_gen(pipe, **kw):
    return gen(pipe, height=48, width=80, **kw)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_img2img_equals_diffusers(dits, family):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    from seg_rt.families.dit import pack

    pipe = dits[family]
    image = picture(h=48, w=80)
    ours = dit_gen(pipe, image=image, strength=0.6, seg_scale=0.0)
    if family == "sd3":
        _, theirs = diffusers_call(
            StableDiffusion3Img2ImgPipeline, pipe, image=image.pil(), strength=0.6, height=48, width=80
        )
    else:
        ours = pack(ours)
        _, theirs = diffusers_call(
            FluxImg2ImgPipeline, pipe, image=image.pil(), strength=0.6, true_cfg_scale=4.0,
            guidance_scale=3.5, height=48, width=80,
        )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what=f"{family} img2img vs diffusers")


def test_flux_inpaint_equals_diffusers(dits):
    from diffusers import FluxInpaintPipeline

    from seg_rt.families.dit import pack

    pipe = dits["flux"]
    image, mask = picture(h=48, w=80), square_mask(48, 80)
    ours = pack(dit_gen(pipe, image=image, mask=mask, strength=0.8, seg_scale=0.0))
    _, theirs = diffusers_call(
        FluxInpaintPipeline, pipe, image=image.pil(), mask_image=mask.pil(), strength=0.8,
        true_cfg_scale=4.0, guidance_scale=3.5, height=48, width=80,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="flux inpaint vs diffusers")


@pytest.fixture(scope="module")
def qwenimage():
    return tiny_dit_pipeline("qwenimage")


def test_qwenimage_img2img_runs_and_refuses_inpainting(qwenimage):
    pipe = qwenimage
    image = picture(h=48, w=80)
    a = dit_gen(pipe, image=image, strength=0.6, cfg=1.0)
    assert a.shape[0] == 1 and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="inpaint is not available for the qwenimage family"):
        dit_gen(pipe, image=image, mask=square_mask(48, 80), cfg=1.0)


# ---- SD1.5 ControlNet ----


def test_sd15_controlnet_equals_diffusers():
    from diffusers import StableDiffusionControlNetPipeline

    pipe = euler(tiny_pipeline("sd15-controlnet"))
    control = picture(4).pil()
    ours = gen(pipe, seg_scale=0.0, height=H, width=W, control_image=control, controlnet_scale=0.8)
    _, theirs = diffusers_call(
        StableDiffusionControlNetPipeline, pipe, image=control, controlnet_conditioning_scale=0.8,
        height=H, width=W,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SD1.5 ControlNet vs diffusers")
    from PIL import Image

    kw = {"seg_scale": 3.0, "height": H, "width": W}
    black = gen(pipe, control_image=Image.new("RGB", (W, H)), **kw)
    white = gen(pipe, control_image=Image.new("RGB", (W, H), "white"), **kw)
    assert (black - white).abs().max() > 1e-4  # the control image steers it (as tests/test_sampler.py)
    assert (gen(pipe, control_image=control, **kw) - ours).abs().max() > 1e-3  # SEG on changes it


def test_sd15_inpaint_any_model_equals_diffusers(sd15):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = euler(sd15)
    ours = gen(pipe, image=picture(), mask=square_mask(), strength=0.75, seg_scale=0.0)
    _, theirs = diffusers_call(
        StableDiffusionInpaintPipeline, pipe, image=picture().pil(), mask_image=square_mask().pil(),
        strength=0.75, height=H, width=W,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SD1.5 inpaint vs diffusers")


def test_sd3_inpaint_keeps_the_known_region(dits):
    """SEG on, on the 4-channel tiny SD3 (StableDiffusion3InpaintPipeline takes only 16- / 33-channel
    transformers: its comparison is test_sd3_inpaint_equals_diffusers): what inpainting guarantees,
    the known region ends as the init image's latents (diffusers' VAE sample with the seed's
    generator, shift and scale), the masked one not."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    pipe = dits["sd3"]
    image, mask = picture(h=48, w=80), square_mask(48, 80)
    ours = dit_gen(pipe, image=image, mask=mask, strength=0.8, seg_scale=3.0)
    pixels = pipe.image_processor.preprocess(image.pil(), height=48, width=80)
    g = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        latents = retrieve_latents(pipe.vae.encode(pixels), generator=g)
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    white = torch.as_tensor(np.asarray(mask.pil()) >= 128, dtype=torch.float32)[None, None]
    known = torch.nn.functional.interpolate(white, size=(6, 10))[0, 0] < 0.5  # nearest, as the pipelines
    assert_close(ours[..., known], latents[..., known], rel=1e-5, what="SD3 known region")
    assert (ours[..., ~known] - latents[..., ~known]).abs().max() > 1e-2


def test_sd15_controlnet_img2img_equals_diffusers():
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    pipe = euler(tiny_pipeline("sd15-controlnet"))
    control = picture(4).pil()
    ours = gen(
        pipe, image=picture(), strength=0.6, seg_scale=0.0, control_image=control, controlnet_scale=0.8
    )
    _, theirs = diffusers_call(
        StableDiffusionControlNetImg2ImgPipeline, pipe, image=picture().pil(), control_image=control,
        strength=0.6, controlnet_conditioning_scale=0.8, height=H, width=W,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SD1.5 ControlNet img2img vs diffusers")


# ---- the remaining diffusers img2img / inpaint oracles (SEG off) ----


def test_qwenimage_img2img_equals_diffusers(qwenimage):
    """CFG off (QwenImagePipeline's CFG rescales per token; seg-rt's is the shared formula, as in
    tests/test_dit.py); seg-rt pads the prompt, masked, where diffusers keeps its own length."""
    from diffusers import QwenImageImg2ImgPipeline

    from seg_rt.families.dit import pack

    pipe = qwenimage
    image = picture(h=48, w=80)
    ours = pack(dit_gen(pipe, image=image, strength=0.6, cfg=1.0, seg_scale=0.0, negative_prompt=None))
    _, theirs = diffusers_call(
        QwenImageImg2ImgPipeline, pipe, image=image.pil(), strength=0.6, true_cfg_scale=1.0,
        negative_prompt=None, height=48, width=80,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="qwenimage img2img vs diffusers")
    assert (ours - pack(dit_gen(pipe, image=image, strength=0.9, cfg=1.0))).abs().max() > 1e-3


def test_sdxl_controlnet_img2img_equals_diffusers():
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    pipe = euler(tiny_pipeline("sdxl-controlnet"))
    control = picture(4).pil()
    ours = gen(
        pipe, image=picture(), strength=0.6, seg_scale=0.0, control_image=control, controlnet_scale=0.8
    )
    _, theirs = diffusers_call(
        StableDiffusionXLControlNetImg2ImgPipeline, pipe, image=picture().pil(), control_image=control,
        strength=0.6, controlnet_conditioning_scale=0.8, height=H, width=W,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SDXL ControlNet img2img vs diffusers")


def sd3_16_channels(sd3):
    """``sd3`` (the tiny SD3) with a 16-channel transformer and VAE, as real SD3 has them (diffusers'
    StableDiffusion3InpaintPipeline takes only 16- or 33-channel transformers)."""
    import diffusers

    from seg_rt.tiny_configs import DITS, VAE

    torch.manual_seed(7)
    config = {**DITS["sd3"][1], "in_channels": 16, "out_channels": 16}
    transformer = diffusers.SD3Transformer2DModel(**config).eval()
    vae = {**VAE, "latent_channels": 16, "shift_factor": 0.0609, "scaling_factor": 1.5305}
    vae = diffusers.AutoencoderKL(**vae, use_quant_conv=False, use_post_quant_conv=False).eval()
    return diffusers.StableDiffusion3Pipeline(**{**sd3.components, "transformer": transformer, "vae": vae})


def test_sd3_inpaint_equals_diffusers(dits):
    from diffusers import StableDiffusion3InpaintPipeline

    pipe = sd3_16_channels(dits["sd3"])
    image, mask = picture(h=48, w=80), square_mask(48, 80)
    ours = dit_gen(pipe, image=image, mask=mask, strength=0.8, seg_scale=0.0)
    _, theirs = diffusers_call(
        StableDiffusion3InpaintPipeline, pipe, image=image.pil(), mask_image=mask.pil(), strength=0.8,
        height=48, width=80,
    )  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="SD3 inpaint vs diffusers")
