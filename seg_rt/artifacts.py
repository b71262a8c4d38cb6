"""What an exported denoiser is: the JSON sidecar written next to an ONNX model or TensorRT engine.

``seg_rt.export`` writes it and ``seg_rt.engines`` reads it, so it lives in the core. The same
record goes into the ONNX model's ``metadata_props`` (key ``seg_rt``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .config import parse_sigma, sigma_to_json
from .safe_load import loads_json

SIDECAR = "seg_rt.json"
RUNTIME_SIGMA = "runtime"
FORK_FIELDS = ("fork_block", "prefix_rows", "fork_rows", "twin_file")  # optional sidecar keys (in-graph fork)
VIDEO_FIELDS = ("frames", "seg_mode", "sigma_time")  # optional sidecar keys (video exports)
FORK_SOURCE = "fork_source"  # a fork graph's input: which prefix rows the forked rows copy (int64 [K])


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
    # in-graph shared-prefix fork (``seg-rt export onnx --fork``): the block where the perturbed rows
    # fork off, the prefix rows the per-row inputs hold, the fork rows ``fork_source`` gathers; None:
    # no fork (every row runs the whole model). Written only when set: older sidecars read unchanged.
    fork_block: str | None = None
    prefix_rows: int | None = None
    fork_rows: int | None = None
    # a fork export's unforked twin: the same model on the prefix rows only (no fork_source), run for
    # a step without perturbed rows, which the fork graph would spend its padded fork rows on
    twin_file: str | None = None
    # a video export (``seg_rt.video.export``): latent frames, the video SEG mode and its baked σ_time
    frames: int | None = None
    seg_mode: str | None = None
    sigma_time: float | None = None

    @property
    def rows(self) -> int:
        return self.batch * len(self.branches)

    @property
    def dynamic_sigma(self) -> bool:
        return self.sigma == RUNTIME_SIGMA

    def twin(self) -> ArtifactInfo:
        """The description of this fork export's twin graph: the prefix rows' layout (the branches
        but ``seg``), its inputs without ``fork_source``, its file; no fork, no twin."""
        if self.twin_file is None:
            raise ValueError(f"{self.kind} artifact has no unforked twin")
        return replace(
            self,
            branches=tuple(b for b in self.branches if b != "seg"),
            input_names=tuple(n for n in self.input_names if n != FORK_SOURCE),
            file=self.twin_file,
            fork_block=None,
            prefix_rows=None,
            fork_rows=None,
            twin_file=None,
        )

    @property
    def files(self) -> tuple[str, ...]:
        """The model / engine files the folder holds (the twin's too)."""
        return (self.file,) if self.twin_file is None else (self.file, self.twin_file)

    def to_json(self) -> str:
        d = asdict(self)
        for k in (*FORK_FIELDS, *VIDEO_FIELDS):
            if d[k] is None:
                del d[k]
        if isinstance(self.sigma, float):
            d["sigma"] = sigma_to_json(self.sigma)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "sidecar") -> ArtifactInfo:
        try:
            d = loads_json(text, source)
            names = {f.name for f in fields(cls)}
            missing = names - set(d) - {"versions", "extra", *FORK_FIELDS, *VIDEO_FIELDS}
            if missing:
                raise ValueError(f"missing {', '.join(sorted(missing))}")
            d = {k: v for k, v in d.items() if k in names}
            for k in ("branches", "input_names", "output_names", "layers", "layer_names", "blur_lengths"):
                d[k] = tuple(d[k])
            _check_file_name(d["file"])
            if d.get("twin_file") is not None:
                _check_file_name(d["twin_file"])
            if d["sigma"] != "runtime":  # a baked σ: a number or "inf" in JSON
                d["sigma"] = parse_sigma(d["sigma"])
            return cls(**d)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source} is not a seg-rt artifact description: {exc}") from None

    def write(self, folder: Path) -> Path:
        for name in self.files:
            _check_file_name(name)
        path = Path(folder) / SIDECAR
        path.write_text(self.to_json())
        return path


def read_info(folder: str | Path) -> ArtifactInfo:
    """Read ``folder/seg_rt.json``; a clear ``ValueError`` when the folder is not an export.

    The sidecar's ``file`` must name a file inside ``folder``: no path separators, no ``..``, and
    no symbolic link that resolves outside the folder (a sidecar from elsewhere cannot point an
    engine at an arbitrary file)."""
    folder = Path(folder)
    path = folder / SIDECAR
    if not folder.is_dir():
        raise FileNotFoundError(f"engine folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise ValueError(
            f"{str(folder)!r} is not a seg-rt export folder (no {SIDECAR}); run seg-rt export first"
        )
    info = ArtifactInfo.from_json(path.read_text(), source=str(path))
    for name in info.files:
        if not (folder / name).resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{path}: file {name!r} resolves outside its folder; refusing to load it")
    return info


def _check_file_name(name: object) -> None:
    """A sidecar ``file`` entry is one plain name inside the artifact folder."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or Path(name).is_absolute()
    ):
        raise ValueError(f"file must be a plain file name inside the folder, got {name!r}")


# -- output folders seg-rt owns ------------------------------------------------------------------

Owned = Callable[[Path], bool]


def is_export_folder(folder: Path) -> bool:
    """True when ``folder`` holds a seg-rt export and nothing else: a valid typed sidecar and only
    the files it names (the model / engine file and its external-data file)."""
    try:
        info = read_info(folder)
    except (OSError, ValueError):
        return False
    allowed = {SIDECAR, *info.files, *(f"{f}.data" for f in info.files)}
    return info.kind in ("onnx", "tensorrt") and all(p.name in allowed for p in Path(folder).iterdir())


def check_out_dir(
    out_dir: str | Path, owned: Owned, *, overwrite: bool = False, what: str = "export"
) -> None:
    """Refuse an output folder seg-rt may not replace, before any work is done.

    Allowed: a missing or empty folder; with ``overwrite``, a folder ``owned`` recognises as a
    seg-rt ``what`` (by its typed sidecar). Refused with one line: a symbolic link, the working
    directory or one of its parents, a file, and any other non-empty folder (seg-rt never
    deletes what it did not write)."""
    p = Path(out_dir)
    if p.is_symlink():
        raise ValueError(f"--out {str(p)!r} is a symbolic link; give a real folder path")
    resolved, cwd = p.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(
            f"--out {str(p)!r} is the working directory or one of its parents; give a new folder"
        )
    if not p.exists():
        return
    if not p.is_dir():
        raise ValueError(f"--out {str(p)!r} exists and is not a folder")
    if not any(p.iterdir()):
        return
    if not owned(p):
        raise ValueError(
            f"--out {str(p)!r} is a non-empty folder that is not a seg-rt {what}; "
            "give a new or empty folder (seg-rt never deletes what it did not write)"
        )
    if not overwrite:
        raise ValueError(f"--out {str(p)!r} already holds a seg-rt {what}; pass --overwrite to replace it")


@contextmanager
def staged_dir(
    out_dir: str | Path, owned: Owned, *, overwrite: bool = False, what: str = "export"
) -> Iterator[Path]:
    """Write a folder atomically: yield a temp folder beside ``out_dir``; on success it takes
    ``out_dir``'s place (mode per umask), on error it is removed and ``out_dir`` stays as it was.

    ``out_dir`` is checked first (:func:`check_out_dir`): only a missing or empty folder, or with
    ``overwrite`` a folder ``owned`` recognises, is replaced. A replaced folder is swapped out in
    one step (``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else rename old away /
    rename new in) and deleted only afterwards, so ``out_dir`` is never missing."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, owned, overwrite=overwrite, what=what)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        check_out_dir(out_dir, owned, overwrite=overwrite, what=what)  # unchanged while we worked?
        if out_dir.exists() and any(out_dir.iterdir()):
            swap_in(tmp, out_dir)  # tmp now holds the old artifact
        else:
            os.replace(tmp, out_dir)  # rename(2) replaces a missing or empty folder atomically
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)`` (glibc >= 2.28); the
    stdlib has no wrapper. False where the platform or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, out_dir: Path) -> None:
    """Put ``new`` at ``out_dir`` and the old ``out_dir`` at ``new`` (to be deleted by the caller)."""
    if _exchange(new, out_dir):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, old)  # old is an empty folder: replaced atomically
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    os.replace(old, new)  # new was renamed away, its name is free: the caller deletes it
