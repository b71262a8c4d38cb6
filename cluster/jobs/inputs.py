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


def image_files(spec, base: Path, prompts: list | None = None) -> list[str]:
    """The relative init image / mask files a job names (job-level and per prompt line), each checked
    to stay inside the job's folder: what ``seg-rt submit`` copies with the job file."""
    from seg_rt.models import is_url

    refs = [getattr(spec, key) for key in IMAGE_KEYS]
    for o in prompts or ():  # the prompts file's lines (spec.read_prompts)
        refs += [getattr(o, key) for key in IMAGE_KEYS]
    out = []
    for key, ref in zip(IMAGE_KEYS * (len(refs) // len(IMAGE_KEYS)), refs, strict=True):
        if ref is not None and not is_url(ref) and not Path(ref).is_absolute() and ref not in out:
            job_file(ref, key, base)
            out.append(ref)
    return out


def input_file(value: str, key: str, base: Path | None = None) -> Path | bytes:
    """The one resolver of a job's input files (init image, mask, a video's still): an object-store
    URL (no credentials: ``check_output_url``) is read here through fsspec (the job's credentials
    chain); a path is resolved in the job's folder ``base`` and must stay inside it (``job_file``)."""
    from seg_rt.models import is_url

    check_image_ref(value, key)
    if is_url(value):
        fsspec = require("fsspec", "object-store inputs")
        try:
            with fsspec.open(value, "rb") as f:
                return f.read()
        except (OSError, ValueError) as exc:
            raise ValueError(f"{key.replace('_', ' ')} {value!r} cannot be read: {first_line(exc)}") from None
    return job_file(value, key, base) if base is not None else Path(value).expanduser()


def job_image(value: str, key: str, base: Path):
    """A job's ``init_image`` / ``mask`` reference as the request's ``InputImage`` (``input_file``)."""
    from seg_rt.tasks import load_image

    return load_image(
        input_file(value, key, base), key.replace("_", " "), mode="L" if key == "mask" else "RGB"
    )


def check_output_url(output: str, what: str = "output") -> str:
    """A local path, or an fsspec URL (``s3://bucket/prefix``) with no credentials in it: they come
    from the backend's own environment / config chain, so none lands in a spec, manifest or log.
    ``what`` names the field in the messages (``output``, ``model``)."""
    from urllib.parse import urlsplit

    from seg_rt.model_refs import check_model_url, is_url

    if not is_url(check_model_url(output, what)):  # the one URL rule (no credentials, no query)
        return output
    parts = urlsplit(output)
    try:
        import fsspec
    except ImportError:  # checked again when the job starts, with the install hint
        return output
    if parts.scheme not in fsspec.available_protocols():
        raise ValueError(
            f"{what} URL scheme {parts.scheme!r} is not an fsspec protocol; give a local path or e.g. s3://bucket/prefix"
        )
    if not parts.netloc:
        raise ValueError(f"{what} URL {output!r} names no bucket; give {parts.scheme}://bucket/prefix")
    return output
