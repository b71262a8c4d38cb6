"""Previews: the family's latent → RGB projection, checked against independent arithmetic and
entries of ComfyUI's ``comfy/latent_formats.py`` typed here; packed DiT tokens; video strips; a
video job's preview through the job API while it samples."""

import base64
import io
import threading

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from fastapi.testclient import TestClient
from PIL import Image

from seg_rt.families import REGISTRY
from seg_rt.video.families.base import PREVIEW_FRAMES, preview_frames

SDXL_FACTORS = [  # ComfyUI's latent_formats.SDXL, written out here
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]
# entries of ComfyUI's comfy/latent_formats.py (Comfy-Org/ComfyUI 75399d78dd), typed from it:
# (family, channels, {row: (R, G, B)}, bias)
SOURCE = {
    "sd3": (16, {0: (-0.0922, -0.0175, 0.0749), 7: (-0.0042, 0.1038, 0.1358), 15: (-0.1448, -0.1463, -0.1189)},
            (0.2394, 0.2135, 0.1925)),
    "flux": (16, {0: (-0.0346, 0.0244, 0.0681), 9: (0.1008, 0.0755, -0.0421), 15: (-0.1262, -0.0982, -0.0778)},
             (-0.0329, -0.0718, -0.0851)),
    "qwenimage": (16, {2: (0.3568, 0.2548, 0.1747), 6: (-0.3477, -0.4059, -0.2925), 15: (0.1984, 0.0913, 0.1861)},
                  (-0.1835, -0.0868, -0.3360)),  # Wan21's
    "wan": (16, {0: (-0.1299, -0.1692, 0.2932), 14: (0.3477, 0.2275, 0.2950)}, (-0.1835, -0.0868, -0.3360)),
    "ltx": (128, {0: (1.1202e-02, -6.3815e-04, -1.0021e-02), 22: (-1.2689e-01, -1.3107e-01, -2.1005e-01),
                  37: (-1.5247e-01, -2.1437e-01, -2.1843e-01), 44: (-5.0414e-03, -7.1503e-03, -8.9686e-04),
                  76: (9.0411e-04, -6.6886e-03, -6.7547e-05), 127: (-1.4605e-02, -6.7032e-03, 3.9675e-03)},
            (-0.0571, -0.1657, -0.2512)),
    "animatediff": (4, {0: (0.3512, 0.2297, 0.3227), 3: (-0.2120, -0.2616, -0.7177)}, (0.0, 0.0, 0.0)),  # SD15
    "svd": (4, {1: (0.3250, 0.4974, 0.2350), 2: (-0.2829, 0.1762, 0.2721)}, (0.0, 0.0, 0.0)),  # SD15
}  # fmt: skip


def family(name):
    return next(f for f in REGISTRY.families() if f.name == name)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def latent2rgb(images, name):
    """ComfyUI's Latent2RGBPreviewer on ``(n, C, h, w)``: ``F.linear`` over channels-last pixels
    with the family's table, then ``(x + 1) / 2`` clamped: an independent formulation."""
    rows, bias = family(name).preview_table
    weight = torch.tensor(rows).T  # [3, C], as ComfyUI transposes it
    rgb = torch.nn.functional.linear(images.movedim(1, -1), weight, torch.tensor(bias))
    return ((rgb + 1) / 2).clamp(0, 1).movedim(-1, 1)


def test_demo_preview_is_the_image_the_model_decodes():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.2
    ours = family("demo").preview(None, x)
    theirs = VaeImageProcessor(do_normalize=True).postprocess(
        x, output_type="pt"
    )  # diffusers' [-1,1] → [0,1]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sdxl_preview_is_the_per_pixel_linear_map():
    x = torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    ours = family("sdxl").preview(None, x)
    for i in range(3):
        for j in range(2):
            for c in range(3):
                v = sum(float(x[0, k, i, j]) * SDXL_FACTORS[k][c] for k in range(4)) + SDXL_BIAS[c]
                assert abs(float(ours[0, c, i, j]) - min(1.0, max(0.0, (v + 1) / 2))) < 1e-5
    assert family("sdxl").preview(None, torch.zeros(1, 16, 3, 2)) is None  # not SDXL's latents: none


@pytest.mark.parametrize("name", sorted(SOURCE))
def test_tables_are_comfyuis(name):
    channels, rows, bias = SOURCE[name]
    table, table_bias = family(name).preview_table
    assert len(table) == channels and all(len(r) == 3 for r in table)
    for k, rgb in rows.items():
        assert table[k] == pytest.approx(rgb, abs=1e-9), (name, k)
    assert table_bias == pytest.approx(bias, abs=1e-9)


@pytest.mark.parametrize("name", ["sd3", "flux", "qwenimage"])
def test_image_dit_preview_is_the_linear_map(name):
    x = rand(2, 16, 4, 6, seed=2) * 2
    ours = family(name).preview(None, x)
    assert ours.shape == (2, 3, 4, 6)
    torch.testing.assert_close(ours, latent2rgb(x, name), atol=1e-5, rtol=0)
    # a few pixels by hand with the typed rows: the first row's channel alone
    rows, bias = SOURCE[name][1], SOURCE[name][2]
    k = min(rows)
    e = torch.zeros(1, 16, 1, 1)
    e[0, k] = 0.5
    want = [min(1, max(0, (0.5 * rows[k][c] + bias[c] + 1) / 2)) for c in range(3)]
    assert family(name).preview(None, e)[0, :, 0, 0].tolist() == pytest.approx(want, abs=1e-6)
    assert family(name).preview(None, torch.zeros(1, 4, 4, 6)) is None  # a 4-channel VAE: no table


@pytest.mark.parametrize("pipeline", ["FluxPipeline", "QwenImagePipeline"])
def test_packed_tokens_preview_as_their_unpacked_latents(pipeline):
    import diffusers

    name = {"FluxPipeline": "flux", "QwenImagePipeline": "qwenimage"}[pipeline]
    x = rand(2, 16, 6, 8, seed=3)
    packed = getattr(diffusers, pipeline)._pack_latents(x, 2, 16, 6, 8)  # diffusers' own packing
    assert packed.shape == (2, 12, 64)
    f = family(name)
    assert torch.equal(f.preview(None, packed, (6, 8)), f.preview(None, x))
    assert f.preview(None, packed) is None  # tokens without their grid: no guess
    assert family("sd3").preview(None, packed, (6, 8)) is None  # SD3 is not packed


def test_preview_frames_are_evenly_spaced():
    assert PREVIEW_FRAMES == 8
    assert preview_frames(3) == [0, 1, 2]
    assert preview_frames(11) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert preview_frames(15) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert preview_frames(1) == [0]


@pytest.mark.parametrize("name", ["wan", "ltx", "animatediff", "svd"])
def test_video_preview_is_a_strip_of_projected_frames(name):
    channels = SOURCE[name][0]
    f = family(name)
    x = rand(2, channels, 11, 3, 4, seed=4)  # [n, C, F, h, w]
    latents = x.transpose(1, 2) if f.frames_first else x  # SVD holds [n, F, C, h, w]
    strip = f.preview(None, latents)
    assert strip.shape == (2, 3, 3, 8 * 4)
    for slot, frame in enumerate([0, 1, 3, 4, 6, 7, 9, 10]):
        want = latent2rgb(x[:, :, frame], name)
        torch.testing.assert_close(strip[..., slot * 4 : (slot + 1) * 4], want, atol=1e-5, rtol=0)
    assert f.preview(None, x[:, :3]) is None  # other latent channels: none
    assert f.preview(None, x[:, :, 0]) is None  # not video latents


def test_a_family_without_a_table_has_no_previews(i2v_pipes):
    from seg_rt.cluster.serving.previews import previewer

    cog = family("cogvideox")
    assert cog.preview_factors(None) is None
    assert cog.preview(None, rand(1, 3, 16, 4, 4)) is None  # [n, F, C, h, w]: no table, no error
    assert previewer(i2v_pipes("cogvideox")) is None  # the server makes no previews for it


def test_a_video_job_shows_its_preview_strip_while_it_samples(demo_video, tmp_path):
    """The demo video model (pixel space; 16x16 frames): a 10-frame job's preview after step 1 is latent
    frames 0, 1, 3, 4, 5, 6, 8, 9 side by side, through ``/v1/jobs/{id}/preview`` and
    ``/sdapi/v1/progress`` while the job still runs (step 2's preview waits for the test)."""
    from seg_rt.cluster.serving.config import ServeConfig
    from seg_rt.cluster.serving.core import ServingCore
    from seg_rt.cluster.serving.http import build_app
    from seg_rt.demo.video_model import video_weights_dir

    from .live_server import torch_threads

    core = ServingCore(
        ServeConfig(model=str(video_weights_dir()), state_dir=str(tmp_path), jobs={"preview_every": 1}),
        demo_video,
    )
    client = TestClient(build_app(core))
    jobs = core.jobs
    made, seen, fetched = jobs.preview, [], threading.Event()
    assert made is not None  # the demo video model has previews

    def gated(latents):
        seen.append(latents.clone())
        if len(seen) > 1:
            assert fetched.wait(300), "the test never fetched the preview"
        return made(latents)

    jobs.preview = gated
    try:
        with torch.inference_mode(), torch_threads(1):
            body = {
                "prompt": "red square moving right",
                "frames": 10,
                "steps": 2,
                "cfg": 1,
                "seg_mode": "spatial",
                "height": 16,
                "width": 16,
            }
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            for _ in range(3000):
                r = client.get(f"/v1/jobs/{job_id}/preview")
                if r.status_code == 200:
                    break
                assert r.status_code == 404, r.text
                threading.Event().wait(0.1)
            assert r.status_code == 200 and r.headers["x-step"] == "1"
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
            progress = client.get("/sdapi/v1/progress").json()
            assert base64.b64decode(progress["current_image"]) == r.content
            fetched.set()
            assert jobs.wait(jobs.jobs[job_id], 300) and jobs.jobs[job_id].status == "succeeded"
    finally:
        fetched.set()
        jobs.preview = made
        core.close()
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape == (16, 8 * 16, 3)  # latent size: the frames themselves
    x = seen[0][0]  # step 1's latents [3, F, 16, 16]: the frames in [-1, 1]
    want = torch.cat([x[:, k] for k in (0, 1, 3, 4, 5, 6, 8, 9)], dim=2)  # side by side
    want = ((want + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(png, want)
