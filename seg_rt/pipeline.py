"""Model families and ``seg_rt.generate`` (docs/design.md §5).

Everything around the loop is diffusers': pipeline loading, prompt encoding, SDXL micro-conditioning,
ControlNet image preparation, initial latents (so seed s gives diffusers' noise for
``torch.Generator("cpu").manual_seed(s)``), VAE decoding and post-processing. seg-rt owns only the
SEG-patched denoiser and the sampling loop (``seg_rt.sampler``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import SEGConfig
from .errors import ModelLoadError, first_line
from .families import family_of, pipeline_class
from .params import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    BranchParallel,
    GenerationParams,
    check_scheduler,
    parse_engine_spec,
)
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
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = Path(model)
    is_local = path.is_dir()
    if not is_local and (path.exists() or str(model).startswith((".", "/", "~"))):
        raise ModelLoadError(f"model folder {str(model)!r} does not exist or is not a diffusers folder")
    # diffusers renamed torch_dtype to dtype (0.36); pass whichever this version takes
    dtype_kw = "dtype" if _has_dtype_kwarg() else "torch_dtype"
    if is_local:
        check_model_index(path / "model_index.json")  # before any code from the folder can run
    cls = pipeline_class(path if is_local else None)
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
        raise ModelLoadError(f"cannot load model folder {str(model)!r}: {first_line(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_model_index(index_path: Path) -> None:
    """Refuse (one line) a ``model_index.json`` that names a class outside diffusers / transformers.

    diffusers loads custom code from a model folder when the pipeline ``_class_name`` is a
    ``[module, class]`` pair or unknown, or when a component's library is a module file in the
    folder; seg-rt allows only classes it can look up in the installed libraries (and, like
    diffusers, ``diffusers.pipelines.<name>`` modules), plus its own demo pipelines (``DEMO_PIPELINES``)."""
    import json

    import diffusers

    from seg_rt.demo.folders import DEMO_PIPELINES

    if not index_path.is_file():
        return  # not a pipeline folder: from_pretrained reports it
    try:
        index = json.loads(index_path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{index_path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_path}: must be a JSON object")
    name = index.get("_class_name")
    if name not in DEMO_PIPELINES and not (
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


def make_scheduler(pipe, scheduler: str | Any | None):
    """``None`` → Euler (the paper's sampler) from the model's scheduler config; a name; or an instance."""
    import diffusers

    if scheduler is None:
        scheduler = DEFAULT_SCHEDULER
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
    request: GenerationParams,
    n: int,
    *,
    height: int,
    width: int,
    control_image=None,
    controlnet_scale: float = 1.0,
) -> Prepared:
    """Encode n rows of ``request``'s prompt and negative prompt (and SDXL micro-conditioning at
    ``height`` x ``width``, the ControlNet image, Flux-dev's distilled guidance) with diffusers."""
    from . import dit

    if family in dit.FAMILIES:
        return Prepared(**dit.encode(pipe, family, request, n))
    prompt, negative_prompt = request.prompt, request.negative_prompt
    device, do_cfg = pipe._execution_device, request.cfg > 1.0
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

    from . import dit

    if dit.pipeline_family(pipe) is not None:
        return dit.initial_latents(pipe, generators, height, width, dtype)
    f = pipe.vae_scale_factor
    shape = (len(generators), pipe.unet.config.in_channels, height // f, width // f)
    noise = randn_tensor(shape, generator=list(generators), device=pipe._execution_device, dtype=dtype)
    return noise * scheduler.init_noise_sigma


def decode(pipe, latents: Tensor, output_type: str):
    """Latents → images with the pipeline's VAE and image processor (SDXL fp16 upcast included)."""
    from . import dit

    if dit.pipeline_family(pipe) is not None:
        return dit.decode(pipe, latents, output_type)
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


def check_size(height: int | None, width: int | None, factor: int) -> tuple[int | None, int | None]:
    """Pixel sizes must be positive multiples of the model's downsampling ``factor`` (its VAE's; 1 for a
    pixel-space model such as the demo). ``None`` (the model's default size) is not checked."""
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v <= 0 or v % factor):
            raise ValueError(f"{name} must be a positive multiple of {factor}, got {v}")
    return height, width


def _check_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    side = default_side(pipe)
    return check_size(height or side, width or side, size_factor(pipe))


def size_factor(pipe) -> int:
    """Pixel sizes of a loaded pipeline are multiples of this: its VAE factor (the spatial one for
    video), times the patch / 2x2 packing for image DiTs (``seg_rt.dit.size_factor``)."""
    from . import dit

    if dit.pipeline_family(pipe) is not None:
        return dit.size_factor(pipe)
    for video in ("vae_scale_factor_spatial", "vae_spatial_compression_ratio"):  # LTX-Video's name
        if getattr(pipe, video, None):
            return int(getattr(pipe, video))
    return int(pipe.vae_scale_factor)


def default_side(pipe) -> int:
    """The image side in pixels that a loaded image pipeline samples when none is given."""
    from . import dit

    if dit.pipeline_family(pipe) is not None:
        return dit.default_size(pipe)
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def denoiser_model(pipe):
    """The network SEG patches: an image DiT's ``transformer``, else the ``unet``."""
    from . import dit

    return pipe.transformer if dit.pipeline_family(pipe) is not None else pipe.unet


def select_seg_layers(pipe, selectors: Sequence[str]) -> list[str]:
    """The layers ``selectors`` pick in ``pipe``'s denoiser, by its family's adapter (DiT block
    selectors such as ``joint.1``, or UNet parts); ``ValueError`` listing what exists otherwise."""
    from . import dit

    if dit.pipeline_family(pipe) is None:
        from .layers import select_layers

        return select_layers(pipe.unet, selectors)
    from .dit_attention import adapter_of

    return adapter_of(pipe.transformer).select(pipe.transformer, selectors)


def folder_scale_factor(folder: str | Path) -> int | None:
    """The pixel-size factor of a local diffusers folder, read from its config files without loading
    weights (what ``size_factor(pipe)`` will be once loaded): 1 for the pixel-space demo model, Wan's
    ``scale_factor_spatial``, LTX-Video's ``spatial_compression_ratio``, Qwen-Image's ``2 ** len(temperal_downsample)``, else ``2 **
    (len(block_out_channels) - 1)`` of the VAE as diffusers computes it; times the patch size (SD3)
    or the 2x2 packing (Flux, Qwen-Image) for image DiTs. ``None`` when the folder is not a
    diffusers folder."""
    import json

    from seg_rt.demo.folders import demo_pipeline_class

    folder = Path(folder)
    if demo_pipeline_class(folder) is not None:
        return 1
    vae = folder / "vae" / "config.json"
    if not vae.is_file():
        return None
    try:
        config = json.loads(vae.read_text())
        if "scale_factor_spatial" in config:
            return int(config["scale_factor_spatial"])
        if "spatio_temporal_scaling" in config:  # LTX-Video's VAE, as it computes its ratio
            scaling = config["spatio_temporal_scaling"]
            return int(config.get("spatial_compression_ratio") or config["patch_size"] * 2 ** sum(scaling))
        if "temperal_downsample" in config:
            factor = 2 ** len(config["temperal_downsample"])
        else:
            factor = 2 ** (len(config["block_out_channels"]) - 1)
        return factor * _dit_patch(folder)
    except (ValueError, KeyError, TypeError):
        return None


def _dit_patch(folder: Path) -> int:
    """Pixels of latent per token side for an image-DiT folder (its pipeline class in
    ``model_index.json``): SD3's ``patch_size``, 2 for Flux's and Qwen-Image's packing; else 1."""
    import json

    index = folder / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name in ("FluxPipeline", "QwenImagePipeline"):
        return 2
    if name == "StableDiffusion3Pipeline":
        return int(json.loads((folder / "transformer" / "config.json").read_text())["patch_size"])
    return 1


def generate(
    model,
    prompt: str = GenerationParams.prompt,
    *,
    negative_prompt: str | None = GenerationParams.negative_prompt,
    seed: int | Sequence[int] = GenerationParams.seed,
    num_images: int = 1,
    **settings,
):
    """Generate images with SEG (and CFG when ``cfg > 1``).

    ``model`` is a folder, a hub id or a loaded diffusers pipeline. Image i uses seed ``seed + i``
    (or ``seed[i]`` when a list is given) and equals that seed run alone, bit for bit.
    ``settings`` are ``generate_batch``'s keywords, defined there once: ``steps``, ``cfg``,
    ``seg_scale``, ``seg_sigma``, ``seg_layers``, ``height``, ``width``, ``scheduler``, ``engine``
    (a denoiser of ``seg_rt.engines`` or a spec: ``"torch"``, ``"torch-compile"``, ``"onnx:DIR"``,
    ``"trt:DIR"``, used instead of the pipeline's torch UNet; text encoders and VAE still come from
    ``model``), ``output_type`` (``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``, like diffusers), the
    SEG window and cheap modes, CFG rescale, sequential branches, a ControlNet image, ``parallel``
    (branch-parallel SEG over 2 or 3 ranks), ...
    Defaults are ``GenerationParams``'; ``run_params`` takes the requests themselves.
    """
    if isinstance(seed, Sequence):
        seeds = [_integer(s) for s in seed]
    else:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        first = _integer(seed)
        seeds = [first + i for i in range(num_images)] if isinstance(first, int) else [first]
    if not seeds:
        raise ValueError("seed must be an integer or a non-empty list of integers, got []")
    negatives = [negative_prompt] * len(seeds)
    return generate_batch(model, [prompt] * len(seeds), seeds, negative_prompts=negatives, **settings)


def generate_batch(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompts: Sequence[str | None] | None = None,
    steps: int = GenerationParams.steps,
    cfg: float = GenerationParams.cfg,
    seg_scale: float = SEGConfig.scale,
    seg_sigma: float = SEGConfig.sigma,
    seg_layers: Sequence[str] = SEGConfig.layers,
    height: int | None = GenerationParams.height,
    width: int | None = GenerationParams.width,
    scheduler=None,
    engine=None,
    output_type: str = "pil",
    seg_start: float = SEGConfig.start,
    seg_end: float = SEGConfig.end,
    seg_every: int = SEGConfig.every,
    seg_placement: str = SEGConfig.placement,
    guidance_rescale: float = GenerationParams.guidance_rescale,
    sequential: bool = GenerationParams.sequential,
    distilled_guidance: float = GenerationParams.distilled_guidance,
    **run_options,
):
    """One sampling run for images with their own prompt, negative prompt and seed, sharing every
    other setting (one denoiser call per step for all of them). Image i equals
    ``generate(model, prompts[i], negative_prompt=negative_prompts[i], seed=seeds[i], ...)``.
    ``scheduler``: a name (``seg_rt.params.SCHEDULERS``; ``None`` = Euler) or a diffusers scheduler.
    ``run_options`` go to ``run_params`` as they are: ``control_image``, ``controlnet_scale``,
    ``device``, ``progress``, ``callback`` and ``parallel`` (branch-parallel SEG: ``BranchParallel``,
    or a number of local CPU processes; each step's rows split over that many ranks)."""
    n = len(prompts)
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [None] * n
    if n < 1 or len(seeds) != n or len(negative_prompts) != n:
        raise ValueError(f"need one seed and negative prompt per prompt, got {n} prompts, {len(seeds)} seeds")
    name = scheduler if isinstance(scheduler, str) else GenerationParams.scheduler
    seg = SEGConfig(seg_scale, seg_sigma, seg_layers, seg_start, seg_end, seg_every, seg_placement)
    base = GenerationParams(
        steps=steps,
        cfg=cfg,
        seg=seg,
        guidance_rescale=guidance_rescale,
        height=height,
        width=width,
        scheduler=name,
        sequential=sequential,
        distilled_guidance=distilled_guidance,
    )
    params = [
        base.replace(prompt=p, negative_prompt=neg, seed=_integer(s))
        for p, neg, s in zip(prompts, negative_prompts, seeds, strict=True)
    ]
    return run_params(
        model,
        params,
        engine=engine,
        output_type=output_type,
        scheduler=None if isinstance(scheduler, str) else scheduler,
        **run_options,
    )


def run_params(
    model,
    params: Sequence[GenerationParams],
    *,
    engine=None,
    output_type: str = "pil",
    scheduler=None,
    control_image=None,
    controlnet_scale: float = 1.0,
    device: str | torch.device | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    parallel: BranchParallel | int | None = None,
):
    """One sampling run for image requests that share ``batch_key()`` (all but prompt, negative prompt
    and seed): the entry point of the CLI, job workers and the server. Image i equals ``params[i]``
    run alone. ``model``, ``engine``, ``output_type``, ``device``, ``progress`` and ``callback`` as in
    ``generate_batch``; ``scheduler``, a diffusers scheduler instance, overrides ``params[i].scheduler``
    (Python API only: records name the scheduler by ``params``).

    ``parallel`` (``BranchParallel``; an int n: n local CPU processes): branch-parallel SEG. The run
    goes to a group of ranks (``seg_rt.cluster.branch``) that each load ``model`` (a folder or hub id)
    and ``engine`` (a spec) and split every step's rows; the result equals the one-device run within
    scale-relative 1e-5. ``device`` is then ``parallel.device``; ``callback`` is not available."""
    params = list(params)
    _check_run(params, output_type)
    if isinstance(engine, str):
        parse_engine_spec(engine)  # a bad spec fails before the model loads
    parallel = BranchParallel.of(parallel)
    if parallel is not None:
        return _run_parallel(
            parallel, model, params, engine, output_type, scheduler, device, callback,
            control_image=control_image, controlnet_scale=controlnet_scale, progress=progress,
        )  # fmt: skip
    first = params[0]
    seg, steps, cfg, height, width = first.seg, first.steps, first.cfg, first.height, first.width
    pipe = load_pipeline(model, device) if isinstance(model, (str, Path)) else model
    family = family_of(pipe)
    height, width = _check_size(pipe, height, width)
    check_model_guidance(pipe, first.distilled_guidance)
    parts = [
        encode(pipe, family, params[start], count, height=height, width=width, control_image=control_image,
               controlnet_scale=controlnet_scale)
        for start, count in _runs([(q.prompt, q.negative_prompt) for q in params])
    ]  # fmt: skip
    cond = {k: torch.cat([q.cond[k] for q in parts]) for k in parts[0].cond}
    uncond = (
        {k: torch.cat([q.uncond[k] for q in parts]) for k in parts[0].uncond} if parts[0].uncond else None
    )
    dtype = cond["encoder_hidden_states"].dtype
    # the scheduler's noise (ancestral samplers) continues each row's stream, as in diffusers
    generators = seed_generators([q.seed for q in params])
    sched = _family_scheduler(
        pipe, family, scheduler if scheduler is not None else first.scheduler, steps, height, width
    )
    sched.set_timesteps(steps, device=pipe._execution_device)
    latents = initial_latents(pipe, sched, generators, height, width, dtype)
    with _open_engine(engine, pipe) as engine:
        engine.configure(seg.sigma, seg.layers)
        latents = sample(
            engine,
            sched,
            latents,
            cond,
            uncond,
            steps=steps,
            cfg=cfg,
            seg=seg,
            guidance_rescale=first.guidance_rescale,
            sequential=first.sequential,
            generators=generators,
            progress=progress,
            callback=callback,
        )
    return decode(pipe, latents, output_type)


def _run_parallel(parallel, model, params, engine, output_type, scheduler, device, callback, **options):
    """``run_params`` over the ranks of a branch-parallel group opened for this run."""
    for name, value, why in (
        ("scheduler", scheduler, "give the scheduler by name in the request"),
        ("device", device, f"the ranks use device {parallel.device!r} (BranchParallel.device)"),
        ("callback", callback, "the steps run in the rank processes"),
    ):
        if value is not None:
            raise ValueError(f"branch parallel takes no {name} argument: {why}")
    with branch_group(parallel, model, engine) as group:
        return group.run("images", params, output_type, **options)


def branch_group(parallel: BranchParallel, model, engine: str | None = None):
    """The ranks of branch-parallel SEG (``seg_rt.cluster.branch.open_group``: local processes or
    Ray actors), each loading ``model`` (a folder, hub id or model URL) and ``engine`` (a spec)."""
    from seg_rt.cluster.branch import open_group  # the ranks are processes or Ray actors

    return open_group(parallel, model, engine)


def check_model_guidance(pipe, value: float) -> None:
    """A value other than the default needs a model that embeds it (Flux.1-dev): never ignored."""
    from . import dit

    if value != GenerationParams.distilled_guidance and not dit.takes_distilled_guidance(pipe):
        raise ValueError(
            f"distilled guidance applies only to guidance-distilled models (Flux.1-dev); "
            f"{type(pipe).__name__} has no guidance input, got {value:g}"
        )


def _family_scheduler(pipe, family: str, scheduler, steps: int, height: int, width: int):
    """The scheduler of a run. Image DiTs sample with their own flow-matching Euler scheduler, which
    is what ``euler`` (the default) means for them; other schedulers are refused."""
    from . import dit

    if family not in dit.FAMILIES:
        return make_scheduler(pipe, scheduler)
    if scheduler not in (None, "euler"):
        raise ValueError(
            f"{family} samples with its own flow-matching Euler scheduler ('euler'); got scheduler {scheduler!r}"
        )
    return dit.make_scheduler(pipe, steps, height, width)


def _open_engine(engine, pipe) -> AbstractContextManager:
    """A denoiser given by the caller stays open (the caller closes it); one loaded here from a spec
    (``None``: torch) is closed after the run."""
    from seg_rt.engines import Denoiser, load_engine

    if isinstance(engine, Denoiser):
        return nullcontext(engine)
    if engine is not None and not isinstance(engine, str):
        raise TypeError(
            f"engine must be a seg_rt.engines.Denoiser or an engine spec string, got {type(engine).__name__}"
        )
    return load_engine(engine or "torch", pipe, pipe._execution_device)


def _runs(keys: list) -> list[tuple[int, int]]:
    """Consecutive equal keys as (first index, count): each distinct prompt is encoded once per run."""
    out: list[list[int]] = []
    for i, key in enumerate(keys):
        if out and keys[out[-1][0]] == key:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return [(start, count) for start, count in out]


def _integer(value):
    """numpy integers as ``int``; anything else unchanged, for ``check_seed`` to judge."""
    try:
        return operator.index(value)
    except TypeError:
        return value


def _check_run(params: list[GenerationParams], output_type: str) -> None:
    """What one sampling run needs beyond each request's own validation (``GenerationParams``)."""
    if not params:
        raise ValueError("need at least one request (GenerationParams) per sampling run")
    for p in params:
        if not isinstance(p, GenerationParams):
            raise ValueError(f"requests must be GenerationParams, got {type(p).__name__}")
        if p.video is not None:
            raise ValueError("a video request goes through seg_rt.video.sampling.generate_video")
        if p.batch_key() != params[0].batch_key():
            raise ValueError(
                "requests in one sampling run must share every setting but prompt, negative prompt and "
                "seed (GenerationParams.batch_key)"
            )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
