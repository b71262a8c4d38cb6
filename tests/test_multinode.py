"""A job on a Ray cluster of several nodes on this machine that loses a node mid-job.

Head (no CPUs: it only hosts the GCS) + two worker nodes (1 CPU slot each), all `ray start` on
loopback with their own temp dirs and token auth (``seg_rt.cluster.localcluster``). The job runs
one worker per CPU slot (so one per node); once items land, one worker node is killed (its raylet,
agents and worker: SIGKILL). The driver must put that worker's in-flight items back on the queue,
the surviving node finishes the job, every item is recorded exactly once, and the bytes equal a
single-process run of the same items. Only this cluster's processes are killed (never `ray stop`).
"""

import threading
import time
from pathlib import Path

import pytest

from seg_rt.cluster.jobs.driver import completed, read_manifest, run_job
from seg_rt.cluster.jobs.spec import expand_items, parse_job

from .ray_helpers import local_nodes


def _reference_bytes(spec, base: Path) -> dict[str, bytes]:
    """The same items computed by one in-process worker (no Ray): the single-node result."""
    import torch

    from seg_rt.cluster.jobs.worker import SEGWorker

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
    out = tmp_path / "out"
    spec = parse_job({"model": str(sdxl_dir), "seg": {"scale": 3.0, "sigma": 2.0}, "cfg": 4.0, "steps": 3,
                      "height": 64, "width": 64, "prompts": ["a cat", "a dog", "a fox"], "samples_per_prompt": 4,
                      "seed": 7, "workers": 2, "output": str(out)})  # fmt: skip
    killed = threading.Event()

    def kill_node_once_items_land() -> None:
        deadline = time.monotonic() + 300
        while len(completed(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        cluster.kill_node(1)  # raylet, agents and the worker on that node
        killed.set()

    with local_nodes(monkeypatch, 2) as cluster:
        killer = threading.Thread(target=kill_node_once_items_land, daemon=True)
        killer.start()
        with caplog.at_level("INFO", logger="seg_rt"):
            result = run_job(spec, tmp_path, address=cluster.address, progress=False, start_timeout=240)
        killer.join(timeout=30)
    assert killed.is_set()
    assert len(set(result.start_nodes.values())) == 2  # one worker per node (CPU slot) at the start
    assert result.ok and result.done == 12 and result.restarts >= 1 and result.rescheduled >= 1
    summary = [r.getMessage() for r in caplog.records if "worker restart(s)" in r.getMessage()]
    assert len(summary) == 1 and "lost on node" in summary[0] and "item(s) rescheduled" in summary[0], summary
    ok = [r["item"] for r in read_manifest(out) if r["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 12  # exactly once
    written = {p.stem: p.read_bytes() for p in (out / "images").glob("*.png")}
    assert written == _reference_bytes(spec, tmp_path)
