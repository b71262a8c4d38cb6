"""Image-to-video (CogVideoX, Wan 2.1, LTX-Video) and the Stable Video Diffusion family.

With SEG off each equals its diffusers pipeline (``CogVideoXImageToVideoPipeline``,
``WanImageToVideoPipeline``, ``LTXImageToVideoPipeline``, ``StableVideoDiffusionPipeline``) on tiny
random-weight models; SEG on perturbs (counted) and changes the video; video i of a batch equals its
seed alone; bad input is one line before sampling."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from seg_rt.cli import main
from seg_rt.params import GenerationParams, VideoParams, request_from_fields
from seg_rt.tasks import load_image
from seg_rt.video.sampling import generate_video
from tests.tolerance import assert_close, max_rel_error

STEPS = 2
SIZES = {  # (height, width, frames): odd latent frame counts where the VAE compresses time
    "cogvideox": (32, 48, 9),
    "wan": (32, 48, 5),
    "ltx": (64, 96, 9),  # LTXImageToVideoPipeline wants multiples of 32
    "svd": (32, 48, 3),
}


def still() -> Image.Image:
    y, x = np.mgrid[0:40, 0:56]
    return Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))


def ours(pipe, family, **kw):
    h, w, f = SIZES[family]
    prompt = {} if family == "svd" else {"prompt": "a cat", "negative_prompt": "dull"}
    args = {"height": h, "width": w, "frames": f, "steps": STEPS, "cfg": 3.0, "output_type": "latent"}
    return generate_video(pipe, image=still(), **prompt, **{**args, **kw})


# Stable Video Diffusion's own arguments, none at its default: the per-frame CFG ramp (min_cfg at
# the first frame to cfg at the last), the motion bucket, the still's noise augmentation, fps
SVD_FIELDS = {"min_cfg": 1.5, "motion_bucket_id": 60, "noise_aug_strength": 0.1, "fps": 5}


def theirs(pipe, family):
    """The diffusers pipeline itself, seed 0, CFG 3, as a diffusers script calls it."""
    h, w, f = SIZES[family]
    kw = {"image": still(), "height": h, "width": w, "num_frames": f, "num_inference_steps": STEPS}
    kw.update(generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    if family == "svd":
        kw.update(min_guidance_scale=SVD_FIELDS["min_cfg"], max_guidance_scale=3.0,
                  **{k: v for k, v in SVD_FIELDS.items() if k != "min_cfg"})  # fmt: skip
    else:
        kw.update(prompt="a cat", negative_prompt="dull", guidance_scale=3.0)
    if family == "cogvideox":
        kw["max_sequence_length"] = pipe.transformer.config.max_text_seq_length
    return pipe(**kw).frames


@pytest.mark.parametrize("family", ["cogvideox", "wan", "ltx", "svd"])
def test_seg_off_equals_the_diffusers_image_to_video_pipeline(i2v_pipes, family, monkeypatch):
    pipe = i2v_pipes(family)
    if family == "wan":
        # diffusers 0.42's WanImageToVideoPipeline calls ftfy unconditionally (WanPipeline, whose
        # encode_prompt it copies, skips it when ftfy is not installed, as here): the same text cleaning
        from diffusers.pipelines.wan import pipeline_wan_i2v

        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False
        )
    mine = ours(pipe, family, seg_scale=0.0, **(SVD_FIELDS if family == "svd" else {}))
    if family == "ltx":  # LTX's latent output is its packed tokens
        from seg_rt.video.families.ltx import ltx_pack

        mine = ltx_pack(mine, 1, 1)
    reference = theirs(pipe, family)
    assert mine.shape == reference.shape
    # SVD's Karras schedule starts at sigma 700: rounding of the first steps scales with it
    assert_close(mine, reference, rel=1e-4 if family == "svd" else 1e-5, what=family)


def test_ltx_keeps_the_conditioning_frame(i2v_pipes):
    """LTX image-to-video: latent frame 0 is the still's latents at every step (never stepped)."""
    pipe = i2v_pipes("ltx")
    a = ours(pipe, "ltx", steps=1)
    b = ours(pipe, "ltx", steps=3)
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert max_rel_error(a[:, :, 1:], b[:, :, 1:]) > 1e-3


@pytest.mark.parametrize("mode", ["spatial", "temporal", "spatiotemporal"])
def test_every_seg_mode_on_image_to_video(i2v_pipes, mode):
    pipe = i2v_pipes("cogvideox")
    off = ours(pipe, "cogvideox", seg_scale=0.0)
    a = ours(pipe, "cogvideox", seg_mode=mode, seg_sigma=2.0)
    assert torch.equal(a, ours(pipe, "cogvideox", seg_mode=mode, seg_sigma=2.0))
    assert max_rel_error(a, off) > 1e-3, mode


@pytest.mark.parametrize("family", ["cogvideox", "svd"])
def test_video_i_of_a_batch_equals_its_seed_alone(i2v_pipes, family):
    pipe = i2v_pipes(family)
    batch = ours(pipe, family, seed=4, num_videos=2, seg_sigma=2.0)
    alone = ours(pipe, family, seed=5, seg_sigma=2.0)
    # video: to float rounding (see video.sampling), of the latents' largest scale on the way: SVD's
    # schedule starts at sigma_max 700, the DiTs' at 1
    start = float(pipe.scheduler.config.sigma_max) if family == "svd" else 1.0
    assert_close(batch[1:], alone, rel=1e-6 * start)


class Counted:
    """A ``wrap_denoiser``: calls the video denoiser and records, per call, how many queries SEG
    perturbed (its processors report each blurred query through ``seg.count``)."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.calls = denoiser, []
        count = denoiser.seg.count

        def counted() -> None:
            self.calls[-1] += 1
            count()

        denoiser.seg.count = counted

    def __call__(self, inputs):
        self.calls.append(0)
        return self.denoiser(inputs)

    def close(self) -> None:
        self.denoiser.close()


@pytest.mark.parametrize("mode", ["temporal", "spatiotemporal"])
def test_svd_seg_perturbs_every_chosen_layer_and_changes_the_video(i2v_pipes, mode):
    from seg_rt.video.attention import svd_layers

    pipe = i2v_pipes("svd")
    kinds = svd_layers(pipe.unet)
    assert {"spatial", "temporal"} == set(kinds.values())
    chosen = [n for n, k in kinds.items() if mode == "spatiotemporal" or k == mode]
    made: list[Counted] = []
    wrap = lambda d: made.append(Counted(d)) or made[-1]  # noqa: E731
    seg = ours(pipe, "svd", seg_mode=mode, seg_sigma=2.0, wrap_denoiser=wrap)
    assert made[0].calls == [len(chosen)] * STEPS  # one forward a step, each chosen layer blurred once
    off = ours(pipe, "svd", seg_scale=0.0, wrap_denoiser=wrap)
    assert made[1].calls == [0] * STEPS
    assert max_rel_error(seg, off) > 1e-3


def test_svd_fields_are_recorded_when_set():
    """The SVD fields (honoured as diffusers does: the oracle test above sets each) are in the record
    when set; records of requests that leave them stay byte-identical."""
    request = request_from_fields({"image": still(), **SVD_FIELDS}, "video")
    record = request.to_record()["video"]
    assert {k: record[k] for k in SVD_FIELDS} == SVD_FIELDS
    assert not {"min_cfg", "motion_bucket_id", "noise_aug_strength"} & set(VideoParams().to_record())
    assert request_from_fields({"min_guidance_scale": 2.0}, "video").video.min_cfg == 2.0  # diffusers' name


def test_svd_fields_are_refused_elsewhere_and_when_out_of_range(i2v_pipes):
    with pytest.raises(ValueError, match=r"^motion_bucket_id: Stable Video Diffusion's conditioning; "):
        ours(i2v_pipes("cogvideox"), "cogvideox", motion_bucket_id=20, steps=1)
    with pytest.raises(ValueError, match=r"min cfg applies with cfg > 1"):
        request_from_fields({"cfg": 1.0, "min_cfg": 2.0}, "video")
    for field, value in (("min_cfg", 0.5), ("noise_aug_strength", -0.1), ("motion_bucket_id", -1)):
        with pytest.raises(ValueError, match=field.replace("_", " ")):
            request_from_fields({field: value}, "video")


# ---- bad input: one line, before sampling -------------------------------------------------------


def test_text_to_video_checkpoints_refuse_an_image_and_i2v_ones_need_one(i2v_pipes):
    from seg_rt.tiny import tiny_video_pipeline

    wan_t2v = tiny_video_pipeline("wan")
    with pytest.raises(ValueError, match=r"^image: WanPipeline cannot animate an image: .*text-to-video"):
        generate_video(wan_t2v, "a cat", image=still(), frames=5, height=32, width=48, steps=1)
    with pytest.raises(ValueError, match=r"^image: CogVideoXImageToVideoPipeline .* give the still"):
        generate_video(i2v_pipes("cogvideox"), "a cat", frames=9, height=32, width=48, steps=1)
    with pytest.raises(ValueError, match=r"^image: StableVideoDiffusionPipeline .* give the still"):
        generate_video(i2v_pipes("svd"), "", frames=3, height=32, width=48, steps=1)
    with pytest.raises(ValueError, match=r"^prompt: Stable Video Diffusion .* image only"):
        generate_video(i2v_pipes("svd"), "a cat", image=still(), frames=3, height=32, width=48, steps=1)


def test_image_field_parses_records_and_refuses_bad_images(tmp_path):
    png = tmp_path / "still.png"
    still().save(png)
    request = request_from_fields({"prompt": "a cat", "image": str(png)}, "video")
    assert request.video.image == load_image(still())  # the same pixels from a file or a PIL image
    record = request.to_record()
    assert record["video"]["image"] == {
        "sha256": request.video.image.sha256,
        "mode": "RGB",
        "width": 56,
        "height": 40,
    }
    assert "image" not in GenerationParams(video=VideoParams()).to_record()["video"]  # when set
    with pytest.raises(ValueError, match="names an image by its sha256 only"):
        GenerationParams.from_record(record)
    assert request.batch_key() != request.replace(video=VideoParams()).batch_key()
    text = tmp_path / "not.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="image is not an image PIL can read"):
        request_from_fields({"image": str(text)}, "video")
    with pytest.raises(ValueError, match="limit is"):
        request_from_fields({"image": np.zeros((4097, 4097, 3), np.uint8)}, "video")


def test_cli_image_flag_refuses_a_file_that_is_not_an_image_in_one_line(tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    assert main(["video", "--image", str(bad), "--out", str(tmp_path / "v.mp4"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image is not an image" in err, err
    assert not (tmp_path / "v.mp4").exists()  # refused before any model loads


def test_cli_image_to_video_on_a_saved_checkpoint(tmp_path, capsys):
    from seg_rt.tiny import save_tiny_i2v_pipeline

    folder = save_tiny_i2v_pipeline("cogvideox", tmp_path / "cog-i2v")
    png = tmp_path / "still.png"
    still().save(png)
    out = tmp_path / "v.mp4"
    args = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "1", "--no-progress"]
    assert (
        main(
            [
                "video",
                "--model",
                str(folder),
                "--prompt",
                "a cat",
                "--image",
                str(png),
                "--out",
                str(out),
                *args,
            ]
        )
        == 0
    )
    assert out.stat().st_size > 0
    assert (
        main(["video", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "w.mp4"), *args])
        == 2
    )
    assert "give the still" in capsys.readouterr().err
    assert not (tmp_path / "w.mp4").exists()


def test_job_video_image_relative_to_the_job_folder(tmp_path, monkeypatch):
    from cluster.jobs.spec import expand_items, load_job

    (tmp_path / "stills").mkdir()
    still().save(tmp_path / "stills" / "a.png")
    job = "model: org/x\noutput: out\nprompts: [a cat]\nvideo:\n  frames: 5\n  image: stills/a.png\n"
    (tmp_path / "job.yaml").write_text(job)
    spec, base = load_job(tmp_path / "job.yaml")
    assert expand_items(spec, base)[0].params.video.image == load_image(still())
    dumped = spec.model_dump(mode="json")  # what the driver sends its workers
    assert dumped["video"]["image"] == str(tmp_path / "stills" / "a.png")
    assert type(spec).model_validate(dumped).video.params().image == load_image(still())
    # the still is read while the job is checked, not once per item (a URL would be a download each)
    import cluster.jobs.spec as spec_module

    reads = []
    real = spec_module.input_file
    monkeypatch.setattr(spec_module, "input_file", lambda *a, **k: reads.append(a) or real(*a, **k))
    many = job.replace("prompts: [a cat]", "prompts: [a, b, c, d, e, f]\nsamples_per_prompt: 2")
    (tmp_path / "many.yaml").write_text(many)
    spec, base = load_job(tmp_path / "many.yaml")
    checked = len(reads)
    items = expand_items(spec, base)
    assert len(items) == 12 and all(i.params.video.image == load_image(still()) for i in items)
    assert len(reads) <= checked + 1, (checked, len(reads))
    (tmp_path / "bad.txt").write_text("x")
    (tmp_path / "bad.yaml").write_text(job.replace("stills/a.png", "bad.txt"))
    with pytest.raises(ValueError, match=r"bad.yaml: video.image: image is not an image"):
        load_job(tmp_path / "bad.yaml")
