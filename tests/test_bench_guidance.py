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
    with pytest.raises(ValueError, match="unknown guidance method 'nag'; known: seg, pag, tpg, slg"):
        g.check_methods(["seg", "nag"])


def test_smoke_counts_forward_passes_and_labels_every_row():
    rows = g.run_guidance(
        ["digits"], cases=["no-cfg", "unconditional"], methods=["seg", "seg-every2"], samples=8, steps=4,
        scales=[2.0], sigmas=[math.inf], case_sigmas=[math.inf], cfg_scales=[2.0, 5.0], checkpoints=["final"],
    )  # fmt: skip
    for row in rows:
        json.dumps(row, allow_nan=False)  # JSON has no infinity: σ = ∞ is "inf" (seg_sigma too)
        assert {"method", "nfe", "effective_strength", "fid", "precision", "recall", "diversity",
                "dist_to_vanilla", "case", "model"} <= row.keys()  # fmt: skip
    by = {(r["case"], r["method"], r["steps"], r.get("role")): r for r in rows}
    # forward passes per image, counted on the UNet: vanilla 1/step, CFG 2/step, SEG 2/step,
    # SEG every 2nd step 1.5/step (4 steps: 2 with the perturbed row)
    assert by[("no-cfg", "vanilla", 4, "anchor")]["nfe"] == 4
    assert by[("no-cfg", "cfg", 4, "rival")]["nfe"] == 8
    # the sweep's strength-0 point has CFG's forward passes too: vanilla at twice the steps
    assert by[("no-cfg", "vanilla", 8, "rival")]["nfe"] == 8 and ("no-cfg", "vanilla", 4, "rival") not in by
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


def test_perturbed_terms_count_their_forward_passes_and_are_labelled():
    """TPG and full-window SLG add one pass per step; SLG at its default window (0.01-0.2 of the
    schedule) only at step 1 of 6; each row is matched to vanilla at its own NFE."""
    rows = g.run_guidance(
        ["digits"], cases=["unconditional"], methods=["tpg", "slg", "slg-full"], samples=8, steps=6,
        scales=[2.0], checkpoints=["final"],
    )  # fmt: skip
    by = {r["method"]: r for r in rows if r["role"] == "method"}
    assert {m: (by[m]["nfe"], by[m]["rival_steps"], g.label(by[m])) for m in by} == {
        "tpg": (12, 12, "tpg 2"), "slg": (7, 7, "slg 2"), "slg-full": (12, 12, "slg-full 2"),
    }  # fmt: skip
    assert by["tpg"]["guidance"] == "tpg=2" and by["slg-full"]["guidance"] == "slg=2:start=0:end=1"
    # each perturbation acts: the samples move away from vanilla's
    assert all(by[m]["dist_to_vanilla"] > 0 for m in by)
    assert {(r["method"], r["steps"]) for r in rows if r["role"] == "rival"} == {
        ("vanilla", 7),
        ("vanilla", 12),
    }


def test_cfg_modifiers_run_on_cfg_rows_at_their_scale_and_flow_only_ones_are_skipped():
    """APG and FreSca reuse CFG's two rows (NFE 2 per step, rival CFG at the same steps), labelled
    with their CFG scale; FreSca's default cutoff (20) covers a 16-wide latent's whole spectrum, so it
    is CFG itself, and the cutoff scaled to the latent is not; CFG-Zero* (flow models) is a skipped
    row on the digits model (DDPM, v-prediction)."""
    rows = g.run_guidance(
        ["digits"], cases=["conditional"], methods=["apg", "cfgzero", "fresca", "fresca-scaled"], samples=8,
        steps=3, cfg_scales=[2.0, 3.0, 5.0], modifier_scales=[3.0], checkpoints=["final"],
    )  # fmt: skip
    by = {r["method"]: r for r in rows if r["role"] in ("method", "skipped")}
    assert {m: (by[m]["nfe"], by[m]["rival_steps"], g.label(by[m])) for m in ("apg", "fresca", "fresca-scaled")} == {
        "apg": (6, 3, "apg cfg 3"), "fresca": (6, 3, "fresca cfg 3"), "fresca-scaled": (6, 3, "fresca-scaled cfg 3"),
    }  # fmt: skip
    assert by["apg"]["cfg"] == 3.0 and by["apg"]["guidance"] == "apg"
    assert by["fresca-scaled"]["guidance"] == "fresca:cutoff=2" and g.fresca_cutoff(128) == 20
    cfg3 = next(r for r in rows if r["method"] == "cfg" and r["scale"] == 3.0 and r["steps"] == 3)
    assert by["fresca"]["fid"] == pytest.approx(cfg3["fid"], abs=1e-3)
    assert by["fresca"]["effective_strength"] == pytest.approx(3.0, abs=0.05)
    assert by["fresca-scaled"]["dist_to_vanilla"] != pytest.approx(cfg3["dist_to_vanilla"], abs=1e-3)
    assert by["apg"]["effective_strength"] is not None and "FID" in by["apg"]["verdict"]
    assert by["cfgzero"]["role"] == "skipped" and by["cfgzero"]["nfe"] is None
    assert "flow-matching" in by["cfgzero"]["reason"]
    assert "| digits | conditional | apg cfg 3 | 6 |" in g.table(rows)


def bad_rows(folder, text: str):
    path = folder / f"rows{abs(hash(text))}.jsonl"
    path.write_text(text + "\n")
    return path


def test_cli_rejects_bad_input_before_loading(capsys, monkeypatch, tmp_path):
    """In-process (the CLI's own entry point; the subprocess run is the smoke test below), with the
    loaders made to fail: a bad value is refused before any model loads."""
    from seg_rt.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(g, "run_guidance", no_loading)
    for args, message in [
        (["--methods", "seg,nope"], "unknown guidance method 'nope'"),
        (["--cases", "sideways"], "unknown case 'sideways'"),
        (["--models", "sdxl"], "unknown model 'sdxl'"),
        (["--report", "/nonexistent/rows.jsonl"], "error: --report /nonexistent/rows.jsonl"),
        (["--report", __file__, "--tie", "-1"], "--tie must be >= 0, got -1"),
        (["--report", __file__, "--tie-acc", "nan"], "--tie-acc must be >= 0, got nan"),
        (["--tie", "-1"], "--tie must be >= 0, got -1"),  # a measuring run too, before it measures
        (["--report", str(bad_rows(tmp_path, "[1, 2]"))], "line 1 is not a bench guidance row"),
        (
            ["--report", str(bad_rows(tmp_path, '{"bench": "guidance", "role": "method", "method": "seg"}'))],
            "line 1 ('seg' row) lacks model, case, steps",
        ),
        (
            [
                "--report",
                str(bad_rows(tmp_path, '{"bench": "guidance", "role": "skipped", "method": "cfgzero"}')),
            ],
            "no seg method rows to judge",
        ),
        (["--report", str(bad_rows(tmp_path, "{not json"))], "error: --report"),
    ]:
        try:
            code = main(["bench", "guidance", *args])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, code, err)


def test_cli_smoke_writes_json_lines_and_plot(tmp_path):
    out, plot = tmp_path / "rows.jsonl", tmp_path / "g.png"
    r = run_cli("bench", "guidance", "--models", "digits", "--checkpoints", "final", "--cases", "no-cfg", "--methods", "seg", "--case-sigmas", "inf",
                "--samples", 8, "--steps", 2, "--scales", 2, "--cfg-scales", 3, "--json", "--out", out,
                "--plot", plot)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == g.read_rows(out)
    assert [(row["method"], row["role"]) for row in rows] == [
        ("vanilla", "anchor"), ("vanilla", "rival"), ("cfg", "rival"), ("seg", "method"),
    ]  # fmt: skip
    assert plot.stat().st_size > 1000
    # --report measures nothing and writes no plot unless asked: the table from the rows
    r = run_cli("bench", "guidance", "--report", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| digits | no-cfg |" in r.stdout and not (tmp_path / "guidance.png").exists()


def test_dominance_with_ties_and_the_verdict_table():
    """A row beats a rival only when no worse on FID and accuracy and better on one, beyond the ties;
    SEG's row that stands best against the rivals with its forward passes is the one reported."""
    a = {"fid": 5.0, "accuracy": 0.90}
    assert g.dominates(a, {"fid": 6.0, "accuracy": 0.90}, tie=0.5)
    assert not g.dominates(a, {"fid": 5.3, "accuracy": 0.90}, tie=0.5)  # within the FID tie
    assert g.dominates(a, {"fid": 5.3, "accuracy": 0.80}, tie=0.5)  # better accuracy, FID tied
    assert not g.dominates(a, {"fid": 4.0, "accuracy": 0.80}, tie=0.5)  # a trade-off: neither
    assert not g.dominates({"fid": 4.0, "accuracy": 0.80}, a, tie=0.5)
    assert g.dominates({"fid": 4.0}, {"fid": 5.0}, tie=0.5)  # unconditional: FID only
    common = {"model": "m", "case": "no-cfg", "sigma": "inf"}
    rival = {"role": "rival", "cfg": 3.0, "steps": 6, "sweep_steps": 6, "nfe": 12}
    rivals = [
        rival | {"method": "vanilla", "cfg": 1.0, "steps": 12, "fid": 4.0, "accuracy": 0.6},
        rival | {"method": "cfg", "fid": 5.0, "accuracy": 0.9},
        rival | {"method": "cfg", "cfg": 1.5, "fid": 2.5, "accuracy": 0.3},  # the lowest FID, less accurate
        *[rival | {"method": "cfg", "cfg": c, "steps": 3, "sweep_steps": 3, "nfe": 6, "fid": 1.0, "accuracy": 0.99}
          for c in (1.5, 3.0, 5.0)],  # another NFE: no rival of the 12-NFE rows
    ]  # fmt: skip
    seg = {"role": "method", "steps": 6, "nfe": 12, "rival_steps": 6, "rival_nfe": 12, "effective_strength": 1.2,
           "beyond_sweep": False, "rival": {"fid": 6.0, "accuracy": 0.6}}  # fmt: skip
    methods = [
        seg | {"method": "seg", "scale": 1.0, "fid": 3.0, "accuracy": 0.5},  # on the frontier
        seg | {"method": "seg", "scale": 3.0, "fid": 6.0, "accuracy": 0.8},  # CFG 3 beats it
        seg | {"method": "tpg", "scale": 1.0, "fid": 2.6, "accuracy": 0.95},  # beats every 12-NFE rival
        seg | {"method": "pag", "scale": 1.0, "fid": 2.0, "accuracy": 0.3},
    ]
    rivals = [r | {"scale": r["cfg"]} for r in rivals]
    rows = [common | r for r in rivals + methods]
    rows += [
        r | {"seed_base": 1000, "accuracy": 0.2} if r["method"] == "seg" else r | {"seed_base": 1000}
        for r in rows
    ]
    # the repeat differs only in SEG's two rows' accuracy: p90 of 10 pairs' differences (the 10th), 0.6; FID 0
    assert g.seed_spread(rows, "m") == {"fid": 0.0, "accuracy": 0.6, "pairs": 10}
    assert g.seed_spread(rows[:-1], "m") is None  # 9 pairs: too few to read a spread from
    first, second = g.case_verdicts(rows, tie=0.4, tie_acc=0.015)
    assert (
        first["seg"] == "seg σ=inf s=1 (12): 3.00, acc 0.50"
    )  # not dominated; the 6-NFE rivals are no rivals
    # the best FID among the rivals at least as accurate, not the lowest FID (CFG 1.5: 2.5 at 0.3)
    assert first["matched_nfe"] == "vanilla, 12 steps (12): 4.00, acc 0.60"
    assert first["matched_strength"] == "CFG 1.2: 6.00, acc 0.60"
    assert first["verdict"] == (
        "SEG is on the rivals' frontier (none is better on both FID and accuracy) at matched NFE; "
        "ties CFG at matched strength"
    )
    assert first["other"].startswith("tpg s=1 (12): 2.60, acc 0.95: beats every rival")
    # both SEG rows at accuracy 0.2: CFG 1.5 (2.5 / 0.3) beats the 3.0 row, it and the others the 6.0 row
    assert second["seed_base"] == 1000 and second["seg"].startswith("seg σ=inf s=1 (12): 3.00")
    assert second["verdict"].startswith("SEG loses to CFG 1.5 at matched NFE")
    assert g.case_verdicts(rows, tie=2.0, tie_acc=0.015)[0]["verdict"].startswith(
        "SEG loses to vanilla at matched NFE"
    )
    table = g.verdict_table(rows, 0.4, 0.015)
    assert table.count("\n") == 3 and "| 1000 (ties 0.4 given / 0.015 given) |" in table
    assert "| 0 (ties 0.4 default / 0.6 repeat) |" in g.verdict_table(rows)  # a spread of 0 is no tie
    # an older row file: no sweep_steps, the prompt case's vanilla at the sweep's steps (half the NFE)
    old = [{k: v for k, v in r.items() if k != "sweep_steps"} for r in rows if not r.get("seed_base")]
    old[0] |= {"steps": 6, "nfe": 6}
    assert g.case_verdicts(old, 0.4, 0.015)[0]["matched_nfe"].startswith("CFG 3, 6 steps (12): 5.00")
