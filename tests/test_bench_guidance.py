"""``seg-rt bench guidance``: counted forward passes, matched-strength interpolation, a smoke run, bad input."""

from __future__ import annotations

import json
import math

import pytest

from seg_rt.bench import guidance as g
from tests.cli_run import run_cli


def test_matched_strength_interpolates_the_cfg_sweep():
    sweep = [
        {"cfg": 1.0, "dist_to_vanilla": 0.0, "fid": 10.0},
        {"cfg": 2.0, "dist_to_vanilla": 1.0, "fid": 6.0},
        {"cfg": 4.0, "dist_to_vanilla": 3.0, "fid": 8.0},
    ]
    assert g._interp(sweep, 2.0, "cfg") == (3.0, False)  # halfway between 2 and 4
    assert g._interp(sweep, 0.25, "fid") == (9.0, False)
    assert g._interp(sweep, 5.0, "cfg") == (4.0, True)  # beyond the sweep: its end, flagged


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown guidance method 'tpg'; known: seg, pag"):
        g.check_methods(["seg", "tpg"])


def test_smoke_counts_forward_passes_and_labels_every_row():
    rows = g.run_guidance(
        ["digits"], cases=["no-cfg", "unconditional"], methods=["seg", "seg-every2"], samples=8, steps=4,
        scales=[2.0], sigmas=[math.inf], case_sigmas=[math.inf], cfg_scales=[2.0, 5.0], checkpoints=["final"],
    )  # fmt: skip
    for row in rows:
        assert {"method", "nfe", "effective_strength", "fid", "precision", "recall", "diversity",
                "dist_to_vanilla", "case", "model"} <= row.keys()  # fmt: skip
    by = {(r["case"], r["method"], r["steps"], r.get("role")): r for r in rows}
    # forward passes per image, counted on the UNet: vanilla 1/step, CFG 2/step, SEG 2/step,
    # SEG every 2nd step 1.5/step (4 steps: 2 with the perturbed row)
    assert by[("no-cfg", "vanilla", 4, "anchor")]["nfe"] == 4
    assert by[("no-cfg", "cfg", 4, "rival")]["nfe"] == 8
    seg = by[("no-cfg", "seg", 4, "method")]
    assert seg["nfe"] == 8 and seg["rival_steps"] == 4 and seg["rival_nfe"] == 8
    every = by[("no-cfg", "seg-every2", 4, "method")]
    assert every["nfe"] == 6 and every["rival_steps"] == 3
    assert seg["effective_strength"] is not None and "FID" in seg["verdict"]
    assert seg["accuracy"] is not None and seg["rival"]["accuracy"] is not None
    useg = by[("unconditional", "seg", 4, "method")]
    assert useg["effective_strength"] is None and useg["rival_steps"] == 8 and useg["accuracy"] is None
    assert by[("unconditional", "vanilla", 8, "rival")]["nfe"] == 8
    assert "| digits | no-cfg | seg σ=inf 2 | 8 |" in g.table(rows)


def test_cli_rejects_bad_input_before_loading():
    r = run_cli("bench", "guidance", "--methods", "seg,nope", timeout=120)
    assert r.returncode == 2 and "unknown guidance method 'nope'" in r.stderr
    r = run_cli("bench", "guidance", "--cases", "sideways", timeout=120)
    assert r.returncode == 2 and "unknown case 'sideways'" in r.stderr
    r = run_cli("bench", "guidance", "--models", "sdxl", timeout=120)
    assert r.returncode == 2 and "unknown model 'sdxl'" in r.stderr


def test_cli_smoke_writes_json_lines_and_plot(tmp_path):
    out, plot = tmp_path / "rows.jsonl", tmp_path / "g.png"
    r = run_cli("bench", "guidance", "--models", "digits", "--checkpoints", "final", "--cases", "no-cfg", "--methods", "pag",
                "--samples", 8, "--steps", 2, "--scales", 2, "--cfg-scales", 3, "--json", "--out", out,
                "--plot", plot)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == g.read_rows(out)
    assert [(row["method"], row["role"]) for row in rows] == [
        ("vanilla", "anchor"), ("vanilla", "rival"), ("cfg", "rival"), ("pag", "method"),
    ]  # fmt: skip
    assert plot.stat().st_size > 1000
