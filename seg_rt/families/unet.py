"""The UNet family: SD1.5, SDXL, SDXL + ControlNet and the bundled demo model (pixel space).

Everything is diffusers': ``encode_prompt``, SDXL micro-conditioning (``_get_add_time_ids``),
ControlNet image preparation (``prepare_image``), the initial noise (``randn_tensor`` scaled by
``init_noise_sigma``), the VAE and its image processor. The four differ only in prompt encoding
and in the VAE (none for the demo model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from seg_rt.params import GenerationParams

from . import latent_rgb
from .base import (
    Classes,
    Family,
    Prepared,
    decode_per_image,
    named_scheduler,
    perturbed_mask,
    read_json,
    vae_factor,
)


def sd15_prompts(pipe, request: GenerationParams, n: int) -> Prepared:
    """n rows of the request's prompts through ``encode_prompt(prompt, device, n, do_cfg, negative)``
    (SD1.5's signature: SD1.5, the demo model, AnimateDiff)."""
    do_cfg = request.cfg > 1.0
    pe, ne = pipe.encode_prompt(request.prompt, pipe._execution_device, n, do_cfg, request.negative_prompt)
    return Prepared({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if do_cfg else None)


class UNetFamily(Family):
    """SD1.5's conditioning (``encode_prompt(prompt, device, n, do_cfg, negative)``); the others
    below override ``encode``."""

    cache_modes = ("deepcache",)  # seg_rt.step_cache.DeepCache

    name = "sd15"
    preview_table = latent_rgb.SD15
    classes = Classes("StableDiffusionPipeline")
    exportable = True
    tasks = ("txt2img", "img2img", "inpaint")
    # diffusers' img2img / inpaint pipelines of the family hold the same components (a dedicated
    # inpainting checkpoint's folder names its inpaint pipeline): they belong to the family too
    task_pipelines: tuple[str, ...] = ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")

    def pipeline_classes(self) -> tuple[type, ...]:
        from .base import _diffusers_classes

        return _diffusers_classes((self.classes.pipeline, *self.task_pipelines))

    def net(self, pipe):
        return pipe.unet

    def size_factor(self, pipe) -> int:
        return int(pipe.vae_scale_factor)

    def default_side(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor

    def folder_factor(self, folder: Path) -> int:
        return vae_factor(read_json(folder / "vae" / "config.json"))

    def select_layers(self, pipe, selectors: Sequence[str]) -> list[str]:
        from seg_rt.layers import select_layers

        return select_layers(pipe.unet, selectors)

    def encode(self, pipe, request: GenerationParams, n: int, **options) -> Prepared:
        return sd15_prompts(pipe, request, n)

    def schedule(self, pipe, scheduler, steps: int, **shape: int):
        sched = named_scheduler(pipe, scheduler)
        sched.set_timesteps(steps, device=pipe._execution_device)
        return sched

    def initial_latents(self, pipe, scheduler, generators, *, height: int, width: int, dtype) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        f = pipe.vae_scale_factor
        shape = (len(generators), pipe.unet.config.in_channels, height // f, width // f)
        noise = randn_tensor(shape, generator=list(generators), device=pipe._execution_device, dtype=dtype)
        return noise * scheduler.init_noise_sigma

    def inpaint_channels(self, pipe) -> int | None:
        extra = pipe.unet.config.in_channels - pipe.unet.config.out_channels
        return extra if extra > 0 else None

    def encode_image(self, pipe, pixels: Tensor, generator) -> Tensor:
        """``StableDiffusionXLImg2ImgPipeline.prepare_latents`` for one row (SD1.5's is the same without
        latents mean / std): the VAE (upcast as its config says) samples with ``generator``, then
        ``scaling_factor`` (and the config's latents mean / std)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae, dtype = pipe.vae, pixels.dtype
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            with torch.no_grad():
                latents = retrieve_latents(vae.encode(pixels.to(vae.dtype)), generator=generator)
        finally:
            vae.to(dtype if upcast else vae.dtype)
        latents = latents.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean = torch.tensor(mean).view(1, c, 1, 1).to(latents)
            std = torch.tensor(std).view(1, c, 1, 1).to(latents)
            return (latents - mean) * vae.config.scaling_factor / std
        return vae.config.scaling_factor * latents

    def noise_shape(self, pipe, image_latents, height: int, width: int) -> tuple[int, ...]:
        if image_latents is not None:
            return tuple(image_latents.shape)
        f = pipe.vae_scale_factor
        return (1, pipe.vae.config.latent_channels, height // f, width // f)

    def denoiser(self, pipe, *, compile: bool = False):
        from seg_rt.engines import TorchDenoiser

        return TorchDenoiser(pipe.unet, controlnet=getattr(pipe, "controlnet", None), compile=compile)

    def decode(self, pipe, latents: Tensor, output_type: str):
        """The VAE (upcast from float16 for the decode when its config says so, as diffusers does,
        and restored after), one image at a time, then the pipeline's image processor."""
        if output_type == "latent":
            return latents
        vae = pipe.vae
        dtype = vae.dtype
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        try:
            latents = latents.to(vae.dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                c = latents.shape[1]
                mean = torch.tensor(mean).view(1, c, 1, 1).to(latents)
                std = torch.tensor(std).view(1, c, 1, 1).to(latents)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = decode_per_image(vae, latents)
        finally:
            vae.to(dtype)
        return pipe.image_processor.postprocess(image, output_type=output_type)

    def export_model(self, pipe, *, sigma: float, layers: Sequence[str]):
        from seg_rt.denoiser import SEGUNet

        return SEGUNet(pipe.unet, sigma=sigma, layers=layers, controlnet=getattr(pipe, "controlnet", None))

    def export_inputs(
        self, pipe, model, rows: int, batch: int, height: int, width: int, dtype, seed: int = 0
    ):
        g = torch.Generator().manual_seed(seed)
        f = pipe.vae_scale_factor
        unet = pipe.unet
        seq = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77)
        seq = seq if isinstance(seq, int) and 0 < seq <= 4096 else 77
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
        inputs = {
            "sample": rnd(rows, unet.config.in_channels, height // f, width // f),
            "timestep": torch.full((rows,), 500.0),
            "encoder_hidden_states": rnd(rows, seq, unet.config.cross_attention_dim),
        }
        if "text_embeds" in model.input_names:
            time_dim = unet.config.addition_time_embed_dim
            # float32 even in fp16 graphs: diffusers concatenates text_embeds with its always-float32
            # sinusoidal time projection, which eager torch type-promotes but the exported Concat cannot
            inputs["text_embeds"] = torch.randn(
                rows, unet.config.projection_class_embeddings_input_dim - 6 * time_dim, generator=g
            )
            inputs["time_ids"] = torch.tensor(
                [[height, width, 0, 0, height, width]] * rows, dtype=torch.float32
            )
        if "controlnet_cond" in model.input_names:
            inputs["controlnet_cond"] = torch.rand(rows, 3, height, width, generator=g).to(dtype)
            inputs["conditioning_scale"] = torch.ones(rows, dtype=dtype)
        inputs["seg_mask"] = perturbed_mask(rows, batch)
        return inputs


class DemoFamily(UNetFamily):
    """The bundled pixel-space demo model: SD1.5's ``encode_prompt`` signature, no VAE (the samples
    are the images, in [-1, 1])."""

    name = "demo"
    preview_table = latent_rgb.PIXELS  # pixel space: the samples are the image

    def pipeline_classes(self) -> tuple[type, ...]:
        from seg_rt.demo.model import SEGDemoPipeline

        return (SEGDemoPipeline,)

    task_pipelines = ()

    def folder_factor(self, folder: Path) -> int:
        return 1

    def inpaint_channels(self, pipe) -> int | None:
        return None

    def encode_image(self, pipe, pixels: Tensor, generator) -> Tensor:
        """Pixel space: the image's latents are its pixels in [-1, 1] (no VAE, nothing drawn)."""
        return pixels

    def decode(self, pipe, latents: Tensor, output_type: str):
        if output_type == "latent":
            return latents
        return pipe.image_processor.postprocess(latents.float(), output_type=output_type)


class SDXLFamily(UNetFamily):
    """SDXL: two text encoders, pooled embeddings and micro-conditioning time ids."""

    name = "sdxl"
    classes = Classes("StableDiffusionXLPipeline")
    preview_table = latent_rgb.SDXL

    task_pipelines = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

    def check_request(self, pipe, request: GenerationParams) -> None:
        if getattr(pipe.config, "requires_aesthetics_score", False):
            raise ValueError(
                "SDXL models conditioned on an aesthetic score (the refiner) are not supported; give a base "
                "or inpainting SDXL model"
            )
        super().check_request(pipe, request)

    def encode(
        self, pipe, request: GenerationParams, n: int, *, height: int, width: int, **options
    ) -> Prepared:
        device, do_cfg = pipe._execution_device, request.cfg > 1.0
        pe, ne, pooled, npooled = pipe.encode_prompt(
            prompt=request.prompt,
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=request.negative_prompt,
        )
        encoder_2 = pipe.text_encoder_2
        proj = encoder_2.config.projection_dim if encoder_2 is not None else pooled.shape[-1]
        # StableDiffusionXLPipeline's micro-conditioning (its img2img / inpaint pipelines give the same
        # ids without an aesthetic score, and spell the method with more arguments)
        from diffusers import StableDiffusionXLPipeline

        time_ids = StableDiffusionXLPipeline._get_add_time_ids(
            pipe, (height, width), (0, 0), (height, width), pe.dtype, proj
        )
        time_ids = time_ids.to(device).repeat(n, 1)
        cond = {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": time_ids}
        uncond = (
            {"encoder_hidden_states": ne, "text_embeds": npooled, "time_ids": time_ids} if do_cfg else None
        )
        return Prepared(cond, uncond)


def add_control(
    pipe,
    prepared: Prepared,
    n: int,
    height: int,
    width: int,
    control_image,
    controlnet_scale: float,
    what: str,
) -> Prepared:
    """The control image (``prepare_image`` of diffusers' ControlNet pipelines) and its per-row scale,
    in both branches."""
    if control_image is None:
        raise ValueError(f"an {what} ControlNet model needs a control image (--control-image)")
    device = pipe._execution_device
    image = pipe.prepare_image(
        control_image, width, height, n, 1, device, pipe.controlnet.dtype, do_classifier_free_guidance=False
    )
    extra = {
        "controlnet_cond": image,
        "conditioning_scale": torch.full((n,), float(controlnet_scale), device=device),
    }
    for inputs in (prepared.cond, prepared.uncond):
        if inputs is not None:
            inputs.update(extra)
    return prepared


class SDXLControlNetFamily(SDXLFamily):
    """SDXL with a ControlNet: SDXL's conditioning plus the control image (both branches)."""

    cache_modes = ()  # DeepCache skips the down blocks the ControlNet residuals are added to
    name = "sdxl-controlnet"
    classes = Classes("StableDiffusionXLControlNetPipeline")
    tasks = ("txt2img", "img2img")
    task_pipelines = ()

    def encode(
        self, pipe, request: GenerationParams, n: int, *, height: int, width: int, control_image=None,
        controlnet_scale: float = 1.0, **options,
    ) -> Prepared:  # fmt: skip
        prepared = super().encode(pipe, request, n, height=height, width=width)
        return add_control(pipe, prepared, n, height, width, control_image, controlnet_scale, "SDXL")


class SD15ControlNetFamily(UNetFamily):
    """SD1.5 with a ControlNet (``StableDiffusionControlNetPipeline``): SD1.5's conditioning plus the
    control image (both branches)."""

    cache_modes = ()  # DeepCache skips the down blocks the ControlNet residuals are added to
    name = "sd15-controlnet"
    classes = Classes("StableDiffusionControlNetPipeline")
    tasks = ("txt2img", "img2img")
    task_pipelines = ()

    def encode(
        self, pipe, request: GenerationParams, n: int, *, height: int, width: int, control_image=None,
        controlnet_scale: float = 1.0, **options,
    ) -> Prepared:  # fmt: skip
        prepared = sd15_prompts(pipe, request, n)
        return add_control(pipe, prepared, n, height, width, control_image, controlnet_scale, "SD1.5")
