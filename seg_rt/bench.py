"""``seg-rt bench ...``: speed measured as ratios of alternating pairs in one process.

Shared machines are noisy, so nothing here is a timed test: each case times the baseline and the
candidate alternately (order swapped every pair) and reports the median of the per-pair ratios.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SEGAttention


def alternating_ratio(
    baseline: Callable[[], object], candidate: Callable[[], object], pairs: int, calls: int = 3
) -> dict:
    """Median of ``t(candidate) / t(baseline)`` over ``pairs`` alternating pairs, each timing ``calls``
    calls (after one warm-up each)."""
    baseline(), candidate()
    ratios, base_times = [], []
    for i in range(pairs):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[fn] = (time.perf_counter() - t0) / calls
        ratios.append(times[candidate] / times[baseline])
        base_times.append(times[baseline])
    return {
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_p25": round(statistics.quantiles(ratios, n=4)[0], 4),
        "ratio_p75": round(statistics.quantiles(ratios, n=4)[2], 4),
        "baseline_ms_median": round(1000 * statistics.median(base_times), 3),
    }


def _reference_blur_2d(img: torch.Tensor, sigma: float) -> torch.Tensor:
    # The reference SEG-SDXL blur (k×k depthwise conv2d, reflect pad), cap per axis as docs/design.md §1;
    # kept only as the cost baseline the separable op is measured against.
    c = math.ceil(6 * sigma)
    k0 = c + 1 - c % 2
    kh, kw = (min(k0, n if n % 2 else n + 1) for n in img.shape[-2:])

    def taps(k: int) -> torch.Tensor:
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        return (w / w.sum()).to(img.dtype)

    kernel = torch.outer(taps(kh), taps(kw)).expand(img.shape[-3], 1, kh, kw)
    img = F.pad(img, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    return F.conv2d(img, kernel, groups=img.shape[-3])


class _ReferenceSEGProcessor:
    """The reference code's processor (query blurred by 2D conv on every row) for the cost baseline."""

    def __init__(self, grid: tuple[int, int], sigma: float) -> None:
        self.grid, self.sigma = grid, sigma

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        h, w = self.grid
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (query, key, value))
        q = query.permute(0, 1, 3, 2).reshape(b, attn.heads * d, h, w)
        q = _reference_blur_2d(q, self.sigma)
        query = q.view(b, attn.heads, d, n).permute(0, 1, 3, 2)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def bench_attention_layer(
    grid: tuple[int, int], channels: int = 1280, heads: int = 20, sigma: float = 10.0, pairs: int = 30
) -> dict:
    """A whole diffusers self-attention layer with SEG on every row vs the same layer without SEG."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn1 = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).eval()
    attn = holder.attn1
    x = torch.randn(1, grid[0] * grid[1], channels)
    plain = AttnProcessor2_0()
    seg = SEGAttention(holder, sigma, ["attn1"]).install()
    seg_proc = attn.processor
    seg_proc.grid = grid
    seg.set_mask(torch.ones(1, dtype=torch.bool))
    reference = _ReferenceSEGProcessor(grid, sigma)

    def run(proc):
        def call():
            attn.processor = proc
            with torch.no_grad():
                attn(x)

        return call

    ours = alternating_ratio(run(plain), run(seg_proc), pairs)
    ref = alternating_ratio(run(plain), run(reference), pairs)
    seg.remove()
    return {
        "bench": "blur",
        "case": "self-attention layer, SEG vs no SEG",
        "tokens": f"{grid[0]}x{grid[1]}",
        "channels": channels,
        "heads": heads,
        "sigma": sigma,
        "pairs": pairs,
        "seg_ratio": ours["ratio_median"],
        "seg_ratio_iqr": [ours["ratio_p25"], ours["ratio_p75"]],
        "reference_conv_ratio": ref["ratio_median"],
        "layer_ms_no_seg": ours["baseline_ms_median"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def sd15_shaped_pipeline(width_scale: int = 5):
    """A tiny SD1.5 pipeline whose UNet has SD1.5's layout (4 levels, 2 layers per block, 8 heads,
    cross-attention in the first three) at 1/``width_scale`` of its channels (320 -> 64)."""
    from diffusers import UNet2DConditionModel

    from .tiny import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    c = 320 // width_scale
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(c, 2 * c, 4 * c, 4 * c),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,
        cross_attention_dim=768 // width_scale,
        norm_num_groups=32,
    ).eval()
    pipe.register_modules(unet=unet)
    return pipe


def bench_engines(pairs: int = 10, size: int = 256) -> list[dict]:
    """Per-step time of the SEG denoiser ([uncond, cond, perturbed] rows): torch eager vs ONNX Runtime
    CPU at several settings, each as an alternating-pair ratio against torch in this process."""
    import tempfile

    from seg_rt.engines import TorchDenoiser
    from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
    from seg_rt.export.onnx import example_inputs, export_onnx

    from .denoiser import SEGUNet

    pipe = sd15_shaped_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(pipe, f"{tmp}/onnx", height=size, width=size, sigma=2.0, validate=False)
        export_seconds = time.perf_counter() - t0
        probe = SEGUNet(pipe.unet, sigma=2.0)
        inputs = example_inputs(pipe, probe, 3, 1, size, size, torch.float32, seed=1)
        probe.remove()
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :77]
        settings = [("all", None), ("all", 1), ("extended", None), ("basic", None)]
        rows = []
        with TorchDenoiser(pipe.unet, sigma=2.0) as eager:
            for level, threads in settings:
                with OnnxRuntimeDenoiser(f"{tmp}/onnx", optimization=level, threads=threads) as engine:
                    err = (engine(inputs) - eager(inputs)).abs().max().item()
                    r = alternating_ratio(lambda e=engine: e(inputs), lambda: eager(inputs), pairs, calls=1)
                rows.append(
                    {
                        "bench": "engines",
                        "model": "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch), SEG on mid",
                        "latent": f"{size // 8}x{size // 8}",
                        "rows": 3,
                        "ort_optimization": level,
                        "ort_threads": threads or "default",
                        "speedup_ort_vs_torch": r["ratio_median"],
                        "speedup_iqr": [r["ratio_p25"], r["ratio_p75"]],
                        "ort_step_ms": r["baseline_ms_median"],
                        "max_abs_diff": err,
                        "pairs": pairs,
                        "export_seconds": round(export_seconds, 1),
                        "torch_threads": torch.get_num_threads(),
                    }
                )
    return rows


def bench_cluster(items: int = 24, steps: int = 8, batch_size: int = 2) -> list[dict]:
    """Images/s of ``seg-rt run`` with 1 and 2 CPU workers (1 CPU each) on one local Ray, and Ray's
    overhead: worker-seconds not spent inside ``run()`` as a fraction of the time that was."""
    import tempfile

    from seg_rt.cluster.jobs.driver import run_job, start_ray
    from seg_rt.cluster.jobs.spec import parse_job

    from .tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_pipeline("sdxl", f"{tmp}/model")
        ray = start_ray(None, num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="segrt-bench-", dir="/tmp"))
        stats = {}
        try:
            for workers in (1, 2):
                spec = parse_job({
                    "model": str(model), "steps": steps, "height": 64, "width": 64, "seg": {"sigma": 2.0},
                    "prompts": [f"prompt {k}" for k in range(items)], "batch_size": batch_size,
                    "workers": workers, "output": f"{tmp}/out{workers}",
                })  # fmt: skip
                r = run_job(spec, Path(tmp), progress=False)
                stats[workers] = {
                    "throughput": r.done / r.loop_seconds,
                    "overhead": (r.loop_seconds * workers - r.batch_seconds) / r.batch_seconds,
                    "ms_per_item": 1000 * r.compute_seconds / r.done,
                    "ms_overhead_per_batch": 1000 * (r.loop_seconds * workers - r.batch_seconds) / r.batches,
                    "startup_s": r.startup_seconds,
                }
        finally:
            ray.shutdown()
    return [{
        "bench": "cluster",
        "model": "tiny SDXL (random weights), 64x64, SEG + CFG",
        "items": items, "steps": steps, "batch_size": batch_size, "cpus_per_worker": 1,
        "throughput_1_worker": round(stats[1]["throughput"], 3),
        "throughput_2_workers": round(stats[2]["throughput"], 3),
        "scaling": round(stats[2]["throughput"] / stats[1]["throughput"], 3),
        "overhead_fraction": round(stats[1]["overhead"], 4),
        "overhead_fraction_2_workers": round(stats[2]["overhead"], 4),
        "ms_per_item_1_worker": round(stats[1]["ms_per_item"], 1),
        "ms_overhead_per_batch_1_worker": round(stats[1]["ms_overhead_per_batch"], 1),
        "worker_startup_s": round(stats[2]["startup_s"], 2),
    }, bench_multinode(), bench_branch_parallel(steps=steps)]  # fmt: skip


def bench_multinode(items: int = 12, steps: int = 4) -> dict:
    """A local 2-node Ray cluster (1 CPU slot per node): job throughput on 1 node (1 worker) vs 2
    nodes (2 workers), and the seconds from killing one node mid-job until the driver has put the
    lost worker's items back on the queue (the rest of that run is the surviving node's work)."""
    import tempfile
    import threading

    from seg_rt.cluster.jobs.driver import completed, run_job
    from seg_rt.cluster.jobs.spec import parse_job
    from seg_rt.cluster.localcluster import start_local_cluster

    from .optional import require
    from .tiny import save_tiny_pipeline

    ray = require("ray", "the cluster benchmark")
    row: dict = {"bench": "multinode", "model": "tiny SDXL (random weights), 64x64, SEG + CFG", "items": items,
                 "steps": steps, "cpus_per_node": 1}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_pipeline("sdxl", f"{tmp}/model")

        def spec(workers: int, out: str):
            return parse_job({"model": str(model), "steps": steps, "height": 64, "width": 64, "seg": {"sigma": 2.0},
                              "prompts": [f"prompt {k}" for k in range(items)], "workers": workers,
                              "output": f"{tmp}/{out}"})  # fmt: skip

        cluster = start_local_cluster(2)
        try:
            for workers in (1, 2):
                r = run_job(spec(workers, f"n{workers}"), Path(tmp), address=cluster.address, progress=False)
                row[f"throughput_{workers}_node{'s' if workers > 1 else ''}"] = round(
                    r.done / r.loop_seconds, 3
                )
            killed: list[float] = []

            def kill_once_items_land() -> None:
                deadline = time.monotonic() + 600
                while len(completed(f"{tmp}/loss")) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                killed.append(cluster.kill_node(1))

            threading.Thread(target=kill_once_items_land, daemon=True).start()
            r = run_job(spec(2, "loss"), Path(tmp), address=cluster.address, progress=False)
            row["recovery_s_after_node_loss"] = (
                round(r.loss_times[0] - killed[0], 2) if r.loss_times else None
            )
            row["items_rescheduled"], row["all_done_after_loss"] = r.rescheduled, r.ok and r.done == items
        finally:
            ray.shutdown()
            cluster.stop()
    row["scaling"] = round(row["throughput_2_nodes"] / row["throughput_1_node"], 3)
    return row


def bench_branch_parallel(steps: int = 8, size: int = 64, worlds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """Branch-parallel SEG on this machine: one image's step time with its rows split over 1, 2, 3
    gloo processes (1 CPU thread each), the median all_gather time per step inside the run (which
    includes waiting for the slowest rank), the exchange alone (all ranks released together) and its
    payload; and, in one process, the step time at 1, 2 and 3 rows (the compute split that the
    3-GPU projection in docs/benchmarks.md is derived from)."""
    import json
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from seg_rt.engines.parallel import bench_rank, free_address

    from .pipeline import generate, load_pipeline
    from .tiny import save_tiny_pipeline

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
            mp.spawn(bench_rank, args=(world, free_address(), model, out, steps, size), nprocs=world)
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


def bench_serve(
    requests: int = 24, steps: int = 25, size: int = 64, batch_wait_s: float = 0.002
) -> list[dict]:
    """Requests/s and p50/p95 latency at 1 and 8 concurrent HTTP clients (loopback) against the
    tiny model, and the server's latency overhead over a direct ``seg_rt.generate`` call."""
    import json
    import socket
    import tempfile
    import threading
    import urllib.request

    from ray import serve

    from seg_rt.cluster.jobs.driver import start_ray
    from seg_rt.cluster.serving.deployment import build_app

    from .pipeline import generate, load_pipeline
    from .tiny import save_tiny_pipeline

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny_pipeline("sdxl", f"{tmp}/model"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray = start_ray(None, num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="segrt-bench-", dir="/tmp"))
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"model": model, "num_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": batch_wait_s,
                                 "max_queued_requests": 64, "max_ongoing_requests": 16}), name="bench")  # fmt: skip
            url = f"http://127.0.0.1:{port}/v1/generate"

            def call(k: int) -> float:
                body = json.dumps(
                    {"prompt": f"prompt {k}", "seed": k, "steps": steps, "height": size, "width": size}
                )
                req = urllib.request.Request(
                    url, data=body.encode(), headers={"Content-Type": "application/json"}
                )
                t0 = time.perf_counter()
                with urllib.request.urlopen(req, timeout=300) as r:
                    r.read()
                return time.perf_counter() - t0

            call(10_000)  # warm-up
            pipe = load_pipeline(model, "cpu")
            threads_before = torch.get_num_threads()
            torch.set_num_threads(1)  # as the replica
            seq = iter(range(10**6))

            def direct() -> None:
                k = next(seq)
                generate(pipe, f"prompt {k}", seed=k, steps=steps, height=size, width=size)

            try:  # overhead: alternating (direct call, HTTP call) pairs, median ratio
                overhead = alternating_ratio(direct, lambda: call(next(seq)), pairs=requests // 2, calls=1)
            finally:
                torch.set_num_threads(threads_before)
            rows = []
            for clients in (1, 8):
                lat: list[float] = []

                def client(offset: int, clients: int = clients, lat: list = lat) -> None:
                    for k in range(offset, requests, clients):
                        lat.append(call(k))  # list.append is atomic under the GIL

                t0 = time.perf_counter()
                ts = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wall = time.perf_counter() - t0
                rows.append({"clients": clients, "rps": round(len(lat) / wall, 3),
                             "p50_ms": round(1000 * pct(lat, 0.5), 1), "p95_ms": round(1000 * pct(lat, 0.95), 1)})  # fmt: skip
        finally:
            serve.shutdown()
            ray.shutdown()
    return [{
        "bench": "serve",
        "model": f"tiny SDXL (random weights), {size}x{size}, {steps} steps, SEG + CFG, 1 CPU replica",
        "requests": requests,
        "batch_wait_timeout_s": batch_wait_s,
        **{f"{k}_{r['clients']}_client{'s' if r['clients'] > 1 else ''}": r[k] for r in rows for k in ("rps", "p50_ms", "p95_ms")},
        "direct_generate_p50_ms": overhead["baseline_ms_median"],
        "server_overhead_1_client": round(overhead["ratio_median"] - 1, 4),
        "server_overhead_iqr": [round(overhead["ratio_p25"] - 1, 4), round(overhead["ratio_p75"] - 1, 4)],
    }]  # fmt: skip


def sdxl_shaped_unet(width_scale: int = 5):
    """A random-weight UNet with SDXL's layout (3 levels, no attention in the first, 2 / 10
    transformer layers in the second / third, text-time embedding, linear projections) at
    1/``width_scale`` of its channels (320 -> 64) and text width (2048 -> 2048/``width_scale``)."""
    from diffusers import UNet2DConditionModel

    c = 320 // width_scale
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(c, 2 * c, 4 * c),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),  # heads per level (diffusers' name), 32 channels per head
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256 // width_scale,
        projection_class_embeddings_input_dim=6 * (256 // width_scale) + 1280 // width_scale,
        cross_attention_dim=2048 // width_scale,
        norm_num_groups=32,
    ).eval()


def step_inputs(unet: nn.Module, latent: int, n: int = 1, seed: int = 0):
    """(latents ``[n, 4, latent, latent]``, cond inputs, uncond inputs) of random values for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim

    def branch() -> dict[str, torch.Tensor]:
        d = {"encoder_hidden_states": torch.randn(n, 77, c, generator=g)}
        if unet.config.addition_embed_type == "text_time":
            pooled = (
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            )
            d["text_embeds"] = torch.randn(n, pooled, generator=g)
            d["time_ids"] = torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]] * n)
        return d

    return torch.randn(n, 4, latent, latent, generator=g), branch(), branch()


def move_inputs(inputs: tuple, device: torch.device | str, dtype: torch.dtype) -> tuple:
    """``step_inputs`` on ``device``, floating tensors in ``dtype``."""

    def move(v: torch.Tensor) -> torch.Tensor:
        return v.to(device, dtype if v.is_floating_point() else v.dtype)

    x, cond, uncond = inputs
    return move(x), {k: move(v) for k, v in cond.items()}, {k: move(v) for k, v in uncond.items()}


STEP_MODES = (
    "vanilla",
    "cfg_seg",
    "cfg_seg_shared",
    "cfg_pag",
    "seg_every_2",
    "seg_uncond",
    "seg_window_half",
)


def bench_step_case(
    unet: nn.Module,
    model: str,
    layers: Sequence[str],
    latent: int,
    pairs: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    modes: Sequence[str] = STEP_MODES,
) -> dict:
    """Time per denoising step of each mode as a ratio to the CFG step ([uncond, cond] rows), one
    image, alternating pairs in this process. ``cfg_seg`` is today's batched SEG (every row runs the
    whole UNet); ``cfg_seg_shared`` the shared-prefix forward (``seg_rt.denoiser.SharedPrefix``).
    The cheap modes' cost per step is their average over a schedule: ``seg_every_2`` and
    ``seg_window_half`` alternate a SEG step and a CFG step; ``seg_uncond`` runs two rows."""
    from seg_rt.engines import TorchDenoiser

    from .sampler import build_batch

    x, cond, uncond = move_inputs(step_inputs(unet, latent), device, dtype)
    t = torch.tensor(500.0, device=device)
    cuda = torch.device(device).type == "cuda"
    batch = {
        names: build_batch(list(names), x, t, cond, uncond)
        for names in (("cond",), ("uncond", "cond"), ("uncond", "cond", "seg"), ("seg_uncond", "cond"))
    }
    den = TorchDenoiser(unet, sigma=math.inf, layers=layers, shared_prefix=True)
    seg = den.model.seg

    def step(names: tuple[str, ...], shared: bool = True, perturbation: str = "blur") -> Callable[[], object]:
        inputs = batch[names] if shared else dict(batch[names])  # a plain dict: no host layout, no sharing

        def call() -> object:
            seg.perturbation = perturbation
            out = den(inputs)
            if cuda:  # host timers measure the GPU work
                torch.cuda.synchronize(device)
            return out

        return call

    cfg = step(("uncond", "cond"))
    seg_step = step(("uncond", "cond", "seg"))
    candidates = {
        "vanilla": (step(("cond",)), 1),
        "cfg_seg": (step(("uncond", "cond", "seg"), shared=False), 1),
        "cfg_seg_shared": (seg_step, 1),
        "cfg_pag": (step(("uncond", "cond", "seg"), perturbation="identity"), 1),
        "seg_every_2": (lambda: (seg_step(), cfg()), 2),  # SEG step, then a step reusing its delta
        "seg_uncond": (step(("seg_uncond", "cond")), 1),
        "seg_window_half": (lambda: (seg_step(), cfg()), 2),  # window [0, 0.5): half the steps
    }
    row = {
        "bench": "step",
        "model": model,
        "layers": list(layers),
        "latent": f"{latent}x{latent}",
        "pairs": pairs,
    }
    try:
        with torch.no_grad():
            for name in modes:
                fn, steps = candidates[name]
                r = alternating_ratio(cfg, fn, pairs, calls=1)
                row[f"{name}_over_cfg"] = round(r["ratio_median"] / steps, 4)
                row[f"{name}_over_cfg_iqr"] = [
                    round(r["ratio_p25"] / steps, 4),
                    round(r["ratio_p75"] / steps, 4),
                ]
                row["cfg_step_ms"] = r["baseline_ms_median"]
    finally:
        den.close()
    row |= {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    return row


def bench_step(pairs: int = 3) -> list[dict]:
    """``seg-rt bench step``: the step-cost ratios on an SD1.5-shaped UNet (32x32 latents, 256 px)
    and an SDXL-shaped one (16x16 latents; its 10-layer level dominates), both at 1/5 width to fit
    a 2-core CPU in ~3 minutes, for SEG layers ``mid`` and ``up``."""
    models = [
        (sd15_shaped_pipeline().unet, "SD1.5-shaped UNet at 1/5 width (64-128-256-256 ch)", 32),
        (sdxl_shaped_unet(), "SDXL-shaped UNet at 1/5 width (64-128-256 ch, 1/2/10 transformer layers)", 16),
    ]
    return [
        bench_step_case(unet, name, [layers], latent, pairs)
        for unet, name, latent in models
        for layers in ("mid", "up")
    ]


def run(what: str, pairs: int | None = None) -> list[dict]:
    if what == "blur":
        p = pairs or 40
        # SDXL 1024x1024 mid block (32x32 tokens) and 832x1216 (26x38 tokens), 1280 ch, 20 heads
        return [bench_attention_layer((32, 32), pairs=p), bench_attention_layer((26, 38), pairs=p)]
    if what == "engines":
        return bench_engines(pairs=pairs or 10)
    if what == "cluster":
        return bench_cluster()
    if what == "serve":
        return bench_serve()
    if what == "step":
        return bench_step(pairs=pairs or 3)
    raise ValueError(f"unknown benchmark {what!r}; available: blur, engines, cluster, serve, step")


def describe(row: dict) -> str:
    if row["bench"] == "step":
        return (
            f"{row['model']}, SEG {','.join(row['layers'])}: CFG step {row['cfg_step_ms']:.0f} ms; "
            + ", ".join(f"{m} {row[f'{m}_over_cfg']:.2f}x" for m in STEP_MODES)
        )
    if row["bench"] == "serve":
        return (
            f"1 client: {row['rps_1_client']} req/s p50 {row['p50_ms_1_client']} ms; 8 clients: "
            f"{row['rps_8_clients']} req/s p95 {row['p95_ms_8_clients']} ms; overhead {100 * row['server_overhead_1_client']:.1f}%"
        )
    if row["bench"] == "cluster":
        return (
            f"{row['throughput_1_worker']} img/s (1 worker), {row['throughput_2_workers']} img/s (2), "
            f"scaling {row['scaling']}x, Ray overhead {100 * row['overhead_fraction']:.1f}% of compute"
        )
    if row["bench"] == "multinode":
        return (
            f"{row['throughput_1_node']} img/s (1 node), {row['throughput_2_nodes']} img/s (2 nodes), "
            f"node loss seen after {row['recovery_s_after_node_loss']} s, {row['items_rescheduled']} item(s) rescheduled"
        )
    if row["bench"] == "branch-parallel":
        worlds = sorted(int(k.split("_")[2]) for k in row if k.startswith("step_ms_"))
        return ", ".join(
            f"{w} rank(s): {row[f'step_ms_{w}_ranks']} ms/step ({row[f'step_vs_one_device_{w}_ranks']}x one device), "
            f"exchange {row[f'exchange_ms_{w}_ranks']} ms ({row[f'comm_ms_per_step_{w}_ranks']} ms with waiting)"
            for w in worlds
        )
    if row["bench"] == "engines":
        return (
            f"ONNX Runtime ({row['ort_optimization']}, threads {row['ort_threads']}) vs torch eager: "
            f"{row['speedup_ort_vs_torch']:.2f}x faster, {row['ort_step_ms']:.0f} ms/step"
        )
    return (
        f"{row['case']} at {row['tokens']} tokens, {row['channels']} ch, σ={row['sigma']}: "
        f"SEG {row['seg_ratio']:.3f}x (reference conv blur {row['reference_conv_ratio']:.3f}x), "
        f"layer {row['layer_ms_no_seg']:.1f} ms"
    )
