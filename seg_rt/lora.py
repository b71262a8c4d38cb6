"""LoRA files as a request field (``loras``): the type, its rules, and loading them into a pipeline.

A ``LoRA`` names its file by file name and sha256 (what records carry: never a path) and a weight;
``path`` is where this process reads it (not compared, not recorded). Loading is diffusers'
(``load_lora_weights`` with one adapter per file, named by its hash; ``set_adapters`` with the
per-LoRA weights), which needs the ``peft`` package (the ``[lora]`` extra). SEG stays exact: peft
wraps the attention projections (``to_q`` ...) inside diffusers' ``Attention`` modules, and SEG's
processors call those modules, so the blur runs on the final query after the LoRA-adapted ``to_q``.

Spellings at the edges: ``PATH[:WEIGHT]`` (CLI ``--lora``, job files, the Python API), a record entry
``{"file", "sha256", "weight"}``, and on the server ``NAME[:WEIGHT]`` / ``{"name", "weight"}`` picking
one of the LoRAs it preloaded (``resolve_named``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUFFIX = ".safetensors"
ADAPTER_PREFIX = "segrt_lora_"


@dataclass(frozen=True)
class LoRA:
    """One LoRA of a request: its file name, sha256 and weight (``path``: where it is read here)."""

    file: str
    sha256: str
    weight: float = 1.0
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", check_weight(self.weight))
        if not isinstance(self.file, str) or not self.file:
            raise ValueError(f"loras: a LoRA needs its file name, got {self.file!r}")
        sha = self.sha256
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"loras: sha256 of {self.file!r} must be 64 lowercase hex digits, got {sha!r}")

    @property
    def adapter(self) -> str:
        """The diffusers adapter name: one per file content, whatever its path or weight."""
        return ADAPTER_PREFIX + self.sha256[:16]

    def to_record(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "weight": self.weight}

    def with_weight(self, weight: Any) -> LoRA:
        return LoRA(self.file, self.sha256, weight, self.path)

    @classmethod
    def from_path(cls, path: str | Path, weight: Any = 1.0) -> LoRA:
        """The LoRA at ``path``: a safetensors file (checked by its header, never unpickled), hashed."""
        p = check_lora_file(path)
        return cls(p.name, file_sha256(p), weight, str(p))


def check_weight(weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(f"loras: a LoRA weight must be a finite number, got {weight!r}")
    return float(weight)


def check_lora_file(path: str | Path) -> Path:
    """``path`` as an existing ``.safetensors`` file whose header safetensors reads (one line otherwise)."""
    p = Path(path).expanduser()
    if p.suffix.lower() != SUFFIX:
        raise ValueError(
            f"loras: {str(path)!r} is not a safetensors file; seg-rt loads LoRAs from .safetensors only "
            "(pickle formats such as .ckpt / .pt / .bin are never loaded)"
        )
    if not p.is_file():
        raise ValueError(f"loras: LoRA file {str(path)!r} does not exist")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"loras: {str(path)!r} is not a readable safetensors file ({exc})") from None
    return p


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_spec(text: str) -> tuple[str, float]:
    """``SOURCE[:WEIGHT]`` → (source, weight); a colon followed by no number is part of the source
    (a Windows drive, a name with a colon)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"loras: give PATH[:WEIGHT] (or NAME[:WEIGHT] on a server), got {text!r}")
    source, sep, tail = text.rpartition(":")
    if sep and source:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0
        return source, check_weight(weight)
    return text, 1.0


def lora_of(value: Any) -> LoRA:
    """One request LoRA from its spellings: a ``LoRA``; ``"PATH[:WEIGHT]"``; ``{"path", "weight"}``;
    a record entry ``{"file", "sha256", "weight"}`` (no path: the file must already be loaded)."""
    if isinstance(value, LoRA):
        return value
    if isinstance(value, str):
        return LoRA.from_path(*split_spec(value))
    if isinstance(value, Mapping):
        keys = set(value)
        if keys <= {"path", "weight"} and "path" in keys:
            return LoRA.from_path(value["path"], value.get("weight", 1.0))
        if keys <= {"file", "sha256", "weight"} and {"file", "sha256"} <= keys:
            return LoRA(value["file"], value["sha256"], value.get("weight", 1.0))
    raise ValueError(
        f"loras: a LoRA is PATH[:WEIGHT], {{path, weight}} or a record's {{file, sha256, weight}}, got {value!r}"
    )


def loras_of(value: Any) -> tuple[LoRA, ...]:
    """The ``loras`` field as the request holds it: a tuple of ``LoRA``, each file at most once."""
    if value is None:
        return ()
    if isinstance(value, str | Mapping | LoRA) or not isinstance(value, Iterable):
        value = [value]
    loras = tuple(lora_of(v) for v in value)
    seen: set[str] = set()
    for lora in loras:
        if lora.sha256 in seen:
            raise ValueError(f"loras: {lora.file!r} is given twice; give each LoRA once with its weight")
        seen.add(lora.sha256)
    return loras


def named_specs(value: Any) -> tuple[tuple[str, float], ...]:
    """A server request's ``loras``: ``NAME[:WEIGHT]`` strings or ``{"name", "weight"}`` objects →
    (name, weight) pairs, syntax only (``resolve_named`` looks the names up)."""
    if value is None:
        return ()
    if isinstance(value, str | Mapping) or not isinstance(value, Iterable):
        value = [value]
    out = []
    for v in value:
        if isinstance(v, str):
            out.append(split_spec(v))
        elif isinstance(v, Mapping) and "name" in v and set(v) <= {"name", "weight"}:
            if not isinstance(v["name"], str):
                raise ValueError(f"loras: a LoRA name must be a string, got {v['name']!r}")
            out.append((v["name"], check_weight(v.get("weight", 1.0))))
        else:
            raise ValueError(f"loras: give NAME[:WEIGHT] or {{name, weight}} per LoRA, got {v!r}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("loras: a LoRA is named twice; give each once with its weight")
    return tuple(out)


def resolve_named(specs: Iterable[tuple[str, float]], available: Mapping[str, LoRA]) -> tuple[LoRA, ...]:
    """(name, weight) pairs → the server's preloaded LoRAs with those weights; an unknown name is an
    error naming the field and the names there are."""
    out = []
    for name, weight in specs:
        if name not in available:
            there = ", ".join(sorted(available)) or "none"
            raise ValueError(f"loras: {name!r} is not one of this server's LoRAs (loaded: {there})")
        out.append(available[name].with_weight(weight))
    return tuple(out)


def preload(named: Mapping[str, str | Path]) -> dict[str, LoRA]:
    """A server's named set ``{NAME: PATH}`` as LoRAs (files checked and hashed, nothing loaded)."""
    out = {}
    for name, path in named.items():
        if not isinstance(name, str) or not name or ":" in name or "=" in name:
            raise ValueError(
                f"loras: a LoRA name must be a non-empty string without ':' or '=', got {name!r}"
            )
        out[name] = LoRA.from_path(path)
    return out


def parse_named(items: Iterable[str]) -> dict[str, str]:
    """``serve --lora NAME=PATH`` arguments → ``{NAME: PATH}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora: give NAME=PATH, got {item!r}")
        if name in out:
            raise ValueError(f"--lora: the name {name!r} is given twice")
        out[name] = path
    return out


# ---- on a loaded pipeline ---------------------------------------------------------------------


def check_engine(eager_torch: bool, loras: Iterable[LoRA], engine: Any) -> None:
    """LoRAs change the torch model's weights; an exported or compiled engine would silently ignore
    them, so only the eager torch engine takes them."""
    if tuple(loras) and not eager_torch:
        shown = engine if isinstance(engine, str) else type(engine).__name__
        raise ValueError(
            f"loras need the eager torch engine (an exported or compiled one ignores them), got {shown!r}"
        )


def loaded_adapters(pipe) -> set[str]:
    get = getattr(pipe, "get_list_adapters", None)
    if get is None:
        return set()
    try:
        listed = get()
    except ValueError:  # diffusers without its peft backend: nothing can be loaded
        return set()
    return {name for names in listed.values() for name in names}


def load(pipe, loras: Iterable[LoRA]) -> None:
    """Load each LoRA not loaded yet into ``pipe`` as its own adapter (diffusers' ``load_lora_weights``).
    A LoRA whose layers do not match the model is an error naming it, and leaves nothing behind."""
    loras = tuple(loras)
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"loras: {type(pipe).__name__} does not take LoRAs (diffusers has no LoRA loader for it)"
        )
    from .optional import require

    require("peft", "LoRA")
    have = loaded_adapters(pipe)
    for lora in loras:
        if lora.adapter in have:
            continue
        if lora.path is None:
            raise ValueError(
                f"loras: {lora.file!r} (sha256 {lora.sha256[:12]}...) is not loaded: give its path"
            )
        if file_sha256(Path(lora.path)) != lora.sha256:
            raise ValueError(f"loras: {lora.file!r} changed since it was read (sha256 differs)")
        try:
            pipe.load_lora_weights(lora.path, adapter_name=lora.adapter)
        except Exception as exc:  # diffusers / peft say "size mismatch", "target modules not found", ...
            _drop(pipe, lora.adapter)
            from .errors import first_line

            raise ValueError(f"loras: {lora.file!r} does not match this model ({first_line(exc)})") from None
        if lora.adapter not in loaded_adapters(pipe):
            _drop(pipe, lora.adapter)
            raise ValueError(f"loras: {lora.file!r} does not match this model (none of its layers are in it)")
        have.add(lora.adapter)


def _drop(pipe, adapter: str) -> None:
    if adapter in loaded_adapters(pipe):
        pipe.delete_adapters(adapter)


def activate(pipe, loras: Iterable[LoRA]) -> None:
    """Make exactly ``loras`` active with their weights (loading those not loaded yet); none: every
    loaded LoRA is switched off, so the pipeline samples as without them."""
    loras = tuple(loras)
    load(pipe, loras)
    if not loras:
        if loaded_adapters(pipe):
            pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([lora.adapter for lora in loras], [lora.weight for lora in loras])
