"""img2img / inpainting at the edges: the CLI flags (derived from the field table), job items with
init images and masks relative to the job's folder, the same bytes from both, and bad input as one
line / exit 2 naming the field before any model loads."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from seg_rt.cli import main
from seg_rt.cluster.jobs.spec import Item, expand_items, input_files, parse_job
from seg_rt.cluster.jobs.worker import SEGWorker
from seg_rt.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tasks") / "sd15"))


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:32]).save(tmp_path / "small-mask.png")
    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    return tmp_path


def _record(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["parameters"])


def test_cli_inpainting_and_a_job_item_give_the_same_bytes(folder, pictures):
    out = pictures / "cli.png"
    flags = ["generate", "--model", folder, "--prompt", "a red cube", "--steps", "4", "--seed", "7",
             "--init-image", str(pictures / "init.png"), "--mask", str(pictures / "mask.png"),
             "--strength", "0.75", "--mask-blur", "2", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(flags) == 0
    record = _record(out.read_bytes())
    assert record["strength"] == 0.75 and record["mask_blur"] == 2
    assert set(record["init_image"]) == {"sha256", "mode", "width", "height"}  # no bytes, no path
    assert record["mask"]["mode"] == "L" and record["init_image"]["width"] == 64
    # the job: the init image per prompt line, the mask for the whole job, both relative to its folder
    (pictures / "p.jsonl").write_text(
        json.dumps({"prompt": "a red cube", "seed": 7, "init_image": "init.png"})
    )
    spec = {"model": folder, "prompts_file": "p.jsonl", "steps": 4, "mask": "mask.png", "strength": 0.75,
            "mask_blur": 2, "output": str(pictures / "job"), "resources_per_worker": {"num_cpus": 1}}  # fmt: skip
    job = parse_job(spec)
    items = expand_items(job, pictures)
    assert items[0].params.task == "inpaint" and sorted(input_files(job, pictures)) == [
        "init.png",
        "mask.png",
    ]
    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(job.model_dump(mode="json"), "w0")  # one thread, as the CLI's --threads 1
        result = worker.run([Item(0, 0, items[0].params)])[0]
        worker.close()
    finally:
        torch.set_num_threads(threads)
    assert result["png"] == out.read_bytes()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init-image", "not-an-image.png"], "init image is not an image"),
        (["--init-image", "missing.png"], "init image 'missing.png' is not a file"),
        (
            ["--init-image", "init.png", "--mask", "small-mask.png"],
            "mask is 64x32 but the init image is 64x64",
        ),
        (["--init-image", "init.png", "--strength", "0"], "strength must be in (0, 1]"),
        (["--init-image", "init.png", "--strength", "1.5"], "strength must be in (0, 1]"),
        (["--init-image", "init.png", "--strength", "0.2", "--steps", "4"], "strength x steps must be >= 1"),
        (["--strength", "0.5"], "strength applies only with an init image"),
        (["--mask", "mask.png"], "mask applies only with an init image"),
    ],
)
def test_bad_task_input_is_one_line_exit_2_before_loading(pictures, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(pictures)
    monkeypatch.setattr("seg_rt.pipeline.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["generate", "--model", str(pictures / "no-model"), "--out", "x.png", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (pictures / "x.png").exists()


def test_inpainting_on_a_family_without_it_is_refused_before_loading(pictures, capsys, monkeypatch):
    model = pictures / "controlnet"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionControlNetPipeline"}))
    monkeypatch.setattr("seg_rt.pipeline.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    flags = ["generate", "--model", str(model), "--init-image", str(pictures / "init.png"),
             "--mask", str(pictures / "mask.png"), "--out", str(pictures / "x.png")]  # fmt: skip
    assert main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert "inpaint is not available for the sd15-controlnet family" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_image": "../init.png"}, "init_image '../init.png' leaves the job's folder"),
        ({"init_image": "s3://user:pw@bucket/x.png"}, "carries credentials"),
        ({"strength": 0.0}, "strength must be in (0, 1]"),
        ({"mask_blur": -1}, "mask blur must be an integer >= 0"),
    ],
)
def test_bad_job_task_fields_name_the_field(folder, tmp_path, fields, message):
    spec = {"model": folder, "prompts": ["a"], "output": str(tmp_path / "o"), **fields}
    with pytest.raises(ValueError) as info:
        parse_job(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_job_item_without_its_init_image_file_fails_before_ray(folder, pictures):
    job = parse_job(
        {"model": folder, "prompts": ["a"], "init_image": "gone.png", "output": str(pictures / "o")}
    )
    with pytest.raises(ValueError, match=r"init image .*gone\.png.* is not a file"):
        expand_items(job, pictures)
