"""The browser playground at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by
Playwright), on the bundled demo model, through the job API: compare renders 7 images, σ changes
the SEG image, img2img / inpainting with an uploaded image and a mask painted with the mouse, a
progress bar counting steps with previews before the final image, cancel, and a keyed server whose
defaults the page reads once the key is given (under the page's own CSP, not bypassed).

``SEG_RT_SCREENSHOT=docs/playground.png pytest tests/test_playground.py`` also writes the README's
screenshot there."""

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg_rt.cluster.serving.config import ServeConfig
from seg_rt.cluster.serving.core import ServingCore
from seg_rt.cluster.serving.http import build_app
from seg_rt.demo.model import weights_dir
from seg_rt.pipeline import load_pipeline

from .live_server import live_server, torch_threads

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no system chromium (apt-get install chromium; .ci/run installs it)"
)
expect = sync_api.expect
SIGMAS = [
    "0.1",
    "0.2",
    "0.5",
    "1",
    "2",
    "3",
    "5",
    "7",
    "10",
    "15",
    "20",
    "30",
    "50",
    "100",
    "inf",
]  # the slider
WAIT = 300_000  # ms: a loaded 2-core CI machine
KEY = "playground-test-key"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(weights_dir()), "cpu")


def serve(pipe, state_dir: Path, **config):
    cfg = ServeConfig(model=str(weights_dir()), state_dir=str(state_dir), **config)
    core = ServingCore(cfg, pipe)
    return core, build_app(core)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    """(base URL, core): the demo model with a preview after every step."""
    core, app = serve(pipe, tmp_path_factory.mktemp("state"), jobs={"preview_every": 1})
    with torch_threads(1), live_server(app) as base:
        yield base, core
    core.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        # as root (CI) Chromium needs --no-sandbox; no browser download: Debian's chromium
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page(
        viewport={"width": 1400, "height": 1000}, bypass_csp=True
    )  # the test waits with JS strings (eval); the keyed test below runs under the page's CSP
    page.goto(server[0] + "/")
    yield page
    page.close()


@contextlib.contextmanager
def slow_steps(core, seconds: float):
    """Each sampling step of jobs submitted meanwhile takes ``seconds`` longer (the previewer, run
    after every step in the worker thread, waits): progress the browser can see, deterministically."""
    jobs = core.jobs
    made = jobs.preview

    def slow(latents):
        time.sleep(seconds)
        return made(latents)

    jobs.preview = slow
    try:
        yield
    finally:
        jobs.preview = made


def rendered(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(
        selector,
        "imgs => imgs.map(i => ({label: i.dataset.label, task: i.dataset.task, src: i.src, "
        "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))",
    )


def wait_images(page, selector: str, count: int) -> list[dict]:
    page.wait_for_function(
        f"""() => {{ const imgs = [...document.querySelectorAll({selector!r})];
                     return imgs.length === {count} && imgs.every(i => i.complete && i.naturalWidth > 0); }}""",
        timeout=WAIT,
    )
    return rendered(page, selector)


def png_of(src: str) -> Image.Image:
    head, _, data = src.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def record_of(src: str) -> dict:
    return json.loads(png_of(src).text["parameters"])  # the record the server wrote into the PNG


def sha(image: Image.Image) -> str:  # seg_rt.tasks.InputImage's rule, written out here
    return hashlib.sha256(image.mode.encode() + b"\0" + image.tobytes()).hexdigest()


def picture(width=32, height=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def job_bodies(page) -> list[dict]:
    """The bodies the page POSTs to ``v1/jobs`` from now on (a list that fills as it runs)."""
    bodies: list[dict] = []

    def seen(request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/jobs"):
            bodies.append(json.loads(request.post_data))

    page.on("request", seen)
    return bodies


def test_compare_renders_seven_images(page, tmp_path):
    page.wait_for_function("document.getElementById('model').textContent === 'seg-rt-demo'")
    assert page.input_value("#steps") == "25" and page.input_value("#cfg") == "5"  # the server's defaults
    assert page.input_value("#width") == "32" and page.input_value("#height") == "32"
    assert page.input_value("#sampler") == "euler"
    options = page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)")
    assert options == ["euler", "euler_a", "ddim", "dpmpp_2m", "unipc", "heun"]  # GET v1/info's list
    page.fill("#prompt", "yellow star on checks")
    page.fill("#steps", "4")
    page.fill("#cfg", "3")
    page.click("#compare")
    images = wait_images(page, "#grid img.final", 7)
    assert [i["label"] for i in images] == [
        "vanilla",
        "CFG 3",
        "SEG σ=1 +CFG 3",
        "SEG σ=2 +CFG 3",
        "SEG σ=5 +CFG 3",
        "SEG σ=10 +CFG 3",
        "SEG σ=∞ +CFG 3",
    ]
    assert all(i["width"] == 32 and i["height"] == 32 for i in images)  # decoded by the browser
    assert all(i["task"] == "txt2img" for i in images)
    assert len({i["src"] for i in images}) == 7  # seven different pictures
    # the bar counts sampling steps: 7 jobs x 4 steps, not 7 images
    assert page.get_attribute("#progress", "max") == "28" and page.get_attribute("#progress", "value") == "28"
    assert page.text_content("#status").startswith("7 / 7 images, step 28 / 28")
    assert page.text_content("#error") == ""
    links = page.eval_on_selector_all("#grid a[download]", "as => as.map(a => a.download)")
    assert links[:2] == ["seg-rt_seed0_cfg1_seg0_sigmainf.png", "seg-rt_seed0_cfg1_seg0_sigmainf.json"]
    shot = os.environ.get("SEG_RT_SCREENSHOT")
    page.screenshot(path=str(Path(shot) if shot else tmp_path / "playground.png"), full_page=True)


def test_sigma_slider_changes_the_seg_image(page):
    by_label = {i["label"]: i["src"] for i in rendered(page, "#grid img.final")}
    page.fill("#sigma", str(SIGMAS.index("1")))
    assert page.text_content("#sigma_value") == "1"
    page.click("#generate")
    [at_1] = wait_images(page, "#single img.final", 1)
    page.fill("#sigma", str(SIGMAS.index("inf")))
    assert page.text_content("#sigma_value") == "∞"
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#single img.final')?.dataset.sigma === 'inf'", timeout=WAIT
    )
    [at_inf] = wait_images(page, "#single img.final", 1)
    assert at_1["label"] == "SEG σ=1" and at_inf["label"] == "SEG σ=∞"
    assert at_1["src"] != at_inf["src"]  # σ changes the image
    # the same settings as the compare row: the same PNG, bit for bit
    assert at_1["src"] == by_label["SEG σ=1 +CFG 3"] and at_inf["src"] == by_label["SEG σ=∞ +CFG 3"]


def test_inpainting_with_an_uploaded_image_and_a_painted_mask(page, tmp_path):
    """Upload an init image, paint a stroke on it with the mouse: the server gets the image and a
    white-on-black mask of the stroke, the result's record names both (inpaint), and every pixel
    away from the stroke is the init image's. Clear the mask: img2img at the slider's strength."""
    init = picture(seed=7)
    init.save(tmp_path / "init.png")
    bodies = job_bodies(page)
    page.set_input_files("#init_file", str(tmp_path / "init.png"))
    expect(page.locator("#stage")).to_be_visible()
    assert page.is_disabled("#width") and page.is_disabled("#height")  # the image gives the size
    page.fill("#brush", "4")
    page.fill("#strength", "1")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    box = page.locator("#mask_canvas").bounding_box()
    s = box["width"] / 32
    at = lambda x, y: (box["x"] + (x + 0.5) * s, box["y"] + (y + 0.5) * s)  # noqa: E731 (pixel centres)
    page.mouse.move(*at(6, 16))
    page.mouse.down()
    page.mouse.move(*at(25, 16), steps=8)
    page.mouse.up()
    page.click("#generate")
    [out] = wait_images(page, "#single img.final", 1)
    assert out["task"] == "inpaint" and "inpaint" in page.text_content("#single figcaption")
    [body] = bodies
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).convert("L")
    m = np.asarray(mask)
    assert mask.size == (32, 32) and m[16, 6:26].min() == 255  # white = repaint, on the stroke
    assert m[:12].max() == 0 and m[21:].max() == 0 and m[:, :3].max() == 0  # black elsewhere
    record = record_of(out["src"])
    assert record["init_image"] == {"sha256": sha(init), "mode": "RGB", "width": 32, "height": 32}
    assert record["mask"]["sha256"] == sha(mask) and body["strength"] == 1  # 1: left out of records
    got = np.asarray(png_of(out["src"]).convert("RGB")).astype(int)
    known = m == 0
    assert np.array_equal(got[known], np.asarray(init)[known])  # the unmasked region is kept
    assert np.abs(got - np.asarray(init))[15:18, 8:24].mean() > 20  # the stroke is repainted

    page.click("#clear_mask")
    page.fill("#strength", "0.5")
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#single img.final')?.dataset.task === 'img2img'", timeout=WAIT
    )
    [out] = wait_images(page, "#single img.final", 1)
    assert "mask" not in bodies[1] and bodies[1]["strength"] == 0.5
    record = record_of(out["src"])
    assert record["init_image"]["sha256"] == sha(init) and "mask" not in record and record["strength"] == 0.5
    assert not np.array_equal(np.asarray(png_of(out["src"]).convert("RGB")), np.asarray(init))
    page.click("#remove_image")
    assert not page.is_disabled("#width")


RECORDER = """() => {
  window.__log = [];
  const snap = (what) => {
    const bar = document.getElementById('progress');
    const pv = document.querySelector('#single img.preview');
    window.__log.push({what, value: bar.value, max: bar.max,
      preview: !!(pv && !pv.hidden && pv.complete && pv.naturalWidth > 0), step: pv ? pv.dataset.step : null,
      final: document.querySelectorAll('#single img.final').length});
  };
  new MutationObserver(() => snap('mutation')).observe(document.body,
    {subtree: true, childList: true, attributes: true, characterData: true});
  document.addEventListener('load', (e) => snap('load:' + e.target.className), true);
}"""


def test_progress_bar_and_previews_before_the_final_image(page, server):
    """A 6-step job made slow (0.15 s more per step): the page's bar counts the steps as they come
    from the job's event stream, and previews are on the page before the final image."""
    page.fill("#steps", "6")
    page.evaluate(RECORDER)  # the test's own observer of the page, installed before the click
    with slow_steps(server[1], 0.15):
        page.click("#generate")
        page.wait_for_function(
            "document.querySelector('#single img.final')?.dataset.label?.startsWith('SEG') && "
            "document.querySelector('#single img.final').complete",
            timeout=WAIT,
        )
    log = page.evaluate("window.__log")
    first_final = next(i for i, e in enumerate(log) if e["final"])
    before = log[:first_final]
    previews = [e for e in before if e["what"] == "load:preview"]
    assert previews and all(e["preview"] for e in previews)  # a preview shown before the final image
    steps = [int(e["step"]) for e in previews]
    assert steps == sorted(steps) and steps[0] >= 1 and steps[-1] < 6
    values = sorted({e["value"] for e in before if e["max"] == 6 and 0 < e["value"] < 6})
    assert len(values) >= 2  # the bar advanced step by step (at least two steps seen)
    assert all(e["max"] == 6 for e in before if e["value"] > 0)  # counting steps (1 image, 6 steps)
    assert log[-1]["final"] == 1 and page.get_attribute("#progress", "value") == "6"


def test_cancel_stops_the_running_job(page, server):
    core = server[1]
    page.fill("#steps", "30")
    with slow_steps(core, 0.1):
        page.click("#generate")
        expect(page.locator("#single .state")).to_have_text(re.compile(r"^step [1-9]"), timeout=WAIT)
        page.click("#cancel")
        expect(page.locator("#single .state")).to_have_text("cancelled", timeout=WAIT)
    assert page.locator("#single img.final").count() == 0
    job = core.jobs.owned("")[-1]
    assert job.status == "cancelled" and 0 < job.done_steps < 30
    assert page.text_content("#status").endswith("(cancelled)") and not page.is_disabled("#generate")


def test_keyed_server_fills_the_fields_once_the_key_is_given(browser, pipe, tmp_path):
    """On a keyed server the page cannot read ``v1/info`` before the key: the fields stay empty and
    the page asks for the key; once it is given, the server's defaults fill them (its size and
    sampler here), the key is kept in the browser's storage (said on the page), and a Generate
    with a field left empty leaves it out (the server's default) rather than sending 0; an init image
    over the server's pixel limit is scaled down to fit before it is sent. Run under
    the page's own CSP: no violation, no script error, no other request refused."""
    core, app = serve(
        pipe,
        tmp_path / "state",
        api_keys=[KEY],
        default_height=24,
        default_width=40,
        scheduler="ddim",
        limits={"max_pixels": 1600},
    )
    with torch_threads(1), live_server(app) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})  # the CSP applies
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        unauthorized: list[str] = []
        page.on("response", lambda r: unauthorized.append(r.url) if r.status == 401 else None)
        bodies = job_bodies(page)
        try:
            page.goto(base + "/")
            expect(page.locator("#error")).to_contain_text("enter the server's API key above")
            assert page.input_value("#steps") == "" and page.input_value("#width") == ""
            expect(page.locator("#key_note")).to_contain_text("local storage")
            page.fill("#key", KEY)
            page.click("#use_key")
            expect(page.locator("#model")).to_have_text("seg-rt-demo")
            expect(page.locator("#steps")).to_have_value("25")
            assert (page.input_value("#width"), page.input_value("#height")) == ("40", "24")
            assert page.input_value("#sampler") == "ddim" and page.text_content("#error") == ""
            page.reload()  # the key was kept: the defaults come at once
            expect(page.locator("#steps")).to_have_value("25")
            assert page.input_value("#key") == KEY
            page.fill("#prompt", "yellow star on checks")
            page.fill("#steps", "2")
            page.fill("#seed", "")  # left empty: the server's default, not 0
            page.fill("#seg_scale", "")
            page.fill("#num_images", "2")
            page.click("#generate")
            finals = page.locator("#single img.final")
            expect(finals).to_have_count(2, timeout=WAIT)
            [body] = bodies
            assert "seed" not in body and "seg_scale" not in body
            assert body["steps"] == 2 and body["scheduler"] == "ddim" and body["num_images"] == 2
            assert (body["width"], body["height"]) == (40, 24)
            records = [record_of(finals.nth(i).get_attribute("src")) for i in range(2)]
            assert [r["seed"] for r in records] == [0, 1]  # the server's default seed, + i
            for r in records:
                assert r["scheduler"] == "ddim" and r["steps"] == 2 and r["seg_scale"] == 3.0
                assert (r["width"], r["height"]) == (40, 24)
            assert png_of(finals.nth(0).get_attribute("src")).size == (40, 24)

            # an init image over the server's pixel limit is sent at the largest size under it
            picture(64, 48).save(tmp_path / "big.png")
            page.set_input_files("#init_file", str(tmp_path / "big.png"))
            expect(page.locator("#init_note")).to_contain_text("46×34 (resized from 64×48")
            page.fill("#num_images", "1")
            page.fill("#strength", "0.5")
            page.click("#generate")
            expect(page.locator("#single img.final")).to_have_count(1, timeout=WAIT)
            sent = bodies[1]
            assert "width" not in sent and "mask" not in sent  # the size is the image's
            out = png_of(page.locator("#single img.final").get_attribute("src"))
            init = record_of(page.locator("#single img.final").get_attribute("src"))["init_image"]
            assert out.size == (46, 34) and (init["width"], init["height"]) == (46, 34)  # 1564 <= 1600
            assert unauthorized == [base + "/v1/info"]  # only the one before the key was given
            assert problems == [
                "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
            ]
        finally:
            page.close()
    core.close()
