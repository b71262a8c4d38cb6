"""img2img and inpainting over HTTP (``POST /v1/generate``): base64 images only, decoded under the
server's pixel limit, the same bytes as ``seg_rt.generate`` for the same request (the same code path,
so bit-equal), records naming the input images by sha256, and one 422 line naming the field for each
bad input, before any sampling. Served from the bundled demo model in-process (no Ray, no network)."""

import base64
import hashlib
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import seg_rt
from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.demo.model import weights_dir
from seg_rt.pipeline import load_pipeline

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
    # the job API refuses them with one line (its records could not give the images back)
    r = client.post("/v1/jobs", json={"prompt": PROMPT, "init_image": init, "strength": 0.5})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_image: img2img / inpainting jobs")
