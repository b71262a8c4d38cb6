"""Test-only helpers for Ray clusters the tests start themselves (never a global `ray stop`)."""

import contextlib
import os
import tempfile
import time

from seg_rt.cluster.localcluster import free_ports, kill_under


def short_temp_dir() -> str:
    # Ray puts unix sockets under its temp dir: keep the path short (108-byte socket path limit).
    return tempfile.mkdtemp(prefix="sr", dir="/tmp")


def free_port() -> int:
    return free_ports(1)[0]


LOOPBACK = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's address; 127.0.0.2 stays on lo


def kill_ray_under(temp_dir: str, timeout: float = 10.0) -> None:
    """Kill only the processes of the cluster we started under ``temp_dir``."""
    kill_under(temp_dir, timeout)
    time.sleep(0.2)


@contextlib.contextmanager
def local_nodes(monkeypatch, nodes: int = 2):
    """A Ray cluster of ``nodes`` nodes on loopback (``cluster.localcluster``) with token auth and fast
    node-death detection set in this process's environment (monkeypatch remembers the previous values);
    on exit Ray is shut down, the nodes stopped, the environment restored and Ray's cached auth
    re-read, so the next tests get theirs back."""
    import ray

    from seg_rt.cluster.jobs.driver import refresh_ray_auth
    from seg_rt.cluster.localcluster import FAST_NODE_DEATH, start_local_cluster

    for key, value in {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "segrt-test-" + os.urandom(8).hex(),
                       **FAST_NODE_DEATH}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    cluster = None
    try:
        cluster = start_local_cluster(nodes)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.stop()
        monkeypatch.undo()
        refresh_ray_auth()
