"""The browser playground at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by
Playwright), on the bundled demo model: compare renders 7 images, and σ changes the SEG image.

``SEG_RT_SCREENSHOT=docs/playground.png pytest tests/test_playground.py`` also writes the README's
screenshot there."""

import os
import shutil
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def url():
    cfg = ServeConfig(model=str(weights_dir()))
    core = ServingCore(cfg, load_pipeline(cfg.model, "cpu"))
    with torch_threads(1), live_server(build_app(core)) as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as pw:
        # as root (CI) Chromium needs --no-sandbox; no browser download: Debian's chromium
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(
            viewport={"width": 1400, "height": 900}, bypass_csp=True
        )  # the test waits with JS strings (eval); the page's CSP has its own test (test_hardening2)
        page.goto(url + "/")
        yield page
        browser.close()


def rendered(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(
        selector,
        "imgs => imgs.map(i => ({label: i.dataset.label, src: i.src, complete: i.complete, "
        "width: i.naturalWidth, height: i.naturalHeight}))",
    )


def wait_images(page, selector: str, count: int) -> list[dict]:
    page.wait_for_function(
        f"""() => {{ const imgs = [...document.querySelectorAll({selector!r})];
                     return imgs.length === {count} && imgs.every(i => i.complete && i.naturalWidth > 0); }}""",
        timeout=300_000,
    )
    return rendered(page, selector)


def test_compare_renders_seven_images(page, tmp_path):
    page.wait_for_function("document.getElementById('model').textContent === 'seg-rt-demo'")
    assert page.input_value("#steps") == "25" and page.input_value("#cfg") == "5"  # the server's defaults
    page.fill("#prompt", "yellow star on checks")
    page.fill("#steps", "8")
    page.fill("#cfg", "3")
    page.click("#compare")
    images = wait_images(page, "#grid img", 7)
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
    assert len({i["src"] for i in images}) == 7  # seven different pictures
    assert page.text_content("#status").startswith("7 / 7 images") and page.text_content("#error") == ""
    links = page.eval_on_selector_all("#grid a[download]", "as => as.map(a => a.download)")
    assert links[:2] == ["seg-rt_seed0_cfg1_seg0_sigmainf.png", "seg-rt_seed0_cfg1_seg0_sigmainf.json"]
    shot = os.environ.get("SEG_RT_SCREENSHOT")
    page.screenshot(path=str(Path(shot) if shot else tmp_path / "playground.png"), full_page=True)


def test_sigma_slider_changes_the_seg_image(page):
    by_label = {i["label"]: i["src"] for i in rendered(page, "#grid img")}
    page.fill("#sigma", str(SIGMAS.index("1")))
    assert page.text_content("#sigma_value") == "1"
    page.click("#generate")
    [at_1] = wait_images(page, "#single img", 1)
    page.fill("#sigma", str(SIGMAS.index("inf")))
    assert page.text_content("#sigma_value") == "∞"
    page.click("#generate")
    page.wait_for_function("document.querySelector('#single img')?.dataset.sigma === 'inf'", timeout=300_000)
    [at_inf] = wait_images(page, "#single img", 1)
    assert at_1["label"] == "SEG σ=1" and at_inf["label"] == "SEG σ=∞"
    assert at_1["src"] != at_inf["src"]  # σ changes the image
    # the same settings as the compare row: the same PNG, bit for bit
    assert at_1["src"] == by_label["SEG σ=1 +CFG 3"] and at_inf["src"] == by_label["SEG σ=∞ +CFG 3"]
