"""The folder-to-namespace mapping works from a plain (non-editable) install too (docs/design.md §2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = [
    "seg_rt",
    "seg_rt.bench",
    "seg_rt.cli",
    "seg_rt.demo",
    "seg_rt.families",
    "seg_rt.export",
    "seg_rt.engines",
    "seg_rt.video",
    "seg_rt.video.families",
    "seg_rt.cluster",
    "seg_rt.cluster.jobs",
    "seg_rt.cluster.serving",
]


def test_editable_install_imports_every_subpackage():
    code = f"import importlib; [importlib.import_module(m) for m in {SUBPACKAGES!r}]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.slow
def test_plain_install_imports_every_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    code = f"import importlib, seg_rt; [importlib.import_module(m) for m in {SUBPACKAGES!r}]; print(seg_rt.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert str(target) in out.stdout
    # the demo models (image, video) and the benchmark classifier ship as package data
    demo = target / "seg_rt" / "demo"
    for rel in ("weights/model_index.json", "weights/unet/diffusion_pytorch_model.safetensors",
                "weights/text_encoder/model.safetensors", "weights/tokenizer/tokenizer.json",
                "weights/train_config.json", "classifier/model.safetensors", "classifier/config.json",
                "video_weights/model_index.json", "video_weights/unet/diffusion_pytorch_model.safetensors",
                "video_weights/text_encoder/model.safetensors", "video_weights/train_config.json"):  # fmt: skip
        assert (demo / rel).is_file(), rel
    assert (target / "seg_rt" / "cluster" / "serving" / "playground.html").is_file()  # the server's page at /


def test_core_imports_no_heavy_optional_dependency():
    code = "import sys, seg_rt, seg_rt.engines; bad = {'onnxruntime', 'tensorrt', 'ray'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
