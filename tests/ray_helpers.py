"""Test-only helpers for Ray clusters the tests start themselves (never a global `ray stop`)."""

import contextlib
import os
import signal
import socket
import tempfile
import time

import psutil


def short_temp_dir() -> str:
    # Ray puts unix sockets under its temp dir: keep the path short (108-byte socket path limit).
    return tempfile.mkdtemp(prefix="sr", dir="/tmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_ray_under(temp_dir: str, timeout: float = 10.0) -> None:
    """Kill only the processes whose command line names ``temp_dir`` (the cluster we started)."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and any(temp_dir in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
    for proc in mine:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(mine, timeout=timeout)
    time.sleep(0.2)
