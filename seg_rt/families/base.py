"""The model-family contract (docs/design.md §4): one object per family that knows everything that
differs between families, so that the sampler, the engines and the export ask it instead of testing
names.

A family is resolved once per pipeline, by class (``isinstance`` against ``pipeline_classes()``),
from the one registry (``seg_rt.families.registry``). ``seg_rt.pipeline.run_params`` and
``seg_rt.video.sampling.generate_video`` are the same short recipe over it:
check the request, encode the prompts, make the schedule (``set_timesteps`` called here, once),
draw the initial latents, load the torch denoiser, sample, decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from seg_rt.params import GenerationParams
from seg_rt.safe_load import loads_json

from .latent_rgb import Factors, project


@dataclass
class Prepared:
    """Per-row model inputs of the conditional and unconditional branches (``uncond`` None without CFG)."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None


def read_json(path: Path) -> dict:
    return loads_json(path.read_text(), str(path))


@dataclass(frozen=True)
class Classes:
    """Who a family is: its diffusers pipeline class, the network class SEG patches (for finding a
    family by its network; None for the image UNets, which share one adapter) and its SEG adapter as
    ``module:name``."""

    pipeline: str
    model: str | None = None
    adapter: str = "seg_rt.attention:UNET"


class Family:
    """What differs per model family. Subclasses set ``name`` and implement the methods; one instance
    per family lives in the registry. ``kind`` is ``"image"`` (``seg_rt.run_params``) or ``"video"``
    (``seg_rt.video.sampling.generate_video``)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "image"
    exportable: ClassVar[bool] = False  # has an ONNX export (``export_model`` / ``export_inputs``)
    # the image tasks it takes (seg_rt.tasks.TASKS); how they run: seg_rt.families.tasks
    tasks: ClassVar[tuple[str, ...]] = ("txt2img",)
    flow: ClassVar[bool] = (
        False  # flow matching: strength truncation and noising as diffusers' flow pipelines
    )

    def __repr__(self) -> str:
        return f"<{self.kind} family {self.name}>"

    # --- identity -------------------------------------------------------------------------------
    classes: ClassVar[Classes | None] = None  # or override the three methods below

    def pipeline_classes(self) -> tuple[type, ...]:
        """The pipeline classes of this family (looked up in diffusers when asked, so resolving one
        family imports no other's code); subclasses belong to the family too."""
        if self.classes is None:
            raise NotImplementedError(f"family {self.name} names no pipeline class")
        return _diffusers_classes((self.classes.pipeline,))

    def model_classes(self) -> tuple[type, ...]:
        """The denoiser network classes (UNet / transformer) SEG patches in this family."""
        model = self.classes.model if self.classes is not None else None
        return _diffusers_classes((model,) if model else ())

    def adapter(self):
        """The family's SEG adapter (``seg_rt.attention.Adapter``)."""
        import importlib

        spec = self.classes.adapter if self.classes is not None else Classes("").adapter
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)

    # --- model facts ----------------------------------------------------------------------------
    def net(self, pipe) -> nn.Module:
        """The network SEG patches (``pipe.unet`` or ``pipe.transformer``)."""
        raise NotImplementedError

    def size_factor(self, pipe) -> int:
        """Pixel sizes of a loaded pipeline are multiples of this."""
        raise NotImplementedError

    def default_side(self, pipe) -> int:
        """The side in pixels sampled when the request gives none."""
        raise NotImplementedError

    def size(self, pipe, height: int | None, width: int | None) -> tuple[int, int]:
        """A request's size (``None``: the default side), checked against ``size_factor``."""
        from seg_rt.params import check_size

        side = self.default_side(pipe)
        return check_size(height or side, width or side, self.size_factor(pipe))

    def folder_factor(self, folder: Path) -> int:
        """``size_factor`` read from a diffusers folder's config files, before any weight loads."""
        raise NotImplementedError

    def select_layers(self, pipe, selectors: Sequence[str]) -> list[str]:
        """The SEG layers ``selectors`` pick; ``ValueError`` listing what exists otherwise."""
        raise NotImplementedError

    # --- a request ------------------------------------------------------------------------------
    def check_request(self, pipe, request: GenerationParams) -> None:
        """Model-side rules only a loaded model can check (never silently ignored)."""
        self.check_task(request.task, self.inpaint_channels(pipe) is not None)
        if (
            not self.takes_distilled_guidance(pipe)
            and request.distilled_guidance != GenerationParams.distilled_guidance
        ):
            raise ValueError(
                f"distilled guidance applies only to guidance-distilled models (Flux.1-dev); "
                f"{type(pipe).__name__} has no guidance input, got {request.distilled_guidance:g}"
            )

    def takes_distilled_guidance(self, pipe) -> bool:
        """Whether the model embeds a distilled guidance value (Flux.1-dev); other models refuse one."""
        return False

    cache_modes: ClassVar[tuple[str, ...]] = ()  # the step caches it takes (seg_rt.step_cache)

    def check_cache(self, request: GenerationParams) -> None:
        """A step cache this family takes (``request.cache``), or one line saying which it takes."""
        if request.cache != "none" and request.cache not in self.cache_modes:
            takes = ", ".join(self.cache_modes) or "none"
            raise ValueError(
                f"cache {request.cache!r} is not available for the {self.name} family; it takes {takes}"
            )

    def encode(self, pipe, request: GenerationParams, n: int, **options: Any) -> Prepared:
        """n rows of ``request``'s prompt and negative prompt (``uncond`` only with CFG)."""
        raise NotImplementedError

    def schedule(self, pipe, scheduler, steps: int, **shape: int):
        """A fresh scheduler for this run with ``set_timesteps`` already called (the sampler only
        calls ``scale_model_input`` and ``step``). ``scheduler``: a name, None or an instance."""
        raise NotImplementedError

    def initial_latents(self, pipe, scheduler, generators: Sequence[torch.Generator], **shape: int) -> Tensor:
        """diffusers' initial noise, row i from ``generators[i]``."""
        raise NotImplementedError

    # --- tasks (img2img, inpainting: seg_rt.families.tasks) ----------------------------------------
    def check_task(self, task: str, dedicated_inpainting: bool = False) -> None:
        """A task this family takes; a dedicated inpainting checkpoint takes inpainting only."""
        if task not in self.tasks:
            raise ValueError(
                f"{task} is not available for the {self.name} family; it takes {', '.join(self.tasks)}"
            )
        if dedicated_inpainting and task != "inpaint":
            raise ValueError(
                f"this {self.name} model is an inpainting checkpoint (a 9-channel UNet): give an init "
                "image and a mask (--init-image, --mask)"
            )

    def inpaint_channels(self, pipe) -> int | None:
        """The extra input channels of a dedicated inpainting checkpoint (mask + masked-image latents,
        concatenated to the latents every step), or None for a plain model."""
        return None

    def start_step(self, steps: int, strength: float) -> int:
        """The first step an init image re-runs from (diffusers' ``get_timesteps``)."""
        from .tasks import start_step

        return start_step(steps, strength, flow=self.flow)

    def encode_image(self, pipe, pixels: Tensor, generator: torch.Generator) -> Tensor:
        """One preprocessed image ``[1, 3, H, W]`` in [-1, 1] → its initial latents (the VAE's sample,
        drawn from ``generator``, normalised as the family's img2img pipeline does)."""
        raise ValueError(f"img2img is not available for the {self.name} family")

    def noised(self, scheduler, latents: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """``latents`` noised to ``timestep``: ``add_noise`` (``scale_noise`` for flow matching)."""
        if self.flow:
            return scheduler.scale_noise(latents, timestep, noise)
        return scheduler.add_noise(latents, noise, timestep)

    def noise_shape(self, pipe, image_latents: Tensor | None, height: int, width: int) -> tuple[int, ...]:
        """The shape of one row's noise (the image latents', or drawn at the size without them)."""
        if image_latents is not None:
            return tuple(image_latents.shape)
        raise NotImplementedError

    def start(self, pipe, scheduler, generators: Sequence[torch.Generator], params, *, height, width, dtype):
        """Where a run of ``params`` starts (``seg_rt.families.tasks.Start``): txt2img's
        ``initial_latents``, or the init image's latents on a truncated schedule, with the mask."""
        from .tasks import task_start

        return task_start(self, pipe, scheduler, generators, params, height=height, width=width, dtype=dtype)

    def denoiser(self, pipe, *, compile: bool = False):
        """The eager (or compiled) PyTorch SEG denoiser (``seg_rt.engines``) over ``net(pipe)``."""
        raise NotImplementedError

    def decode(self, pipe, latents: Tensor, output_type: str):
        """Latents → outputs with the pipeline's VAE and post-processor; ``"latent"`` returns them."""
        raise NotImplementedError

    # --- previews -------------------------------------------------------------------------------
    # A cheap look at latents while sampling (A1111's "Approx cheap", ComfyUI's Latent2RGB previews):
    # one linear map per latent channel to RGB, no VAE decode (``seg_rt.families.latent_rgb``: the
    # tables, their source, the convention). None: the family has no preview.
    preview_table: ClassVar[Factors | None] = None

    def preview_factors(self, pipe) -> Factors | None:
        """The latent → RGB table of ``pipe``'s latents (``preview_table``), or None: no previews."""
        return self.preview_table

    def preview_latents(self, pipe, latents: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        """The sampler's latents as latent images ``(n, C, h, w)`` to project, or None when they are
        not laid out as this family's (``size``: the latent ``(h, w)`` where the layout needs it)."""
        return latents if latents.ndim == 4 else None

    def preview(self, pipe, latents: Tensor, size: tuple[int, int] | None = None) -> Tensor | None:
        """Latents as the sampler holds them → ``(n, 3, h, w)`` RGB in [0, 1], one image per row;
        None when the family has no table or the latents are not its format."""
        factors = self.preview_factors(pipe)
        images = self.preview_latents(pipe, latents, size) if factors is not None else None
        return None if images is None else project(images, factors)

    # --- export ---------------------------------------------------------------------------------
    def export_model(self, pipe, *, sigma: float, layers: Sequence[str]) -> nn.Module:
        """The SEG-patched module an ONNX export traces (``forward(inputs) -> prediction``)."""
        raise ValueError(f"ONNX export is not available for {self.name}")

    def export_inputs(
        self, pipe, model: nn.Module, rows: int, batch: int, height: int, width: int, dtype
    ) -> dict:
        """Deterministic random denoiser inputs at the export shapes; the last ``batch`` rows perturbed."""
        raise ValueError(f"ONNX export is not available for {self.name}")


def _diffusers_classes(names: tuple[str, ...]) -> tuple[type, ...]:
    if not names:
        return ()
    import diffusers

    return tuple(getattr(diffusers, name) for name in names)


def perturbed_mask(rows: int, batch: int) -> Tensor:
    """``seg_mask`` of an export: the last ``batch`` of ``rows`` perturbed."""
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[rows - batch :] = True
    return mask


def named_scheduler(pipe, scheduler):
    """``None`` → Euler (the paper's sampler) from the model's scheduler config; a name
    (``seg_rt.params.SCHEDULERS``); or a diffusers scheduler instance, used as it is."""
    import diffusers

    from seg_rt.params import DEFAULT_SCHEDULER, SCHEDULERS, check_scheduler

    if scheduler is None:
        scheduler = DEFAULT_SCHEDULER
    if isinstance(scheduler, str):
        return getattr(diffusers, SCHEDULERS[check_scheduler(scheduler)]).from_config(pipe.scheduler.config)
    return scheduler


def own_flow_scheduler(family: str, pipe, scheduler):
    """A fresh copy of the pipeline's own (flow-matching Euler) scheduler: what ``euler``, the
    default, means for the families that sample with it; other schedulers are refused."""
    if scheduler not in (None, "euler"):
        raise ValueError(
            f"{family} samples with its own flow-matching Euler scheduler ('euler'); got scheduler {scheduler!r}"
        )
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def flow_shift(config, sequence_length: int) -> float:
    """The resolution-dependent shift ``mu`` of Flux-style flow matching (diffusers' ``calculate_shift``
    with the scheduler config's bounds)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        sequence_length,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def vae_factor(vae_config: dict) -> int:
    """diffusers' ``vae_scale_factor``: ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def decode_per_image(vae, latents: Tensor) -> Tensor:
    """VAE-decode one image at a time (diffusers' VAE slicing): less memory, and each image's pixels
    do not depend on the batch it was sampled in."""
    with torch.no_grad():
        return torch.cat([vae.decode(latent[None], return_dict=False)[0] for latent in latents])
