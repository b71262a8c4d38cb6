"""The branch-parallel case of ``seg-rt bench cluster``: one image's step time with its rows split
over 1, 2, 3 gloo processes (``seg_rt.engines.parallel.BranchParallelDenoiser``), and the exchange."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seg_rt.pipeline import generate, load_pipeline
from seg_rt.tiny import save_tiny_pipeline


def bench_branch_parallel(steps: int = 8, size: int = 64, worlds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """Branch-parallel SEG on this machine: one image's step time with its rows split over 1, 2, 3
    gloo processes (1 CPU thread each), the median all_gather time per step inside the run (which
    includes waiting for the slowest rank), the exchange alone (all ranks released together) and its
    payload; and, in one process, the step time at 1, 2 and 3 rows (the compute split that the
    3-GPU projection in docs/benchmarks.md is derived from)."""
    import shutil

    from seg_rt.engines.parallel import private_rendezvous

    row: dict = {"bench": "branch-parallel", "model": f"tiny SD1.5 (random weights), {size}x{size}, SEG + CFG",
                 "steps": steps, "threads_per_rank": 1}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny_pipeline("sd15", f"{tmp}/model"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:  # one device, 1 thread: rows per step 3 (CFG + SEG), 2 (SEG, no CFG), 1 (neither)
            pipe = load_pipeline(model, "cpu")
            for rows, cfg, scale in ((3, 4.0, 3.0), (2, 1.0, 3.0), (1, 1.0, 0.0)):
                run = {"cfg": cfg, "seg_scale": scale, "seg_sigma": 2.0, "height": size, "width": size,
                       "output_type": "latent"}  # fmt: skip
                generate(pipe, "warm up", steps=1, **run)
                t0 = time.perf_counter()
                generate(pipe, "a red cube", steps=steps, **run)
                row[f"one_device_step_ms_{rows}_rows"] = round(1000 * (time.perf_counter() - t0) / steps, 1)
        finally:
            torch.set_num_threads(threads)
        for world in worlds:
            out = f"{tmp}/w{world}.json"
            address, folder = private_rendezvous()  # a file store: no TCP rendezvous listening
            try:
                mp.spawn(bench_rank, args=(world, address, model, out, steps, size), nprocs=world)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            stats = json.loads(Path(out).read_text())
            row[f"step_ms_{world}_ranks"] = round(stats["step_ms"], 1)
            row[f"comm_ms_per_step_{world}_ranks"] = round(stats["comm_ms_median"], 2)
            row[f"exchange_ms_{world}_ranks"] = round(stats["exchange_ms"], 3)
            row[f"exchange_kb_{world}_ranks"] = round(stats["payload_bytes"] / 1024, 1)
        for world in worlds:
            row[f"step_vs_one_device_{world}_ranks"] = round(
                row[f"step_ms_{world}_ranks"] / row["one_device_step_ms_3_rows"], 3
            )
    return row


def bench_rank(rank: int, world: int, address: str, model: str, out: str, steps: int, size: int) -> None:
    """One process of the branch-parallel case: one image, SEG + CFG over the whole schedule; rank 0
    writes step and exchange times (ms, after one warm-up step) to ``out``."""
    from seg_rt.engines import load_engine
    from seg_rt.engines.parallel import BranchParallelDenoiser, init_group

    torch.set_num_threads(1)
    init_group(rank, world, address)
    try:
        pipe = load_pipeline(model, "cpu")
        run = {"cfg": 4.0, "seg_scale": 3.0, "seg_sigma": 2.0, "height": size, "width": size,
               "output_type": "latent"}  # fmt: skip
        with BranchParallelDenoiser(load_engine("torch", pipe, "cpu")) as engine:
            generate(pipe, "warm up", steps=1, engine=engine, **run)
            engine.comm_seconds.clear()
            t0 = time.perf_counter()
            generate(pipe, "a red cube", steps=steps, engine=engine, **run)
            wall = time.perf_counter() - t0
            comm = list(engine.comm_seconds)
            exchange_s, payload = time_exchange(engine.block_shape, world)
        if rank == 0:
            stats = {"step_ms": 1000 * wall / steps, "comm_ms_median": 1000 * statistics.median(comm),
                     "exchange_ms": 1000 * exchange_s, "payload_bytes": payload}  # fmt: skip
            Path(out).write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


def time_exchange(block: tuple[int, ...], world: int, reps: int = 20) -> tuple[float, int]:
    """The exchange alone: seconds per ``all_gather`` of one step's prediction blocks, all ranks
    released together by a barrier (no waiting for a slow rank), and the bytes gathered per rank."""
    buf = torch.zeros(block)
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_gather(gathered, buf)
    return (time.perf_counter() - t0) / reps, world * buf.numel() * buf.element_size()


def describe(row: dict) -> str:
    worlds = sorted(int(k.split("_")[2]) for k in row if k.startswith("step_ms_"))
    return ", ".join(
        f"{w} rank(s): {row[f'step_ms_{w}_ranks']} ms/step ({row[f'step_vs_one_device_{w}_ranks']}x one device), "
        f"exchange {row[f'exchange_ms_{w}_ranks']} ms ({row[f'comm_ms_per_step_{w}_ranks']} ms with waiting)"
        for w in worlds
    )
