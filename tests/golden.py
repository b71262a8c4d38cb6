"""Golden outputs: fixed runs of every entry point whose bytes must not change under refactoring.

`python -m tests.golden record` writes tests/golden.json (run it only when an output change is
intended, and say why in the commit). tests/test_golden.py reruns each case and compares:

- on the machine kind that recorded the file (same CPU model, torch version and thread count), the
  outputs must be bit-identical: SHA-256 of the mp4 / latent bytes, and of a PNG's pixels plus its
  parameter record (the PNG's own bytes hold the model's path, which for the bundled demo model is
  wherever seg-rt is installed);
- on another CPU (CI runs on AMD and Intel), float kernels differ in the last bits, so the test
  compares an 8x8 block-mean thumbnail of the pixels (or block means of the latents) within a small
  bound relative to the values' scale instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).with_name("golden.json")
THUMB = 8


def fingerprint() -> str:
    import torch

    model, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == (platform.processor() or ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return f"{model} | {isa} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _block_means(a: np.ndarray, n: int = THUMB) -> list[float]:
    """Mean of each of n x n spatial blocks (per channel) of [..., H, W, C] data, as a flat list."""
    a = a.astype(np.float64).reshape(-1, *a.shape[-3:])  # [F, H, W, C]
    _, h, w, _ = a.shape
    hs, ws = np.array_split(np.arange(h), min(n, h)), np.array_split(np.arange(w), min(n, w))
    out = [a[:, r][:, :, q].mean(axis=(0, 1, 2)) for r in hs for q in ws]
    return [round(float(v), 4) for v in np.concatenate(out)]


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_record(data: bytes) -> dict:
    """The PNG's parameter record, with the model path cut to its last part (the bundled demo
    model's path is wherever seg-rt is installed)."""
    from PIL import Image

    from seg_rt.images import PARAMS_KEY

    record = json.loads(Image.open(io.BytesIO(data)).text[PARAMS_KEY])
    record["model"] = Path(record["model"]).name
    return record


def mp4_frames(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def summary(kind: str, data: bytes) -> dict:
    """What the golden file keeps of one output: its hash and a CPU-portable thumbnail."""
    record = None
    if kind == "png":
        pixels = png_pixels(data)
        record = png_record(data)
    elif kind == "mp4":
        pixels = mp4_frames(data)
    else:  # raw float32 bytes, shape in the first line: "latent" [B, C, H, W], "frames" [B, F, H, W, 3]
        shape, raw = data.split(b"\n", 1)
        values = np.frombuffer(raw, dtype=np.float32).reshape(json.loads(shape))
        pixels = np.moveaxis(values, 1, -1) if kind == "latent" else values
    return {
        "kind": kind,
        "sha256": hashlib.sha256(data).hexdigest(),
        "record": record,
        "pixel_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
        "thumb": _block_means(pixels),
        "scale": round(float(np.abs(pixels.astype(np.float64)).max()), 4),
    }


def _cli(folder: Path, args: list[str]) -> None:
    """``seg-rt ARGS`` run in ``folder``, so model paths are relative and PNG records the same every run."""
    import torch

    from seg_rt.cli import main

    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(folder)
    try:  # --threads sets the process-wide count: restore it so cases do not depend on their order
        code = main([*args, "--no-progress"] if args[0] in ("generate", "video") else args)
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"seg-rt {' '.join(args)} exited {code}")


def _image(folder: Path, name: str, args: list[str]) -> tuple[str, bytes]:
    out = folder / f"{name}.png"
    _cli(folder, ["generate", *args, "--out", out.name])
    return "png", out.read_bytes()


def _video(folder: Path, name: str, args: list[str]) -> tuple[str, bytes]:
    out = folder / f"{name}.mp4"
    _cli(folder, ["video", *args, "--out", out.name])
    return "mp4", out.read_bytes()


def _models(folder: Path) -> dict[str, str]:
    """Tiny pipelines saved once per run (random weights from fixed seeds)."""
    from PIL import Image

    from seg_rt.tiny import save_tiny_pipeline, save_tiny_video_pipeline

    for family in IMAGE_FAMILIES:
        save_tiny_pipeline(family, folder / family)
    for family in ("animatediff", "cogvideox", "wan"):
        save_tiny_video_pipeline(family, folder / family)
    models = {family: family for family in (*IMAGE_FAMILIES, *VIDEO_FAMILIES)}  # relative to folder
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    Image.fromarray(ramp).save(folder / "control.png")
    models["control"] = "control.png"
    return models


IMAGE_FAMILIES = ("sd15", "sdxl", "sdxl-controlnet")
VIDEO_FAMILIES = ("animatediff", "cogvideox", "wan")
# AnimateDiff's sampled frames are not bit-reproducible across processes on this CPU: the same
# command differs in the last float bits in some runs (CPU kernels take alignment-dependent paths),
# and H.264 turns a flipped pixel rounding into different blocks. So its cases hash the float frames
# from the Python API, and are compared by thumbnail (relative 1e-4), never by hash.
NOT_BIT_REPRODUCIBLE = ("video-animatediff-",)

COMMON = ["--prompt", "a cat", "--seed", "3", "--steps", "3", "--seg-sigma", "2"]
VIDEO = ["--prompt", "a cat", "--seed", "2", "--steps", "2", "--height", "48", "--width", "80"]
VIDEO_SIGMAS = ["--seg-sigma", "2", "--seg-sigma-time", "1"]


def cases(folder: Path) -> dict[str, Callable[[], tuple[str, bytes]]]:
    """name → a function producing (kind, bytes). Each runs one entry point on a tiny model."""
    m = _models(folder)
    out: dict[str, Callable[[], tuple[str, bytes]]] = {
        "generate-sd15": lambda: _image(
            folder, "sd15", ["--model", m["sd15"], *COMMON, "--height", "64", "--width", "64"]
        ),
        "generate-sdxl-non-square": lambda: _image(
            folder,
            "sdxl",
            ["--model", m["sdxl"], *COMMON, "--height", "64", "--width", "96", "--seg-layers", "mid,up.1"],
        ),
        # the request test_serve.py serves (1 CPU thread per replica): served PNG == this file
        "generate-sdxl-served-request": lambda: _image(
            folder,
            "sdxl1",
            ["--model", m["sdxl"], *COMMON, "--height", "64", "--width", "96", "--threads", "1"],
        ),
        "generate-sdxl-controlnet": lambda: _image(
            folder,
            "cn",
            [
                "--model",
                m["sdxl-controlnet"],
                *COMMON,
                "--height",
                "64",
                "--width",
                "64",
                "--control-image",
                m["control"],
            ],
        ),
        "generate-sd15-window-rescale-ddim": lambda: _image(
            folder,
            "sd15w",
            [
                "--model",
                m["sd15"],
                *COMMON,
                "--height",
                "64",
                "--width",
                "64",
                "--seg-start",
                "0.3",
                "--seg-end",
                "0.9",
                "--guidance-rescale",
                "0.5",
                "--scheduler",
                "ddim",
                "--cfg",
                "3",
            ],
        ),
        "generate-demo-grid": lambda: _image(
            folder,
            "demo",
            [
                "--prompt",
                "orange star on dots",
                "--cfg",
                "3",
                "--seg-scale",
                "1",
                "--steps",
                "6",
                "--num-images",
                "2",
                "--grid",
            ],
        ),
        "generate-demo-compare": lambda: _image(
            folder,
            "compare",
            ["--prompt", "yellow star on checks", "--cfg", "3", "--steps", "6", "--compare"],
        ),
        "latent-sd15-api": lambda: _latent(str(folder / m["sd15"])),
        "generate-sd15-onnx-engine": lambda: _onnx(folder, m["sd15"]),
    }
    for mode in ("spatial", "temporal", "spatiotemporal"):
        out[f"video-animatediff-{mode}"] = lambda mode=mode: _video_frames(folder / m["animatediff"], mode)
    for family in VIDEO_FAMILIES[1:]:
        for mode in ("spatial", "temporal", "spatiotemporal"):  # CogVideoX / Wan decode 4k + 1 frames
            out[f"video-{family}-{mode}"] = lambda family=family, mode=mode: _video(
                folder,
                f"{family}-{mode}",
                ["--model", m[family], *VIDEO, *VIDEO_SIGMAS, "--frames", "9", "--seg-mode", mode],
            )
    return out


def _latent(model: str) -> tuple[str, bytes]:
    import seg_rt

    lat = seg_rt.generate(
        model,
        "a dog",
        steps=3,
        cfg=4.0,
        seg_sigma=1.5,
        seed=[5, 6],
        height=64,
        width=64,
        output_type="latent",
    )
    arr = lat.detach().cpu().float().numpy()
    return "latent", json.dumps(list(arr.shape)).encode() + b"\n" + arr.tobytes()


def _video_frames(model: Path, mode: str) -> tuple[str, bytes]:
    from seg_rt.video.sampling import generate_video

    frames = generate_video(
        str(model), "a cat", seed=2, steps=2, height=48, width=80, frames=5, seg_mode=mode,
        seg_sigma=2.0, seg_sigma_time=1.0,
    )  # fmt: skip
    arr = np.ascontiguousarray(frames, dtype=np.float32)
    return "frames", json.dumps(list(arr.shape)).encode() + b"\n" + arr.tobytes()


def _onnx(folder: Path, model: str) -> tuple[str, bytes]:
    if not (folder / "onnx-sd15").exists():
        _cli(folder, ["export", "onnx", "--model", model, "--height", "64", "--width", "64", "--seg-sigma", "2",
                      "--out", "onnx-sd15"])  # fmt: skip
    return _image(folder, "onnx", ["--model", model, *COMMON, "--height", "64", "--width", "64",
                                   "--engine", "onnx:onnx-sd15"])  # fmt: skip


def record(folder: Path) -> dict:
    machine = fingerprint()
    results = {name: summary(*make()) for name, make in cases(folder).items()}
    return {"fingerprint": machine, "cases": results}


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python -m tests.golden record")
    with tempfile.TemporaryDirectory() as tmp:
        data = record(Path(tmp))
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(data['cases'])} cases on {data['fingerprint']}")
