"""img2img and inpainting over HTTP (``POST /v1/generate``): base64 images only, decoded under the
server's pixel limit, the same bytes as ``seg_rt.generate`` for the same request (the same code path,
so bit-equal), records naming the input images by sha256, and one 422 line naming the field for each
bad input, before any sampling; the OpenAI ``/v1/images/edits`` route with the official ``openai``
client against a loopback server. Served from the bundled demo model (no Ray, no network)."""

import base64
import hashlib
import io
import json

import numpy as np
import openai
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

import seg_rt
from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.demo.model import weights_dir
from seg_rt.pipeline import load_pipeline

from .live_server import live_server, torch_threads

PROMPT = "yellow star on checks"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(weights_dir()), "cpu")


@pytest.fixture(scope="module")
def client(pipe):
    config = ServeConfig(model=str(weights_dir()), limits={"max_pixels": 40 * 40})
    return TestClient(build_app(ServingCore(config, pipe)))


def picture(width=32, height=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def the_mask(width=32, height=32) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[8:24, 4:20] = 255  # white = repaint
    return Image.fromarray(m)


def b64(image: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def sha(image: Image.Image) -> str:  # seg_rt.tasks.InputImage's rule, written out here
    return hashlib.sha256(image.mode.encode() + b"\0" + image.tobytes()).hexdigest()


def test_img2img_and_inpainting_equal_generate(client, pipe):
    init, mask = picture(), the_mask()
    cases = [
        ({"init_image": b64(init), "strength": 0.5}, {"image": init, "strength": 0.5}),
        (  # aliases and a data: URL; the mask as a JPEG-free grayscale PNG
            {
                "image": "data:image/png;base64," + b64(init),
                "mask_image": b64(mask),
                "strength": 0.75,
                "mask_blur": 2,
            },
            {"image": init, "mask": mask, "strength": 0.75, "mask_blur": 2},
        ),
    ]
    for body, kwargs in cases:
        r = client.post("/v1/generate", json={"prompt": PROMPT, "seed": 3, "steps": 4, **body})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(r.content))
        ref = seg_rt.generate(pipe, PROMPT, seed=3, steps=4, **kwargs)[0]
        assert got.size == init.size  # the size defaults to the init image's
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ref.convert("RGB")))
        record = json.loads(got.text["parameters"])
        assert record["init_image"] == {"sha256": sha(init), "mode": "RGB", "width": 32, "height": 32}
        assert record["strength"] == kwargs["strength"]
        if "mask" in kwargs:
            assert record["mask"]["sha256"] == sha(mask.convert("L"))
            assert record["mask_blur"] == 2
        else:
            assert "mask" not in record
        assert base64.b64encode(r.content).decode() not in json.dumps(record)  # no bytes in the record


def test_bad_task_fields_are_one_422_line_naming_the_field(client, tmp_path):
    init = b64(picture())
    path = tmp_path / "server-file.png"
    picture().save(path)
    bad = [
        ({"init_image": str(path)}, "init_image"),  # a path is never opened
        ({"init_image": "not base64!"}, "init_image must be base64-encoded image bytes"),
        ({"init_image": base64.b64encode(b"hello world!").decode()}, "init_image is not an image"),
        ({"init_image": b64(picture(48, 48))}, "init_image is 48x48 = 2304 pixels; the limit is 1600"),
        ({"init_image": init, "mask": b64(the_mask(32, 16))}, "mask is 32x16 but the init image is 32x32"),
        ({"init_image": init, "strength": 0}, "strength must be in (0, 1]"),
        ({"init_image": init, "strength": 1.5}, "strength must be in (0, 1]"),
        ({"init_image": init, "strength": 0.2, "steps": 4}, "strength x steps must be >= 1"),
        ({"strength": 0.5}, "strength applies only with an init image"),
        ({"mask": b64(the_mask())}, "mask applies only with an init image"),
    ]
    for body, start in bad:
        r = client.post("/v1/generate", json={"prompt": PROMPT, "steps": 4, **body})
        assert r.status_code == 422, (body.keys(), r.text)
        detail = r.json()["detail"]
        assert detail.startswith(start) and "\n" not in detail, detail
    r = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 4, "init_image": init, "strength": 0.1})
    assert r.status_code == 422 and r.json()["detail"].startswith("strength x steps must be >= 1")


def test_an_inpainting_job_gives_the_generate_bytes_and_survives_a_restart(pipe, tmp_path):
    """``POST /v1/jobs`` takes the same body; the job keeps its input images (by sha256) in its
    folder, so a restarted server reads the job back and serves its result."""
    config = ServeConfig(model=str(weights_dir()), state_dir=str(tmp_path / "state"))
    core = ServingCore(config, pipe)
    init, mask = picture(), the_mask()
    body = {
        "prompt": PROMPT,
        "seed": 4,
        "steps": 4,
        "init_image": b64(init),
        "mask": b64(mask),
        "strength": 0.75,
    }
    try:
        c = TestClient(build_app(core))
        job = c.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert core.jobs.wait(core.jobs.jobs[job_id], 900)
        result = c.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200, result.text
        assert result.content == c.post("/v1/generate", json=body).content
        kept = json.loads((core.jobs.root / job_id / "job.json").read_text())
        assert kept["request"]["init_image"]["sha256"] == sha(init)  # no image bytes in the record
        assert b64(init) not in json.dumps(kept)
    finally:
        core.close()
    again = ServingCore(config, pipe)
    try:
        c = TestClient(build_app(again))
        assert c.get(f"/v1/jobs/{job_id}/result").content == result.content
        assert again.jobs._load(job_id).rows[0].mask.sha256 == sha(mask)
    finally:
        again.close()


# ---- OpenAI /v1/images/edits with the official client ---------------------------------------------


@pytest.fixture(scope="module")
def base_url(pipe):
    config = ServeConfig(model=str(weights_dir()), api_keys=["k-1"], limits={"max_pixels": 40 * 40})
    with torch_threads(1), live_server(build_app(ServingCore(config, pipe))) as base:
        yield base


@pytest.fixture(scope="module")
def openai_client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="k-1", max_retries=0)


def png_file(image: Image.Image) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return ("x.png", buf.getvalue(), "image/png")


def test_openai_images_edit_equals_generate(openai_client, pipe):
    """OpenAI's mask: transparent = edit; seg-rt's: white = repaint (the conversion written out here)."""
    init = picture()
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 4:20] = 0  # the region to edit
    mask = Image.fromarray(np.dstack([np.asarray(init), alpha]), "RGBA")
    ours = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    extra = {"seed": 3, "steps": 4, "strength": 0.75}
    result = openai_client.images.edit(
        image=png_file(init), mask=png_file(mask), prompt=PROMPT, n=1, size="32x32",
        response_format="b64_json", extra_body=extra,
    )  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    with torch_threads(1):
        ref = seg_rt.generate(pipe, PROMPT, image=init, mask=ours, height=32, width=32, **extra)[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ref.convert("RGB")))
    record = json.loads(got.text["parameters"])
    assert record["init_image"]["sha256"] == sha(init) and record["mask"]["sha256"] == sha(ours)
    # no mask: img2img
    result = openai_client.images.edit(
        image=png_file(init),
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={"seed": 1, "steps": 4, "strength": 0.5},
    )
    got = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    with torch_threads(1):
        ref = seg_rt.generate(pipe, PROMPT, image=init, seed=1, steps=4, strength=0.5)[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ref.convert("RGB")))
    assert "mask" not in json.loads(got.text["parameters"])


def test_openai_images_edit_bad_input_is_a_400_naming_the_field(openai_client):
    init = png_file(picture())
    cases = [
        (
            {"image": init, "mask": png_file(Image.new("L", (32, 32)))},
            "mask",
            "mask must have an alpha channel",
        ),
        ({"image": ("x.png", b"no image", "image/png")}, "image", "init_image is not an image"),
        (
            {"image": png_file(picture(48, 48))},
            "image",
            "init_image is 48x48 = 2304 pixels; the limit is 1600",
        ),
        (
            {"image": init, "mask": png_file(Image.new("RGBA", (16, 32)))},
            None,
            "mask is 16x32 but the init image",
        ),
    ]
    for files, param, start in cases:
        with pytest.raises(openai.BadRequestError) as info:
            openai_client.images.edit(prompt=PROMPT, response_format="b64_json", **files)
        error = info.value.body
        assert error["message"].startswith(start), error
        if param is not None:
            assert error["param"] == param, error
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.edit(prompt=PROMPT, image=init, n=0)
    assert info.value.body["param"] == "n" and info.value.body["message"].startswith("n: ")


# ---- AUTOMATIC1111 /sdapi/v1/img2img with webuiapi ------------------------------------------------


@pytest.fixture(scope="module")
def webui(base_url):
    host, port = base_url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    api.set_auth("anyone", "k-1")
    return api


def test_webuiapi_img2img_and_inpainting_equal_generate(webui, pipe):
    init, mask = picture(), the_mask()
    common = {"prompt": PROMPT, "seed": 7, "steps": 4, "cfg_scale": 5.0, "width": 32, "height": 32}
    common["sampler_name"] = "Euler"  # webuiapi's own default is Euler a
    result = webui.img2img(images=[init], denoising_strength=0.5, **common)
    with torch_threads(1):
        ref = seg_rt.generate(pipe, PROMPT, image=init, strength=0.5, seed=7, steps=4, cfg=5.0)[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(ref.convert("RGB")))
    assert result.info["seg_rt"][0]["init_image"]["sha256"] == sha(init)
    assert result.parameters["init_images"] is None  # no image echoed back
    # inpainting: the web UI's settings that diffusers' inpaint pipelines mean
    result = webui.img2img(
        images=[init], mask_image=mask, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
        denoising_strength=0.75, **common,
    )  # fmt: skip
    with torch_threads(1):
        ref = seg_rt.generate(
            pipe, PROMPT, image=init, mask=mask, mask_blur=2, strength=0.75, seed=7, steps=4, cfg=5.0
        )[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(ref.convert("RGB")))
    assert result.info["seg_rt"][0]["mask"]["sha256"] == sha(mask)


def test_webuiapi_img2img_refuses_settings_without_an_equivalent(webui):
    init, mask = picture(), the_mask()
    common = {"prompt": PROMPT, "steps": 4, "width": 32, "height": 32}
    cases = [  # webuiapi's defaults: fill 0, only masked
        ({"mask_image": mask}, "inpainting_fill must be 1 (original)"),
        ({"mask_image": mask, "inpainting_fill": 1}, "inpaint_full_res must be false"),
        ({"resize_mode": 1}, "resize_mode must be 0"),
        ({"denoising_strength": 0.1}, "strength x steps must be >= 1"),
    ]
    for kwargs, start in cases:
        with pytest.raises(RuntimeError) as info:  # webuiapi raises on a non-200 answer
            webui.img2img(images=[init], **common, **kwargs)
        assert start in str(info.value), str(info.value)
