"""One generation request, one type (docs/design.md, "One request, one type").

``GenerationParams`` holds everything that determines an output image (``VideoParams`` adds the video
fields): prompt, negative prompt, seed, steps, CFG, the SEG config, size, scheduler, and the distilled
guidance that guidance-distilled models (Flux.1-dev) take as an input. Every entry point
(Python API, CLI, job items, HTTP requests) builds one, and every record (PNG text chunk, manifest
row) is its ``to_record()``. Each default is written here once. σ is a float inside; ``"inf"`` only in
the JSON record (``SEGConfig.to_dict`` / ``sigma_to_json``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import SEGConfig, parse_layers, parse_sigma, sigma_to_json
from .guidance import Guidance
from .lora import LoRA, loras_of
from .step_cache import CACHE_MODES, DEFAULT_INTERVAL, DEFAULT_THRESHOLD, CacheConfig, check_cache
from .tasks import InputImage, check_task, load_image, task_key, task_of

# Sampler names → diffusers scheduler classes (built from the model's own scheduler config).
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}
DEFAULT_SCHEDULER = "euler"  # the paper's sampler
VIDEO_MODES = ("spatial", "temporal", "spatiotemporal")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to 2**64 - 1


def check_scheduler(name: str) -> str:
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return name


def check_text(name: str, text: str) -> str:
    """Text that is valid Unicode: a lone UTF-16 surrogate (JSON ``"\\ud800"``, undecodable bytes
    in argv) cannot be tokenized nor written to a record."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} is not valid Unicode text: a lone surrogate {text[exc.start]!r} at character {exc.start}"
        ) from None
    return text


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return seed


def check_cfg(cfg: float) -> float:
    """CFG scale: finite and >= 1 (an infinite scale gives NaN images)."""
    cfg = _number("cfg", cfg)
    if not math.isfinite(cfg) or cfg < 1.0:
        raise ValueError(
            f"cfg must be a finite number >= 1 (1 disables classifier-free guidance), got {cfg:g}"
        )
    return cfg


def check_distilled_guidance(value: float) -> float:
    """Flux.1-dev's distilled guidance (the ``guidance`` input its transformer embeds): finite, >= 0."""
    value = _number("distilled guidance", value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"distilled guidance must be a finite number >= 0, got {value:g}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class VideoParams:
    """The fields only a video request has.

    mode:       which axes the query blur runs over: ``spatial`` (per frame, σ = ``seg.sigma``),
                ``temporal`` (along frames, σ = ``sigma_time``) or ``spatiotemporal`` (both, separable).
    sigma_time: blur σ along time in frames; 0 keeps frames independent; ``inf`` = mean over frames.
    frames:     output frames; fps: frames per second of the written file.
    layers:     video self-attention layers to perturb, as module names or prefixes; ``None`` = all.
    image:      image-to-video: the still the video starts from (``seg_rt.tasks.InputImage``); ``None``
                = text-to-video. Records name it by sha256, mode and size.
    Stable Video Diffusion's own conditioning (``StableVideoDiffusionPipeline``'s arguments and
    defaults; other families refuse values other than these defaults):
    min_cfg:    the CFG scale of the first frame, ramping linearly to ``cfg`` at the last
                (``min_guidance_scale``; ``cfg`` is ``max_guidance_scale``); 1.0, its default.
    motion_bucket_id, noise_aug_strength: the micro-conditioning (127, 0.02); the still is noised by
                ``noise_aug_strength`` before its VAE encoding, as the pipeline does.
    """

    frames: int = 16
    fps: int = 8
    mode: str = "spatiotemporal"
    sigma_time: float = 1.0
    layers: tuple[str, ...] | None = None
    image: InputImage | None = None
    min_cfg: float = 1.0
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02

    def __post_init__(self) -> None:
        _int("video frames", self.frames, 1)
        _int("video fps", self.fps, 1)
        _int("motion bucket id", self.motion_bucket_id, 0)
        min_cfg = _number("min cfg", self.min_cfg)
        if not math.isfinite(min_cfg) or min_cfg < 1.0:
            raise ValueError(
                f"min cfg must be a finite number >= 1 (the first frame's CFG scale), got {min_cfg:g}"
            )
        object.__setattr__(self, "min_cfg", min_cfg)
        aug = _number("noise aug strength", self.noise_aug_strength)
        if not math.isfinite(aug) or aug < 0:
            raise ValueError(f"noise aug strength must be a finite number >= 0, got {aug:g}")
        object.__setattr__(self, "noise_aug_strength", aug)
        if self.mode not in VIDEO_MODES:
            raise ValueError(f"seg mode must be one of {', '.join(VIDEO_MODES)}, got {self.mode!r}")
        sigma_time = _number("seg sigma time", self.sigma_time)
        if math.isnan(sigma_time) or sigma_time < 0:
            raise ValueError(f"seg sigma time must be >= 0 or inf, got {sigma_time:g}")
        object.__setattr__(self, "sigma_time", sigma_time)
        if self.mode == "temporal" and sigma_time == 0:
            raise ValueError("seg mode 'temporal' with seg sigma time 0 blurs nothing: give sigma time > 0")
        if self.layers is not None:
            layers = parse_layers(self.layers)
            if not layers:
                raise ValueError("video seg layers must name at least one layer, or be left out for all")
            object.__setattr__(self, "layers", layers)
        if self.image is not None and not isinstance(self.image, InputImage):
            object.__setattr__(self, "image", load_image(self.image, "image"))

    def axis_sigmas(self, sigma: float) -> tuple[float, float]:
        """(σ over space, σ over time) for this mode; 0 means that axis is not blurred."""
        space = 0.0 if self.mode == "temporal" else sigma
        time = 0.0 if self.mode == "spatial" else self.sigma_time
        return space, time

    def to_record(self) -> dict:
        record = {
            "frames": self.frames,
            "fps": self.fps,
            "mode": self.mode,
            "sigma_time": sigma_to_json(self.sigma_time),
            "layers": None if self.layers is None else list(self.layers),
        }
        if self.image is not None:  # when set: text-to-video records stay byte-identical
            record["image"] = self.image.record()
        for name in SVD_CONDITIONING:  # when set, likewise
            if getattr(self, name) != getattr(VideoParams, name):
                record[name] = getattr(self, name)
        return record

    def svd_conditioning(self) -> dict[str, Any]:
        """The Stable Video Diffusion fields set to other than their defaults."""
        return {k: getattr(self, k) for k in SVD_CONDITIONING if getattr(self, k) != getattr(VideoParams, k)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> VideoParams:
        """Inverse of ``to_record``; a record's image (a sha256) is refused as input (give the image)."""
        data = dict(record)
        if "sigma_time" in data:
            data["sigma_time"] = parse_sigma(data["sigma_time"])
        if data.get("image") is not None:
            data["image"] = field_named("image", "video").parse(data["image"])
        return cls(**data)


SVD_CONDITIONING = ("min_cfg", "motion_bucket_id", "noise_aug_strength")  # VideoParams' SVD-only fields


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines one generated image (or video, with ``video``).

    ``height`` / ``width`` ``None`` mean the model's default size; sizes are checked against the
    model's own scale factor where the model is known (``check_size``, ``Family.size``).
    ``distilled_guidance``: the guidance value a guidance-distilled model (Flux.1-dev) embeds, as
    ``FluxPipeline``'s ``guidance_scale`` (default 3.5); a model without that input refuses any other
    value (``seg_rt.pipeline.run_params``). Not CFG: ``cfg`` is true CFG with the negative prompt.
    ``guidance``: the guidance list (``seg_rt.guidance``: ``"apg,pag=3"``), kept in its canonical
    spelling; ``""`` = CFG and SEG alone (``cfg``, ``seg``).
    """

    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    cfg: float = 5.0
    seg: SEGConfig = field(default_factory=SEGConfig)
    guidance_rescale: float = 0.0
    height: int | None = None
    width: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    sequential: bool = False
    video: VideoParams | None = None
    distilled_guidance: float = 3.5
    loras: tuple[LoRA, ...] = ()  # seg_rt.lora: file name, sha256 and weight of each
    # tasks (seg_rt.tasks): img2img with an init image, inpainting with a mask as well
    init_image: InputImage | None = None
    mask: InputImage | None = None
    strength: float = 1.0
    mask_blur: int = 0
    guidance: str = ""
    # step cache (seg_rt.step_cache): per-row first-block cache (DiTs) or DeepCache (UNets)
    cache: str = "none"
    cache_threshold: float = DEFAULT_THRESHOLD
    cache_interval: int = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative prompt must be a string, got {type(self.negative_prompt).__name__}")
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt or "")):
            check_text(name, text)
        check_seed(self.seed)
        _int("steps", self.steps, 1)
        object.__setattr__(self, "cfg", check_cfg(self.cfg))
        if not isinstance(self.seg, SEGConfig):
            raise ValueError(f"seg must be a SEGConfig, got {type(self.seg).__name__}")
        rescale = _number("guidance rescale", self.guidance_rescale)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale:g}")
        object.__setattr__(self, "guidance_rescale", rescale)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _int(name, value, 1)
        check_scheduler(self.scheduler)
        object.__setattr__(self, "distilled_guidance", check_distilled_guidance(self.distilled_guidance))
        object.__setattr__(self, "sequential", bool(self.sequential))
        if not (isinstance(self.loras, tuple) and all(isinstance(x, LoRA) for x in self.loras)):
            object.__setattr__(self, "loras", loras_of(self.loras))
        self.seg.check_cfg(self.cfg)
        check_task(self)
        terms = Guidance.parse(self.guidance)
        terms.check(self.cfg, self.seg)
        object.__setattr__(self, "guidance", terms.spec())
        check_cache(self.cache, self.cache_threshold, self.cache_interval)
        object.__setattr__(self, "cache_threshold", float(self.cache_threshold))
        if self.cache != "none" and self.video is not None:
            raise ValueError(f"cache {self.cache!r} is not available for video requests")
        if self.video is not None and not isinstance(self.video, VideoParams):
            raise ValueError(f"video must be VideoParams, got {type(self.video).__name__}")
        if self.video is not None and self.video.min_cfg != 1.0 and self.cfg <= 1.0:
            raise ValueError(
                f"min cfg applies with cfg > 1 (it ramps the CFG scale from the first frame to cfg), "
                f"got min cfg {self.video.min_cfg:g} with cfg {self.cfg:g}"
            )
        if self.video is not None and self.seg.layers != SEGConfig().layers:
            raise ValueError(
                f"seg layers {','.join(self.seg.layers)!r} select image UNet blocks and do not apply to video "
                "models; give video layers (module names or prefixes) instead"
            )

    def replace(self, **changes: Any) -> GenerationParams:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_seg(self, **changes: Any) -> GenerationParams:
        """A copy whose SEG config has ``changes`` (e.g. ``sigma=2.0``)."""
        return self.replace(seg=dataclasses.replace(self.seg, **changes))

    def to_record(self) -> dict:
        """The JSON record written into PNG text chunks and manifests (σ = inf as ``"inf"``): flat
        keys, the request field table's wire names (``seg_rt.params.to_record``), as seg-rt PNGs
        have carried them since the first release."""
        return record_of(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> GenerationParams:
        """Inverse of ``to_record``; unknown keys (``model``, ``generator``, ...) are ignored."""
        return request_of_record(record)

    @property
    def cache_config(self) -> CacheConfig:
        """The step cache of this request (``seg_rt.step_cache``)."""
        return CacheConfig(self.cache, self.cache_threshold, self.cache_interval)

    @property
    def task(self) -> str:
        """``txt2img``, ``img2img`` (an init image) or ``inpaint`` (an init image and a mask)."""
        return task_of(self)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampling run: everything but prompt,
        negative prompt, seed and the init image / mask pixels (those are per row; rows share their
        size, the task, strength and mask blur)."""
        return (
            self.steps,
            self.cfg,
            self.seg,
            self.guidance_rescale,
            self.height,
            self.width,
            self.scheduler,
            self.sequential,
            self.video,
            self.distilled_guidance,
            self.loras,
            *task_key(self),
            self.guidance,
            self.cache_config,
        )


def check_size(height: int | None, width: int | None, factor: int) -> tuple[int | None, int | None]:
    """Pixel sizes must be positive multiples of the model's downsampling ``factor`` (its VAE's; 1 for a
    pixel-space model such as the demo). ``None`` (the model's default size) is not checked."""
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v <= 0 or v % factor):
            raise ValueError(f"{name} must be a positive multiple of {factor}, got {v}")
    return height, width


# ---- the request field table (docs/design.md §3) ----------------------------------------------
# Every field a user sets, once: its wire name (= its record key), value type, where it lives in
# the request, help text and the spellings users bring from diffusers / OpenAI clones. Every edge
# is derived from it: the CLI's request flags, the Python API's keywords (``request_from_fields``),
# the HTTP body and job items, the records (``to_record`` / ``from_record``). Defaults are not
# written here: each comes from its dataclass field (``RequestField.default``).

KINDS = ("image", "video")
IMAGE, VIDEO, WHEN_SET = ("image",), ("video",), "when set"


@dataclass(frozen=True)
class RequestField:
    """One request field.

    key:     wire name = record key (flat: ``seg_scale``; video fields as ``VideoParams`` names them
             inside the record's ``video`` object, flat ``seg_mode`` / ``seg_sigma_time`` / ``frames``
             on the wire).
    path:    where the value lives: ``("steps",)``, ``("seg", "scale")``, ``("video", "frames")``.
    type:    ``str``, ``int``, ``float``, ``bool``, ``"sigma"`` (a number or ``inf``), ``"layers"``
             (comma-separated or a list), ``"loras"`` (``seg_rt.lora``), ``"optional_str"``,
             ``"optional_int"``, ``"image"`` / ``"mask"`` (an ``InputImage``, RGB / L, from anything
             ``seg_rt.tasks.load_image`` takes; recorded as its sha256, mode and size).
    kinds:   the requests it applies to (``image``, ``video``).
    aliases: other spellings accepted by the Python API and HTTP (``num_inference_steps``).
    choices: the allowed values, when a fixed set.
    recorded: ``"always"`` in the flat record, or ``"when set"`` (fields added after the first
             release: records of runs that leave them at their default stay byte-identical).
    Video-only fields are recorded in the record's ``video`` object (``VideoParams.to_record``).
    """

    key: str
    path: tuple[str, ...]
    type: Any
    help: str
    kinds: tuple[str, ...] = KINDS
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    recorded: str = "always"  # or "when set": in records only when it differs from its default

    @property
    def default(self) -> Any:
        """The default, read from the request dataclasses (written there once)."""
        owner: Any = {"seg": SEGConfig(), "video": VideoParams()}.get(self.path[0], GenerationParams())
        return getattr(owner, self.path[-1])

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """A wire / flag value as the request type takes it (σ ``"inf"``, layer lists); validation
        is the request type's own."""
        if self.type == "sigma" and isinstance(value, str):
            return parse_sigma(value)
        if self.type == "layers" and value is not None and not isinstance(value, tuple):
            return parse_layers(value) if isinstance(value, str | list) else value
        if self.type in ("image", "mask") and value is not None and not isinstance(value, InputImage):
            if isinstance(value, Mapping) and "sha256" in value:
                raise ValueError(
                    f"{self.key} in a record names an image by its sha256 only: give the image itself"
                )
            return load_image(value, self.key.replace("_", " "), mode="L" if self.type == "mask" else "RGB")
        if self.type == "loras":
            return loras_of(value)
        return value

    def dump(self, value: Any) -> Any:
        """The value as the JSON record writes it (σ ``inf`` as ``"inf"``, layers as a list)."""
        if self.type == "sigma":
            return sigma_to_json(value)
        if self.type == "layers":
            return None if value is None else list(value)
        if self.type in ("image", "mask"):
            return None if value is None else value.record()
        if self.type == "loras":
            return [lora.to_record() for lora in value]
        return value


def _f(key, path, type_, help_, **kw) -> RequestField:
    return RequestField(key, tuple(path.split(".")), type_, help_, **kw)


# fmt: off
FIELDS: tuple[RequestField, ...] = (  # record order; one line a field reads as the table it is
    _f("prompt", "prompt", str, "text prompt ('' for unconditional SEG)"),
    _f("negative_prompt", "negative_prompt", "optional_str", "negative prompt (the CFG branch's text)"),
    _f("steps", "steps", int, "sampling steps", aliases=("num_inference_steps",)),
    _f("cfg", "cfg", float, "CFG scale (1 = no CFG)", aliases=("guidance_scale", "true_cfg_scale")),
    _f("seg_scale", "seg.scale", float, "SEG guidance scale s (0 = off)"),
    _f("seg_sigma", "seg.sigma", "sigma", "blur σ in tokens, or 'inf'"),
    _f("seg_layers", "seg.layers", "layers", "SEG layers: mid, down, up, down.N, up.N, names", kinds=IMAGE),
    _f("seg_layers", "video.layers", "layers", "video self-attention layers (names or prefixes)", kinds=VIDEO),
    _f("seg_start", "seg.start", float, "SEG window start, fraction of the schedule"),
    _f("seg_end", "seg.end", float, "SEG window end, fraction of the schedule"),
    _f("guidance_rescale", "guidance_rescale", float, "CFG rescale φ in [0, 1]"),
    _f("height", "height", "optional_int", "height in pixels"),
    _f("width", "width", "optional_int", "width in pixels"),
    _f("seed", "seed", int, "seed; sample i of a batch uses seed + i"),
    _f("scheduler", "scheduler", str, "sampler", choices=tuple(SCHEDULERS)),
    _f("sequential", "sequential", bool, "one denoiser call per branch (less memory, same images)"),
    # added after the first release: in records only when set, so old records stay byte-identical
    _f("seg_every", "seg.every", int, "cheap mode: SEG branch every k-th step", recorded=WHEN_SET),
    _f("seg_placement", "seg.placement", str, "cheap mode: blur inside the CFG row",
       choices=SEGConfig.PLACEMENTS, recorded=WHEN_SET),
    _f("distilled_guidance", "distilled_guidance", float, "the guidance Flux.1-dev embeds", kinds=IMAGE,
       recorded=WHEN_SET),
    _f("loras", "loras", "loras", "LoRA files PATH[:WEIGHT] (safetensors)", kinds=IMAGE, recorded=WHEN_SET),
    _f("init_image", "init_image", "image", "init image (img2img / inpainting; the size defaults to its size)",
       kinds=IMAGE, aliases=("image",), recorded=WHEN_SET),
    _f("mask", "mask", "mask", "inpainting mask, white = repaint (same size as the init image)", kinds=IMAGE,
       aliases=("mask_image",), recorded=WHEN_SET),
    _f("strength", "strength", float, "fraction of the schedule re-run from the init image, in (0, 1]",
       kinds=IMAGE, recorded=WHEN_SET),
    _f("mask_blur", "mask_blur", int, "Gaussian blur radius of the mask in pixels (diffusers' blur_factor)",
       kinds=IMAGE, recorded=WHEN_SET),
    _f("guidance", "guidance", str, "guidance terms NAME[=SCALE][:OPT=V...], comma-separated: "
       "cfg (window), pag, tpg, slg, cfgzero, fresca, apg (seg_rt.guidance)", recorded=WHEN_SET),
    _f("cache", "cache", str, "step cache: fbcache (DiTs: first-block residual), deepcache (UNets)",
       kinds=IMAGE, choices=CACHE_MODES, recorded=WHEN_SET),
    _f("cache_threshold", "cache_threshold", float, "fbcache: skip when the first block's relative L1 "
       "change is below this", kinds=IMAGE, recorded=WHEN_SET),
    _f("cache_interval", "cache_interval", int, "deepcache: a full forward every N steps", kinds=IMAGE,
       recorded=WHEN_SET),
    _f("frames", "video.frames", int, "output frames", kinds=VIDEO),
    _f("fps", "video.fps", int, "frames per second of the written file", kinds=VIDEO),
    _f("seg_mode", "video.mode", str, "which axes the query blur runs over", kinds=VIDEO, choices=VIDEO_MODES),
    _f("seg_sigma_time", "video.sigma_time", "sigma", "blur σ along time (0: frames independent)", kinds=VIDEO),
    _f("image", "video.image", "image", "image-to-video: the still to animate", kinds=VIDEO, recorded=WHEN_SET),
    _f("min_cfg", "video.min_cfg", float, "Stable Video Diffusion: the first frame's CFG scale, ramping to cfg",
       kinds=VIDEO, aliases=("min_guidance_scale",), recorded=WHEN_SET),
    _f("motion_bucket_id", "video.motion_bucket_id", int, "Stable Video Diffusion: the motion bucket",
       kinds=VIDEO, recorded=WHEN_SET),
    _f("noise_aug_strength", "video.noise_aug_strength", float,
       "Stable Video Diffusion: the noise added to the still before encoding", kinds=VIDEO, recorded=WHEN_SET),
)
# fmt: on


def fields_for(kind: str) -> tuple[RequestField, ...]:
    if kind not in KINDS:
        raise ValueError(f"request kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tuple(f for f in FIELDS if kind in f.kinds)


def field_named(key: str, kind: str) -> RequestField:
    for f in fields_for(kind):
        if f.key == key:
            return f
    raise KeyError(key)


def canonical(values: Mapping[str, Any], kind: str, *, what: str = "request") -> dict[str, Any]:
    """``values`` by wire name: aliases replaced by their field's key (both spellings with different
    values is an error); a key the ``kind`` of request has no field for is an error naming them."""
    table = fields_for(kind)
    by_name = {name: f for f in table for name in (f.key, *f.aliases)}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, value in values.items():
        f = by_name.get(name)
        if f is None:
            other = [
                k for k in KINDS if k != kind and any(name in (g.key, *g.aliases) for g in fields_for(k))
            ]
            if other:
                raise ValueError(f"{what} field {name!r} applies to {other[0]} requests only, not {kind}")
            known = ", ".join(f.key for f in table)
            raise ValueError(f"unknown {what} field {name!r}; the fields are: {known}")
        if f.key in out and out[f.key] != value:
            raise ValueError(
                f"{what} gives {spelled[f.key]}={out[f.key]!r} and {name}={value!r}: the same field spelled "
                "twice with different values"
            )
        out[f.key], spelled[f.key] = value, name
    return out


def request_from_fields(values: Mapping[str, Any], kind: str = "image", *, what: str = "request"):
    """A ``GenerationParams`` from flat wire fields (aliases accepted; the rest at their defaults).
    ``kind="video"`` gives a video request (``GenerationParams.video`` set)."""
    nested: dict[str, dict[str, Any]] = {"": {}, "seg": {}, "video": {}}
    for key, value in canonical(values, kind, what=what).items():
        f = field_named(key, kind)
        where = f.path[0] if len(f.path) > 1 else ""
        nested[where][f.path[-1]] = f.parse(value)
    seg = SEGConfig(**nested["seg"])
    video = VideoParams(**nested["video"]) if kind == "video" else None
    return GenerationParams(**nested[""], seg=seg, video=video)


def values_of(params, kind: str) -> dict[str, Any]:
    """The flat wire values of a request (inverse of ``request_from_fields``; σ stays a float)."""
    return {f.key: _value(params, f) for f in fields_for(kind)}


def _value(params, f: RequestField) -> Any:
    obj = params
    for part in f.path:
        obj = getattr(obj, part)
    return obj


def record_of(params) -> dict[str, Any]:
    """The flat JSON record of a request (``GenerationParams.to_record``): the image fields in table
    order (``"when set"`` ones only when they differ from their default), then the ``video`` object."""
    record = {}
    for f in fields_for("image"):
        value = _value(params, f)
        if f.recorded == "always" or value != f.default:
            record[f.key] = f.dump(value)
    if params.video is not None:
        record["video"] = params.video.to_record()
    return record


def request_of_record(record: Mapping[str, Any]):
    """Inverse of ``to_record``; keys that are no request field (``model``, ``generator``) are ignored."""
    keys = {f.key for f in fields_for("image")}
    request = request_from_fields({k: v for k, v in record.items() if k in keys}, "image", what="record")
    video = record.get("video")
    return request if video is None else request.replace(video=VideoParams.from_record(video))


def replace_fields(params: GenerationParams, kind: str, values: Mapping[str, Any]) -> GenerationParams:
    """``params`` with some wire fields changed (aliases accepted), validated again."""
    return request_from_fields({**values_of(params, kind), **canonical(values, kind)}, kind)


def check_field(key: str, value: Any, kind: str = "image") -> Any:
    """``value`` of wire field ``key`` checked by the request type's own rule, alone (for validators
    that name the field); returns it as the request holds it."""
    context = _CHECK_ALONE.get(key, {})
    return values_of(request_from_fields({**context, key: value}, kind), kind)[key]


# fields whose own rule is checked next to other fields' neutral values: a perturbed guidance term
# excludes SEG, so the list alone is checked with SEG off; a cache option next to its own cache mode
# (the whole request is checked as a whole)
_CHECK_ALONE: dict[str, dict[str, Any]] = {
    "guidance": {"seg_scale": 0.0},
    "cache_threshold": {"cache": "fbcache"},
    "cache_interval": {"cache": "deepcache"},
}
