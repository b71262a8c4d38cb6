"""`seg-rt generate` end to end on a saved tiny SDXL, in a subprocess like a user runs it."""

import json

import pytest
from PIL import Image

from seg_rt.cli import main
from seg_rt.images import read_params
from tests.cli_run import run_cli


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--cfg", "inf"], "cfg must be a finite number >= 1 (1 disables classifier-free guidance), got inf"),
        (["generate", "--seed", "18446744073709551616"], "seed must be an integer from 0 to 2**64 - 1, got 18446744073709551616"),
        (["generate", "--out", "x.jpg"], "output must be a .png file, got 'x.jpg'"),
        (["generate", "--engine", "magic"], "engine must be one of torch, torch-compile, onnx:DIR, trt:DIR, got 'magic'"),
        (["generate", "--compare", "--compare-sigmas", "2,0"], "seg sigma must be > 0 or inf, got 0"),
        (["generate", "--height", "65", "--model", "SDXL"], "height must be a positive multiple of 8, got 65"),
        (["video", "--model", "m", "--seg-mode", "temporal", "--seg-sigma-time", "0"], "seg mode 'temporal' with seg sigma time 0"),
        (["video", "--model", "m", "--seed", "18446744073709551616"], "seed must be an integer from 0 to 2**64 - 1"),
        (["video", "--model", "m", "--cfg", "inf"], "cfg must be a finite number >= 1"),
        (["video", "--model", "m", "--compare", "--seg-sigma-time", "0"], "--compare, mode temporal: seg mode 'temporal'"),
    ],
)  # fmt: skip
def test_bad_request_exits_2_before_a_model_loads(sdxl_dir, tmp_path, monkeypatch, capsys, argv, message):
    import seg_rt.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(seg_rt.pipeline, "load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    argv = [str(sdxl_dir) if a == "SDXL" else a for a in argv]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not list(tmp_path.iterdir())  # nothing written


def test_records_equal_for_cli_and_api_requests(sdxl_dir, tmp_path):
    """The PNG record is the request's own: parsing it back gives the request the CLI built."""
    from seg_rt.params import GenerationParams

    out = tmp_path / "r.png"
    argv = ["generate", "--model", str(sdxl_dir), "--steps", "1", "--height", "64", "--width", "64",
            "--seg-sigma", "inf", "--seed", str(2**64 - 1), "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = read_params(out)
    assert record["seg_sigma"] == "inf" and record["model"] == sdxl_dir.name  # a name, never the path
    expected = GenerationParams(seed=2**64 - 1, steps=1, height=64, width=64)
    assert GenerationParams.from_record(record) == expected


def _help_lines(capsys, monkeypatch, *command: str) -> dict[str, str]:
    """``seg-rt COMMAND --help``, one entry per flag: its whole help line (no wrapping)."""
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    lines: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            lines[flag] = line
        elif flag and line.startswith("      "):  # a long flag's help starts on the next line
            lines[flag] += " " + line.strip()
        else:
            flag = None
    return lines


def test_help_shows_every_request_default(capsys, monkeypatch):
    """Each request flag's help shows the request type's own default (GenerationParams / SEGConfig /
    VideoParams), formatted here independently of the CLI."""
    import math

    from seg_rt.params import GenerationParams, VideoParams

    d, v = GenerationParams(), VideoParams()
    assert (d.prompt, d.negative_prompt, d.height, d.width, d.sequential, v.layers) == (
        "",
        None,
        None,
        None,
        False,
        None,
    )
    assert math.isinf(d.seg.sigma)

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(x)

    shared = {
        "--prompt": "''", "--negative-prompt": "none", "--seg-scale": num(d.seg.scale), "--seg-sigma": "inf",
        "--cfg": num(d.cfg), "--steps": str(d.steps), "--height": "the model's default size",
        "--width": "the model's default size", "--seed": str(d.seed), "--scheduler": d.scheduler,
    }  # fmt: skip
    image = {
        **shared, "--seg-layers": ",".join(d.seg.layers), "--seg-start": num(d.seg.start), "--seg-end": num(d.seg.end),
        "--seg-every": str(d.seg.every), "--seg-placement": d.seg.placement,
        "--guidance-rescale": num(d.guidance_rescale), "--distilled-guidance": num(d.distilled_guidance),
        "--sequential": "off",
    }  # fmt: skip
    video = {
        **shared, "--frames": str(v.frames), "--seg-mode": v.mode, "--seg-sigma-time": num(v.sigma_time),
        "--seg-layers": "all video self-attention", "--fps": str(v.fps),
        # every field the video path honours has its flag (derived from the request field table)
        "--seg-start": num(d.seg.start), "--seg-end": num(d.seg.end), "--seg-every": str(d.seg.every),
        "--seg-placement": d.seg.placement, "--guidance-rescale": num(d.guidance_rescale), "--sequential": "off",
    }  # fmt: skip
    for command, expected in (("generate", image), ("video", video)):
        lines = _help_lines(capsys, monkeypatch, command)
        for flag, value in expected.items():
            assert f"(default: {value}" in lines[flag], (command, flag, lines[flag])
