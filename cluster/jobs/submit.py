"""Submit a job file to a Ray cluster as a Ray job (``ray job submit`` through the Python SDK).

The job file (and its prompts file) travel in a small ``working_dir``; the entrypoint is
``seg-rt run JOB --address auto`` on the cluster, where seg-rt must be installed. Ray's token auth
is respected: the client reads ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / the default token file
as Ray does. Only ``RAY_AUTH_MODE`` is passed on to the job: the token itself would be stored in
the job record (readable by anyone who can list jobs); the job's driver runs on the head and reads
the head's token as every Ray process there does.

Everything the job file names is checked before Ray is contacted: a relative ``prompts_file`` must
stay inside the job's folder (no ``..``, no symbolic link out), and ``output`` must be absolute
(a relative one would land in Ray's temporary copy of the working dir and vanish with it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from seg_rt.errors import EnvironmentUnavailable, first_line
from seg_rt.models import is_url
from seg_rt.optional import require

from .spec import input_files, load_job

AUTH_ENV = ("RAY_AUTH_MODE",)  # never the token: the job record keeps its runtime env


TRANSIENT = ("No available agent", "status code 503")  # a head that is still starting


def _auth_error(address: str) -> EnvironmentUnavailable:
    return EnvironmentUnavailable(
        f"Ray at {address} rejected the auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
    )


def _client(cls, address: str):
    from ray.exceptions import AuthenticationError

    try:
        return cls(address)
    except AuthenticationError:
        raise _auth_error(address) from None
    except ConnectionError as exc:
        raise EnvironmentUnavailable(
            f"cannot reach the Ray dashboard at {address}: {first_line(exc)[:300]}"
        ) from None
    except RuntimeError as exc:
        raise EnvironmentUnavailable(
            f"Ray dashboard at {address} refused the client: {first_line(exc)[:300]}"
        ) from None


def _with_retry(call, address: str, wait_s: float = 90.0):
    """Retry while the head's job agent is still starting; other errors are one clear line."""
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except AuthenticationError:
            raise _auth_error(address) from None
        except RuntimeError as exc:
            text = str(exc)
            if any(t in text for t in TRANSIENT) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            if "401" in text or "403" in text:
                raise _auth_error(address) from None
            raise EnvironmentUnavailable(
                f"Ray job submission to {address} failed: {first_line(exc)[:300]}"
            ) from None


def entrypoint(job_name: str) -> str:
    """The shell command Ray runs for the job (through ``/bin/sh``): the file name is quoted, so a
    name with spaces or ``;`` is one argument and never a second command."""
    return f"seg-rt run {shlex.quote(job_name)} --address auto --no-progress"


def check_submittable(spec, base: Path) -> None:
    """What ``seg-rt run`` accepts locally but a submitted job cannot honour safely.

    - ``output`` relative: it would resolve inside Ray's temporary working-dir copy on the cluster
      and be deleted with it, so submit refuses it (an absolute path on the cluster is required).
    - ``prompts_file`` relative: copied into the staging folder at the same relative path, so it
      must stay inside the job's folder: no ``..`` and no symbolic link resolving outside it; the same
      for relative ``init_image`` / ``mask`` files (job-level and per prompt line).
    """
    if not Path(spec.output).is_absolute() and not is_url(spec.output):
        raise ValueError(
            f"job: output: submit needs an absolute path on the cluster, got {spec.output!r} "
            "(a relative output would land in Ray's temporary copy of the working dir)"
        )
    input_files(spec, base)  # relative init images / masks stay inside the job's folder
    if not spec.prompts_file or Path(spec.prompts_file).is_absolute():
        return
    rel = Path(spec.prompts_file)
    source = (base / rel).resolve()
    if ".." in rel.parts or not source.is_relative_to(Path(base).resolve()):
        raise ValueError(
            f"job: prompts_file: {spec.prompts_file!r} leaves the job's folder; give a path inside it "
            "(no '..', no symbolic link out) or an absolute path on the cluster"
        )


def submit(
    job_path: str | Path, address: str, *, follow: bool = False, timeout_s: float | None = None
) -> tuple[str, str | None]:
    """Submit; return (submission id, final status if ``follow`` else None)."""
    require("ray", "submitting jobs")
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec, base = load_job(job_path)  # validate before sending anything
    job_path = Path(job_path)
    check_submittable(spec, base)
    staging = Path(tempfile.mkdtemp(prefix="segrt-job-"))
    try:
        shutil.copy(job_path, staging / job_path.name)
        if spec.prompts_file and not Path(spec.prompts_file).is_absolute():
            target = staging / spec.prompts_file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(base / spec.prompts_file, target)
        for name in input_files(spec, base):  # init images / masks, at the same relative paths
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(base / name, target)
        env = {k: os.environ[k] for k in AUTH_ENV if os.environ.get(k)}
        client = _client(JobSubmissionClient, address)
        job_id = _with_retry(
            lambda: client.submit_job(
                entrypoint=entrypoint(job_path.name),
                runtime_env={"working_dir": str(staging), "env_vars": env},
                metadata={"tool": "seg-rt", "job": job_path.name},
            ),
            address,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not follow:
        return job_id, None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printed = 0
    while True:
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status)
        if deadline is not None and time.monotonic() > deadline:
            return job_id, str(status)
        time.sleep(1.0)
