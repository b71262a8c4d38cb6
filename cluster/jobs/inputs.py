"""A job's input images: ``init_image`` / ``mask`` given as files in the job's folder (relative paths
stay inside it, as ``prompts_file``) or as object-store URLs, checked when the job is parsed and
loaded per item (``job_image``) into the request's ``InputImage``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seg_rt.errors import first_line
from seg_rt.optional import require
from seg_rt.params import fields_for

IMAGE_TYPES = ("image", "mask")  # request fields whose job value is a file reference, not pixels
IMAGE_KEYS = tuple(f.key for f in fields_for("image") if f.type in IMAGE_TYPES)


def check_task_field(key: str, value: Any) -> Any:
    """A task field's own rule (their combination is checked per item, naming its prompt)."""
    from seg_rt.tasks import check_mask_blur, check_strength

    if value is None:
        return value
    if key in IMAGE_KEYS:
        return check_image_ref(value, key)
    return check_strength(value) if key == "strength" else check_mask_blur(value)


def check_image_ref(value: Any, key: str) -> str:
    """An init image / mask reference of a job: a path (relative: inside the job's folder, as
    ``prompts_file``) or an object-store URL without credentials. Loaded per item (``job_image``)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a path or an object-store URL, got {value!r}")
    from seg_rt.models import is_url

    if is_url(value):
        from .spec import check_output_url

        return check_output_url(value, key)
    rel = Path(value)
    if not rel.is_absolute() and ".." in rel.parts:
        raise ValueError(f"{key} {value!r} leaves the job's folder; give a path inside it (no '..')")
    return value


def job_file(value: str, key: str, base: Path) -> Path:
    """A relative file reference of a job resolved in its folder: it must stay inside (no symbolic
    link out), as ``prompts_file`` on submit."""
    rel = Path(value)
    if rel.is_absolute():
        return rel
    path = (base / rel).resolve()
    if ".." in rel.parts or not path.is_relative_to(Path(base).resolve()):
        raise ValueError(
            f"{key} {value!r} leaves the job's folder; give a path inside it (no '..', no link out)"
        )
    return path


def image_files(spec, base: Path) -> list[str]:
    """The relative init image / mask files a job names (job-level and per prompt line), each checked
    to stay inside the job's folder: what ``seg-rt submit`` copies with the job file."""
    from seg_rt.models import is_url

    refs = [getattr(spec, key) for key in IMAGE_KEYS]
    if spec.prompts_file is not None:
        from .spec import read_prompts

        refs += [getattr(o, key) for o in read_prompts(spec, base) for key in IMAGE_KEYS]
    out = []
    for key, ref in zip(IMAGE_KEYS * (len(refs) // len(IMAGE_KEYS)), refs, strict=True):
        if ref is not None and not is_url(ref) and not Path(ref).is_absolute() and ref not in out:
            job_file(ref, key, base)
            out.append(ref)
    return out


def job_image(value: str, key: str, base: Path):
    """A job's ``init_image`` / ``mask`` reference as the request's ``InputImage``: a file in the job's
    folder (or absolute), or an object-store URL read through fsspec (the job's credentials chain)."""
    from seg_rt.models import is_url
    from seg_rt.tasks import load_image

    mode = "L" if key == "mask" else "RGB"
    what = key.replace("_", " ")
    if is_url(value):
        fsspec = require("fsspec", "object-store inputs")
        try:
            with fsspec.open(value, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as exc:
            raise ValueError(f"{what} {value!r} cannot be read: {first_line(exc)}") from None
        return load_image(data, what, mode=mode)
    return load_image(job_file(value, key, base), what, mode=mode)
