"""Image DiT families (SD3 / SD3.5, Flux.1, Qwen-Image): prompt encoding, latents, schedule, denoiser, decoding.

Each step reproduces the family's diffusers pipeline (``StableDiffusion3Pipeline``,
``FluxPipeline``, ``QwenImagePipeline``) so that seed s gives diffusers' noise for ``torch.Generator("cpu").manual_seed(s)``
and the same schedule: the family's own ``FlowMatchEulerDiscreteScheduler`` (Flux: ``sigmas =
linspace(1, 1/steps)`` and the resolution-dependent shift ``mu``), the pipelines' ``encode_prompt``,
and the VAE's ``scaling_factor`` / ``shift_factor``. SEG guidance combines the velocity
predictions with the same formula as noise predictions (docs/design.md, "SEG, exactly").

Flux's and Qwen-Image's latents stay unpacked ``[B, C, 2H, 2W]`` in the sampler (their scheduler
step is elementwise, so packing, a permutation, commutes with it); ``SEGDiT`` packs them into 2×2
patches for the transformer and unpacks its output, exactly as the pipelines pack their noise.

Qwen-Image differs from its pipeline in two documented ways: every prompt's embedding is padded to
``QWEN_TEXT_TOKENS`` with its mask (diffusers keeps each run's own length), so that a row's result
does not depend on the other prompts of its batch; and its CFG is seg-rt's shared formula, without
``QwenImagePipeline``'s per-token norm rescale of the CFG prediction.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .attention import SEGAttention, tracing
from .denoiser import RowwiseLinear, swap_linears
from .dit_attention import MODEL_FAMILIES, adapter_of
from .params import GenerationParams

logger = logging.getLogger(__name__)

FAMILIES = ("sd3", "flux", "qwenimage")  # pipeline classes: seg_rt.families
PACKED = ("flux", "qwenimage")  # 2x2-packed latent tokens, RoPE positions instead of a patchify conv
QWEN_TEXT_TOKENS = 512
"""Qwen-Image prompt embeddings are padded (masked) to this length: ``QwenImagePipeline``'s
``max_sequence_length`` default, so every row of every batch has the same text length."""


def pipeline_family(pipe) -> str | None:
    """``"sd3"`` / ``"flux"`` / ``"qwenimage"`` for an image-DiT pipeline (``seg_rt.families``), else None."""
    from .families import family_of

    try:
        family = family_of(pipe)
    except ValueError:
        return None
    return family if family in FAMILIES else None


def size_factor(pipe) -> int:
    """Pixel sizes are multiples of the VAE factor times the patch (SD3) / the 2x2 packing (Flux,
    Qwen-Image)."""
    if pipeline_family(pipe) in PACKED:
        return pipe.vae_scale_factor * 2
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size


def default_size(pipe) -> int:
    return (
        pipe.transformer.config.sample_size * pipe.vae_scale_factor
        if pipeline_family(pipe) == "sd3"
        else 1024
    )


def takes_distilled_guidance(pipe) -> bool:
    """Whether the pipeline's transformer embeds a distilled guidance value (Flux.1-dev, not schnell)."""
    return pipeline_family(pipe) == "flux" and bool(pipe.transformer.config.guidance_embeds)


def encode(pipe, family: str, request: GenerationParams, n: int) -> dict:
    """Per-row inputs ``{"cond": {...}, "uncond": {...} or None}`` for n rows of ``request``'s prompt
    and negative prompt, from the pipeline's ``encode_prompt``.

    ``request.cfg`` is true CFG (SD3's usual CFG; Flux's and Qwen-Image's with the negative prompt,
    off at 1); ``request.distilled_guidance`` is the value Flux.1-dev embeds."""
    prompt, negative_prompt = request.prompt, request.negative_prompt
    device, do_cfg = pipe._execution_device, request.cfg > 1.0
    if family == "qwenimage":
        cond = _qwen_embeds(pipe, prompt, n)
        uncond = _qwen_embeds(pipe, negative_prompt or "", n) if do_cfg else None
        return {"cond": cond, "uncond": uncond}
    if family == "sd3":
        pe, ne, pooled, npooled = pipe.encode_prompt(
            prompt,
            None,
            None,
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
        )
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": ne, "pooled_projections": npooled} if do_cfg else None
        return {"cond": cond, "uncond": uncond}
    pe, pooled, _ = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=n)
    cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
    uncond = None
    if do_cfg:  # true CFG: the negative prompt ("" when none), encoded the same way
        ne, npooled, _ = pipe.encode_prompt(
            negative_prompt or "", None, device=device, num_images_per_prompt=n
        )
        uncond = {"encoder_hidden_states": ne, "pooled_projections": npooled}
    if takes_distilled_guidance(pipe):
        guidance = torch.full((n,), float(request.distilled_guidance), device=device, dtype=torch.float32)
        cond["guidance"] = guidance
        if uncond is not None:
            uncond["guidance"] = guidance
    return {"cond": cond, "uncond": uncond}


def _qwen_embeds(pipe, prompt: str, n: int) -> dict:
    """``QwenImagePipeline.encode_prompt`` for n rows, padded with its mask to ``QWEN_TEXT_TOKENS``."""
    embeds, mask = pipe.encode_prompt(
        prompt, device=pipe._execution_device, num_images_per_prompt=n, max_sequence_length=QWEN_TEXT_TOKENS
    )
    # embeds: [n, L, D]; mask: [n, L] or None (all valid)
    length = embeds.shape[1]
    if mask is None:
        mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
    pad = QWEN_TEXT_TOKENS - length
    embeds = torch.cat([embeds, embeds.new_zeros(n, pad, embeds.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(n, pad)], dim=1)
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}


def latent_shape(pipe, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Unpacked latent shape ``[n, C, h, w]`` as the pipeline's ``prepare_latents`` draws its noise."""
    f = pipe.vae_scale_factor
    if pipeline_family(pipe) in PACKED:
        channels = pipe.transformer.config.in_channels // 4
        return n, channels, 2 * (height // (f * 2)), 2 * (width // (f * 2))
    return n, pipe.transformer.config.in_channels, height // f, width // f


def initial_latents(pipe, generators: Sequence[torch.Generator], height: int, width: int, dtype) -> Tensor:
    """diffusers' initial noise: row i from ``generators[i]`` (``randn_tensor``); flow matching starts
    at unit noise (no ``init_noise_sigma``)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = latent_shape(pipe, len(generators), height, width)
    return randn_tensor(shape, generator=list(generators), device=pipe._execution_device, dtype=dtype)


def make_scheduler(pipe, steps: int, height: int, width: int):
    """A fresh copy of the family's flow-matching scheduler whose ``set_timesteps(steps)`` gives the
    pipeline's schedule: Flux's ``sigmas`` and ``mu``, SD3's ``mu`` when it shifts dynamically.

    The sampler calls ``set_timesteps(steps, device=...)`` itself, so the pipeline's extra arguments
    are bound on this instance (diffusers has no scheduler option for them)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    family, config = pipeline_family(pipe), sched.config
    if family in PACKED and config.get("shift_terminal") and steps < 2:
        # sigmas = linspace(1, 1/steps) is [1.0]: stretching it to shift_terminal divides by zero
        raise ValueError(f"{family} with a terminal shift (shift_terminal) needs steps >= 2, got {steps}")
    _, _, h, w = latent_shape(pipe, 1, height, width)
    p = 2 if family in PACKED else pipe.transformer.config.patch_size
    seq_len = (h // p) * (w // p)
    kwargs = {}
    if family in PACKED or config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    if family in PACKED and not config.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if kwargs:
        sched.set_timesteps = functools.partial(sched.set_timesteps, **kwargs)
    return sched


def decode(pipe, latents: Tensor, output_type: str):
    """Latents → images: ``latents / scaling_factor + shift_factor`` through the VAE, one image at a
    time (pixels independent of the batch), then the pipeline's image processor."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    if pipeline_family(pipe) == "qwenimage":  # a video VAE: one frame, per-channel mean and std
        c = latents.shape[1]
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(latents.device, vae.dtype)
        latents = latents.to(vae.dtype)[:, :, None] * std + mean  # [B, C, 1, h, w]
        with torch.no_grad():
            image = torch.cat([vae.decode(x[None], return_dict=False)[0][:, :, 0] for x in latents])
        return pipe.image_processor.postprocess(image, output_type=output_type)
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        image = torch.cat([vae.decode(latent[None], return_dict=False)[0] for latent in latents])
    return pipe.image_processor.postprocess(image, output_type=output_type)


def pack(latents: Tensor) -> Tensor:
    """``[B, C, 2H, 2W]`` → Flux tokens ``[B, H·W, 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Flux tokens ``[B, H·W, 4C]`` → ``[B, C, 2H, 2W]`` (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Flux's token positions ``[H·W, 3]``: (0, row, column), row-major (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class RowwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` run one sample at a time in eager mode: CPU Conv2d picks another algorithm for
    another batch size, so SD3's patch embedding gave batched rows results ~1e-7 off solo runs (as
    ``seg_rt.denoiser.RowwiseConv3d`` for Wan). Only the DiT's patchify conv uses it."""

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[0] > 1 and not tracing(input):
            return torch.cat(
                [super(RowwiseConv2d, self).forward(input[i : i + 1]) for i in range(input.shape[0])]
            )
        return super().forward(input)


def _patch_convs(transformer: nn.Module) -> list[nn.Module]:
    """The patchify convs of a DiT (SD3's ``pos_embed.proj``; Flux patchifies by packing)."""
    proj = getattr(getattr(transformer, "pos_embed", None), "proj", None)
    return [proj] if isinstance(proj, nn.Conv2d) else []


def batch_invariance(transformer: nn.Module, on: bool) -> None:
    """Per-sample linears and patchify conv (on) or the plain layers back (off)."""
    swap_linears([transformer], RowwiseLinear if on else nn.Linear)
    for conv in _patch_convs(transformer):
        conv.__class__ = RowwiseConv2d if on else nn.Conv2d


class SEGDiT(nn.Module):
    """An SD3 / Flux / Qwen-Image transformer with SEG installed; ``forward(inputs)`` → the velocity
    prediction.

    Inputs: ``sample`` (unpacked latents ``[B, C, h, w]``), ``timestep`` (the scheduler's, 0-1000),
    ``encoder_hidden_states``, ``pooled_projections`` (SD3, Flux), Flux-dev's ``guidance``,
    Qwen-Image's ``encoder_hidden_states_mask``, and ``seg_mask``.
    """

    def __init__(
        self, transformer: nn.Module, *, sigma: float, layers: Sequence[str] = ("mid",), perturbation="blur"
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.family = MODEL_FAMILIES[type(transformer).__name__]
        self.seg = SEGAttention(transformer, sigma, layers, perturbation, adapter=adapter_of(transformer))
        self.seg.install()
        batch_invariance(transformer, True)  # per-sample results independent of the batch
        self._image_ids: dict[tuple, Tensor] = {}  # Flux: (h, w, device, dtype) -> img_ids

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self.seg.set_mask(inputs.get("seg_mask"), getattr(inputs, "seg_rows", None))  # host layout: no sync
        try:
            out = self._forward(inputs)
            self.seg.check()  # SEG active but no query perturbed: an error, never a CFG-only result
            return out
        finally:
            self.seg.set_mask(None)

    def _forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        x, t, text = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
        if self.family == "sd3":
            return self.transformer(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=text,
                pooled_projections=inputs["pooled_projections"],
                return_dict=False,
            )[0]
        h, w = x.shape[-2:]
        if self.family == "qwenimage":
            out = self.transformer(
                hidden_states=pack(x),
                timestep=t.to(x.dtype) / 1000,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=inputs["encoder_hidden_states_mask"],
                img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
                return_dict=False,
            )[0]
            return unpack(out, h, w)
        out = self.transformer(
            hidden_states=pack(x),
            timestep=t.to(x.dtype) / 1000,
            guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
            img_ids=self._ids(h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def _ids(self, h: int, w: int, device, dtype) -> Tensor:
        """Flux's ``img_ids`` for an (h, w) token grid, built once per shape as a concrete tensor:
        the SEG grid is read from their values, which an exporter's trace can read only from a
        tensor made before it (``export_onnx`` runs the model eagerly first)."""
        key = (h, w, str(device), dtype)
        if key not in self._image_ids:
            self._image_ids[key] = image_ids(h, w, device, dtype)
        return self._image_ids[key]

    controlnet = None  # the export code asks every SEG denoiser for its ControlNet

    def grids(self) -> list[tuple[int, int]]:
        """The token grid of the last forward (for runtime-σ exports' blur-matrix inputs)."""
        return [] if self.seg.grid is None else [self.seg.grid[1:]]

    def remove(self) -> None:
        self.seg.remove()
        batch_invariance(self.transformer, False)


EXPORTABLE = ("sd3", "flux")
"""Image DiTs with an ONNX export (fixed shapes). Flux's grid is read from the values of its
``img_ids``, built as a constant for the export's shape (``SEGDiT._ids``). Qwen-Image is not
exportable yet (its padded text and mask make a graph of their own)."""

T5_EXPORT_TOKENS = {"sd3": 256, "flux": 512}  # the pipelines' encode_prompt max_sequence_length defaults


def export_inputs(pipe, rows: int, batch: int, height: int, width: int, dtype, seed: int = 0) -> dict:
    """Deterministic random denoiser inputs at the export shapes; the last ``batch`` rows perturbed."""
    family = pipeline_family(pipe)
    if family not in EXPORTABLE:
        raise ValueError(f"ONNX export supports the image DiTs {', '.join(EXPORTABLE)}, got {family}")
    g = torch.Generator().manual_seed(seed)
    config = pipe.transformer.config
    clip_tokens = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[rows - batch :] = True
    text_tokens = T5_EXPORT_TOKENS[family] + (clip_tokens if family == "sd3" else 0)  # Flux: T5 only
    inputs = {
        "sample": rnd(*latent_shape(pipe, rows, height, width)),
        "timestep": torch.full((rows,), 500.0),
        "encoder_hidden_states": rnd(rows, text_tokens, config.joint_attention_dim),
        "pooled_projections": rnd(rows, config.pooled_projection_dim),
    }
    if takes_distilled_guidance(pipe):  # Flux-dev's guidance input (a runtime value per row)
        inputs["guidance"] = torch.full((rows,), 3.5)
    inputs["seg_mask"] = mask
    return inputs
