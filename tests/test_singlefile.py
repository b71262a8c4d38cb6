"""Single-file checkpoints (seg_rt/singlefile.py): an SD1.5 / SDXL checkpoint in the original key
layout, written from tiny random-weight pipelines, loads through ``--model FILE.safetensors`` with no
network and gives the folder's image; the family comes from the keys; pickles are refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import seg_rt
from seg_rt.errors import ModelLoadError
from seg_rt.singlefile import checkpoint_keys, detect_family
from seg_rt.tiny import save_tiny_pipeline

from .cli_run import run_cli
from .single_file_writer import write_single_file
from .tolerance import assert_close


def tiny_sdxl_two_widths():
    """A tiny SDXL whose two text encoders differ in width, as SDXL's (768 / 1280) do: diffusers'
    single-file loader tells the CLIP-L and OpenCLIP weights apart by that width."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from seg_rt.tiny import _sdxl_parts
    from seg_rt.tiny_configs import TEXT

    parts = _sdxl_parts(0)
    torch.manual_seed(3)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**TEXT, "hidden_size": 48, "projection_dim": 48})
    ).eval()
    unet = parts["unet"]
    torch.manual_seed(2)
    config = {**unet.config, "cross_attention_dim": TEXT["hidden_size"] + 48,
              "projection_class_embeddings_input_dim": 6 * 8 + 48}  # fmt: skip
    parts["unet"] = UNet2DConditionModel.from_config(config).eval()
    return StableDiffusionXLPipeline(**parts, add_watermarker=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for family in ("sd15", "sdxl"):
        if family == "sd15":
            folder = save_tiny_pipeline("sd15", root / "sd15")
        else:
            folder = root / "sdxl"
            tiny_sdxl_two_widths().save_pretrained(folder, safe_serialization=True)
        pipe = seg_rt.pipeline.load_pipeline(str(folder), "cpu")
        out[family] = (folder, write_single_file(pipe, root / f"{family}.safetensors"))
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_gives_the_image_of_its_folder_offline(checkpoints, family, tmp_path, monkeypatch):
    folder, file = checkpoints[family]
    assert detect_family(checkpoint_keys(file)) == family
    common = ["--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "--seed", "3",
              "--threads", "1", "--no-progress"]  # fmt: skip
    # no hub: offline, an empty cache, and an endpoint nothing answers on
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "no-hub"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }.items():
        monkeypatch.setenv(k, v)
    a = run_cli("generate", "--model", str(file), "--model-config", str(folder), "--out", str(tmp_path / "f.png"),
                *common)  # fmt: skip
    assert a.returncode == 0, a.stderr
    b = run_cli("generate", "--model", str(folder), "--out", str(tmp_path / "d.png"), *common)
    assert b.returncode == 0, b.stderr
    from PIL import Image

    fa, fb = (np.asarray(Image.open(tmp_path / n), dtype=np.float64) for n in ("f.png", "d.png"))
    assert_close(fa / 255, fb / 255, rel=1.5 / 255, what="single-file image vs its folder's")
    record = json.loads(Image.open(tmp_path / "f.png").text["parameters"])
    assert record["model"] == str(file) or record["model"].endswith(file.name)


def test_pickles_and_unknown_layouts_are_refused_in_one_line(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match=r"pickle checkpoint \(\.ckpt\); seg-rt never unpickles"):
        seg_rt.pipeline.load_pipeline(str(tmp_path / "m.ckpt"), "cpu")
    r = run_cli("generate", "--model", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "never unpickles" in r.stderr
    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelLoadError, match=r"not an SD1\.5, SDXL, SD3 / SD3\.5 or Flux\.1 checkpoint"):
        seg_rt.pipeline.load_pipeline(str(tmp_path / "odd.safetensors"), "cpu")


def test_config_folder_of_another_family_is_refused(checkpoints):
    (sd15_folder, _), (_, sdxl_file) = checkpoints["sd15"], checkpoints["sdxl"]
    with pytest.raises(ModelLoadError, match=r"is a sdxl checkpoint but model config .* is for sd15"):
        seg_rt.pipeline.load_pipeline(str(sdxl_file), "cpu", model_config=str(sd15_folder))


# keys (with the shapes of the released models) of the four layouts, as the files carry them
LAYOUTS = {
    "sd15": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    },
    "sdxl": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    },
    "sd3": {  # SD3.5 Large: 38 joint blocks, bare keys as Stability releases them
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (7488, 2432),
        "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (7488, 2432),
        "model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432),
        "model.diffusion_model.pos_embed": (1, 36864, 2432),
    },
    "flux": {  # Flux.1-dev as Black Forest Labs releases it (no prefix)
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "guidance_in.in_layer.bias": (3072,),
        "img_in.weight": (3072, 64),
        "single_blocks.37.linear1.weight": (21504, 3072),
    },
}
DIFFUSERS_TYPES = {"sd15": {"v1"}, "sdxl": {"xl_base"}, "sd3": {"sd35_large"}, "flux": {"flux-dev"}}


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_family_from_the_keys_of_each_layout(family, tmp_path):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    layout = LAYOUTS[family]
    # the layout is genuine: diffusers' own detector (shapes from meta tensors) names the same model
    meta = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    assert infer_diffusers_model_type(meta) in DIFFUSERS_TYPES[family]
    path = tmp_path / f"{family}.safetensors"  # the file: one element per tensor, keys as released
    save_file({k: torch.zeros(1) for k in layout}, str(path))
    assert detect_family(checkpoint_keys(path)) == family


# parameter counts of the released models (their model cards / diffusers folders)
RELEASED = {
    ("sd15", "unet"): 859_520_964, ("sd15", "vae"): 83_653_863, ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "unet"): 2_567_463_684, ("sdxl", "vae"): 83_653_863, ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840, ("sd3", "text_encoder_2"): 694_659_840,
    ("flux", "transformer"): 11_901_408_320, ("flux", "vae"): 83_819_683, ("flux", "text_encoder"): 123_060_480,
}  # fmt: skip


@pytest.mark.parametrize(("family", "part"), list(RELEASED))
def test_shipped_configs_build_the_released_architectures(family, part):
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from seg_rt.singlefile import shipped_config

    cfg = json.loads((shipped_config(family) / part / "config.json").read_text())
    with init_empty_weights():  # no memory: shapes only
        if "_class_name" in cfg:
            model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        else:
            cls = getattr(transformers, cfg["architectures"][0])
            model = cls(cls.config_class(**{k: v for k, v in cfg.items() if k != "architectures"}))
    assert sum(p.numel() for p in model.parameters()) == RELEASED[(family, part)]


def test_shipped_configs_are_configs_only():
    from seg_rt.singlefile import shipped_config

    files = [p for p in shipped_config("sd15").parent.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".gz") for p in files)
    assert sum(p.stat().st_size for p in files) < 512 * 1024


def test_shipped_clip_tokenizer_is_clips():
    from seg_rt.singlefile import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids
    assert clip_tokenizer("!").pad_token_id == 0  # SDXL's second tokenizer pads with "!"


def test_shipped_configs_are_used_offline_and_a_mismatch_says_give_model_config(checkpoints, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, file = checkpoints["sd15"]  # tiny weights: not the released SD1.5 architecture
    with pytest.raises(ModelLoadError, match=r"with the configs in 'sd15': .*give --model-config DIR") as err:
        seg_rt.pipeline.load_pipeline(str(file), "cpu")
    assert "\n" not in str(err.value)


def test_flux_and_sd3_files_without_a_config_folder_are_refused(tmp_path):
    for family in ("flux", "sd3"):
        path = tmp_path / f"{family}.safetensors"
        save_file({k: torch.zeros(1) for k in LAYOUTS[family]}, str(path))
        with pytest.raises(ModelLoadError, match=r"T5 text encoder and tokenizer .* give --model-config DIR"):
            seg_rt.pipeline.load_pipeline(str(path), "cpu")


def test_server_names_a_single_file_model_by_its_file_name(checkpoints):
    from seg_rt.cluster.serving.config import ServeConfig

    folder, file = checkpoints["sd15"]
    config = ServeConfig(model=str(file), single_file_config=str(folder))
    assert config.public_model == "sd15.safetensors"
    # with a model that is not a single file, the config folder would be silently unused: refused
    with pytest.raises(ValueError, match=r"single_file_config applies to single-file checkpoints only"):
        ServeConfig(model=str(folder), single_file_config=str(folder))


def test_job_single_file_config_is_the_cli_s_model_config(checkpoints, sd15, monkeypatch):
    """A job names a single-file checkpoint and its config folder (relative: to the job's folder);
    the worker loads it with that folder and gives the folder's image; with any other model the
    field is refused at parse time in one line."""
    from seg_rt.cluster.jobs.spec import expand_items, parse_job
    from seg_rt.cluster.jobs.worker import SEGWorker

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, file = checkpoints["sd15"]
    base = file.parent
    job = {"model": file.name, "single_file_config": folder.name, "prompts": ["a cat"], "output": "out",
           "steps": 2, "height": 32, "width": 32, "seed": 3}  # fmt: skip
    spec = parse_job(job, base=base)
    assert spec.model == str(file) and spec.single_file_config == str(folder)
    (item,) = expand_items(spec, base)
    threads = torch.get_num_threads()
    try:
        worker = SEGWorker(spec.model_dump(mode="json"), "w0")
        result = worker.run([item])[0]
        worker.close()
    finally:
        torch.set_num_threads(threads)
    from io import BytesIO

    from PIL import Image

    ours = np.asarray(Image.open(BytesIO(result["png"])), dtype=np.float64)
    theirs = np.asarray(seg_rt.pipeline.run_params(sd15, [item.params])[0], dtype=np.float64)  # the folder's
    assert_close(ours / 255, theirs / 255, rel=1.5 / 255, what="job single-file image vs its folder's")
    with pytest.raises(
        ValueError, match=r"single_file_config applies to single-file checkpoints only"
    ) as err:
        parse_job({**job, "model": folder.name}, base=base)
    assert "\n" not in str(err.value)
