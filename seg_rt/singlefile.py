"""Single-file checkpoints (the ``.safetensors`` files A1111 / Forge / ComfyUI users have), loaded offline.

``--model FILE.safetensors``: the family is read from the checkpoint's keys (the safetensors header
only, no tensor is read for it), and diffusers' ``from_single_file`` converts the original key layout
with the component configs of that family shipped in ``seg_rt/single_file_configs/<family>`` (configs
only, no weights), given as a local ``config=`` folder so no hub access happens. A checkpoint whose
architecture differs from the shipped configs (another size, a fine-tune with other settings) takes a
config folder explicitly (``--model-config DIR``: a diffusers folder of the base model, configs and
tokenizers suffice for the components the file carries; diffusers' ``config=``). Pickle formats
(``.ckpt``, ``.pt``, ``.bin``, ...) are refused in one line: seg-rt never unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ModelLoadError, first_line

SAFE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PIPELINES = {  # family -> the diffusers pipeline class whose from_single_file loads it
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
DIFFUSION_PREFIXES = ("", "model.diffusion_model.")  # bare (diffusers' releases) or wrapped (ComfyUI)


def is_checkpoint_file(model) -> bool:
    """``model`` names a single-file checkpoint (by its suffix), existing or not."""
    return (
        isinstance(model, str | Path) and Path(str(model)).suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES
    )


def check_config_applies(model, config, what: str = "a model config folder") -> None:
    """A config folder (the CLI's ``--model-config``, a job's ``single_file_config``) is for a
    single-file checkpoint only: with any other model it would be silently unused."""
    if config is not None and not is_checkpoint_file(model):
        raise ModelLoadError(f"{what} applies to single-file checkpoints only, not {str(model)!r}")


def check_file(model: str | Path) -> Path:
    path = Path(str(model)).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"model {str(model)!r} is a pickle checkpoint ({path.suffix}); seg-rt never unpickles: "
            "give the .safetensors version of it"
        )
    if not path.is_file():
        raise ModelLoadError(f"model file {str(model)!r} does not exist")
    return path


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"model file {str(path)!r} is not a readable safetensors file ({exc})") from None


def _any(keys: set[str], *names: str) -> bool:
    return any(p + n in keys for p in DIFFUSION_PREFIXES for n in names)


def detect_family(keys: Iterable[str], what: str = "checkpoint") -> str:
    """The family of an original-layout checkpoint by its keys: ``sd15`` (LDM UNet, CLIP-L text
    encoder), ``sdxl`` (LDM UNet with the add-embedding ``label_emb``), ``sd3`` (MMDiT
    ``joint_blocks``: SD3 / SD3.5), ``flux`` (``double_blocks``); anything else is an error naming
    what it looks like and what is supported."""
    keys = set(keys)
    if _any(keys, "double_blocks.0.img_attn.qkv.weight"):
        return "flux"
    if _any(keys, "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight"):
        return "sd3"
    unet = "model.diffusion_model.input_blocks.0.0.weight" in keys
    if unet and "model.diffusion_model.label_emb.0.0.weight" in keys:
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ModelLoadError(
                f"{what} is an SDXL refiner (OpenCLIP only); seg-rt supports SDXL base checkpoints"
            )
        return "sdxl"
    if unet and any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(
            f"{what} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder), not a supported family"
        )
    if unet:
        return "sd15"
    shown = ", ".join(sorted(keys)[:3]) + (", ..." if len(keys) > 3 else "")
    raise ModelLoadError(
        f"{what} is not an SD1.5, SDXL, SD3 / SD3.5 or Flux.1 checkpoint in the original key layout "
        f"(keys: {shown or 'none'})"
    )


SHIPPED_PIPELINES = ("sd15", "sdxl")  # whose single files carry every weight the pipeline needs


def shipped_config(family: str) -> Path:
    """The component configs shipped for ``family`` (no weights): SD1.5 (v1-5), SDXL base 1.0,
    SD3.5 Large, Flux.1-dev, as diffusers' folders of those models write them."""
    return Path(__file__).parent / "single_file_configs" / family


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's BPE tokenizer (49408 tokens, as SD1.5 / SDXL / SD3 / Flux use it) from the merges shipped
    in ``single_file_configs/clip_merges.txt.gz`` (CLIP's own BPE file's first 48894 merges); the
    vocabulary follows from them as CLIP builds it: the 256 byte symbols, the same with ``</w>``, one
    token per merge, then the start and end tokens."""
    import gzip

    from transformers import CLIPTokenizer

    from .tokenizers import byte_unicode

    text = gzip.decompress((shipped_config("clip_merges.txt.gz")).read_bytes()).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n") if line]
    chars = byte_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    # transformers 5 ignores vocab_file/merges_file: pass the vocabulary itself (docs/design.md §8)
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )  # fmt: skip


def shipped_parts(family: str) -> dict:
    """The components ``from_single_file`` takes as objects with the shipped configs: the tokenizers
    (SDXL's second pads with ``!``, as its release does) and SD1.5's absent safety checker."""
    if family == "sd15":
        return {"tokenizer": clip_tokenizer(), "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}  # fmt: skip
    return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(pad_token="!")}


def _config_family(folder: Path, check_index: Callable[[Path], None]) -> str:
    """The family a config folder is for, by the pipeline class its ``model_index.json`` names."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"model config {str(folder)!r} is not a diffusers folder (no model_index.json)")
    check_index(index)  # no custom code from the folder
    name = json.loads(index.read_text()).get("_class_name")
    for family, cls in PIPELINES.items():
        if name == cls:
            return family
    raise ModelLoadError(
        f"model config {str(folder)!r} is for {name}; single-file checkpoints load with {', '.join(PIPELINES.values())}"
    )


def load(
    model: str | Path,
    dtype,
    dtype_kw: str,
    config: str | Path | None,
    check_index: Callable[[Path], None],
):
    """The pipeline of a single-file checkpoint (``from_single_file``, offline), with the component
    configs of ``config`` (a local diffusers folder, its ``model_index.json`` checked by
    ``check_index``: ``seg_rt.pipeline.check_model_index``) or those shipped for the detected family."""
    import diffusers

    path = check_file(model)
    family = detect_family(checkpoint_keys(path), f"model file {path.name!r}")
    if config is not None:
        folder = Path(config).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"model config {str(config)!r} is not a folder")
        if (given := _config_family(folder, check_index)) != family:
            raise ModelLoadError(
                f"model file {path.name!r} is a {family} checkpoint but model config {str(config)!r} is for {given}"
            )
        parts: dict = {}
    else:
        folder = shipped_config(family)
        if family not in SHIPPED_PIPELINES:
            raise ModelLoadError(
                f"model file {path.name!r} is a {family} checkpoint: its T5 text encoder and tokenizer are not in "
                "single files and not shipped with seg-rt; give --model-config DIR (the base model's diffusers "
                "folder, whose missing components load from it)"
            )
        parts = shipped_parts(family)
    cls = getattr(diffusers, PIPELINES[family])
    try:
        pipe = cls.from_single_file(
            str(path), config=str(folder), local_files_only=True, **parts, **{dtype_kw: dtype}
        )
    except Exception as exc:  # a missing component, a shape that differs from the configs, ...
        raise ModelLoadError(
            f"cannot load {family} checkpoint {path.name!r} with the configs in {folder.name!r}: {first_line(exc)}"
            + (
                ""
                if config is not None
                else "; give --model-config DIR for a checkpoint of another architecture"
            )
        ) from None
    return pipe
