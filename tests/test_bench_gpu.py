"""The GPU check script: argument parsing, one clear line without CUDA, and the CPU dry run."""

import json

import pytest
import torch

from seg_rt import bench_gpu


def test_parse_args_defaults_and_errors(capsys):
    args = bench_gpu.parse_args([])
    assert (args.device, args.tiny, args.latent, args.pairs, args.skip_compile) == (
        "cuda",
        False,
        128,
        10,
        False,
    )
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--latent", "100"])
    assert "--latent must be a multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--pairs", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_one_clear_line(capsys):
    assert bench_gpu.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "--device cpu --tiny" in err[0]
    assert bench_gpu.main(["--device", "cpu"]) == 2
    assert "add --tiny" in capsys.readouterr().err


def test_cpu_dry_run_writes_json(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--pairs", "2", "--out", str(out)]) == 0
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
