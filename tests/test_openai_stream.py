"""The official ``openai`` client's streamed image generation against the server (loopback, no
Ray): partial images in OpenAI's event shape, then the final image, equal to the non-streamed one."""

import base64
import io

import pytest
import torch
from PIL import Image

from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app

from .live_server import live_server, torch_threads

EXTRA = {"seed": 3, "steps": 6, "cfg": 3, "seg_scale": 3}


def test_images_generate_stream_partial_images(sdxl, tmp_path):
    openai = pytest.importorskip("openai")
    core = ServingCore(ServeConfig(model="tiny-sdxl", state_dir=str(tmp_path)), sdxl)
    try:
        with torch.inference_mode(), torch_threads(1), live_server(build_app(core)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            events = list(
                client.images.generate(
                    prompt="a cat", size="64x64", stream=True, partial_images=2, extra_body=EXTRA
                )
            )
            plain = client.images.generate(prompt="a cat", size="64x64", extra_body=EXTRA)
            with pytest.raises(openai.BadRequestError, match="partial_images must be an integer 0-3"):
                list(client.images.generate(prompt="a cat", stream=True, partial_images=5, extra_body=EXTRA))
    finally:
        core.close()
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events[:2]:
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (8, 8)  # latent-size preview
        assert e.size == "64x64" and e.output_format == "png"
    assert events[-1].b64_json == plain.data[0].b64_json  # the same bytes as the plain request
