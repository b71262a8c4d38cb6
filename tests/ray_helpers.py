"""Test-only helpers for Ray clusters the tests start themselves (never a global `ray stop`)."""

import socket
import tempfile
import time

from seg_rt.cluster.localcluster import kill_under


def short_temp_dir() -> str:
    # Ray puts unix sockets under its temp dir: keep the path short (108-byte socket path limit).
    return tempfile.mkdtemp(prefix="sr", dir="/tmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's address; 127.0.0.2 stays on lo


def kill_ray_under(temp_dir: str, timeout: float = 10.0) -> None:
    """Kill only the processes of the cluster we started under ``temp_dir``."""
    kill_under(temp_dir, timeout)
    time.sleep(0.2)
