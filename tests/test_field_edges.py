"""Every edge takes the request field table's keys: ``POST /v1/generate`` and a job item accept
``seg_every`` (and the other fields added after the first release), the PNG record carries it, and a
job item gives the CLI's image bytes for the same keys at the same thread count."""

from __future__ import annotations

import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from seg_rt.cli import main
from seg_rt.cluster.jobs.spec import item_params, parse_job, read_prompts
from seg_rt.cluster.jobs.worker import SEGWorker
from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore, run_group
from seg_rt.cluster.serving.http import build_app
from seg_rt.config import SEGConfig
from seg_rt.params import GenerationParams
from seg_rt.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_pipeline("sd15", tmp_path_factory.mktemp("edges") / "sd15"))


def _record(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["parameters"])


def test_http_generate_takes_seg_every_and_the_record_carries_it(folder):
    from seg_rt.pipeline import load_pipeline

    core = ServingCore(ServeConfig(model="tiny"), load_pipeline(folder, "cpu"))
    client = TestClient(build_app(core))
    body = {"prompt": "a cat", "seed": 5, "num_inference_steps": 3, "seg_every": 2, "guidance_rescale": 0.5}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    record = _record(r.content)
    assert record["seg_every"] == 2 and record["steps"] == 3 and record["guidance_rescale"] == 0.5
    expected = GenerationParams(
        prompt="a cat", seed=5, steps=3, seg=SEGConfig(every=2), guidance_rescale=0.5, height=64, width=64
    )
    assert GenerationParams.from_record(record) == expected
    with torch.inference_mode():
        assert r.content == core.png(run_group(core.pipe, [expected])[0], expected)
    bad = client.post("/v1/generate", json={"prompt": "a", "steps": 2, "num_inference_steps": 3})
    assert bad.status_code == 422 and "gives steps=2 and num_inference_steps=3" in bad.text


def test_a_job_item_with_seg_every_gives_the_cli_image_bytes(folder, tmp_path):
    out = tmp_path / "cli.png"
    flags = ["generate", "--model", folder, "--prompt", "a red cube", "--steps", "3", "--height", "64",
             "--width", "64", "--seed", "7", "--seg-every", "2", "--seg-sigma", "2", "--threads", "1",
             "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(flags) == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "a red cube", "seed": 7, "seg_every": 2, "seg_sigma": 2.0}) + "\n"
    )
    spec = {"model": folder, "prompts_file": str(prompts), "steps": 3, "height": 64, "width": 64,
            "output": str(tmp_path / "job"), "resources_per_worker": {"num_cpus": 1}}  # fmt: skip
    job = parse_job(spec)
    items = [item_params(job, o, 0, 0) for o in read_prompts(job, tmp_path)]
    assert items[0].seg.every == 2 and items[0].seed == 7
    from seg_rt.cluster.jobs.spec import Item

    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(job.model_dump(mode="json"), "w0")  # one thread, as the CLI's --threads 1
        result = worker.run([Item(0, 0, items[0])])[0]
        worker.close()
    finally:
        torch.set_num_threads(threads)
    assert result["png"] == out.read_bytes()
    assert _record(result["png"])["seg_every"] == 2
