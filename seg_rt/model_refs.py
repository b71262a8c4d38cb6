"""Model references: what seg-rt accepts as ``--model`` / ``model:`` and what it shows of one.

One rule for every edge (``seg-rt generate|video|serve --model``, branch-parallel ranks, job files,
the serve config, ``fetch_model``):

- a model URL (``s3://bucket/models/sdxl``) must carry no credentials and no query or fragment
  (``user:password@``, presigned ``?X-Amz-Signature=...``): credentials come from the backend's own
  chain (environment, ``~/.aws``, instance roles). ``check_model_url`` refuses one with a line that
  shows the URL with its secret parts replaced (``redact``).
- what clients, records and logs see of a model is ``public_name``: a URL's last path segment, a
  local folder's name (the bundled demo model: ``seg-rt-demo``), a hub id as it is; never a URL nor
  a server path.
- no error message carries a credential: messages that quote a URL go through ``redact``.

Torch-free (the serve config and the job spec import it before anything loads).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

DEMO_MODEL_NAME = "seg-rt-demo"  # what clients see of the bundled demo model
DEMO_VIDEO_MODEL_NAME = "seg-rt-demo-video"  # and of the bundled demo video model

# scheme://userinfo@  and  ?query / #fragment of a URL inside any text
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]*@")
_QUERY = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"?#]*)[?#][^\s'\"]*")


def is_url(model: str) -> bool:
    """``scheme://...`` with a scheme other than ``file`` (a local path otherwise)."""
    scheme, sep, _ = str(model).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def redact(text: str) -> str:
    """``text`` with every URL's user info and query / fragment replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", str(text))
    return _QUERY.sub(lambda m: f"{m['head']}?***", text)


def check_model_url(model: str, what: str = "model") -> str:
    """``model`` unchanged, or ``ValueError`` (one line without the secret) for a URL that carries
    credentials, a query or a fragment. ``what`` names the field (``model``, ``output``)."""
    if not is_url(model):
        return model
    parts = urlsplit(model)
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in model or "#" in model:
        raise ValueError(
            f"{what} URL {redact(model)!r} carries credentials or query options; give "
            f"{parts.scheme}://bucket/prefix and put credentials in the environment / config chain "
            "(e.g. AWS_* variables, ~/.aws)"
        )
    return model


def public_name(model: str | Path) -> str:
    """What clients, PNG records and log lines see of ``model``: a URL's last path segment (its
    bucket when it has no path), a local folder's or file's name (``seg-rt-demo`` / ``seg-rt-demo-video``
    for the bundled demo models), anything else (a hub id) as it is."""
    text = str(model)
    if is_url(text):
        parts = urlsplit(text)
        segments = [s for s in parts.path.split("/") if s]
        return segments[-1] if segments else parts.netloc.rpartition("@")[2]
    local = text[len("file://") :] if text.lower().startswith("file://") else text
    path = Path(local)
    if path.is_file():  # a single-file checkpoint: its file name
        return path.name
    if not path.is_dir():
        return text
    from seg_rt.demo.model import is_demo_folder  # torch: only for a local folder
    from seg_rt.demo.video_model import is_demo_video_folder

    if is_demo_folder(path):
        return DEMO_MODEL_NAME
    return DEMO_VIDEO_MODEL_NAME if is_demo_video_folder(path) else path.resolve().name
