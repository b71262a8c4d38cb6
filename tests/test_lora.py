"""LoRA (seg_rt/lora.py): same image as diffusers' own load_lora_weights with SEG off, SEG stays on
with LoRA layers on the attention projections, records name each file by name and sha256, and bad
LoRAs are refused in one line naming the field before sampling."""

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

import seg_rt
from seg_rt.lora import LoRA, loras_of, named_specs, resolve_named
from seg_rt.params import GenerationParams, request_from_fields
from seg_rt.tiny import tiny_pipeline

from .tolerance import assert_close

pytest.importorskip("peft")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def write_lora(path, seed: int, targets=ATTN, rank: int = 4):
    """A random LoRA on a tiny SD1.5 UNet's attention projections, in diffusers' file format
    (peft's state dict, saved by diffusers' save_lora_weights)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_pipeline("sd15").unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():  # peft's random init is small: make the LoRA change the images visibly
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=state, weight_name=path.name)
    return path


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return write_lora(d / "style.safetensors", 1), write_lora(d / "other.safetensors", 2)


KW = {"steps": 2, "cfg": 4.0, "seed": 7, "height": 32, "width": 32, "output_type": "latent"}


def test_lora_equals_diffusers_load_lora_weights_with_seg_off(lora_files):
    style, other = lora_files
    ours_pipe = tiny_pipeline("sd15")
    ours = seg_rt.generate(ours_pipe, "a cat", seg_scale=0.0, loras=[f"{style}:0.7", f"{other}:0.4"], **KW)
    theirs_pipe = tiny_pipeline("sd15")  # diffusers alone: its loader, its adapters, its pipeline call
    theirs_pipe.load_lora_weights(str(style), adapter_name="a")
    theirs_pipe.load_lora_weights(str(other), adapter_name="b")
    theirs_pipe.set_adapters(["a", "b"], [0.7, 0.4])
    theirs_pipe.scheduler = EulerDiscreteScheduler.from_config(theirs_pipe.scheduler.config)
    theirs = theirs_pipe(
        "a cat", num_inference_steps=2, guidance_scale=4.0, output_type="latent", height=32, width=32,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images  # fmt: skip
    assert_close(ours, theirs, rel=1e-5, what="LoRA latents vs diffusers")
    plain = seg_rt.generate(tiny_pipeline("sd15"), "a cat", seg_scale=0.0, **KW)
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA changed the result
    # the same pipeline with no LoRA in the request samples as without them (adapters switched off)
    off = seg_rt.generate(ours_pipe, "a cat", seg_scale=0.0, **KW)
    assert torch.equal(off, plain)


def test_seg_with_lora_blurs_the_lora_adapted_query(lora_files):
    """SEG's processor calls the LoRA-wrapped to_q: the query it blurs is the LoRA-adapted one."""
    from seg_rt.attention import SEGAttnProcessor

    style, _ = lora_files
    pipe = tiny_pipeline("sd15")
    seen = []
    original = SEGAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        seen.append(type(attn.to_q).__module__)
        return original(self, attn, hidden_states, *args, **kwargs)

    SEGAttnProcessor.__call__ = spy
    try:
        seg = seg_rt.generate(pipe, "a cat", seg_scale=3.0, seg_sigma=2.0, loras=[str(style)], **KW)
    finally:
        SEGAttnProcessor.__call__ = original
    assert seen and all(m.startswith("peft.") for m in seen)  # to_q is peft's LoRA layer there
    cfg_only = seg_rt.generate(pipe, "a cat", seg_scale=0.0, loras=[str(style)], **KW)
    # SEG ran (the denoiser raises SEGNotApplied otherwise) and changed the result
    assert (seg - cfg_only).abs().max() > 1e-3 * cfg_only.abs().max()


def test_record_names_file_and_sha256_never_the_path(lora_files):
    style, _ = lora_files
    p = request_from_fields({"loras": [f"{style}:0.5"]})
    sha = hashlib.sha256(style.read_bytes()).hexdigest()
    rec = p.to_record()
    assert rec["loras"] == [{"file": "style.safetensors", "sha256": sha, "weight": 0.5}]
    assert str(style.parent) not in json.dumps(rec)
    again = GenerationParams.from_record(rec)
    assert again.loras == p.loras and again.batch_key() == p.batch_key()
    assert "loras" not in GenerationParams().to_record()  # old records stay byte-identical
    assert p.batch_key() != p.replace(loras=()).batch_key()
    assert p.batch_key() != request_from_fields({"loras": [f"{style}:0.6"]}).batch_key()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("model.ckpt", "not a safetensors file"),
        ("missing.safetensors", "does not exist"),
        ("bad.safetensors", "not a readable safetensors file"),
        ("LORA:nan", "finite number"),
    ],
)
def test_bad_lora_files_are_one_line_naming_the_field(tmp_path, lora_files, value, message):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors at all")
    value = value.replace("LORA", str(lora_files[0]))
    with pytest.raises(ValueError, match=message) as err:
        request_from_fields({"loras": [value if ":" in value else str(tmp_path / value)]})
    assert str(err.value).startswith("loras:") and "\n" not in str(err.value)


def test_lora_that_does_not_match_the_model_fails_before_sampling(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"  # keys of a model this one is not
    save_file({"unet.nowhere.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.nowhere.to_q.lora_B.weight": torch.zeros(8, 4)}, str(path))  # fmt: skip
    pipe = tiny_pipeline("sd15")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"loras: 'foreign.safetensors' does not match this model"):
        seg_rt.generate(pipe, "a cat", loras=[str(path)], **KW)
    assert calls == []  # nothing sampled
    assert seg_rt.lora.loaded_adapters(pipe) == set()  # nothing left behind


def test_server_names_pick_among_the_preloaded_set(lora_files):
    style, other = lora_files
    available = {"style": LoRA.from_path(style), "other": LoRA.from_path(other)}
    picked = resolve_named(named_specs(["style:0.3", {"name": "other"}]), available)
    assert [(x.file, x.weight) for x in picked] == [("style.safetensors", 0.3), ("other.safetensors", 1.0)]
    with pytest.raises(
        ValueError, match=r"loras: 'nope' is not one of this server's LoRAs \(loaded: other, style\)"
    ):
        resolve_named(named_specs(["nope"]), available)
    with pytest.raises(ValueError, match="given twice"):
        loras_of([str(style), f"{style}:0.2"])


def test_lora_refused_by_an_engine_that_would_ignore_it(lora_files):
    with pytest.raises(ValueError, match="loras need the eager torch engine"):
        seg_rt.generate(tiny_pipeline("sd15"), "x", engine="torch-compile", loras=[str(lora_files[0])], **KW)


def test_server_preloads_a_named_set_and_requests_pick_by_name(lora_files):
    from seg_rt.cluster.serving.config import ServeConfig
    from seg_rt.cluster.serving.core import ServingCore, group_rows
    from seg_rt.cluster.serving.request import make_request
    from seg_rt.models import open_model

    style, other = lora_files
    config = ServeConfig(model="tiny-sd15", loras={"style": str(style), "other": str(other)})
    loras = config.preloaded_loras()
    opened = open_model(tiny_pipeline("sd15"), "torch", "cpu", loras=tuple(loras.values()))
    core = ServingCore(config, opened.pipe, opened.engine, loras=loras)
    try:
        assert core.info()["loras"]["style"]["file"] == "style.safetensors"
        assert str(style.parent) not in json.dumps(core.info())
        body = {
            "prompt": "a cat",
            "steps": 2,
            "cfg": 4.0,
            "height": 32,
            "width": 32,
            "seg_scale": 0.0,
            "seed": 7,
        }
        a = core.check(make_request(**body, loras=["style:0.7"]))[0]
        b = core.check(make_request(**body))[0]
        c = core.check(make_request(**body, loras=[{"name": "other", "weight": 0.7}]))[0]
        assert a.loras == (loras["style"].with_weight(0.7),) and b.loras == ()
        assert len(group_rows([[a], [b], [c]], 4)) == 3  # different LoRA sets never share a run
        served = core.run_batch([[a], [b]])
        ours = seg_rt.generate(
            tiny_pipeline("sd15"),
            "a cat",
            seg_scale=0.0,
            loras=[f"{style}:0.7"],
            **{**KW, "output_type": "pil"},
        )[0]
        lora_img, plain_img = (np.asarray(x[0], dtype=np.int16) for x in served)
        assert np.abs(lora_img - np.asarray(ours, dtype=np.int16)).max() <= 1  # same run, other adapter idle
        assert np.abs(lora_img - plain_img).max() > 8  # the request without LoRA samples without it
        with pytest.raises(ValueError, match=r"^loras: 'nope' is not one of this server's LoRAs"):
            core.check(make_request(**body, loras=["nope"]))
    finally:
        opened.close()


def test_server_config_refuses_bad_lora_files_in_one_line(tmp_path):
    from seg_rt.cluster.serving.config import load_config

    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"^server config: .*loras: .*x.ckpt' is not a safetensors file"):
        load_config(None, model="m", loras={"x": str(tmp_path / "x.ckpt")})
    with pytest.raises(ValueError, match="loras need the eager torch engine"):
        load_config(
            None,
            model="m",
            engine="torch-compile",
            loras={"x": str(write_lora(tmp_path / "l.safetensors", 3))},
        )


def test_cli_bad_lora_is_exit_2_before_the_model_loads(tmp_path):
    from .cli_run import run_cli

    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    r = run_cli("generate", "--model", str(tmp_path / "no-model"), "--lora", str(tmp_path / "x.ckpt"),
                "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert r.returncode == 2 and "x.ckpt' is not a safetensors file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()


def test_job_loras_resolve_relative_to_the_job_folder(tmp_path, lora_files):
    from seg_rt.cluster.jobs.spec import expand_items, parse_job

    style, _ = lora_files
    (tmp_path / "style.safetensors").write_bytes(style.read_bytes())
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "b", "loras": ["style.safetensors:0.2"]}) + "\n")
    spec = parse_job({"model": "m", "prompts": ["a"], "output": "out", "loras": ["style.safetensors:0.5"]},
                     base=tmp_path)  # fmt: skip
    (item,) = expand_items(spec, tmp_path)
    assert item.params.loras[0].weight == 0.5 and item.params.loras[0].path == str(
        tmp_path / "style.safetensors"
    )
    jsonl = parse_job({"model": "m", "prompts_file": "p.jsonl", "output": "out"}, base=tmp_path)
    assert expand_items(jsonl, tmp_path)[0].params.loras[0].weight == 0.2
    with pytest.raises(ValueError, match=r"loras: .*'.*missing.safetensors' does not exist"):
        parse_job(
            {"model": "m", "prompts": ["a"], "output": "o", "loras": ["missing.safetensors"]}, base=tmp_path
        )


# ---- beyond SD1.5: SDXL (a UNet with two text encoders) and Flux (a DiT) ----


def family_pipe(family: str):
    from seg_rt.tiny import tiny_dit_pipeline

    return tiny_dit_pipeline(family) if family == "flux" else tiny_pipeline(family)


def write_family_lora(path, family: str, seed: int, rank: int = 4):
    """A random LoRA on the family's attention projections (UNet or transformer), saved by the
    family's own diffusers pipeline class (``save_lora_weights``)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = family_pipe(family)
    net = pipe.transformer if family == "flux" else pipe.unet
    torch.manual_seed(seed)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTN, init_lora_weights=False))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    layers = {
        ("transformer" if family == "flux" else "unet") + "_lora_layers": get_peft_model_state_dict(net)
    }
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_lora_beyond_sd15_equals_diffusers_and_seg_stays_on(tmp_path, family):
    from seg_rt.families.dit import pack

    path = write_family_lora(tmp_path / "style.safetensors", family, 5)
    kw = {**KW, "negative_prompt": "blurry"}
    if family == "flux":  # FluxPipeline's true CFG off; its distilled guidance at seg-rt's default
        kw["cfg"] = 1.0
    pipe = family_pipe(family)
    ours = seg_rt.generate(pipe, "a cat", seg_scale=0.0, loras=[f"{path}:0.8"], **kw)
    seg = seg_rt.generate(pipe, "a cat", seg_scale=3.0, seg_sigma=2.0, loras=[f"{path}:0.8"], **kw)
    plain = seg_rt.generate(pipe, "a cat", seg_scale=0.0, **kw)  # the adapter switched off
    theirs_pipe = family_pipe(family)  # diffusers alone: its loader, its adapters, its pipeline call
    theirs_pipe.load_lora_weights(str(path), adapter_name="a")
    theirs_pipe.set_adapters(["a"], [0.8])
    call = {"num_inference_steps": 2, "output_type": "latent", "height": 32, "width": 32,
            "negative_prompt": "blurry", "generator": torch.Generator("cpu").manual_seed(7)}  # fmt: skip
    if family == "flux":
        call.update(true_cfg_scale=1.0, guidance_scale=GenerationParams.distilled_guidance)
        ours, seg, plain = pack(ours), pack(seg), pack(plain)
    else:
        theirs_pipe.scheduler = EulerDiscreteScheduler.from_config(theirs_pipe.scheduler.config)
        call["guidance_scale"] = 4.0
    theirs = theirs_pipe("a cat", **call).images
    assert_close(ours, theirs, rel=1e-5, what=f"{family} LoRA latents vs diffusers")
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA changed the result
    assert (seg - ours).abs().max() > 1e-3 * ours.abs().max()  # SEG on with the LoRA active
