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


LOOPBACK = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's address; 127.0.0.2 stays on lo


def _mentions(proc: psutil.Process, temp_dir: str) -> bool:
    """The process names ``temp_dir`` in its command line or holds a file under it (Ray's agents
    rename their process title, so only their open log files tell where they belong)."""
    if any(temp_dir in part for part in proc.info["cmdline"] or []):
        return True
    with contextlib.suppress(psutil.Error):
        return any(f.path.startswith(temp_dir) for f in proc.open_files())
    return False


def kill_ray_under(temp_dir: str, timeout: float = 10.0) -> None:
    """Kill only the processes of the cluster we started under ``temp_dir``."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and _mentions(proc, temp_dir):
                mine.append(proc)
    for proc in mine:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(mine, timeout=timeout)
    time.sleep(0.2)
