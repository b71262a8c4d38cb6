"""#27 leftovers without a Ray cluster: a request's memory bound (item 8), the infeasible-resource
rule on a joined cluster (item 7), what the private Ray is asked to bind (item 2)."""

from __future__ import annotations

import os

import pytest

from seg_rt.cli import main


def _demo():
    from seg_rt.demo.model import weights_dir

    return str(weights_dir())


def test_a_4000_square_request_on_the_demo_model_is_refused_at_once(capsys, monkeypatch, tmp_path):
    """``seg-rt generate --height 4000 --width 4000`` sampled for minutes and was killed by the
    kernel; now one line, exit 2, before anything samples."""
    import seg_rt.pipeline

    monkeypatch.delenv("SEG_RT_MAX_MEMORY_GB", raising=False)
    monkeypatch.setattr(seg_rt.pipeline, "sample", lambda *a, **k: pytest.fail("sampling started"))
    rc = main(["generate", "--height", "4000", "--width", "4000", "--steps", "1", "--no-progress",
               "--out", str(tmp_path / "o.png")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err  # and nothing sampled (sample fails the test)
    assert err[-1].startswith("seg-rt: error: 1 image(s) of 4000x4000 need about "), err
    assert "SEG_RT_MAX_MEMORY_GB" in err[-1] and not list(tmp_path.iterdir())


def test_memory_estimate_is_the_stated_formula_and_the_bound_is_configurable(monkeypatch):
    """The estimate recomputed here from the demo UNet's config (module docstring of seg_rt/memory.py);
    ``SEG_RT_MAX_MEMORY_GB`` moves the bound both ways; a bad value is one line."""
    from seg_rt.errors import RequestTooLarge
    from seg_rt.families import family_of
    from seg_rt.memory import check_memory, estimate_bytes
    from seg_rt.pipeline import load_pipeline

    pipe = load_pipeline(_demo(), "cpu")
    family = family_of(pipe, "image")
    cfg = pipe.unet.config
    rows, side = 2 * 3, 64  # 2 images, CFG + SEG rows
    latent = side * side  # no VAE: the demo samples pixels
    # self-attention lives in the CrossAttn blocks and the mid block; heads = attention_head_dim
    levels = [i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t] + [
        len(cfg.down_block_types) - 1
    ]
    maps = max(rows * cfg.attention_head_dim * (latent // 4**lv) * min(latent // 4**lv, 1024) * 2 * 4
               for lv in levels)  # fmt: skip
    activations = rows * max(cfg.block_out_channels) * latent * 4 * 16
    params = sum(p.numel() * 4 for p in pipe.unet.parameters())
    assert estimate_bytes(pipe, family, 2, side, side) == params + maps + activations
    monkeypatch.setenv("SEG_RT_MAX_MEMORY_GB", str((params + maps + activations) / 2**30 * 0.99))
    with pytest.raises(RequestTooLarge, match=r"2 image\(s\) of 64x64 need about"):
        check_memory(pipe, family, 2, side, side)
    monkeypatch.setenv("SEG_RT_MAX_MEMORY_GB", str((params + maps + activations) / 2**30 * 1.01))
    check_memory(pipe, family, 2, side, side)
    monkeypatch.setenv("SEG_RT_MAX_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="SEG_RT_MAX_MEMORY_GB must be a number of GB, got 'lots'"):
        check_memory(pipe, family, 2, side, side)


def test_job_workers_refuse_a_too_big_request_and_report_allocation_failures_in_one_line(
    monkeypatch, tmp_path
):
    import torch

    import seg_rt.cluster.jobs.worker as worker_module
    from seg_rt.cluster.jobs.spec import parse_job
    from seg_rt.cluster.jobs.worker import SEGWorker
    from seg_rt.errors import RequestTooLarge

    monkeypatch.delenv("SEG_RT_MAX_MEMORY_GB", raising=False)
    big = parse_job({"model": _demo(), "prompts": ["a"], "output": str(tmp_path / "o"), "height": 4000,
                     "width": 4000, "steps": 1})  # fmt: skip
    with pytest.raises(RequestTooLarge, match=r"1 image\(s\) of 4000x4000 need about"):
        SEGWorker(big.model_dump(mode="json"), "w0")  # at load, before any item samples
    spec = parse_job({"model": _demo(), "prompts": ["a"], "output": str(tmp_path / "o"), "steps": 1})
    worker = SEGWorker(spec.model_dump(mode="json"), "w0")

    def huge(*a, **k):
        return torch.empty(2**46, dtype=torch.uint8)  # 64 TiB: torch's CPU allocator refuses it

    monkeypatch.setattr(worker_module, "run_params", huge)
    from seg_rt.cluster.jobs.spec import expand_items

    [result] = worker.run(expand_items(spec, tmp_path))
    assert result["error"].startswith("out of memory: DefaultCPUAllocator") and "\n" not in result["error"]


class _Config:
    def __init__(self, groups):
        self.node_group_configs = groups


class _Group:
    def __init__(self, resources, max_count):
        self.resources, self.max_count = resources, max_count


class _Ray:
    @staticmethod
    def nodes():
        return [{"Alive": True, "Resources": {"CPU": 4.0}}]


def test_infeasible_request_on_a_joined_cluster_unless_an_autoscaler_can_add_it(monkeypatch):
    """The rule of driver.refuse_unplaceable for ``--address``: no autoscaling config published (a
    cluster of ``ray start`` nodes) or none of its node types holds a worker: refused at once; a
    node type that holds one (may still start): left to the start timeout."""
    from ray._private.state import state

    from seg_rt.cluster.jobs.driver import refuse_unplaceable
    from seg_rt.cluster.jobs.spec import Resources
    from seg_rt.errors import EnvironmentUnavailable

    gpu = Resources(num_cpus=1, num_gpus=1)
    for config, refused in [
        (None, "it has no autoscaler to add one"),
        (_Config([_Group({"CPU": 8}, -1), _Group({"CPU": 8, "GPU": 1}, 0)]), "no node type its autoscaler"),
        (_Config([_Group({"CPU": 8, "GPU": 2}, 4)]), None),
    ]:
        monkeypatch.setattr(state, "get_cluster_config", lambda c=config: c)
        if refused is None:
            refuse_unplaceable(_Ray, gpu, "10.0.0.1:6379")
        else:
            with pytest.raises(EnvironmentUnavailable, match=refused):
                refuse_unplaceable(_Ray, gpu, "10.0.0.1:6379")
    refuse_unplaceable(_Ray, Resources(num_cpus=2, num_gpus=0), "10.0.0.1:6379")  # a node holds it


def test_private_ray_is_asked_for_loopback_binding_and_no_metrics(monkeypatch, tmp_path):
    """What start_ray sets while Ray starts (the real sockets: tests/test_serve.py::
    test_serve_and_its_ray_listen_on_loopback_only): node address 127.0.0.1 in Ray's single-machine
    mode (so its servers bind loopback), no dashboard, no metrics exporter; the process gets Ray's
    multi-node default back afterwards."""
    import ray
    from ray._private import ray_constants

    from seg_rt.cluster.jobs import driver

    seen = {}

    def fake_init(**kw):
        seen.update(kw, single=not ray_constants.ENABLE_RAY_CLUSTER,
                    env=os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                    metrics=os.environ.get("RAY_enable_metrics_collection"))  # noqa: SIM112  # fmt: skip

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_enable_metrics_collection"):
        monkeypatch.setenv(key, os.environ.get(key, "token" if key == "RAY_AUTH_MODE" else "x"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    before = ray_constants.ENABLE_RAY_CLUSTER
    driver.start_ray(None, num_cpus=1, temp_dir=str(tmp_path / "rt"))
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["include_dashboard"] is False
    assert seen["single"] and seen["env"] == "0" and seen["metrics"] == "0"
    assert (
        before == ray_constants.ENABLE_RAY_CLUSTER and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    )
    from seg_rt.cluster.jobs.driver import refresh_ray_auth

    monkeypatch.undo()
    refresh_ray_auth()
