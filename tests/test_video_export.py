"""Video DiT exports (``seg-rt export video``, ``seg_rt.video.export``): CogVideoX, Wan and LTX-Video tiny
models traced with video SEG, with and without the in-graph fork, served by ``generate_video(engine=...)``.

Each engine is checked against the PyTorch path (``VideoDenoiser``, with the shared prefix for the fork
exports), an independent code path, within a scale-relative bound.
"""

from __future__ import annotations

import json

import pytest
import torch

from seg_rt.artifacts import read_info
from seg_rt.engines.onnxruntime import OnnxRuntimeDenoiser
from seg_rt.sampler import build_batch
from seg_rt.video.attention import VideoBlur
from seg_rt.video.export import export_video_onnx
from seg_rt.video.sampling import VideoDenoiser, generate_video

from .test_fork_export import LAYOUTS, _count_runs
from .tolerance import assert_close

pytestmark = pytest.mark.slow

LAST_BLOCK = {"wan": "blocks.1", "cogvideox": "transformer_blocks.1", "ltx": "transformer_blocks.1"}
FRAMES, SIGMA, SIGMA_TIME = 5, 2.0, 1.0


@pytest.fixture(scope="module", params=["wan", "cogvideox", "ltx"])
def video(request, tmp_path_factory):
    """(family name, pipeline, fork export of SEG on its last block) for one tiny video DiT."""
    from seg_rt.tiny import tiny_video_pipeline

    name = request.param
    pipe = tiny_video_pipeline(name)
    out = tmp_path_factory.mktemp(f"{name}video") / "engine"
    result = export_video_onnx(
        pipe, out, frames=FRAMES, sigma=SIGMA, sigma_time=SIGMA_TIME, layers=[LAST_BLOCK[name]], fork=True
    )
    return name, pipe, result


def _branch_inputs(pipe):
    """(x, t, cond, uncond, shared) for one video, as ``generate_video`` builds them."""
    from seg_rt.params import request_from_fields
    from seg_rt.pipeline import seed_generators
    from seg_rt.video.families import video_family_of

    family = video_family_of(pipe)
    request = request_from_fields({"prompt": "a red fox", "frames": FRAMES, "cfg": 5.0}, "video")
    height, width = family.size(pipe, None, None)
    frames = family.latent_frames(pipe, FRAMES)
    with torch.no_grad():
        prepared = family.encode(pipe, request, 1)
    sched = family.schedule(pipe, None, 3, frames=frames, height=height, width=width)
    dtype = prepared.cond["encoder_hidden_states"].dtype
    x = family.initial_latents(
        pipe, sched, seed_generators([3]), frames=frames, height=height, width=width, dtype=dtype
    )
    shared = family.shared_inputs(pipe, frames=frames, height=height, width=width)
    return x, sched.timesteps[1], prepared.cond, prepared.uncond, shared


def test_video_fork_engine_equals_the_pytorch_shared_prefix_for_every_layout(video):
    name, pipe, result = video
    info = result.info
    assert info.frames == read_info(result.folder).frames and info.seg_mode == "spatiotemporal"
    assert info.fork_block == LAST_BLOCK[name] and info.prefix_rows == 2 and info.twin_file
    x, t, cond, uncond, shared = _branch_inputs(pipe)
    blur = VideoBlur("spatiotemporal", SIGMA, SIGMA_TIME)
    ref = VideoDenoiser(pipe.transformer, blur, [LAST_BLOCK[name]], shared, shared_prefix=True)
    engine = OnnxRuntimeDenoiser(result.folder)
    ran = _count_runs(engine)
    try:
        for layout, calls in LAYOUTS.items():
            for branches in calls:
                batch = build_batch(list(branches), x, t, cond, uncond)
                ran.clear()
                ours, want = engine(batch), ref(batch)
                assert_close(ours, want, rel=1e-4, what=f"{name} {layout} {branches}")
                forks = branches[-1] == "seg" and len(branches) > 1
                assert ran == (["fork"] if forks else ["twin"]), (layout, branches, ran)
        out = engine(build_batch(["uncond", "cond", "seg"], x, t, cond, uncond))
        assert (out[2] - out[1]).abs().max() > 1e-3  # the perturbed row really is perturbed
    finally:
        engine.close()
        ref.close()


def test_generate_video_on_the_fork_engine_equals_torch(video):
    """Through the sampler: SEG steps fork, the steps past the SEG window run the twin."""
    name, pipe, result = video
    kw = {"frames": FRAMES, "steps": 3, "seg_sigma": SIGMA, "seg_sigma_time": SIGMA_TIME, "seg_end": 0.6,
          "seg_layers": [LAST_BLOCK[name]], "output_type": "latent"}  # fmt: skip
    ours = generate_video(pipe, "a red fox", **kw)
    onnx = generate_video(pipe, "a red fox", engine=f"onnx:{result.folder}", **kw)
    assert_close(onnx, ours, rel=1e-4, what=f"{name} video fork engine vs torch latents")


def test_video_engine_refuses_a_request_it_was_not_exported_for(video):
    name, pipe, result = video
    spec = f"onnx:{result.folder}"
    kw = {"frames": FRAMES, "steps": 2, "seg_sigma": SIGMA, "seg_sigma_time": SIGMA_TIME,
          "seg_layers": [LAST_BLOCK[name]], "output_type": "latent"}  # fmt: skip
    cases = [
        ({"frames": 9}, "latent frames"),
        ({"seg_mode": "spatial"}, "seg mode"),
        ({"seg_sigma": 3.0}, "seg sigma 2.0, got 3.0"),
        ({"seg_sigma_time": 2.0}, "seg sigma time"),
        ({"seg_layers": None}, "seg layers"),
    ]
    for change, line in cases:
        with pytest.raises(ValueError, match=line) as e:
            generate_video(pipe, "a red fox", engine=spec, **(kw | change))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="SEG's blur only"):
        generate_video(pipe, "a red fox", engine=spec, perturbation="skip", **kw)
    with pytest.raises(ValueError, match="onnx:DIR or trt:DIR"):
        generate_video(pipe, "a red fox", engine="torch", **kw)


def test_unforked_video_export_serves_every_layer_and_passes_the_tensorrt_check(tmp_path):
    """Without --fork (default: every self-attention layer): one graph, no fork keys, no twin; TensorRT
    takes its operators."""
    from seg_rt.export.tensorrt import check_onnx_for_tensorrt
    from seg_rt.tiny import tiny_video_pipeline

    pipe = tiny_video_pipeline("wan")
    folder = export_video_onnx(pipe, tmp_path / "e", frames=FRAMES, mode="spatial", sigma=SIGMA).folder
    sidecar = json.loads((folder / "seg_rt.json").read_text())
    assert not {"fork_block", "twin_file"} & set(sidecar) and sidecar["seg_mode"] == "spatial"
    assert sorted(p.name for p in folder.iterdir()) == ["denoiser.onnx", "seg_rt.json"]
    check_onnx_for_tensorrt(folder)
    kw = {"frames": FRAMES, "steps": 2, "seg_mode": "spatial", "seg_sigma": SIGMA, "output_type": "latent"}
    assert_close(
        generate_video(pipe, "a red fox", engine=f"onnx:{folder}", **kw),
        generate_video(pipe, "a red fox", **kw),
        rel=1e-4,
        what="unforked wan video engine",
    )
    # an image request on a video engine: one line, not ONNX Runtime's shape error
    with OnnxRuntimeDenoiser(folder) as engine, pytest.raises(ValueError, match="takes video latents"):
        engine({"sample": torch.zeros(3, 4, 8, 8), "seg_mask": torch.zeros(3, dtype=torch.bool)})


def test_video_export_refusals(tmp_path, capsys):
    """Families without an export, a fork with nothing to share, and the CLI's one-line refusals before
    any model loads (--no-twin without --fork, --compare / branch parallel / an image export with
    --engine)."""
    from seg_rt.cli import main
    from seg_rt.tiny import tiny_video_pipeline

    with pytest.raises(ValueError, match="video ONNX export supports the families cogvideox, wan, ltx"):
        export_video_onnx(tiny_video_pipeline("animatediff"), tmp_path / "a", frames=4)
    with pytest.raises(ValueError, match=r"first block \(blocks.0.attn1\), so no prefix is shared"):
        export_video_onnx(tiny_video_pipeline("wan"), tmp_path / "w", frames=FRAMES, fork=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "w").exists()

    def refused(args, line):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert line in err and len(err.strip().splitlines()) == 1, err

    model = str(tmp_path / "no-model")
    refused(["export", "video", "--model", model, "--frames", "5", "--no-twin", "--out", str(tmp_path / "o")],
            "--no-twin applies to --fork exports only")  # fmt: skip
    image = tmp_path / "image-export"
    image.mkdir()
    (image / "seg_rt.json").write_text(
        json.dumps({"kind": "onnx", "family": "sd15", "model": "", "height": 64, "width": 64,
                    "latent_height": 8, "latent_width": 8, "batch": 1, "branches": ["uncond", "cond", "seg"],
                    "input_names": ["sample"], "output_names": ["out_sample"], "dtype": "float32", "sigma": 2.0,
                    "layers": ["mid"], "layer_names": [], "blur_lengths": [], "opset": 18, "file": "m.onnx"})
    )  # fmt: skip
    (image / "m.onnx").write_bytes(b"")
    video = ["video", "--model", model, "--frames", "5", "--out", str(tmp_path / "v.mp4")]
    refused([*video, "--engine", f"onnx:{image}"], "is an image export")
    refused([*video, "--engine", f"onnx:{image}", "--compare"], "--compare runs every SEG mode")
    refused([*video, "--engine", "torch"], "onnx:DIR or trt:DIR")
    assert not (tmp_path / "o").exists() and not (tmp_path / "v.mp4").exists()


def test_export_video_and_video_engine_from_the_command_line(tmp_path):
    """``seg-rt export video`` on a saved tiny Wan folder, then ``seg-rt video --engine`` samples with it."""
    from seg_rt.tiny import save_tiny_video_pipeline

    from .cli_run import run_cli

    model = save_tiny_video_pipeline("wan", tmp_path / "wan")
    engine = tmp_path / "engine"
    r = run_cli("export", "video", "--model", model, "--frames", FRAMES, "--seg-sigma", SIGMA, "--seg-layers",
                LAST_BLOCK["wan"], "--fork", "--out", engine, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["validation"]["twin"]["max_rel_error"] < 1e-4
    assert read_info(engine).frames == 2 and read_info(engine).fork_block == LAST_BLOCK["wan"]
    out = tmp_path / "v.mp4"
    r = run_cli("video", "--model", model, "--frames", FRAMES, "--steps", 2, "--seg-sigma", SIGMA,
                "--seg-layers", LAST_BLOCK["wan"], "--engine", f"onnx:{engine}", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    r = run_cli("video", "--model", model, "--frames", 9, "--steps", 2, "--seg-sigma", SIGMA,
                "--seg-layers", LAST_BLOCK["wan"], "--engine", f"onnx:{engine}", "--out", tmp_path / "w.mp4")  # fmt: skip
    assert r.returncode == 2 and "latent frames 2, got 3" in r.stderr and not (tmp_path / "w.mp4").exists()


def test_video_engine_step_row_reports_its_ratios():
    """``seg-rt bench step``'s video-engine row, at a tiny size (no timing asserted)."""
    import math

    from seg_rt.video.bench_step import bench_video_step_onnx

    row = bench_video_step_onnx(pairs=2, threads=1, frames=5, size=64)
    assert row["fork_block"] == "blocks.4" and row["engine"] == "onnxruntime-cpu"
    for mode in ("cfg_seg", "cfg_seg_fork", "cfg_on_fork_engine", "seg_no_cfg_fork", "torch_cfg_seg_shared"):
        lo, hi = row[f"{mode}_over_cfg_iqr"]
        assert math.isfinite(row[f"{mode}_over_cfg"]) and 0 < lo <= hi
