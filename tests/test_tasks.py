"""Input images (seg_rt.tasks): one identity whatever the source, limits checked before decoding."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from seg_rt.tasks import InputImage, load_image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_pixels_same_identity_from_every_source(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    path = tmp_path / "a.png"
    path.write_bytes(_png(pil))
    images = [load_image(v) for v in (array, pil, _png(pil), path, str(path))]
    assert len({im for im in images}) == 1
    im = images[0]
    assert (im.width, im.height, im.mode) == (5, 6, "RGB")
    # the identity is the sha256 of the decoded pixels, computed here independently
    assert im.sha256 == hashlib.sha256(b"RGB\0" + array.tobytes()).hexdigest()
    assert im.record() == {"sha256": im.sha256, "mode": "RGB", "width": 5, "height": 6}
    assert np.array_equal(np.asarray(im.pil()), array)
    assert "sha256=" in repr(im) and str(array.tobytes()[:4]) not in repr(im)


def test_mask_mode_is_luminance():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = 255
    m = load_image(rgb, "mask", mode="L")
    assert m.mode == "L" and np.asarray(m.pil()).tolist() == [[255, 0], [0, 0]]


@pytest.mark.parametrize(
    "value, message",
    [
        (b"not an image", "init image is not an image PIL can read"),
        (12, "init image must be a path, image bytes, a PIL image or a uint8 array, got int"),
        (np.zeros((2, 2), dtype=np.float32), "init image array must be uint8"),
        ("/nonexistent/x.png", "init image '/nonexistent/x.png' is not a file"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(value, message):
    with pytest.raises(ValueError) as e:
        load_image(value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pixel_limit_checked_before_decoding():
    # a 6000 x 6000 PNG of one colour is a few KB; decoding it would take 36 MB
    big = _png(Image.new("L", (6000, 6000)))
    assert len(big) < 100_000
    with pytest.raises(ValueError, match=r"init image is 6000x6000 = 36000000 pixels; the limit is 16777216"):
        load_image(big)
    with pytest.raises(ValueError, match="limit is 10"):
        load_image(Image.new("RGB", (4, 3)), max_pixels=10)
    assert isinstance(load_image(Image.new("RGB", (4, 3)), max_pixels=12), InputImage)
