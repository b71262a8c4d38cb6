"""Branch-parallel SEG on CPU through the public entry points: the rows of each step split over 2 or
3 gloo processes equal the one-device run (scale-relative 1e-5) and are deterministic (a rerun is
bit-equal), for SD1.5, SDXL, the image DiTs (SD3, Flux) and a video family (AnimateDiff)."""

import pytest
import torch

from seg_rt import BranchParallel, generate
from seg_rt.engines.parallel import check_backend, row_split
from seg_rt.pipeline import load_pipeline, run_params
from seg_rt.tiny import save_tiny_dit_pipeline, save_tiny_pipeline, save_tiny_video_pipeline

from .ray_helpers import local_nodes
from .sockets import listening, not_on_loopback
from .tolerance import max_rel_error

# SEG window ends half-way: later steps have 2 rows per image, so with 3 ranks one rank has none
RUN = {"prompt": "a red cube", "steps": 3, "cfg": 4.0, "seg_scale": 3.0, "seg_sigma": 2.0, "height": 64,
       "width": 64, "seed": 5, "seg_end": 0.5, "output_type": "latent"}  # fmt: skip
VIDEO = {"prompt": "a cat", "frames": 3, "height": 32, "width": 48, "steps": 2, "cfg": 3.0, "seg_sigma": 2.0,
         "seg_sigma_time": 1.0, "seed": 2, "output_type": "latent"}  # fmt: skip


def test_row_split_is_contiguous_balanced_and_rank0_first():
    assert row_split(3, 3) == [1, 1, 1] and row_split(3, 2) == [2, 1] and row_split(2, 3) == [1, 1, 0]
    assert row_split(6, 2) == [3, 3] and row_split(4, 3) == [2, 1, 1]
    for rows in range(1, 10):
        for world in range(1, 5):
            sizes = row_split(rows, world)
            assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1 and sizes[0] >= 1


def _one_thread(fn, *args, **kwargs):
    """The one-device reference with one thread, as each rank runs (CPU results depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "ranks", "images"), [("sd15", 2, 1), ("sd15", 3, 1), ("sdxl", 3, 2)])
def test_branch_parallel_generate_equals_the_one_device_run(family, ranks, images, tmp_path):
    from seg_rt.engines.branch import ProcessBranchGroup

    model = str(save_tiny_pipeline(family, tmp_path / family))
    one = _one_thread(generate, load_pipeline(model, "cpu"), num_images=images, **RUN)
    # one group, two runs: the same result twice (deterministic), ranks loaded once
    with ProcessBranchGroup(BranchParallel(ranks=ranks), model, threads=1) as group:
        params = _params(images)
        first = group.run("images", params, "latent")
        again = group.run("images", params, "latent")
        calls = group.run("comm_seconds")
        if ranks == 2:  # a request every rank refuses: the error comes back and the group ends
            procs = list(group._procs)
            # docs/security.md: the ranks listen on loopback only (a file:// rendezvous, no TCPStore)
            assert listening([p.pid for p in procs]) and not_on_loopback([p.pid for p in procs]) == []
            with pytest.raises(ValueError, match="height must be a positive multiple of"):
                group.run("images", [params[0].replace(height=61)], "latent")
            assert not any(p.is_alive() for p in procs)
    assert first.shape == one.shape
    assert torch.equal(first, again)
    assert len(calls) == 2 * RUN["steps"]  # one exchange per step
    assert max_rel_error(first, one) <= 1e-5


def _params(images: int):
    from seg_rt import GenerationParams, SEGConfig

    base = GenerationParams(
        prompt=RUN["prompt"], steps=RUN["steps"], cfg=RUN["cfg"], height=64, width=64,
        seg=SEGConfig(scale=3.0, sigma=2.0, end=0.5),
    )  # fmt: skip
    return [base.replace(seed=RUN["seed"] + i) for i in range(images)]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_branch_parallel_video_equals_the_one_device_run(ranks, tmp_path):
    from seg_rt.video.sampling import generate_video

    model = str(save_tiny_video_pipeline("animatediff", tmp_path / "ad"))
    one = _one_thread(generate_video, load_pipeline(model, "cpu"), **VIDEO)
    split = generate_video(model, parallel=BranchParallel(ranks=ranks), **VIDEO)
    again = generate_video(model, parallel=BranchParallel(ranks=ranks), **VIDEO)
    assert split.shape == one.shape
    assert torch.equal(split, again)
    assert max_rel_error(split, one) <= 1e-5


def test_bad_parallel_options_fail_before_any_process_starts():
    assert BranchParallel.of(2) == BranchParallel(ranks=2) and BranchParallel.of(1) is None
    assert BranchParallel.of(None) is None and BranchParallel(ranks=2, device="cuda").backend == "nccl"
    with pytest.raises(ValueError, match="branch parallel launcher must be one of processes, ray, got 'mpi'"):
        BranchParallel(ranks=2, launcher="mpi")
    with pytest.raises(ValueError, match="branch parallel ranks must be an integer >= 1, got 0"):
        BranchParallel(ranks=0)
    with pytest.raises(ValueError, match="placement strategy must be one of"):
        BranchParallel(strategy="ANYWHERE")
    pipe_like = object()
    with pytest.raises(ValueError, match="give the model as a folder or hub id, not a loaded object"):
        generate(pipe_like, parallel=2, **RUN)
    with pytest.raises(ValueError, match="branch parallel takes no callback argument"):
        generate("unused", parallel=2, callback=lambda *a: None, **RUN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_nccl_without_gpus_fails_with_a_clear_message():
    with pytest.raises(RuntimeError, match="NCCL, which needs CUDA GPUs; none is visible here"):
        check_backend("nccl", 2)
    with pytest.raises(RuntimeError, match="NCCL, which needs CUDA GPUs"):
        generate("unused", parallel=BranchParallel(ranks=2, device="cuda"), **RUN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_nccl_without_gpus_is_one_line(tmp_path, capsys):
    from seg_rt.cli import main

    code = main(["generate", "--model", str(tmp_path), "--branch-parallel", "2", "--parallel-device", "cuda",
                 "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("none is visible here (use device 'cpu' for gloo)")


def _cli_one_and_split(model: str, height: int, width: int, ranks: int, tmp_path):
    """``seg-rt generate`` on one device and with ``--branch-parallel ranks``: (flags, both images)."""
    import numpy as np
    from PIL import Image

    from seg_rt.cli import main

    flags = ["generate", "--model", model, "--steps", "2", "--height", str(height), "--width", str(width),
             "--seed", "3", "--seg-sigma", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "one.png")]) == 0
    assert main([*flags, "--out", str(tmp_path / "split.png"), "--branch-parallel", str(ranks)]) == 0
    one, split = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("one", "split"))
    return flags, one, split


@pytest.mark.slow
def test_cli_branch_parallel_writes_the_image_of_the_one_device_run(tmp_path, capsys):
    import numpy as np

    from seg_rt.cli import main

    model = str(save_tiny_pipeline("sd15", tmp_path / "sd15"))
    flags, one, split = _cli_one_and_split(model, 64, 64, 3, tmp_path)
    assert np.abs(one - split).max() <= 1  # latents within 1e-5: at most one 8-bit rounding step apart
    assert main([*flags, "--out", str(tmp_path / "x.png"), "--branch-parallel", "2", "--device", "cpu"]) == 2
    assert "--device does not apply with --branch-parallel" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_branch_parallel_image_dit_equals_the_one_device_run(family, tmp_path):
    """The ranks load the DiT's own denoiser through the family (this was an AttributeError on
    every rank: the ranks called a loader that no longer existed)."""
    from seg_rt import GenerationParams, SEGConfig
    from seg_rt.engines.branch import ProcessBranchGroup

    model = str(save_tiny_dit_pipeline(family, tmp_path / family))
    request = GenerationParams(prompt="a red cube", steps=2, cfg=3.0, height=48, width=80, seed=4,
                               seg=SEGConfig(scale=3.0, sigma=2.0))  # fmt: skip
    one = _one_thread(run_params, load_pipeline(model, "cpu"), [request], output_type="latent")
    with ProcessBranchGroup(BranchParallel(ranks=2), model, threads=1) as group:
        split = group.run("images", [request], "latent")
    assert split.shape == one.shape and one.shape[0] == 1
    assert max_rel_error(split, one) <= 1e-5


@pytest.mark.slow
def test_cli_branch_parallel_on_sd3_writes_the_image_of_the_one_device_run(tmp_path):
    import numpy as np

    model = str(save_tiny_dit_pipeline("sd3", tmp_path / "sd3"))
    _, one, split = _cli_one_and_split(model, 48, 80, 2, tmp_path)
    assert one.shape == (48, 80, 3)
    assert np.abs(one - split).max() <= 1  # latents within 1e-5: at most one 8-bit rounding step apart


@pytest.mark.slow
def test_ray_ranks_in_a_strict_spread_placement_group_over_two_nodes(tmp_path, monkeypatch):
    """Two Ray nodes on loopback (1 CPU each); STRICT_SPREAD puts one rank on each; the result
    equals the one-device run and the ranks exchange over gloo between the nodes."""

    from seg_rt.cluster.branch import RayBranchGroup

    model = str(save_tiny_pipeline("sd15", tmp_path / "sd15"))
    one = _one_thread(generate, load_pipeline(model, "cpu"), **RUN)
    with local_nodes(monkeypatch, 2) as cluster:
        spec = BranchParallel(ranks=2, launcher="ray", strategy="STRICT_SPREAD", address=cluster.address)
        with RayBranchGroup(spec, model, threads=1) as group:
            nodes = group.nodes()
            split = group.run("images", _params(1), "latent")
        with pytest.raises(
            RuntimeError, match=r"placement group of 3 x \{'CPU': 1\} \(STRICT_SPREAD\) was not placed"
        ):
            RayBranchGroup(BranchParallel(ranks=3, launcher="ray", strategy="STRICT_SPREAD"), model,
                           ready_timeout_s=3)  # fmt: skip
    assert len(set(nodes)) == 2
    assert max_rel_error(split, one) <= 1e-5


@pytest.mark.slow
def test_serving_latency_mode_answers_with_the_one_device_image(tmp_path):
    """The Ray-free serving core with ``branch_parallel: 2``: the ranks sample, the replica only
    checks requests; the image equals the one-device core's (within one 8-bit step)."""
    import numpy as np

    from seg_rt.cluster.serving.config import ServeConfig
    from seg_rt.cluster.serving.core import ServingCore
    from seg_rt.cluster.serving.request import make_request

    model = str(save_tiny_pipeline("sd15", tmp_path / "sd15"))
    req = make_request(prompt="a red cube", steps=2, height=64, width=64, seed=9, seg_sigma=2.0)
    cores = [ServingCore.load(ServeConfig(model=model, branch_parallel=n)) for n in (1, 2)]
    try:
        assert cores[1].group is not None and cores[1].info()["branch_parallel"] == 2
        images = [core.run_batch([core.check(req)])[0][0] for core in cores]
        with pytest.raises(ValueError, match="height must be a positive multiple of"):
            cores[1].check(make_request(prompt="x", height=61, width=64))  # checked by the replica
    finally:
        for core in cores:
            core.close()
    one, split = (np.asarray(im, dtype=int) for im in images)
    assert np.abs(one - split).max() <= 1


def test_serve_latency_mode_puts_the_ranks_in_the_replica_placement_group():
    from seg_rt.cluster.serving.deployment import build_app
    from seg_rt.demo.model import weights_dir

    app = build_app({"model": str(weights_dir()), "branch_parallel": 3, "num_cpus_per_replica": 2})
    deployment = app._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 0  # the ranks hold the devices
    assert deployment._replica_config.placement_group_bundles == [{"CPU": 2.0}] + [{"CPU": 1}] * 3
    assert deployment._replica_config.placement_group_strategy == "PACK"
    with pytest.raises(ValueError, match="branch parallel device must be one of cpu, cuda, got 'tpu'"):
        build_app({"model": str(weights_dir()), "branch_parallel": 2, "branch_parallel_device": "tpu"})
