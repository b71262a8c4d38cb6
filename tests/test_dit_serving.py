"""Image DiTs through jobs and serving: the Ray-free job worker and serving core on tiny SD3 / Flux
(and, served, Qwen-Image) pipelines give the same bytes as ``seg_rt.generate`` (the same code path, so bit-equal), and the
model-side checks (size multiple, default size, layer selectors) follow the family's rules."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from seg_rt.cluster.jobs.spec import JobSpec, expand_items
from seg_rt.cluster.jobs.worker import SEGWorker
from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.images import params_text, png_bytes
from seg_rt.params import GenerationParams
from seg_rt.pipeline import folder_scale_factor, generate
from seg_rt.tiny import save_tiny_dit_pipeline, tiny_dit_pipeline


@pytest.fixture(scope="module", params=["sd3", "flux", "qwenimage"])
def core(request):
    return ServingCore(ServeConfig(model=f"tiny-{request.param}"), tiny_dit_pipeline(request.param))


def test_served_request_equals_generate(core):
    body = {"prompt": "a red fox", "seed": 5, "steps": 2, "height": 48, "width": 80, "seg_layers": ["mid"]}
    r = TestClient(build_app(core)).post("/v1/generate", json=body)
    # not under inference_mode: the server does not use it, and Flux's result differs under it (~3e-6)
    ref = generate(core.pipe, "a red fox", seed=5, steps=2, height=48, width=80)[0]
    assert r.status_code == 200, r.text
    p = GenerationParams(prompt="a red fox", seed=5, steps=2, height=48, width=80)
    assert r.content == core.png(ref, p)


def test_distilled_guidance_over_http(core):
    """The HTTP field reaches Flux-dev's guidance input; a model without one answers 422, one line."""
    body = {"prompt": "a", "seed": 1, "steps": 2, "height": 48, "width": 80, "distilled_guidance": 2.0}
    r = TestClient(build_app(core)).post("/v1/generate", json=body)
    if core.config.model != "tiny-flux":
        assert r.status_code == 422
        assert r.json()["detail"].startswith("distilled guidance applies only to guidance-distilled models")
        return
    assert r.status_code == 200, r.text
    ref = generate(core.pipe, "a", seed=1, steps=2, height=48, width=80, distilled_guidance=2.0)[0]
    p = GenerationParams(prompt="a", seed=1, steps=2, height=48, width=80, distilled_guidance=2.0)
    assert r.content == core.png(ref, p)


def test_serving_checks_follow_the_family(core):
    """16-pixel multiples (8x VAE x 2x2 patches / packing), the family's default size, DiT block
    selectors: one 422 line each, before sampling."""
    family = core.config.model.removeprefix("tiny-")
    assert core.factor == 16
    assert core.default_side == (64 if family == "sd3" else 1024)  # SD3: sample_size x 8; else 1024
    c = TestClient(build_app(core))
    r = c.post("/v1/generate", json={"prompt": "a", "height": 40, "width": 80, "steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == "height must be a positive multiple of 16, got 40"
    r = c.post(
        "/v1/generate", json={"prompt": "a", "height": 48, "width": 80, "seg_layers": ["joint.9", "double.9"]}
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("seg layer")


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage"])
def test_job_items_equal_generate(family, tmp_path):
    folder = save_tiny_dit_pipeline(family, tmp_path / family)
    assert folder_scale_factor(folder) == 16  # the spec checks sizes before any worker loads
    spec = JobSpec(
        model=str(folder),
        prompts=("a red fox", "a cat"),
        steps=2,
        height=48,
        width=80,
        seed=3,
        batch_mode="fused",
        batch_size=2,
        output=str(tmp_path / "out"),
    )
    items = expand_items(spec, tmp_path)
    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(spec.model_dump(mode="json"), "w0")
        rows = worker.run(items)
        worker.close()  # its engine holds SEG on the pipeline: the reference below installs its own
        for item, row in zip(items, rows, strict=True):
            assert "error" not in row, row
            p = item.params
            ref = generate(worker.pipe, p.prompt, seed=p.seed, steps=2, height=48, width=80)[0]
            assert row["png"] == png_bytes(ref, params_text(spec.model, p.to_record()))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16, got 40"):
        JobSpec(model=str(folder), prompts=("a",), height=40, width=80, output=str(tmp_path / "o"))


def test_ltx_video_job_item_equals_generate_video(tmp_path, monkeypatch):
    """LTX-Video through the job worker: the item is ``generate_video``'s frames. Compared before
    encoding: libx264 here gave different bytes for the same frames within one process."""
    import numpy as np

    import seg_rt.video.io
    from seg_rt.tiny import save_tiny_video_pipeline
    from seg_rt.video.sampling import generate_video

    folder = save_tiny_video_pipeline("ltx", tmp_path / "ltx")
    assert folder_scale_factor(folder) == 8  # patch 1 x 2^3 spatio-temporal scalings
    video = {"frames": 9, "fps": 6, "mode": "spatiotemporal", "sigma_time": 1.0}
    spec = JobSpec(
        model=str(folder),
        prompts=("a cat",),
        steps=2,
        height=48,
        width=80,
        video=video,
        output=str(tmp_path / "o"),
    )
    (item,) = expand_items(spec, tmp_path)
    raw = lambda frames, fps: np.asarray(frames).tobytes() + bytes([fps])  # noqa: E731
    monkeypatch.setattr(seg_rt.video.io, "mp4_bytes", raw)
    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(spec.model_dump(mode="json"), "w0")
        (row,) = worker.run([item])
        assert "error" not in row, row
        frames = generate_video(worker.pipe, params=item.params)[0]
        assert np.asarray(frames).shape == (9, 48, 80, 3)
        assert row["mp4"] == raw(frames, 6)
    finally:
        torch.set_num_threads(threads)


def test_a1111_distilled_cfg_scale_is_the_distilled_guidance(core):
    """Forge's ``distilled_cfg_scale`` (its Flux field) on ``/sdapi/v1/txt2img``."""
    import base64

    body = {"prompt": "a", "seed": 1, "steps": 2, "height": 48, "width": 80, "distilled_cfg_scale": 2.0}
    r = TestClient(build_app(core)).post("/sdapi/v1/txt2img", json=body)
    if core.config.model != "tiny-flux":
        assert r.status_code == 422 and "distilled guidance applies only to guidance-distilled" in r.text
        return
    assert r.status_code == 200, r.text
    ref = generate(core.pipe, "a", seed=1, steps=2, height=48, width=80, distilled_guidance=2.0)[0]
    p = GenerationParams(prompt="a", seed=1, steps=2, height=48, width=80, distilled_guidance=2.0)
    # A1111 answers carry the web UI's infotext as ``parameters`` and seg-rt's record under
    # ``seg-rt`` (a1111_api.with_infotext: text chunks only); the pixels and the record are /v1's
    import io

    import numpy as np
    from PIL import Image

    from seg_rt.cluster.serving.a1111_api import RECORD_KEY

    ours, theirs = (
        Image.open(io.BytesIO(b)) for b in (base64.b64decode(r.json()["images"][0]), core.png(ref, p))
    )
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert ours.text[RECORD_KEY] == theirs.text["parameters"]
    assert ours.text["parameters"].startswith("a\nSteps: 2, ")


def test_inpainting_on_a_family_without_it_is_a_422(core):
    """Qwen-Image takes img2img but not inpainting: one 422 line from the family, before sampling."""
    if core.config.model != "tiny-qwenimage":
        pytest.skip("SD3 and Flux inpaint (tests/test_tasks.py)")
    import base64
    import io

    from PIL import Image

    def b64(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {"prompt": "a", "steps": 2, "init_image": b64(Image.new("RGB", (80, 48), (9, 90, 200)))}
    body["mask"] = b64(Image.new("L", (80, 48), 255))
    r = TestClient(build_app(core)).post("/v1/generate", json=body)
    assert r.status_code == 422
    assert (
        r.json()["detail"] == "inpaint is not available for the qwenimage family; it takes txt2img, img2img"
    )
