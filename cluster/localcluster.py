"""A throwaway multi-node Ray cluster on this machine (``ray start`` head + worker nodes on
loopback), for ``seg-rt bench cluster`` and the node-loss test.

Each node has its own 0700 temp dir, so a node is "lost" by killing exactly the processes that
belong to its temp dir (raylet, agents, workers) and nothing else on the machine (never a global
``ray stop``). Token auth as for every Ray that seg-rt starts (``driver._private_ray_env``); the
token lives in the environment of this process and the nodes it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .jobs.driver import _private_ray_env, private_temp_dir

BIN = Path(sys.executable).parent
# the GCS declares a silent node dead after 3 missed 1 s health checks (Ray's default: ~30 s)
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}  # fmt: skip
_NODE_PORTS = ("--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")  # fmt: skip


_GIVEN: set[int] = set()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, none handed out before by this process: the kernel may
    hand a port just closed to the next bind (one CI run got the same port for ``--port`` and
    ``--object-manager-port``), so all ``n`` sockets stay bound until every port is picked."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _GIVEN:
                _GIVEN.add(port)
                ports.append(port)
    return ports


def _ports(flags) -> list[str]:
    # every fixed default port gets a free one: the raylets share this machine's address
    return [
        part for flag, port in zip(flags, free_ports(len(flags)), strict=True) for part in (flag, str(port))
    ]


@dataclass
class LocalCluster:
    """Head (no CPUs: it hosts only the GCS) + ``len(node_dirs)`` worker nodes."""

    address: str
    head_dir: str
    node_dirs: list[str] = field(default_factory=list)

    def kill_node(self, k: int) -> float:
        """SIGKILL every process of worker node ``k``; returns ``time.perf_counter()`` at the kill."""
        t = time.perf_counter()
        kill_under(self.node_dirs[k])
        return t

    def stop(self) -> None:
        for folder in [*self.node_dirs, self.head_dir]:
            kill_under(folder)


def start_local_cluster(nodes: int, cpus_per_node: int = 1) -> LocalCluster:
    """Start the cluster (token auth in this process's environment first, fast node-death detection)."""
    _private_ray_env()
    os.environ.update(FAST_NODE_DEATH)
    # several raylets need Ray's multi-node mode, in which ray rewrites 127.0.0.1 to the machine's
    # address: 127.0.0.2 stays on lo, but Ray then binds its servers to the wildcard address
    # (docs/security.md: a test and benchmark cluster, not seg-rt run / serve's)
    ip = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"
    (port,) = free_ports(1)
    head_dir = private_temp_dir()
    cluster = LocalCluster(f"{ip}:{port}", head_dir)
    try:
        head = [str(BIN / "ray"), "start", "--head", "--node-ip-address", ip, "--port", str(port), "--num-cpus", "0",
                "--include-dashboard", "false", "--temp-dir", head_dir, "--disable-usage-stats",
                *_ports((*_NODE_PORTS, "--ray-client-server-port"))]  # fmt: skip
        subprocess.run(head, check=True, capture_output=True, timeout=120)
        for k in range(nodes):
            folder = private_temp_dir()
            cluster.node_dirs.append(folder)
            low = 31000 + 500 * k  # disjoint worker port ranges for raylets on one address
            node = [str(BIN / "ray"), "start", "--address", cluster.address, "--node-ip-address", ip,
                    "--num-cpus", str(cpus_per_node), "--temp-dir", folder, "--disable-usage-stats",
                    "--min-worker-port", str(low), "--max-worker-port", str(low + 499), *_ports(_NODE_PORTS)]  # fmt: skip
            subprocess.run(node, check=True, capture_output=True, timeout=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def kill_under(folder: str, timeout: float = 10.0) -> None:
    """SIGKILL the processes that name ``folder`` in their command line or hold a file under it
    (Ray's agents rename their process title, so only their open log files tell)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and _mentions(proc, folder):
                mine.append(proc)
    for proc in mine:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(mine, timeout=timeout)


def _mentions(proc, folder: str) -> bool:
    import psutil

    if any(folder in part for part in proc.info["cmdline"] or []):
        return True
    with contextlib.suppress(psutil.Error):
        return any(f.path.startswith(folder) for f in proc.open_files())
    return False
