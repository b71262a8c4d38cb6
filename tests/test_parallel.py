"""Branch-parallel SEG on CPU: the rows of each step split over 2 or 3 gloo processes equal the
batched run (scale-relative 1e-5), and every rank ends with the same latents."""

from pathlib import Path

import pytest
import torch

from seg_rt.engines.parallel import row_split

from .ray_helpers import free_port
from .tolerance import max_rel_error

# SEG window ends half-way: later steps have 2 rows per image, so with 3 ranks one rank has none
RUN = {"prompt": "a red cube", "steps": 4, "cfg": 4.0, "seg_scale": 3.0, "seg_sigma": 2.0, "height": 64,
       "width": 64, "seed": 5, "seg_end": 0.5, "output_type": "latent"}  # fmt: skip


def test_row_split_is_contiguous_balanced_and_rank0_first():
    assert row_split(3, 3) == [1, 1, 1] and row_split(3, 2) == [2, 1] and row_split(2, 3) == [1, 1, 0]
    assert row_split(6, 2) == [3, 3] and row_split(4, 3) == [2, 1, 1]
    for rows in range(1, 10):
        for world in range(1, 5):
            sizes = row_split(rows, world)
            assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1 and sizes[0] >= 1


def _rank(rank: int, world: int, address: str, model: str, out: str, images: int) -> None:
    """One process of the group: the whole sampling loop, with only the denoiser call split."""
    import torch.distributed as dist

    from seg_rt import generate
    from seg_rt.engines import load_engine
    from seg_rt.engines.parallel import BranchParallelDenoiser, init_group
    from seg_rt.pipeline import load_pipeline

    torch.set_num_threads(1)
    init_group(rank, world, address)
    try:
        pipe = load_pipeline(model, "cpu")
        with BranchParallelDenoiser(load_engine("torch", pipe, "cpu")) as engine:
            latents = generate(pipe, engine=engine, num_images=images, **RUN)
            comm = list(engine.comm_seconds)
        torch.save({"latents": latents, "calls": len(comm), "comm": comm}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "world", "images"), [("sd15", 2, 1), ("sd15", 3, 1), ("sdxl", 3, 2)])
def test_branch_parallel_equals_the_batched_run(family, world, images, tmp_path):
    import torch.multiprocessing as mp

    from seg_rt import generate
    from seg_rt.pipeline import load_pipeline
    from seg_rt.tiny import save_tiny_pipeline

    model = str(save_tiny_pipeline(family, tmp_path / family))
    mp.spawn(
        _rank, args=(world, f"tcp://127.0.0.1:{free_port()}", model, str(tmp_path), images), nprocs=world
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched = generate(load_pipeline(model, "cpu"), num_images=images, **RUN)
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["calls"] == RUN["steps"]  # one exchange per step
    for r in ranks[1:]:
        assert torch.equal(r["latents"], ranks[0]["latents"])  # identical guidance on every rank
    assert ranks[0]["latents"].shape == batched.shape
    assert max_rel_error(ranks[0]["latents"], batched) <= 1e-5
