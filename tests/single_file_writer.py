"""The tests' own writer of original (A1111 / CompVis LDM) single-file checkpoints from a diffusers
SD1.5 / SDXL pipeline: the inverse of the key layout diffusers' ``from_single_file`` converts from.
Written from the LDM module structure (input/middle/output blocks, ``encoder.down.i.block.j``, OpenCLIP
``resblocks`` with fused ``in_proj``), with diffusers' own OpenCLIP rename table; diffusers ships no
diffusers → original conversion, so this is what the single-file test loads back."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip


def _resnet(prefix: str, state: dict, src: str, out: dict, names=RESNET) -> None:
    for k, v in state.items():
        if k.startswith(src):
            rest = k[len(src) :]
            head, _, tail = rest.partition(".")
            out[prefix + names.get(head, head) + "." + tail] = v


def _copy(prefix: str, state: dict, src: str, out: dict) -> None:
    for k, v in state.items():
        if k.startswith(src):
            out[prefix + k[len(src) :]] = v


def unet_to_ldm(unet) -> dict:
    state, cfg = unet.state_dict(), unet.config
    out: dict = {}
    top = {
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
    }
    for hf, ldm in top.items():
        if hf in state:
            out[ldm] = state[hf]
    per = cfg.layers_per_block
    n = len(cfg.block_out_channels)
    for i in range(n):
        for j in range(per):
            idx = 1 + i * (per + 1) + j
            _resnet(f"input_blocks.{idx}.0.", state, f"down_blocks.{i}.resnets.{j}.", out)
            _copy(f"input_blocks.{idx}.1.", state, f"down_blocks.{i}.attentions.{j}.", out)
        if i < n - 1:
            _copy(
                f"input_blocks.{(i + 1) * (per + 1)}.0.op.",
                state,
                f"down_blocks.{i}.downsamplers.0.conv.",
                out,
            )
    _resnet("middle_block.0.", state, "mid_block.resnets.0.", out)
    _copy("middle_block.1.", state, "mid_block.attentions.0.", out)
    _resnet("middle_block.2.", state, "mid_block.resnets.1.", out)
    for i in range(n):
        for j in range(per + 1):
            idx = i * (per + 1) + j
            _resnet(f"output_blocks.{idx}.0.", state, f"up_blocks.{i}.resnets.{j}.", out)
            has_attn = any(k.startswith(f"up_blocks.{i}.attentions.{j}.") for k in state)
            _copy(f"output_blocks.{idx}.1.", state, f"up_blocks.{i}.attentions.{j}.", out)
            if j == per and i < n - 1:
                _copy(
                    f"output_blocks.{idx}.{2 if has_attn else 1}.conv.",
                    state,
                    f"up_blocks.{i}.upsamplers.0.conv.",
                    out,
                )
    assert len(out) == len(state), "every UNet weight written once"
    return {"model.diffusion_model." + k: v for k, v in out.items()}


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_attn(prefix: str, state: dict, src: str, out: dict) -> None:
    for k, v in state.items():
        if k.startswith(src):
            rest = k[len(src) :].replace("to_out.0.", "to_out.")
            head, _, tail = rest.partition(".")
            name = VAE_ATTN[head]
            out[prefix + name + "." + tail] = (
                v.reshape(*v.shape, 1, 1) if name != "norm" and v.ndim == 2 else v
            )


def vae_to_ldm(vae) -> dict:
    state = vae.state_dict()
    out = {ldm: state[hf] for hf, ldm in DIFFUSERS_TO_LDM_MAPPING["vae"].items() if hf in state}
    n = len(vae.config.block_out_channels)
    per = vae.config.layers_per_block
    for i in range(n):
        for j in range(per):
            _resnet(
                f"encoder.down.{i}.block.{j}.",
                state,
                f"encoder.down_blocks.{i}.resnets.{j}.",
                out,
                VAE_RESNET,
            )
        if i < n - 1:
            _copy(
                f"encoder.down.{i}.downsample.conv.",
                state,
                f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                out,
            )
        for j in range(per + 1):
            _resnet(
                f"decoder.up.{n - 1 - i}.block.{j}.",
                state,
                f"decoder.up_blocks.{i}.resnets.{j}.",
                out,
                VAE_RESNET,
            )
        if i < n - 1:
            _copy(
                f"decoder.up.{n - 1 - i}.upsample.conv.",
                state,
                f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                out,
            )
    for part in ("encoder", "decoder"):
        for j in (0, 1):
            _resnet(f"{part}.mid.block_{j + 1}.", state, f"{part}.mid_block.resnets.{j}.", out, VAE_RESNET)
        _vae_attn(f"{part}.mid.attn_1.", state, f"{part}.mid_block.attentions.0.", out)
    assert len(out) == len(state), "every VAE weight written once"
    return {"first_stage_model." + k: v for k, v in out.items()}


def clip_state(text_encoder) -> dict:
    """A CLIP text encoder's weights under the names of the released checkpoints (``text_model.``
    in front: transformers 5's ``CLIPTextModel`` names them without it)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        if "position_ids" not in k:
            out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def open_clip_to_ldm(text_encoder) -> dict:
    """CLIPTextModelWithProjection → OpenCLIP keys (fused q/k/v ``in_proj``, transposed projection)."""
    state = clip_state(text_encoder)
    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    out = {}
    for hf, ldm in table["layers"].items():
        if hf in state:
            out[ldm] = state[hf].T.contiguous() if ldm == "text_projection" else state[hf]
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def write_single_file(pipe, path: str | Path) -> Path:
    """An SD1.5 (``cond_stage_model``) or SDXL (``conditioner.embedders``) original checkpoint."""
    out = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    clip = clip_state(pipe.text_encoder)
    if getattr(pipe, "text_encoder_2", None) is None:
        out.update({"cond_stage_model.transformer." + k: v for k, v in clip.items()})
    else:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip.items()})
        out.update(
            {
                "conditioner.embedders.1.model." + k: v
                for k, v in open_clip_to_ldm(pipe.text_encoder_2).items()
            }
        )
    path = Path(path)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path
