"""The bundled demo model: data, tokenizer, training (resume), loading, deterministic sampling, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from seg_rt.demo import data
from seg_rt.demo.model import caption_words, is_demo_folder, tokenizer, weights_dir
from seg_rt.pipeline import family_of, generate, generate_batch, load_pipeline
from tests.cli_run import run_cli


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(2)
    return load_pipeline(weights_dir(), "cpu")


def test_caption_words_are_single_tokens():
    tok = tokenizer()
    for word in caption_words():
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    # any other prompt still tokenizes (byte fallback)
    assert len(tok("a purple hexagon!").input_ids) > 3


def test_render_is_a_function_of_the_seed():
    a, item = data.render(123)
    b, _ = data.render(123)
    c, _ = data.render(124)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert (a == b).all() and (a != c).any()
    assert data.parse_caption(item.caption) == item
    assert data.parse_caption("a photo of a cat") is None


def test_bundled_model_is_a_demo_pipeline(demo):
    assert is_demo_folder(weights_dir())
    assert family_of(demo).name == "demo"
    sizes = sum(f.stat().st_size for f in weights_dir().rglob("*.safetensors"))
    assert sizes <= 25 * 2**20
    info = json.loads((weights_dir() / "train_config.json").read_text())
    assert info["command"].startswith("python -m seg_rt.demo.train")
    # self-attention in the middle block: what SEG perturbs by default
    from seg_rt.layers import select_layers

    assert select_layers(demo.unet, ["mid"])


def test_bundled_model_samples_deterministically(demo):
    kw = {"steps": 8, "cfg": 3.0, "seg_scale": 3.0, "seg_sigma": 2.0, "output_type": "np"}
    a = generate(demo, "red letter a on stripes", seed=[3], **kw)
    b = generate(demo, "red letter a on stripes", seed=[3], **kw)
    batch = generate_batch(demo, ["blue circle on plain", "red letter a on stripes"], [9, 3], **kw)
    assert a.shape == (1, 32, 32, 3)
    assert np.array_equal(a, b)
    assert np.array_equal(batch[1], a[0])  # a sample depends on its seed and prompt, not its batch
    no_seg = generate(demo, "red letter a on stripes", seed=[3], **{**kw, "seg_scale": 0.0})
    assert np.abs(no_seg - a).max() > 1e-3  # SEG acts on this model


def test_bundled_model_follows_its_prompts(demo):
    """The shipped model is trained: the shipped classifier reads most samples as the prompted shape
    (chance is 1/12) and the real renders almost perfectly."""
    from seg_rt.bench.quality import describe_set, to_classifier_input
    from seg_rt.demo.classifier import load_classifier

    items = [
        data.Item(shape, (shape * 5) % len(data.COLORS), shape % len(data.TEXTURES))
        for shape in range(len(data.SHAPES))
    ]
    images = generate_batch(
        demo,
        [it.caption for it in items],
        list(range(len(items))),
        steps=12,
        cfg=3.0,
        seg_scale=0.0,
        output_type="pt",
    )
    clf = load_classifier()
    fake = describe_set(clf, to_classifier_input(images), items)
    real_x, _ = data.batch(range(len(items)), items)
    real = describe_set(clf, real_x, items)
    assert float(real["correct"].mean()) == 1.0
    assert float(fake["shape_correct"].mean()) >= 0.5


def test_training_resumes_exactly(tmp_path):
    from seg_rt.demo import train

    from .trainer_checks import assert_resumes_exactly

    cfg = train.TrainConfig(steps=4, batch=2, checkpoint_every=2, warmup=1)
    resumed = assert_resumes_exactly(train.Trainer, cfg, tmp_path)

    other = train.Trainer(dataclasses.replace(cfg, lr=1e-3), tmp_path / "b")
    with pytest.raises(ValueError, match="another config"):
        other.load_checkpoint()
    resumed.export(tmp_path / "model", "python -m seg_rt.demo.train --steps 4")
    pipe = load_pipeline(tmp_path / "model", "cpu")
    assert family_of(pipe).name == "demo"


def test_generate_without_model_uses_the_demo_model(tmp_path):
    out = tmp_path / "grid.png"
    r = run_cli("generate", "--prompt", "green star on dots", "--num-images", 4, "--grid", "--steps", 6,
                "--out", out, "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    notice = [line for line in r.stderr.splitlines() if "demo model" in line]
    assert len(notice) == 1 and "--model" in notice[0] and "SDXL" in notice[0]
    sheet = Image.open(out)
    assert sheet.width == 4 * 128  # 4 columns of 32x32 images shown at 4x
    assert "parameters" in sheet.info


def test_quality_bench_cli_smoke(tmp_path):
    plot = tmp_path / "q.png"
    r = run_cli("bench", "quality", "--samples", 8, "--steps", 2, "--batch", 8, "--sigmas", "1,inf", "--json",
                "--plot", plot)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["method"] for row in rows] == [
        "vanilla",
        "CFG 3",
        "PAG 3",
        "SEG σ=1",
        "SEG σ=inf",
        "real (held-out)",
    ]
    for row in rows:
        assert {"fid", "precision", "recall", "diversity", "accuracy", "confidence"} <= row.keys()
    assert rows[0]["dist_to_vanilla"] == 0.0 and rows[3]["dist_to_vanilla"] > 0
    assert plot.stat().st_size > 1000
    assert "| method | fid |" in r.stderr
    bad = run_cli("bench", "quality", "--samples", 2, timeout=120)
    assert bad.returncode == 2 and "samples >= 8" in bad.stderr


def test_quality_bench_unconditional_samples_empty_prompts_without_the_cfg_row():
    from seg_rt.bench.quality import run_quality

    rows = run_quality(samples=8, steps=1, batch=8, sigmas=(math.inf,), progress=False, unconditional=True)
    assert [r["method"] for r in rows] == ["vanilla", "PAG 3", "SEG σ=inf", "real (held-out)"]
    assert {r["prompts"] for r in rows} == {"empty"}
    assert rows[0]["accuracy"] is None  # no caption to check a sample against
    assert rows[0]["fid"] > 0 and rows[2]["dist_to_vanilla"] > 0


def test_training_loss_weighting(tmp_path):
    from seg_rt.demo import train

    cfg = train.TrainConfig(steps=1, batch=4, warmup=1)
    min_snr = train.Trainer(cfg, tmp_path / "a").train_step()
    flat = train.Trainer(dataclasses.replace(cfg, weighting="flat"), tmp_path / "b").train_step()
    # the same first batch, timesteps and noise: Min-SNR-γ weights every v-loss by min(snr, γ)/(snr+1) < 1
    assert flat > min_snr > 0
    with pytest.raises(ValueError, match="weighting must be min-snr or flat, got 'snr'"):
        train.TrainConfig(weighting="snr")


def test_trainer_cli_rejects_a_missing_or_foreign_checkpoint_before_building(tmp_path, capsys, monkeypatch):
    from seg_rt.demo import train

    monkeypatch.setattr(train.Trainer, "__init__", lambda *a: pytest.fail("model built before the check"))
    args = ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]
    assert train.main([*args, "--stop-now"]) == 2
    assert "--stop-now needs a checkpoint in" in capsys.readouterr().err
    (tmp_path / "w" / "checkpoint").mkdir(parents=True)
    (tmp_path / "w" / "checkpoint" / "state.json").write_text(json.dumps({"config": {"steps": 1}}))
    assert train.main(args) == 2
    assert "made with another config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
