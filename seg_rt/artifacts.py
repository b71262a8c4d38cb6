"""What an exported denoiser is: the JSON sidecar written next to an ONNX model or TensorRT engine.

``seg_rt.export`` writes it and ``seg_rt.engines`` reads it, so it lives in the core. The same
record goes into the ONNX model's ``metadata_props`` (key ``seg_rt``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .config import sigma_to_json

SIDECAR = "seg_rt.json"
RUNTIME_SIGMA = "runtime"


@dataclass(frozen=True)
class ArtifactInfo:
    """Shapes, SEG settings and provenance of an exported SEG denoiser."""

    kind: str  # "onnx" or "tensorrt"
    family: str
    model: str
    height: int  # pixels
    width: int
    latent_height: int
    latent_width: int
    batch: int  # images per branch
    branches: tuple[str, ...]  # row layout, e.g. ("uncond", "cond", "seg")
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dtype: str  # "float32" / "float16"
    sigma: float | str  # baked σ (inf allowed) or "runtime"
    layers: tuple[str, ...]  # the selectors given at export, e.g. ("mid",)
    layer_names: tuple[str, ...]  # the self-attention modules they resolved to
    blur_lengths: tuple[int, ...]  # axis lengths of the runtime blur-matrix inputs (dynamic σ)
    opset: int
    file: str  # model / engine file name inside the folder
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. TensorRT precision, GPU, profile

    @property
    def rows(self) -> int:
        return self.batch * len(self.branches)

    @property
    def dynamic_sigma(self) -> bool:
        return self.sigma == RUNTIME_SIGMA

    def to_json(self) -> str:
        d = asdict(self)
        if isinstance(self.sigma, float):
            d["sigma"] = sigma_to_json(self.sigma)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "sidecar") -> ArtifactInfo:
        try:
            d = json.loads(text)
            names = {f.name for f in fields(cls)}
            missing = names - set(d) - {"versions", "extra"}
            if missing:
                raise ValueError(f"missing {', '.join(sorted(missing))}")
            d = {k: v for k, v in d.items() if k in names}
            for k in ("branches", "input_names", "output_names", "layers", "layer_names", "blur_lengths"):
                d[k] = tuple(d[k])
            if d["sigma"] == "inf":
                d["sigma"] = math.inf
            return cls(**d)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source} is not a seg-rt artifact description: {exc}") from None

    def write(self, folder: Path) -> Path:
        path = Path(folder) / SIDECAR
        path.write_text(self.to_json())
        return path


def read_info(folder: str | Path) -> ArtifactInfo:
    """Read ``folder/seg_rt.json``; a clear ``ValueError`` when the folder is not an export."""
    folder = Path(folder)
    path = folder / SIDECAR
    if not folder.is_dir():
        raise FileNotFoundError(f"engine folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise ValueError(
            f"{str(folder)!r} is not a seg-rt export folder (no {SIDECAR}); run seg-rt export first"
        )
    return ArtifactInfo.from_json(path.read_text(), source=str(path))


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yield a temp folder beside ``out_dir``; on success it replaces
    ``out_dir`` (mode per umask), on error it is removed and ``out_dir`` stays as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
