"""Loading a pipeline and ``seg_rt.generate``: the one sampling recipe over a model family (docs/design.md §4a, §5).

Everything around the loop is diffusers': pipeline loading, prompt encoding, SDXL micro-conditioning,
ControlNet image preparation, initial latents (so seed s gives diffusers' noise for
``torch.Generator("cpu").manual_seed(s)``), VAE decoding and post-processing. seg-rt owns only the
SEG-patched denoiser and the sampling loop (``seg_rt.sampler``).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from . import lora, singlefile
from .errors import ModelLoadError, first_line
from .execution import BranchParallel, parse_engine_spec
from .families import REGISTRY, family_of
from .guidance import Guidance
from .memory import check_memory
from .params import GenerationParams, request_from_fields
from .safe_load import loads_json
from .sampler import StepCallback, sample

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_config: str | Path | None = None,
):
    """Load a diffusers pipeline from a local folder, hub id or single-file checkpoint (safetensors
    only, no custom code). A ``.safetensors`` file loads offline through ``seg_rt.singlefile``
    (``model_config``: the diffusers folder whose component configs it takes instead of the shipped ones).

    ``model_index.json`` is read first and every class it names must be a diffusers /
    transformers class or seg-rt's demo pipeline (:func:`check_model_index`): diffusers would
    otherwise import a ``*.py`` file shipped in the model folder."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = Path(model)
    # diffusers renamed torch_dtype to dtype (0.36); pass whichever this version takes
    dtype_kw = "dtype" if _has_dtype_kwarg() else "torch_dtype"
    if singlefile.is_checkpoint_file(model):
        pipe = singlefile.load(model, dtype, dtype_kw, model_config, check_model_index)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    singlefile.check_config_applies(model, model_config)
    is_local = path.is_dir()
    if not is_local and (path.exists() or str(model).startswith((".", "/", "~"))):
        raise ModelLoadError(
            f"model {str(model)!r} does not exist or is not a diffusers folder or a .safetensors checkpoint"
        )
    if is_local:
        check_model_index(path / "model_index.json")  # before any code from the folder can run
    cls = _pipeline_class(path if is_local else None)
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

    import diffusers

    from seg_rt.demo.folders import DEMO_PIPELINES

    if not index_path.is_file():
        return  # not a pipeline folder: from_pretrained reports it
    try:
        index = loads_json(index_path.read_text(), str(index_path))
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


def _pipeline_class(folder: Path | None):
    """The class that loads a model folder: the demo's own class for a demo (image or video) folder
    (diffusers cannot look it up by name), else diffusers' ``DiffusionPipeline`` (which reads
    ``model_index.json``)."""
    from diffusers import DiffusionPipeline

    from seg_rt.demo.folders import demo_pipeline_class

    return (demo_pipeline_class(folder) if folder is not None else None) or DiffusionPipeline


def _has_dtype_kwarg() -> bool:
    from diffusers.utils import deprecation_utils

    return hasattr(deprecation_utils, "_resolve_dtype")


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, as a diffusers caller passes ``torch.Generator("cpu").manual_seed(s)``."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def size_factor(pipe) -> int:
    """Pixel sizes of a loaded pipeline are multiples of this (its family's rule: the VAE factor,
    times the patch or 2x2 packing for image DiTs)."""
    return family_of(pipe).size_factor(pipe)


def default_side(pipe) -> int:
    """The side in pixels that a loaded pipeline samples when none is given."""
    return family_of(pipe).default_side(pipe)


def select_seg_layers(pipe, selectors: Sequence[str]) -> list[str]:
    """The layers ``selectors`` pick in ``pipe``'s denoiser, by its family (DiT block selectors such
    as ``joint.1``, or UNet parts); ``ValueError`` listing what exists otherwise."""
    return family_of(pipe).select_layers(pipe, selectors)


def check_model_guidance(pipe, value: float) -> None:
    """A distilled guidance other than the default needs a model that embeds it (Flux.1-dev): never ignored."""
    family_of(pipe).check_request(pipe, GenerationParams(distilled_guidance=value))


def folder_scale_factor(folder: str | Path) -> int | None:
    """The pixel-size factor of a local diffusers folder, read from its config files without loading
    weights (what ``size_factor(pipe)`` will be once loaded); ``None`` when the folder is not a
    diffusers folder of a supported family."""
    folder = Path(folder)
    family = REGISTRY.for_folder(folder)
    if family is None:
        return None
    try:
        return int(family.folder_factor(folder))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    ``settings`` are ``generate_batch``'s keywords, defined there once: the request fields by wire
    name (``steps``, ``cfg``, ``seg_scale``, ``seg_sigma``, ``seg_layers``, ``height``, ``width``,
    ``scheduler``, ...; ``num_inference_steps`` / ``guidance_scale`` as diffusers spells them), ``engine``
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


RUN_OPTIONS = ("control_image", "controlnet_scale", "device", "progress", "callback", "parallel")
"""``generate`` / ``generate_batch`` keywords that are not request fields: they go to ``run_params``."""


def generate_batch(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompts: Sequence[str | None] | None = None,
    scheduler=None,
    engine=None,
    output_type: str = "pil",
    **settings,
):
    """One sampling run for images with their own prompt, negative prompt and seed, sharing every
    other setting (one denoiser call per step for all of them). Image i equals
    ``generate(model, prompts[i], negative_prompt=negative_prompts[i], seed=seeds[i], ...)``.

    ``settings``: the request fields by their wire names (``seg_rt.params.FIELDS``: ``steps``,
    ``cfg``, ``seg_scale``, ``seg_sigma``, ``seg_layers``, ``seg_start`` / ``seg_end``, ``seg_every``,
    ``seg_placement``, ``guidance_rescale``, ``height``, ``width``, ``sequential``,
    ``distilled_guidance``; diffusers' ``num_inference_steps`` and ``guidance_scale`` are accepted
    for ``steps`` and ``cfg``), defaults ``GenerationParams``'; and the run options ``RUN_OPTIONS``,
    passed to ``run_params`` as they are: ``control_image``, ``controlnet_scale``, ``device``,
    ``progress``, ``callback`` and ``parallel`` (branch-parallel SEG: ``BranchParallel``, or a
    number of local CPU processes). ``scheduler``: a name (``seg_rt.params.SCHEDULERS``; ``None`` =
    Euler) or a diffusers scheduler instance."""
    n = len(prompts)
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [None] * n
    if n < 1 or len(seeds) != n or len(negative_prompts) != n:
        raise ValueError(f"need one seed and negative prompt per prompt, got {n} prompts, {len(seeds)} seeds")
    options = {k: settings.pop(k) for k in RUN_OPTIONS if k in settings}
    for per_row in ("prompt", "negative_prompt", "seed"):
        if per_row in settings:
            raise ValueError(f"{per_row} is per image here: give {per_row}s (one per image)")
    if isinstance(scheduler, str):
        settings["scheduler"] = scheduler
    base = request_from_fields(settings, "image", what="generate")
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
        **options,
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
    goes to a group of ranks (``branch_group``) that each load ``model`` (a folder or hub id)
    and ``engine`` (a spec) and split every step's rows; the result equals the one-device run within
    scale-relative 1e-5. ``device`` is then ``parallel.device``; ``callback`` is not available."""
    params = list(params)
    _check_run(params, output_type)
    if isinstance(engine, str):
        parse_engine_spec(engine)  # a bad spec fails before the model loads
    parallel = BranchParallel.of(parallel)
    _check_cache_engine(params[0].cache, engine, parallel)
    if parallel is not None:
        return _run_parallel(
            parallel, model, params, engine, output_type, scheduler, device, callback,
            control_image=control_image, controlnet_scale=controlnet_scale, progress=progress,
        )  # fmt: skip
    first = params[0]
    pipe = load_pipeline(model, device) if isinstance(model, (str, Path)) else model
    family = family_of(pipe, "image")
    family.check_request(pipe, first)
    family.check_cache(first)
    lora.check_engine(_eager_torch(engine), first.loras, engine)
    lora.activate(pipe, first.loras)  # exactly this request's LoRAs (none: every loaded one off)
    height, width = _size(family, pipe, first)
    check_memory(pipe, family, len(params), height, width)  # before encoding or sampling (one line)
    parts = [
        family.encode(
            pipe,
            params[start],
            count,
            height=height,
            width=width,
            control_image=control_image,
            controlnet_scale=controlnet_scale,
        )
        for start, count in _runs([(q.prompt, q.negative_prompt) for q in params])
    ]
    cond = {k: torch.cat([q.cond[k] for q in parts]) for k in parts[0].cond}
    uncond = (
        {k: torch.cat([q.uncond[k] for q in parts]) for k in parts[0].uncond} if parts[0].uncond else None
    )
    # the scheduler's noise (ancestral samplers) continues each row's stream, as in diffusers
    generators = seed_generators([q.seed for q in params])
    sched = family.schedule(
        pipe, scheduler if scheduler is not None else first.scheduler, first.steps, height=height, width=width
    )
    dtype = cond["encoder_hidden_states"].dtype
    # txt2img: the initial noise; img2img / inpainting: the init image's latents, a truncated
    # schedule, the mask inputs or the known-region blend (seg_rt.families.tasks)
    start = family.start(pipe, sched, generators, params, height=height, width=width, dtype=dtype)
    for inputs in (cond, uncond):
        if inputs is not None:
            inputs.update(start.inputs)
    guidance = Guidance.parse(first.guidance)
    with _open_engine(engine, pipe) as engine:
        engine.configure(first.seg.sigma, first.seg.layers)
        # the guidance list's perturbed term (PAG, TPG, SLG) perturbs the seg_mask rows its way for
        # this run; a long-lived engine gets its own kind back after it
        kind = guidance.perturbation() if guidance.perturbed is not None else None
        previous = engine.set_perturbation(kind) if kind is not None else None
        try:
            latents = sample(
                engine,
                sched,
                start.latents,
                cond,
                uncond,
                cfg=first.cfg,
                seg=first.seg,
                guidance_rescale=first.guidance_rescale,
                sequential=first.sequential,
                generators=generators,
                progress=progress,
                callback=callback,
                timesteps=start.timesteps,
                blend=start.blend,
                guidance=guidance,
                cache=first.cache_config if first.cache != "none" else None,
            )
        finally:
            if previous is not None and not engine.closed:
                engine.set_perturbation(previous)
    return family.decode(pipe, latents, output_type)


def _size(family, pipe, request: GenerationParams) -> tuple[int, int]:
    """The run's pixel size: the request's, else the init image's, else the model's default."""
    init = request.init_image
    if init is None or (request.height and request.width):
        return family.size(pipe, request.height, request.width)
    try:
        return family.size(pipe, request.height or init.height, request.width or init.width)
    except ValueError as exc:
        raise ValueError(
            f"init image is {init.width}x{init.height}: {exc} (give --height / --width to resize it)"
        ) from None


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
    """The ranks of branch-parallel SEG, each opening ``model`` (a folder, hub id or model URL) and
    ``engine`` (a spec): local processes (``seg_rt.engines.branch``, no extra needed) or Ray actors
    (``seg_rt.cluster.branch``, the ``[cluster]`` extra)."""
    if parallel.launcher == "ray":
        from seg_rt.cluster.branch import open_group  # Ray actors: the cluster part's

        return open_group(parallel, model, engine)
    from seg_rt.engines.branch import ProcessBranchGroup, check_group_args

    check_group_args(model, engine)
    return ProcessBranchGroup(parallel, str(model), engine or "torch")


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


def _eager_torch(engine) -> bool:
    """``engine`` (a spec, a denoiser or ``None`` for torch) runs the pipeline's own torch modules
    eagerly, so weights changed in place (LoRAs) take effect."""
    if engine is None or isinstance(engine, str):
        return engine is None or engine == "torch"
    from seg_rt.engines.base import PatchedDenoiser

    return isinstance(engine, PatchedDenoiser) and not getattr(engine, "compile", False)


def _check_cache_engine(cache: str, engine, parallel) -> None:
    """A step cache (``seg_rt.step_cache``) runs in the eager torch denoisers only (it wraps the
    model's blocks), in one process: one line otherwise, before the model loads."""
    if cache == "none":
        return
    if parallel is not None:
        raise ValueError(f"cache {cache!r} is not available with branch parallel; drop one of them")
    if not _eager_torch(engine):
        name = engine if isinstance(engine, str) else type(engine).__name__
        raise ValueError(f"cache {cache!r} runs on the torch engine only, got engine {name!r}")


def _runs(keys: list) -> list[tuple[int, int]]:
    """Consecutive equal keys as (first index, count): each distinct prompt is encoded once per run."""
    runs, start = [], 0
    for _, group in itertools.groupby(keys):
        count = len(list(group))
        runs.append((start, count))
        start += count
    return runs


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
