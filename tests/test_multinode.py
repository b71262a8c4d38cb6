"""A job on a Ray cluster of several nodes on this machine that loses a node mid-job.

Head (no CPUs: it only hosts the GCS) + two worker nodes (1 CPU slot each), all `ray start` on
loopback with their own temp dirs and token auth. The job runs one worker per CPU slot (so one per
node); once items land, one worker node is killed (its raylet and workers, SIGKILL). The driver
must put that worker's in-flight items back on the queue, the surviving node finishes the job,
every item is recorded exactly once, and the bytes equal a single-process run of the same items.
Only the processes of this cluster are killed (never a global `ray stop`).
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from seg_rt.cluster.driver import completed, read_manifest, run_job
from seg_rt.cluster.spec import expand_items, parse_job

from .ray_helpers import LOOPBACK, free_port, kill_ray_under, short_temp_dir

BIN = Path(sys.executable).parent
# the GCS declares a silent node dead after ~3 missed 1 s health checks (Ray's default: ~30 s)
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}  # fmt: skip


def _ports(*flags: str) -> list[str]:
    # every fixed default port gets a free one: two raylets share this machine's address
    return [part for flag in flags for part in (flag, str(free_port()))]


def _start_cluster(env: dict, head_temp: str, node_temps: list[str]) -> str:
    port = free_port()
    head = [str(BIN / "ray"), "start", "--head", "--node-ip-address", LOOPBACK, "--port", str(port),
            "--num-cpus", "0", "--include-dashboard", "false", "--temp-dir", head_temp, "--disable-usage-stats",
            *_ports("--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                    "--object-manager-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port")]  # fmt: skip
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    for k, temp in enumerate(node_temps):
        low = 31000 + 500 * k  # disjoint worker port ranges for raylets on one address
        node = [str(BIN / "ray"), "start", "--address", f"{LOOPBACK}:{port}", "--node-ip-address", LOOPBACK,
                "--num-cpus", "1", "--resources", f'{{"segrt_test_node_{k}": 1}}', "--temp-dir", temp,
                "--disable-usage-stats", "--min-worker-port", str(low), "--max-worker-port", str(low + 499),
                *_ports("--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                        "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")]  # fmt: skip
        subprocess.run(node, env=env, check=True, capture_output=True, timeout=120)
    return f"{LOOPBACK}:{port}"


def _reference_bytes(spec, base: Path) -> dict[str, bytes]:
    """The same items computed by one in-process worker (no Ray): the single-node result."""
    import torch

    from seg_rt.cluster.worker import SEGWorker

    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(spec.model_dump(mode="json"), "ref")
        return {row["item"]: row["png"] for row in worker.run(expand_items(spec, base))}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_node_lost_mid_job_items_rescheduled_on_the_survivor_each_written_once(
    sdxl_dir, tmp_path, monkeypatch, caplog
):
    import ray
    from ray._raylet import Config

    token = "segrt-test-" + os.urandom(8).hex()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **FAST_NODE_DEATH}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    Config.initialize("")  # this process (the driver) speaks token auth too
    head_temp, node_temps = short_temp_dir(), [short_temp_dir(), short_temp_dir()]
    out = tmp_path / "out"
    spec = parse_job({"model": str(sdxl_dir), "seg": {"scale": 3.0, "sigma": 2.0}, "cfg": 4.0, "steps": 3,
                      "height": 64, "width": 64, "prompts": ["a cat", "a dog", "a fox"], "samples_per_prompt": 4,
                      "seed": 7, "workers": 2, "output": str(out)})  # fmt: skip
    killed = threading.Event()

    def kill_node_once_items_land() -> None:
        deadline = time.monotonic() + 300
        while len(completed(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_ray_under(node_temps[1])  # raylet, agents and the worker on that node
        killed.set()

    try:
        address = _start_cluster({**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}, head_temp, node_temps)
        killer = threading.Thread(target=kill_node_once_items_land, daemon=True)
        killer.start()
        with caplog.at_level("INFO", logger="seg_rt"):
            result = run_job(spec, tmp_path, address=address, progress=False, start_timeout=240)
        killer.join(timeout=30)
    finally:
        ray.shutdown()
        for temp in [*node_temps, head_temp]:
            kill_ray_under(temp)
        monkeypatch.undo()
        Config.initialize("")
    assert killed.is_set()
    assert len(set(result.start_nodes.values())) == 2  # one worker per node (CPU slot) at the start
    assert result.ok and result.done == 12 and result.restarts >= 1 and result.rescheduled >= 1
    summary = [r.getMessage() for r in caplog.records if "worker restart(s)" in r.getMessage()]
    assert len(summary) == 1 and "lost on node" in summary[0] and "item(s) rescheduled" in summary[0], summary
    ok = [r["item"] for r in read_manifest(out) if r["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 12  # exactly once
    written = {p.stem: p.read_bytes() for p in (out / "images").glob("*.png")}
    assert written == _reference_bytes(spec, tmp_path)
