"""Model families and ``seg_rt.generate`` (DESIGN §3).

Everything around the loop is diffusers': pipeline loading, prompt encoding, SDXL micro-conditioning,
ControlNet image preparation, initial latents (so seed s gives diffusers' noise for
``torch.Generator("cpu").manual_seed(s)``), VAE decoding and post-processing. seg-rt owns only the
SEG-patched denoiser and the sampling loop (``seg_rt.sampler``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import SEGConfig
from .errors import ModelLoadError
from .params import SCHEDULERS, check_scheduler
from .sampler import StepCallback, sample

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
):
    """Load a diffusers pipeline from a local folder or hub id (safetensors only, no custom code).

    ``model_index.json`` is read first and every class it names must be a diffusers /
    transformers class or seg-rt's demo pipeline (:func:`check_model_index`): diffusers would
    otherwise import a ``*.py`` file shipped in the model folder."""
    from diffusers import DiffusionPipeline

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = Path(model)
    is_local = path.is_dir()
    if not is_local and (path.exists() or str(model).startswith((".", "/", "~"))):
        raise ModelLoadError(f"model folder {str(model)!r} does not exist or is not a diffusers folder")
    # diffusers renamed torch_dtype to dtype (0.36); pass whichever this version takes
    dtype_kw = "dtype" if _has_dtype_kwarg() else "torch_dtype"
    cls = DiffusionPipeline
    if is_local:
        from seg_rt.demo.model import SEGDemoPipeline, is_demo_folder

        check_model_index(path / "model_index.json")  # before any code from the folder can run
        if is_demo_folder(path):  # our own pipeline class: diffusers cannot look it up by name
            cls = SEGDemoPipeline
    try:
        if not is_local:
            from huggingface_hub import hf_hub_download

            check_model_index(Path(hf_hub_download(str(model), "model_index.json")))
        pipe = cls.from_pretrained(
            str(model), use_safetensors=True, trust_remote_code=False, **{dtype_kw: dtype}
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # hub/network/format errors all mean the same thing to the user
        if not is_local:
            raise ModelLoadError(
                f"cannot fetch model {str(model)!r} from the hub ({type(exc).__name__}); "
                "pass a local diffusers folder with --model PATH"
            ) from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load model folder {str(model)!r}: {first}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_model_index(index_path: Path) -> None:
    """Refuse (one line) a ``model_index.json`` that names a class outside diffusers / transformers.

    diffusers loads custom code from a model folder when the pipeline ``_class_name`` is a
    ``[module, class]`` pair or unknown, or when a component's library is a module file in the
    folder; seg-rt allows only classes it can look up in the installed libraries (and, like
    diffusers, ``diffusers.pipelines.<name>`` modules), plus its own ``SEGDemoPipeline``."""
    import json

    import diffusers

    from seg_rt.demo.model import SEGDemoPipeline

    if not index_path.is_file():
        return  # not a pipeline folder: from_pretrained reports it
    try:
        index = json.loads(index_path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{index_path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_path}: must be a JSON object")
    name = index.get("_class_name")
    if name != SEGDemoPipeline.__name__ and not (
        isinstance(name, str) and isinstance(getattr(diffusers, name, None), type)
    ):
        raise ModelLoadError(
            f"{index_path}: pipeline class {name!r} is not a diffusers pipeline; seg-rt loads no custom code"
        )
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list | tuple) or len(value) != 2:
            continue
        library, cls_name = value
        if library is None and cls_name is None:
            continue  # an optional component left out
        if _library_class(library, cls_name) is None:
            raise ModelLoadError(
                f"{index_path}: component {key!r} names {library}.{cls_name}, which is not a diffusers "
                "or transformers class; seg-rt loads no custom code"
            )


def _library_class(library: object, name: object) -> type | None:
    """``library.name`` when ``library`` is diffusers, transformers or a diffusers pipeline module
    (diffusers' own rule for built-in components), else None."""
    import importlib

    import diffusers.pipelines

    if not isinstance(library, str) or not isinstance(name, str) or not name.isidentifier():
        return None
    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
    elif library.isidentifier() and hasattr(diffusers.pipelines, library):
        module = getattr(diffusers.pipelines, library)
    else:
        return None
    try:
        obj = getattr(module, name, None)
    except (ImportError, RuntimeError):  # lazy modules raise when an optional backend is missing
        return None
    return obj if isinstance(obj, type) else None


def _has_dtype_kwarg() -> bool:
    from diffusers.utils import deprecation_utils

    return hasattr(deprecation_utils, "_resolve_dtype")


def family_of(pipe) -> str:
    names = [c.__name__ for c in type(pipe).__mro__]
    if "StableDiffusionXLControlNetPipeline" in names:
        return "sdxl-controlnet"
    if "StableDiffusionXLPipeline" in names:
        return "sdxl"
    if "StableDiffusionPipeline" in names:
        return "sd15"
    if "SEGDemoPipeline" in names:
        return "demo"
    raise ValueError(
        f"unsupported pipeline {type(pipe).__name__}; seg-rt generate supports SD1.5, SDXL, SDXL+ControlNet "
        "and the bundled demo model"
    )


def make_scheduler(pipe, scheduler: str | Any | None):
    """``None`` → Euler (the paper's sampler) from the model's scheduler config; a name; or an instance."""
    import diffusers

    if scheduler is None:
        scheduler = "euler"
    if isinstance(scheduler, str):
        return getattr(diffusers, SCHEDULERS[check_scheduler(scheduler)]).from_config(pipe.scheduler.config)
    return scheduler


@dataclass
class Prepared:
    """Per-row model inputs for the conditional and unconditional branches."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None


def encode(
    pipe,
    family: str,
    prompt: str,
    negative_prompt: str | None,
    n: int,
    cfg: float,
    height: int,
    width: int,
    control_image=None,
    controlnet_scale: float = 1.0,
) -> Prepared:
    """Encode prompts (and SDXL micro-conditioning, ControlNet image) with diffusers for n rows."""
    device, do_cfg = pipe._execution_device, cfg > 1.0
    if family in ("sd15", "demo"):  # the demo pipeline's encode_prompt has SD1.5's signature
        pe, ne = pipe.encode_prompt(prompt, device, n, do_cfg, negative_prompt)
        return Prepared({"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if do_cfg else None)

    pe, ne, pooled, npooled = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=n, do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt,
    )  # fmt: skip
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), pe.dtype, proj)
    time_ids = time_ids.to(device).repeat(n, 1)
    cond = {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": time_ids}
    uncond = {"encoder_hidden_states": ne, "text_embeds": npooled, "time_ids": time_ids} if do_cfg else None
    if family == "sdxl-controlnet":
        if control_image is None:
            raise ValueError("an SDXL ControlNet model needs a control image (--control-image)")
        image = pipe.prepare_image(
            control_image,
            width,
            height,
            n,
            1,
            device,
            pipe.controlnet.dtype,
            do_classifier_free_guidance=False,
        )
        extra = {
            "controlnet_cond": image,
            "conditioning_scale": torch.full((n,), float(controlnet_scale), device=device),
        }
        cond.update(extra)
        if uncond is not None:
            uncond.update(extra)
    return Prepared(cond, uncond)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, as a diffusers caller passes ``torch.Generator("cpu").manual_seed(s)``."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_latents(
    pipe, scheduler, generators: Sequence[torch.Generator], height: int, width: int, dtype: torch.dtype
) -> Tensor:
    """diffusers' initial noise: row i drawn from ``generators[i]`` (``randn_tensor``), scaled by the
    scheduler's ``init_noise_sigma``; call after ``scheduler.set_timesteps`` as diffusers does."""
    from diffusers.utils.torch_utils import randn_tensor

    f = pipe.vae_scale_factor
    shape = (len(generators), pipe.unet.config.in_channels, height // f, width // f)
    noise = randn_tensor(shape, generator=list(generators), device=pipe._execution_device, dtype=dtype)
    return noise * scheduler.init_noise_sigma


def decode(pipe, latents: Tensor, output_type: str):
    """Latents → images with the pipeline's VAE and image processor (SDXL fp16 upcast included)."""
    if output_type == "latent":
        return latents
    vae = getattr(pipe, "vae", None)
    if vae is None:  # pixel-space model (the demo): the samples are the images, in [-1, 1]
        return pipe.image_processor.postprocess(latents.float(), output_type=output_type)
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        c = latents.shape[1]
        mean = torch.tensor(mean).view(1, c, 1, 1).to(latents)
        std = torch.tensor(std).view(1, c, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        # one image at a time (diffusers' VAE slicing): less memory, and each image's pixels do
        # not depend on the batch it was sampled in
        image = torch.cat([vae.decode(latent[None], return_dict=False)[0] for latent in latents])
    return pipe.image_processor.postprocess(image, output_type=output_type)


def check_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Pixel sizes must be positive multiples of the VAE's downsampling ``factor``."""
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor}, got {v}")
    return height, width


def _check_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    factor = pipe.vae_scale_factor
    default = pipe.unet.config.sample_size * factor
    return check_size(height or default, width or default, factor)


def generate(
    model,
    prompt: str = "",
    *,
    negative_prompt: str | None = None,
    steps: int = 25,
    cfg: float = 5.0,
    seg_scale: float = 3.0,
    seg_sigma: float = math.inf,
    seg_layers: Sequence[str] = ("mid",),
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] = 0,
    num_images: int = 1,
    scheduler=None,
    engine=None,
    output_type: str = "pil",
    **options,
):
    """Generate images with SEG (and CFG when ``cfg > 1``).

    ``model`` is a folder, a hub id or a loaded diffusers pipeline. Image i uses seed ``seed + i``
    (or ``seed[i]`` when a list is given) and equals that seed run alone, bit for bit.
    ``engine`` is a denoiser (``seg_rt.engines``) or a spec (``"torch"``, ``"torch-compile"``,
    ``"onnx:DIR"``, ``"trt:DIR"``) used instead of the pipeline's torch UNet; text encoders and
    VAE still come from ``model``. Returns PIL images (``"pil"``), a numpy array (``"np"``), a
    tensor (``"pt"``) or the final latents (``"latent"``), like diffusers. ``options``: see
    ``generate_batch`` (SEG window, CFG rescale, sequential branches, ControlNet image, ...).
    """
    seeds = [int(s) for s in seed] if isinstance(seed, Sequence) else [seed + i for i in range(num_images)]
    if not seeds or (not isinstance(seed, Sequence) and num_images < 1):
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return generate_batch(
        model, [prompt] * len(seeds), seeds, negative_prompts=[negative_prompt] * len(seeds), steps=steps,
        cfg=cfg, seg_scale=seg_scale, seg_sigma=seg_sigma, seg_layers=seg_layers, height=height, width=width,
        scheduler=scheduler, engine=engine, output_type=output_type, **options,
    )  # fmt: skip


def generate_batch(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompts: Sequence[str | None] | None = None,
    steps: int = 25,
    cfg: float = 5.0,
    seg_scale: float = 3.0,
    seg_sigma: float = math.inf,
    seg_layers: Sequence[str] = ("mid",),
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
    engine=None,
    output_type: str = "pil",
    seg_start: float = 0.0,
    seg_end: float = 1.0,
    seg_every: int = 1,
    seg_placement: str = "batched",
    guidance_rescale: float = 0.0,
    sequential: bool = False,
    control_image=None,
    controlnet_scale: float = 1.0,
    device: str | torch.device | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
):
    """One sampling run for images with their own prompt, negative prompt and seed, sharing every
    other setting (one denoiser call per step for all of them). Image i equals
    ``generate(model, prompts[i], negative_prompt=negative_prompts[i], seed=seeds[i], ...)``."""
    n = len(prompts)
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [None] * n
    if n < 1 or len(seeds) != n or len(negative_prompts) != n:
        raise ValueError(f"need one seed and negative prompt per prompt, got {n} prompts, {len(seeds)} seeds")
    seg = SEGConfig(
        scale=seg_scale,
        sigma=seg_sigma,
        layers=seg_layers,
        start=seg_start,
        end=seg_end,
        every=seg_every,
        placement=seg_placement,
    )
    seg.check_cfg(cfg)  # before any model loads
    _check_args(steps, cfg, n, output_type, guidance_rescale)
    pipe = load_pipeline(model, device) if isinstance(model, (str, Path)) else model
    family = family_of(pipe)
    height, width = _check_size(pipe, height, width)
    parts = [
        encode(pipe, family, p, neg, count, cfg, height, width, control_image, controlnet_scale)
        for (p, neg), count in _runs(list(zip(prompts, negative_prompts, strict=True)))
    ]
    cond = {k: torch.cat([q.cond[k] for q in parts]) for k in parts[0].cond}
    uncond = (
        {k: torch.cat([q.uncond[k] for q in parts]) for k in parts[0].uncond} if parts[0].uncond else None
    )
    dtype = cond["encoder_hidden_states"].dtype
    # the scheduler's noise (ancestral samplers) continues each row's stream, as in diffusers
    generators = seed_generators(seeds)
    sched = make_scheduler(pipe, scheduler)
    sched.set_timesteps(steps, device=pipe._execution_device)
    latents = initial_latents(pipe, sched, generators, height, width, dtype)
    own_engine = engine is None or isinstance(engine, str)
    if own_engine:
        from seg_rt.engines import load_engine

        engine = load_engine(engine or "torch", pipe, pipe._execution_device)
    if hasattr(engine, "configure"):
        engine.configure(seg.sigma, seg.layers)
    try:
        latents = sample(
            engine, sched, latents, cond, uncond, steps=steps, cfg=cfg, seg=seg,
            guidance_rescale=guidance_rescale, sequential=sequential, generators=generators,
            progress=progress, callback=callback,
        )  # fmt: skip
    finally:
        if own_engine:
            engine.close()
    return decode(pipe, latents, output_type)


def _runs(keys: list) -> list[tuple]:
    """Consecutive equal keys as (key, count): each distinct prompt is encoded once per run."""
    out: list[list] = []
    for key in keys:
        if out and out[-1][0] == key:
            out[-1][1] += 1
        else:
            out.append([key, 1])
    return [tuple(r) for r in out]


def _check_args(steps: int, cfg: float, num_images: int, output_type: str, rescale: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if math.isnan(cfg) or cfg < 1.0:
        raise ValueError(f"cfg must be >= 1 (1 disables classifier-free guidance), got {cfg:g}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale:g}")
