"""The bundled demo video model: clip data, motion estimator, training (resume), loading, sampling, CLI,
and the STG-style identity perturbation against an independent processor."""

from __future__ import annotations

import dataclasses
import json

import av
import numpy as np
import pytest
import torch

from seg_rt.demo import motion, video_data
from seg_rt.demo.video_model import (
    SEGDemoVideoPipeline,
    is_demo_video_folder,
    video_tokenizer,
    video_weights_dir,
)
from seg_rt.pipeline import load_pipeline
from seg_rt.video.sampling import generate_video
from tests.cli_run import run_cli
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def vdemo():
    torch.set_num_threads(2)
    return load_pipeline(video_weights_dir(), "cpu")


def test_clip_is_a_function_of_the_seed():
    a, item = video_data.render_clip(77)
    b, _ = video_data.render_clip(77)
    c, _ = video_data.render_clip(78)
    assert a.shape == (video_data.FRAMES, 32, 32, 3) and a.dtype == np.uint8
    assert (a == b).all() and (a != c).any()
    assert (a[0] != a[-1]).any()  # it moves
    assert video_data.parse_caption(item.caption) == item
    # the same caption from another seed: another clip of the same labels
    d, same = video_data.render_clip(79, item)
    assert same == item and (d != a).any()
    x, items = video_data.batch([77, 78], frames=3)
    assert x.shape == (2, 3, 3, 32, 32) and items[0] == item
    assert x.min() >= -1 and x.max() <= 1


def test_motion_words_are_single_tokens():
    tok = video_tokenizer()
    for word in video_data.caption_words():
        assert len(tok(word).input_ids) == 3, word
    assert len(tok("red star moving left on scrolling stripes").input_ids) == 9


def test_motion_estimator_reads_real_clips_and_can_fail():
    clips, items = zip(*(video_data.render_clip(s) for s in range(900, 980)), strict=True)
    acc, lost = motion.accuracy(list(clips), list(items))
    assert acc == 1.0 and lost == 0.0
    left = next(c for c, it in zip(clips, items, strict=True) if video_data.MOTIONS[it.motion] == "left")
    item = next(it for it in items if video_data.MOTIONS[it.motion] == "left")
    assert motion.classify(left[::-1], item.color) == "right"  # played backwards
    assert motion.classify(np.repeat(left[:1], 8, axis=0), item.color) == "still"
    assert motion.classify(np.zeros_like(left), item.color) == "lost"


def test_bundled_video_model_loads_offline_and_samples_deterministically(vdemo):
    assert is_demo_video_folder(video_weights_dir()) and isinstance(vdemo, SEGDemoVideoPipeline)
    info = json.loads((video_weights_dir() / "train_config.json").read_text())
    assert 0 < info["steps_done"] <= info["config"]["steps"] and "video_train" in info["command"]
    size = sum(f.stat().st_size for f in video_weights_dir().rglob("*.safetensors"))
    assert size <= 25 * 2**20
    # spatial SEG: temporal SEG blurs the h·w rows of each motion module one by one (slow on CPU)
    kw = {"frames": 4, "steps": 2, "cfg": 3.0, "seed": 5, "seg_mode": "spatial"}
    a = generate_video(vdemo, "red square moving right on plain", **kw)
    b = generate_video(vdemo, "red square moving right on plain", **kw)
    assert a.shape == (1, 4, 32, 32, 3) and np.array_equal(a, b)
    c = generate_video(vdemo, "red square moving right on plain", **{**kw, "seg_scale": 0.0})
    assert not np.array_equal(a, c)  # SEG changes the clip


def test_identity_perturbation_is_attention_output_v(vdemo):
    """The STG-style row equals the model with the temporal layers' attention replaced by V
    (an independent processor), and the unperturbed row is untouched."""
    from seg_rt.video.attention import VideoBlur, VideoSEG

    unet = vdemo.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 32, 32, generator=gen)
    t = torch.tensor([400])
    text = vdemo.embed(["blue star rotating on dots"]).repeat_interleave(4, 0)
    with torch.no_grad():
        plain = unet(x, t, text).sample

        class ValueOnly:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
                out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
                if attn.residual_connection:
                    out = out + hidden_states
                return out / attn.rescale_output_factor

        names = [n for n, m in unet.named_modules() if n.endswith("attn1") and ".motion_modules." in n]
        saved = {n: unet.get_submodule(n).processor for n in names}
        for n in names:
            unet.get_submodule(n).set_processor(ValueOnly())
        try:
            skipped = unet(x, t, text).sample
        finally:
            for n, p in saved.items():
                unet.get_submodule(n).set_processor(p)
        seg = VideoSEG(unet, VideoBlur("temporal", 1.0, 1.0), perturbation="identity").install()
        try:
            seg.set_mask(torch.tensor([False, True]))
            both = unet(torch.cat([x, x]), t.expand(2), torch.cat([text, text])).sample
            seg.check()
        finally:
            seg.remove()
    assert_close(both[0], plain[0], rel=1e-5, what="unperturbed row")
    assert_close(both[1], skipped[0], rel=1e-5, what="skipped row")
    assert (skipped - plain).abs().max() > 1e-3  # the trained motion modules matter


def test_video_training_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from seg_rt.demo.video_train import VideoTrainConfig, VideoTrainer

    cfg = VideoTrainConfig(steps=2, batch=1, frames=2, checkpoint_every=1, warmup=1)
    straight = VideoTrainer(cfg, tmp_path / "a")
    straight.train_step(), straight.train_step()
    straight.save_checkpoint()
    first = VideoTrainer(cfg, tmp_path / "b")
    first.train_step()
    first.save_checkpoint()
    resumed = VideoTrainer(cfg, tmp_path / "b")
    assert resumed.load_checkpoint() and resumed.step == 1
    resumed.train_step()
    resumed.save_checkpoint()
    a = load_file(tmp_path / "a/checkpoint/state.safetensors")
    b = load_file(tmp_path / "b/checkpoint/state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = VideoTrainer(dataclasses.replace(cfg, lr=1e-3), tmp_path / "b")
    with pytest.raises(ValueError, match="another config"):
        other.load_checkpoint()
    resumed.export(tmp_path / "model", "python -m seg_rt.demo.video_train --steps 2")
    pipe = load_pipeline(tmp_path / "model", "cpu")
    assert isinstance(pipe, SEGDemoVideoPipeline)


def test_video_without_model_uses_the_demo_video_model(tmp_path):
    out = tmp_path / "clip.mp4"
    r = run_cli("video", "--prompt", "green star moving up on dots", "--steps", 2, "--seg-mode", "spatial",
                "--out", out, "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    notice = [line for line in r.stderr.splitlines() if "demo video model" in line]
    assert len(notice) == 1 and "--model" in notice[0]
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == video_data.FRAMES and frames[0].width == 32


def test_cli_demo_frames_constant_matches_the_data():
    from seg_rt.cli.video import DEMO_FRAMES

    assert DEMO_FRAMES == video_data.FRAMES


def test_video_quality_bench_rows_plot_and_table(vdemo, tmp_path):
    from seg_rt.video import bench as video_bench

    names = ["vanilla", "SEG temporal σt=1", "STG temporal (skip)"]
    rows = video_bench.run_video_quality(vdemo, samples=2, steps=1, method_names=names, progress=False)
    assert [r["method"] for r in rows] == [*names, "real held-out clips"]
    assert rows[1]["mode"] == "temporal" and rows[1]["sigma_time"] == 1.0 and rows[1]["sigma"] is None
    assert rows[2]["perturbation"] == "identity" and rows[0]["mode"] is None
    for row in rows:
        assert set(video_bench.METRICS) <= row.keys()
    assert rows[-1]["motion_accuracy"] == 1.0 and rows[-1]["lost"] == 0.0  # the estimator on real clips
    # same captions and seeds: the unguided clips differ from the guided ones only by guidance
    assert rows[0]["warping_error"] != rows[1]["warping_error"]
    assert video_bench.plot(rows, tmp_path / "vq.png").stat().st_size > 1000
    assert video_bench.table(rows).count("\n") == len(rows) + 2
    with pytest.raises(ValueError, match="unknown method 'SEG sideways'"):
        video_bench.run_video_quality(vdemo, samples=2, steps=1, method_names=["SEG sideways"])
