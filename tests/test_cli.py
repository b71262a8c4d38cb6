"""`seg-rt generate` end to end on a saved tiny SDXL, in a subprocess like a user runs it."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from seg_rt.cli import main
from seg_rt.images import read_params


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seg_rt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_generate_non_square_with_params_chunk(sdxl_dir, tmp_path):
    out = tmp_path / "a.png"
    r = run_cli("generate", "--model", sdxl_dir, "--prompt", "a cat", "--height", 64, "--width", 96,
                "--seg-sigma", 10, "--steps", 3, "--out", out, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"] == [str(out)]
    assert Image.open(out).size == (96, 64)
    params = read_params(out)
    assert params["seg_sigma"] == 10.0 and params["height"] == 64 and params["prompt"] == "a cat"
    assert "seg-rt" in r.stderr  # the step progress bar


@pytest.mark.parametrize("flags", [["--seg-sigma", "inf"], ["--cfg", "1"], ["--cfg", "1", "--prompt", ""]])
def test_generate_inf_sigma_and_no_cfg(sdxl_dir, tmp_path, flags):
    out = tmp_path / "b.png"
    code = main(["generate", "--model", str(sdxl_dir), "--steps", "2", "--height", "64", "--width", "64",
                 "--out", str(out), "--no-progress", *flags])  # fmt: skip
    assert code == 0 and out.exists()


def test_same_seed_same_bytes_and_batch_files(sdxl_dir, tmp_path):
    common = [
        "generate",
        "--model",
        str(sdxl_dir),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "x.png"), "--seed", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "y.png"), "--seed", "4"]) == 0
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "y.png").read_bytes()
    assert main([*common, "--out", str(tmp_path / "z.png"), "--num-images", "2", "--seed", "3"]) == 0
    assert read_params(tmp_path / "z-1.png")["seed"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seg-sigma", "-1"], "seg sigma must be > 0 or inf, got -1"),
        (["--seg-sigma", "abc"], "seg sigma must be a number > 0 or 'inf', got 'abc'"),
        (["--seg-layers", "nowhere"], "seg layer 'nowhere' matches no self-attention layer"),
        (["--height", "65"], "height must be a positive multiple of 8, got 65"),
        (["--scheduler", "bogus"], "scheduler must be one of"),
    ],
)
def test_bad_input_is_one_line_no_traceback(sdxl_dir, tmp_path, flags, message):
    out = tmp_path / "bad.png"
    r = run_cli("generate", "--model", sdxl_dir, "--out", out, "--steps", 1, *flags)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_unfetchable_hub_id_says_to_pass_a_folder(tmp_path):
    r = run_cli("generate", "--model", "nobody/not-a-model", "--out", tmp_path / "h.png", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "pass a local diffusers folder with --model PATH" in lines[0]


def test_missing_model_folder(tmp_path):
    r = run_cli("generate", "--model", tmp_path / "nothing-here", "--out", tmp_path / "m.png")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_compare_grid(sdxl_dir, tmp_path):
    out = tmp_path / "grid.png"
    code = main(["generate", "--model", str(sdxl_dir), "--steps", "2", "--height", "64", "--width", "96",
                 "--compare", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    grid = Image.open(out)
    assert grid.width == 96 * 7 and grid.height > 64  # vanilla, CFG, SEG at σ 1, 2, 5, 10, inf + labels
    assert read_params(out)["compare_sigmas"] == [1.0, 2.0, 5.0, 10.0, "inf"]


def test_controlnet_cli(tmp_path):
    from seg_rt.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sdxl-controlnet", tmp_path / "cn")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "ctl.png")
    out = tmp_path / "c.png"
    code = main(["generate", "--model", str(model), "--control-image", str(tmp_path / "ctl.png"), "--steps", "2",
                 "--height", "64", "--width", "64", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0 and out.exists()
