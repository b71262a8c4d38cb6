"""Tiny random-weight diffusers pipelines, built offline from configs (no hub, no downloads).

They have the real architectures (diffusers UNet2DConditionModel with cross-attention transformer
blocks in the down / mid / up parts, an 8× VAE, CLIP text encoders with a small byte-level
tokenizer), so every code path of a real SD1.5 / SDXL / SDXL-ControlNet model runs, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizers import byte_unicode

FAMILIES = ("sd15", "sdxl", "sdxl-controlnet")

_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}


def tiny_tokenizer():
    """A CLIP tokenizer over single bytes (no merges), model_max_length 77."""
    from transformers import CLIPTokenizer

    chars = byte_unicode()
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {t: i for i, t in enumerate(tokens)}
    # transformers 5 ignores vocab_file/merges_file: pass the vocabulary itself (docs/design.md §8).
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(**_TEXT)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _unet(xl: bool, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + _TEXT["projection_dim"],
            "cross_attention_dim": 2 * _TEXT["hidden_size"],
        }
        if xl
        else {"cross_attention_dim": _TEXT["hidden_size"]}
    )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        use_linear_projection=xl,
        **extra,
    ).eval()


def _controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    # 3 stride-2 convs in the conditioning embedding: pixel-size control image -> latent size.
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    # A fresh ControlNet's output convs are zero (it starts as a no-op); randomise them so the
    # control image really steers the tiny model.
    zeroed = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for module in zeroed:
            for p in module.parameters():
                p.normal_(0.0, 0.05)
    return net


def _vae(seed: int, **config):
    """An 8x ``AutoencoderKL`` (4 levels: the latent factor of real SD models); ``config`` adds to it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=64, **config,
    ).eval()  # fmt: skip


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # Stable Diffusion's training schedule.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _save(pipe, path: str | Path) -> Path:
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_pipeline(family: str = "sdxl", seed: int = 0):
    """A random-weight diffusers pipeline of ``family`` (one of ``FAMILIES``), deterministic in ``seed``."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    vae, scheduler = _vae(seed), _scheduler()
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=_text_encoder(False, seed + 1),
            tokenizer=tiny_tokenizer(),
            unet=_unet(False, seed + 2),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    parts = {
        "vae": vae,
        "text_encoder": _text_encoder(False, seed + 1),
        "text_encoder_2": _text_encoder(True, seed + 3),
        "tokenizer": tiny_tokenizer(),
        "tokenizer_2": tiny_tokenizer(),
        "unet": _unet(True, seed + 2),
        "scheduler": scheduler,
    }
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, add_watermarker=False)
    return StableDiffusionXLControlNetPipeline(
        **parts, controlnet=_controlnet(parts["unet"], seed + 4), add_watermarker=False
    )


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_pipeline(family, seed)`` and save it (safetensors) to ``path``; loadable with ``--model``."""
    return _save(tiny_pipeline(family, seed), path)


VIDEO_FAMILIES = ("animatediff", "cogvideox", "wan", "ltx")


def tiny_video_denoiser(family: str, seed: int = 0):
    """A random-weight video denoiser: AnimateDiff's ``UNetMotionModel`` (tiny SD1.5 UNet + motion
    adapter), ``CogVideoXTransformer3DModel`` or ``WanTransformer3DModel`` (patch 1x2x2)."""
    import diffusers

    torch.manual_seed(seed)
    if family == "animatediff":
        return diffusers.UNetMotionModel.from_unet2d(*_animatediff_parts(seed)).eval()
    if family == "cogvideox":
        return diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
            text_embed_dim=_TEXT["hidden_size"], num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
        ).eval()  # fmt: skip
    if family == "wan":
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=_TEXT["hidden_size"], freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()  # fmt: skip
    if family == "ltx":
        return diffusers.LTXVideoTransformer3DModel(
            in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=_TEXT["hidden_size"],
        ).eval()  # fmt: skip
    raise ValueError(f"unknown tiny video family {family!r}; choose from {', '.join(VIDEO_FAMILIES)}")


def _ltx_vae(seed: int):
    """An LTX-Video VAE with 8x spatial and 8x temporal compression (three scaling blocks, patch 1)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=1, patch_size_t=1,
    ).eval()  # fmt: skip


def _animatediff_parts(seed: int):
    """A tiny SD1.5-style UNet and a motion adapter (two motion layers per block)."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT["hidden_size"], attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    adapter = diffusers.MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=8,
        motion_num_attention_heads=2, motion_max_seq_length=32,
    ).eval()  # fmt: skip
    return unet, adapter


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over ASCII characters, built from an in-code vocabulary."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -2.5) for c in string.ascii_letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(umt5: bool, vocab_size: int, seed: int, d_model: int = _TEXT["hidden_size"]):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kw = {"vocab_size": vocab_size, "d_model": d_model, "d_kv": 8, "d_ff": 37, "num_layers": 2,
          "num_heads": 4, "relative_attention_num_buckets": 8}  # fmt: skip
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def tiny_video_pipeline(family: str = "animatediff", seed: int = 0):
    """A random-weight diffusers video pipeline: ``animatediff`` (CLIP text), ``cogvideox`` (T5 text,
    CogVideoX VAE, 4x temporal compression) or ``wan`` (UMT5 text, Wan VAE, 4x temporal)."""
    import diffusers

    if family == "animatediff":
        unet, adapter = _animatediff_parts(seed + 2)
        return diffusers.AnimateDiffPipeline(
            vae=_vae(seed), text_encoder=_text_encoder(False, seed + 1), tokenizer=tiny_tokenizer(), unet=unet,
            motion_adapter=adapter, scheduler=_scheduler(),
        )  # fmt: skip
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"unknown tiny video family {family!r}; choose from {', '.join(VIDEO_FAMILIES)}")
    tok = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    if family == "cogvideox":
        vae = diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        ).eval()  # fmt: skip
        return diffusers.CogVideoXPipeline(
            tokenizer=tok, text_encoder=_t5(False, len(tok), seed + 1), vae=vae,
            transformer=tiny_video_denoiser("cogvideox", seed + 2), scheduler=diffusers.CogVideoXDDIMScheduler(),
        )  # fmt: skip
    if family == "ltx":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
            max_image_seq_len=4096,
        )  # fmt: skip
        return diffusers.LTXPipeline(
            scheduler=scheduler, vae=_ltx_vae(seed), text_encoder=_t5(False, len(tok), seed + 1), tokenizer=tok,
            transformer=tiny_video_denoiser("ltx", seed + 2),
        )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()  # fmt: skip
    return diffusers.WanPipeline(
        tokenizer=tok, text_encoder=_t5(True, len(tok), seed + 1), transformer=tiny_video_denoiser("wan", seed + 2),
        vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    )  # fmt: skip


def save_tiny_video_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_video_pipeline(family, seed)`` and save it (safetensors) to ``path``; loadable with ``--model``."""
    return _save(tiny_video_pipeline(family, seed), path)


DIT_FAMILIES = ("sd3", "flux", "qwenimage")


def _flow_vae(seed: int, shift: float, scaling: float):
    """``_vae`` with the SD3 / Flux latent normalisation (``shift_factor``) and no quant convs."""
    return _vae(
        seed, shift_factor=shift, scaling_factor=scaling, use_quant_conv=False, use_post_quant_conv=False
    )


def tiny_dit(family: str, seed: int = 0):
    """A random-weight image DiT: ``SD3Transformer2DModel`` (patch 2, 4 joint blocks, the last
    ``context_pre_only``, qk RMS norm; block 1 with SD3.5's second image attention) or
    ``FluxTransformer2DModel`` (2 double-stream + 2 single-stream blocks, guidance embedding), or
    ``QwenImageTransformer2DModel`` (``qwenimage``: 2 double-stream blocks)."""
    import diffusers

    torch.manual_seed(seed)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=2 * _TEXT["hidden_size"], caption_projection_dim=32,
            pooled_projection_dim=2 * _TEXT["projection_dim"], pos_embed_max_size=32, qk_norm="rms_norm",
            dual_attention_layers=(1,),
        ).eval()  # fmt: skip
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_TEXT["hidden_size"],
            pooled_projection_dim=_TEXT["hidden_size"], guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ).eval()  # fmt: skip
    if family == "qwenimage":
        return diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=_TEXT["hidden_size"], axes_dims_rope=(4, 6, 6),
        ).eval()  # fmt: skip
    raise ValueError(f"unknown tiny DiT family {family!r}; choose from {', '.join(DIT_FAMILIES)}")


def tiny_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` over single bytes (no merges) plus Qwen's chat special tokens, so that
    ``QwenImagePipeline``'s prompt template tokenizes as with the real vocabulary's specials."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_unicode())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )


def _qwen_text_encoder(vocab_size: int, seed: int):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (2 text layers, 1 vision block never used)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {
        "hidden_size": _TEXT["hidden_size"],
        "intermediate_size": _TEXT["intermediate_size"],
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "bos_token_id": None,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 3,
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
              "out_hidden_size": _TEXT["hidden_size"], "fullatt_block_indexes": [0]}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_vae(seed: int):
    """An ``AutoencoderKLQwenImage`` (Wan-style video VAE, 8x spatial) with 4 latent channels."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()  # fmt: skip


def tiny_dit_pipeline(family: str = "sd3", seed: int = 0):
    """A random-weight ``StableDiffusion3Pipeline`` (CLIP-L, CLIP-G and T5 text encoders, all tiny),
    ``FluxPipeline`` (CLIP + T5) or ``QwenImagePipeline`` (Qwen2.5-VL text encoder, Qwen-Image VAE),
    with the family's flow-matching scheduler and an 8x VAE."""
    import diffusers

    if family not in DIT_FAMILIES:
        raise ValueError(f"unknown tiny DiT family {family!r}; choose from {', '.join(DIT_FAMILIES)}")
    if family == "qwenimage":
        tok = tiny_qwen_tokenizer()
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        )  # fmt: skip
        return diffusers.QwenImagePipeline(
            scheduler=scheduler, vae=_qwen_vae(seed), text_encoder=_qwen_text_encoder(len(tok), seed + 1),
            tokenizer=tok, transformer=tiny_dit("qwenimage", seed + 2),
        )  # fmt: skip
    t5_tok = tiny_t5_tokenizer()
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=tiny_dit("sd3", seed + 2), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(seed, 0.0609, 1.5305), text_encoder=_text_encoder(True, seed + 1),
            tokenizer=tiny_tokenizer(), text_encoder_2=_text_encoder(True, seed + 3), tokenizer_2=tiny_tokenizer(),
            text_encoder_3=_t5(False, len(t5_tok), seed + 4, d_model=2 * _TEXT["hidden_size"]),
            tokenizer_3=t5_tok,
        )  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return diffusers.FluxPipeline(
        scheduler=scheduler, vae=_flow_vae(seed, 0.1159, 0.3611), text_encoder=_text_encoder(False, seed + 1),
        tokenizer=tiny_tokenizer(), text_encoder_2=_t5(False, len(t5_tok), seed + 4), tokenizer_2=t5_tok,
        transformer=tiny_dit("flux", seed + 2),
    )  # fmt: skip


def save_tiny_dit_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_dit_pipeline(family, seed)`` and save it (safetensors) to ``path``; loadable with ``--model``."""
    return _save(tiny_dit_pipeline(family, seed), path)
