"""Where a job's outputs go: a local folder or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ...).

Both stores keep the same rule: an output is complete (durable, whole) before the manifest row that
names it is written, and a rerun trusts a row only if the output it names has the recorded size and
sha256 (see ``docs/design.md``, section "Engines, jobs, serving").

- :class:`LocalStore`: ``images/``, ``videos/``, ``contact/`` and one append-only ``manifest.jsonl``;
  files written with temp + rename + fsync (:func:`seg_rt.images.write_atomic`), the manifest opened
  without following symbolic links and fsynced line by line.
- :class:`FsspecStore`: the same names under the URL's prefix. An object store cannot append to an
  object, so the manifest is **one object per row** under ``manifest/``, named
  ``manifest/<run stamp>-<row number>.json``: an object PUT is visible only whole (no torn rows),
  rows of concurrent or later runs never collide, and reading them in name order gives the rows in
  the order they were written. Outputs are written with one whole-object PUT (``pipe_file``), which
  object stores (S3, GCS, Azure) make visible atomically.

Credentials come from the backend's own chain (for S3: botocore's environment variables,
``~/.aws`` config, instance roles; ``AWS_ENDPOINT_URL_S3`` for an S3-compatible server); a URL
carrying ``user:password@`` is refused by the job spec, so none is ever written to a manifest or log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Protocol

from seg_rt.artifacts import swap_in
from seg_rt.errors import first_line
from seg_rt.images import write_atomic
from seg_rt.model_refs import check_model_url, is_url, redact
from seg_rt.optional import require

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"  # local folders: one append-only file
MANIFEST_PREFIX = "manifest"  # object stores: one object per row


def parse_rows(texts: list[str], where: str) -> list[dict]:
    """Manifest rows: JSON objects naming an item; torn or garbage ones are skipped with one warning."""
    rows, bad = [], 0
    for text in texts:
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("item"), str):
            rows.append(row)
        elif text.strip():
            bad += 1
    if bad:
        logger.warning("%s: skipped %d unreadable line(s) (torn write or not a manifest row)", where, bad)
    return rows


def _safe_rel(rel: object) -> str | None:
    """A manifest ``path`` that stays inside the output (relative, no ``..``), else None."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return None
    return None if ".." in rel.split("/") else rel


class ManifestWriter(Protocol):
    def append(self, row: dict) -> None: ...
    def close(self) -> None: ...


class Store(Protocol):
    """The output location of one job (every name is relative, ``/``-separated)."""

    def write_atomic(self, name: str, data: bytes) -> None: ...
    def read(self, name: str) -> bytes: ...
    def exists(self, name: str) -> bool: ...
    def read_manifest(self) -> list[dict]: ...
    def open_manifest(self) -> ManifestWriter: ...
    def verified(self, row: dict) -> bool: ...


def _row_matches(data: bytes, row: dict) -> bool:
    return len(data) == row.get("bytes") and hashlib.sha256(data).hexdigest() == row["sha256"]


def _ok_row_path(row: dict) -> str | None:
    if row.get("status") != "ok" or not isinstance(row.get("sha256"), str):
        return None
    return _safe_rel(row.get("path"))


# ---- local folder ------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """Append-only ``manifest.jsonl``; every line flushed and fsynced before the next item.

    Opened without following symbolic links; a file whose last line was torn (no final newline)
    gets a newline first, so the torn fragment stays one skipped line and the next row survives."""

    def __init__(self, output: Path) -> None:
        output.mkdir(parents=True, exist_ok=True)
        path = _manifest_path(output)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self.f = os.fdopen(fd, "r+b")
        size = os.fstat(fd).st_size
        if size:
            self.f.seek(size - 1)
            if self.f.read(1) != b"\n":
                self._write(b"\n")
        _fsync_dir(output)  # the manifest's own directory entry

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()
        os.fsync(self.f.fileno())

    def append(self, row: dict) -> None:
        self._write((json.dumps(row, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        self.f.close()


def _manifest_path(output: Path) -> Path:
    path = output / MANIFEST
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; seg-rt only appends to a manifest it created")
    return path


class LocalStore:
    """A local output folder (the job's behaviour before object storage, unchanged)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def write_atomic(self, name: str, data: bytes) -> None:
        write_atomic(self.root / name, data)  # fsynced file and folder before any manifest row

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_manifest(self) -> list[dict]:
        path = _manifest_path(self.root)
        if not path.is_file():
            return []
        return parse_rows(path.read_text(errors="replace").splitlines(), str(path))

    def open_manifest(self) -> Manifest:
        return Manifest(self.root)

    def verified(self, row: dict) -> bool:
        """An ``ok`` row counts only if its file is a regular file inside the folder with the
        recorded size and sha256 (rows without them, or a file changed since, are redone)."""
        rel = _ok_row_path(row)
        if rel is None:
            return False
        path = self.root / rel
        try:
            if (
                path.is_symlink()
                or not path.resolve().is_relative_to(self.root.resolve())
                or not path.is_file()
            ):
                return False
            return path.stat().st_size == row.get("bytes") and sha256_file(path) == row["sha256"]
        except OSError:
            return False


# ---- fsspec URL --------------------------------------------------------------------------------


class _ObjectManifest:
    """One object per manifest row: ``manifest/<run stamp>-<row number>.json`` (see module doc)."""

    def __init__(self, store: FsspecStore) -> None:
        self.store = store
        # sortable across runs (UTC time first), unique across concurrent drivers (random suffix)
        self.stamp = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        self.rows = 0

    def append(self, row: dict) -> None:
        self.rows += 1
        name = f"{MANIFEST_PREFIX}/{self.stamp}-{self.rows:07d}.json"
        self.store.write_atomic(name, (json.dumps(row, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        pass


class FsspecStore:
    """Outputs under an fsspec URL; the filesystem and its credentials come from fsspec's own
    resolution (``fsspec.core.url_to_fs``: environment and config chain of the backend)."""

    def __init__(self, url: str) -> None:
        fsspec = require("fsspec", "job outputs on object storage")
        self.url = url.rstrip("/")
        self.fs, self.prefix = fsspec.core.url_to_fs(self.url)
        self.prefix = self.prefix.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def _path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def write_atomic(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)  # one whole-object PUT: visible only complete

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def exists(self, name: str) -> bool:
        return self.fs.isfile(self._path(name))

    def read_manifest(self) -> list[dict]:
        folder = self._path(MANIFEST_PREFIX)
        self.fs.invalidate_cache(folder)  # rows written since this process last listed
        try:
            names = sorted(p for p in self.fs.find(folder) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        if not names:
            return []
        blobs = self.fs.cat(names, on_error="omit")  # fetched concurrently by async backends
        texts = [blobs[n].decode(errors="replace") for n in names if n in blobs]
        return parse_rows(texts, f"{self.url}/{MANIFEST_PREFIX}/")

    def open_manifest(self) -> _ObjectManifest:
        return _ObjectManifest(self)

    def verified(self, row: dict) -> bool:
        """An ``ok`` row counts only if its object is there with the recorded size and sha256."""
        rel = _ok_row_path(row)
        if rel is None:
            return False
        try:
            return _row_matches(self.read(rel), row)
        except (FileNotFoundError, IsADirectoryError):
            return False


def open_store(output: str | Path, base: Path | None = None) -> LocalStore | FsspecStore:
    """The store for a job's ``output``: an fsspec URL, or a local path (relative to ``base``)."""
    if isinstance(output, str) and is_url(output):
        return FsspecStore(output)
    text = str(output)
    path = Path(text[len("file://") :] if text.lower().startswith("file://") else text)
    return LocalStore(path if path.is_absolute() or base is None else Path(base) / path)


# ---- model folders on object storage -------------------------------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.load / pickle formats
MODEL_CACHE_ENV = "SEG_RT_MODEL_CACHE"


def model_cache_dir() -> Path:
    """Where fetched model folders live: ``$SEG_RT_MODEL_CACHE`` or ``~/.cache/seg-rt/models``."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "seg-rt" / "models")


def fetch_model(url: str, cache_dir: str | Path | None = None) -> Path:
    """A diffusers model folder at an fsspec URL (``s3://bucket/models/sdxl``) as a local folder,
    fetched once per machine and reused by every worker on it.

    The cache entry is named by the URL and the remote listing (each file's relative path, size and
    ETag / modification time), so a changed object gives a new entry and an unchanged one is
    reused without a download. A fetch goes into a temp folder beside the cache and is renamed into
    place whole; concurrent workers race harmlessly (the loser drops its copy). Weights must be
    safetensors: a folder holding pickle formats (``.bin``, ``.pt``, ``.ckpt``, ...) is refused
    before any byte is fetched, and the pipeline loads with ``use_safetensors=True``."""
    check_model_url(url)  # no credentials / query in the URL (they would reach logs and records)
    fsspec = require("fsspec", "model folders on object storage")
    try:
        return _fetch(fsspec, url, cache_dir)
    except (ValueError, FileNotFoundError):
        raise  # our own lines, naming the credential-free URL
    except Exception as exc:  # botocore / fsspec: one line, any URL in it redacted
        raise OSError(f"model URL {url!r}: could not fetch: {redact(first_line(exc))}") from None


def _fetch(fsspec, url: str, cache_dir: str | Path | None) -> Path:
    fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    listing = fs.find(root, detail=True)  # {path: info}
    files = {p[len(root) + 1 :]: info for p, info in listing.items() if info.get("type") != "directory"}
    if not files:
        raise FileNotFoundError(f"model URL {url!r} holds no files")
    pickled = sorted(rel for rel in files if rel.lower().endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"model URL {url!r} holds pickle-format files ({', '.join(pickled[:3])}); seg-rt loads "
            "safetensors weights only: convert them (diffusers save_pretrained(safe_serialization=True))"
        )
    if not any(rel.endswith(".safetensors") for rel in files):
        raise ValueError(f"model URL {url!r} holds no .safetensors weights")
    for rel in files:
        if _safe_rel(rel) is None:
            raise ValueError(f"model URL {url!r} holds an unsafe object name {rel!r}")
    key = _listing_key(url, files)
    cache = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    target = cache / key
    # a listing with a version (ETag / modification time) for every file names its content; without
    # one, an object changed at the same size keeps its key: fetch and compare the content
    versioned = all(_version(info) is not None for info in files.values())
    cached = os.path.lexists(target)
    if cached:
        check_cache_entry(target, files, url)
        if versioned:
            logger.debug("model %s: cached at %s", url, target)
            return target
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    _warn_shared_root(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))  # mode 0700
    try:
        for rel, info in files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(dest))
            if info.get("size") is not None and dest.stat().st_size != info["size"]:
                raise OSError(f"model URL {url!r}: {rel} changed while it was fetched; try again")
        if cached and not versioned:
            if _same_content(tmp, target, files):
                shutil.rmtree(tmp, ignore_errors=True)
                logger.debug("model %s: cached at %s (content checked)", url, target)
                return target
            swap_in(tmp, target)  # the stale copy is now at tmp (readers keep their open files)
            shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(cache)
            logger.info("model %s: changed at the same size; fetched again into %s", url, target)
            return target
        try:
            os.rename(tmp, target)  # whole or not at all
        except OSError:
            if not target.is_dir():  # not another worker's finished copy: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _fsync_dir(cache)
            logger.info("model %s: fetched %d file(s) into %s", url, len(files), target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


VERSION_KEYS = ("ETag", "etag", "mtime", "LastModified", "Last-Modified", "last_modified", "generation")


def _version(info: dict):
    """An object's version in a backend's listing (ETag, modification time), None when it has none."""
    return next((info[k] for k in VERSION_KEYS if info.get(k)), None)


def _listing_key(url: str, files: dict) -> str:
    """The cache entry of a remote folder: sha256 over the URL and every (path, size, version)."""
    h = hashlib.sha256(url.rstrip("/").encode())
    for rel in sorted(files):
        info = files[rel]
        h.update(f"\n{rel}\t{info.get('size')}\t{_version(info)}".encode())
    return h.hexdigest()[:32]


def check_cache_entry(entry: Path, files: dict, url: str) -> None:
    """A cache entry is used only if this user wrote it: a real folder (no symbolic link) owned by
    the current user with mode 0700, holding the listing's files as regular files of the listed
    sizes. Anything else (an entry planted by another user of a shared cache root, a damaged one)
    is refused with one line; seg-rt deletes nothing it did not write."""
    st = os.lstat(entry)
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder (a symbolic link?)"
    elif st.st_uid != os.getuid():
        problem = f"is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    elif stat.S_IMODE(st.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    else:
        for rel, info in files.items():
            try:
                fst = os.lstat(entry / rel)
            except FileNotFoundError:
                problem = f"lacks {rel}"
                break
            if not stat.S_ISREG(fst.st_mode) or fst.st_uid != os.getuid():
                problem = f"holds {rel} as a link or another user's file"
                break
            if info.get("size") is not None and fst.st_size != info["size"]:
                problem = f"holds {rel} at {fst.st_size} bytes, the listing says {info['size']}"
                break
    if problem:
        raise ValueError(
            f"model cache entry {str(entry)!r} for {url!r} {problem}; remove it (or set "
            f"{MODEL_CACHE_ENV} to a folder of your own) and run again"
        )


def _warn_shared_root(cache: Path) -> None:
    mode = stat.S_IMODE(os.stat(cache).st_mode)
    if mode & 0o022:
        logger.warning(
            "model cache %s is writable by other users (mode %04o): entries are checked, but set %s "
            "to a folder of your own",
            cache,
            mode,
            MODEL_CACHE_ENV,
        )


def _same_content(a: Path, b: Path, files: dict) -> bool:
    return all(sha256_file(a / rel) == sha256_file(b / rel) for rel in files)


def resolve_model(model: str, cache_dir: str | Path | None = None) -> str:
    """``model`` as ``load_pipeline`` takes it: a URL fetched into the cache, anything else as is."""
    return str(fetch_model(model, cache_dir)) if is_url(model) else model
