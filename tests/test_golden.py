"""Every entry point's output is what it was when tests/golden.json was recorded (see tests/golden.py)."""

import json

import numpy as np
import pytest

from .golden import GOLDEN, NOT_BIT_REPRODUCIBLE, cases, fingerprint, summary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def machine():
    return fingerprint()  # before any case runs (a case may set thread counts)


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("golden"))


def _names():
    return sorted(json.loads(GOLDEN.read_text())["cases"])


def test_every_case_is_recorded(golden, runs):
    assert sorted(runs) == sorted(golden["cases"])


@pytest.mark.parametrize("name", _names())
def test_output_unchanged(name, golden, runs, machine):
    want = golden["cases"][name]
    got = summary(*runs[name]())
    exact = golden["fingerprint"] == machine and not name.startswith(NOT_BIT_REPRODUCIBLE)
    if exact:  # same machine kind, same code path: bit-exact
        if want["kind"] == "png":
            assert got["pixel_sha256"] == want["pixel_sha256"], f"{name}: pixels changed"
        else:
            assert got["sha256"] == want["sha256"], f"{name}: output bytes changed"
    else:  # another CPU: kernels differ in the last bits; compare thumbnails relative to the scale
        assert got["kind"] == want["kind"]
        err = np.abs(np.array(got["thumb"]) - np.array(want["thumb"])).max()
        # 8-bit outputs: half a level of a block mean; float outputs: far tighter
        rel = 2e-3 if want["kind"] in ("png", "mp4") else 1e-4
        assert err <= rel * max(1.0, want["scale"]), f"{name}: thumbnail differs by {err:g}"
    if want["kind"] == "png":
        assert got["record"] == want["record"], f"{name}: PNG parameter record changed"
