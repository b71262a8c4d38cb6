"""``seg-rt bench gpu``: flag defaults and errors, one clear line without CUDA, and the CPU dry run."""

import json

import pytest
import torch

from seg_rt.bench import gpu
from seg_rt.cli import build_parser, main


def test_flag_defaults_and_errors(capsys):
    args = build_parser().parse_args(["bench", "gpu"])
    assert (args.device, args.tiny, args.latent, args.pairs, args.skip_compile, args.out) == (
        "cuda",
        False,
        128,
        10,
        False,
        None,
    )
    assert (gpu.DEVICE, gpu.LATENT, gpu.PAIRS) == ("cuda", 128, 10)  # the flags' defaults are run's
    assert main(["bench", "gpu", "--latent", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["seg-rt: error: --latent must be a multiple of 8 and >= 8, got 100"]
    assert main(["bench", "gpu", "--pairs", "1"]) == 2
    assert capsys.readouterr().err.strip() == "seg-rt: error: --pairs must be >= 2, got 1"
    assert main(["bench", "gpu", "--samples", "3"]) == 2  # a flag of another bench: refused
    assert "unrecognized arguments: --samples 3" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_one_clear_line(capsys):
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "--device cpu --tiny" in err[0]
    assert main(["bench", "gpu", "--device", "cpu"]) == 2
    assert "add --tiny" in capsys.readouterr().err


def test_cpu_dry_run_writes_json(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--device", "cpu", "--tiny", "--pairs", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    *sections, last = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert last == result  # the whole result last, after one line per section as it finished
    assert [s["section"] for s in sections] == ["setup", "ratios_mid", "ratios_up", "engines"]
    assert sections[1]["data"] == result["ratios"][0] and sections[3]["data"]["eager_step_ms_batch1"] > 0
    assert [r["layers"] for r in result["ratios"]] == [["mid"], ["up"]]
    assert all(r["cfg_seg_shared_over_cfg"] > 0 and r["cfg_seg_over_cfg"] > 0 for r in result["ratios"])
    engines = result["engines"]
    assert engines["eager_step_ms_batch1"] > 0 and engines["eager_images_per_s_batch4"] > 0
    assert engines["cuda_graph"] == "skipped: needs CUDA" and engines["compile"] == "skipped"
