"""Tiny random-weight diffusers pipelines, built offline from configs (no hub, no downloads).

They have the real architectures (diffusers UNet2DConditionModel with cross-attention transformer
blocks in the down / mid / up parts, an 8× VAE, CLIP text encoders with a small byte-level
tokenizer), so every code path of a real SD1.5 / SDXL / SDXL-ControlNet model runs, in seconds.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch

from .tiny_configs import (
    ANIMATEDIFF_UNET,
    CLIP_VISION,
    COGVIDEOX_VAE,
    DITS,
    FLUX_SCHEDULER,
    I2V_DENOISERS,
    LTX_SCHEDULER,
    LTX_VAE,
    MOTION_ADAPTER,
    QWEN_SCHEDULER,
    QWEN_VAE,
    SVD_SCHEDULER,
    SVD_UNET,
    SVD_VAE,
    TEXT,
    VAE,
    VIDEO_DENOISERS,
    WAN_VAE,
)
from .tokenizers import byte_unicode


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
    config = CLIPTextConfig(**TEXT)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _unet(xl: bool, seed: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + TEXT["projection_dim"],
            "cross_attention_dim": 2 * TEXT["hidden_size"],
        }
        if xl
        else {"cross_attention_dim": TEXT["hidden_size"]}
    )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,  # 9: an inpainting checkpoint (latents, mask, masked-image latents)
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


def _build(class_name: str, config: dict, seed: int):
    """``diffusers.<class_name>(**config)`` in eval mode, its random weights drawn from ``seed``."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**copy.deepcopy(config)).eval()  # the table stays as written


def _vae(seed: int, **config):
    """The 8x ``AutoencoderKL`` of ``VAE``; ``config`` adds to it."""
    return _build("AutoencoderKL", {**VAE, **config}, seed)


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


def _sd15_pipeline(seed: int):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=_text_encoder(False, seed + 1),
        tokenizer=tiny_tokenizer(),
        unet=_unet(False, seed + 2),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_parts(seed: int) -> dict:
    return {
        "vae": _vae(seed),
        "text_encoder": _text_encoder(False, seed + 1),
        "text_encoder_2": _text_encoder(True, seed + 3),
        "tokenizer": tiny_tokenizer(),
        "tokenizer_2": tiny_tokenizer(),
        "unet": _unet(True, seed + 2),
        "scheduler": _scheduler(),
    }


def _sdxl_pipeline(seed: int):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**_sdxl_parts(seed), add_watermarker=False)


def _sdxl_controlnet_pipeline(seed: int):
    from diffusers import StableDiffusionXLControlNetPipeline

    parts = _sdxl_parts(seed)
    controlnet = _controlnet(parts["unet"], seed + 4)
    return StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)


def _sd15_controlnet_pipeline(seed: int):
    from diffusers import StableDiffusionControlNetPipeline

    base = _sd15_pipeline(seed)
    controlnet = _controlnet(base.unet, seed + 4)
    return StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=controlnet,
    )


def _sdxl_inpaint_pipeline(seed: int):
    """A dedicated SDXL inpainting checkpoint: a 9-channel UNet (StableDiffusionXLInpaintPipeline)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    parts = {**_sdxl_parts(seed), "unet": _unet(True, seed + 2, in_channels=9)}
    return StableDiffusionXLInpaintPipeline(**parts, add_watermarker=False)


_PIPELINES = {  # family -> builder(seed)
    "sd15": _sd15_pipeline,
    "sdxl": _sdxl_pipeline,
    "sdxl-controlnet": _sdxl_controlnet_pipeline,
    "sd15-controlnet": _sd15_controlnet_pipeline,
    "sdxl-inpaint": _sdxl_inpaint_pipeline,
}
FAMILIES = tuple(_PIPELINES)


def _pick(table: dict, family: str, what: str):
    """``table[family]``, or a one-line error listing the families there are."""
    if family not in table:
        raise ValueError(f"unknown tiny {what}family {family!r}; choose from {', '.join(table)}")
    return table[family]


def tiny_pipeline(family: str = "sdxl", seed: int = 0):
    """A random-weight diffusers pipeline of ``family`` (one of ``FAMILIES``), deterministic in ``seed``."""
    return _pick(_PIPELINES, family, "")(seed)


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_pipeline(family, seed)`` and save it (safetensors) to ``path``; loadable with ``--model``."""
    return _save(tiny_pipeline(family, seed), path)


def _animatediff_parts(seed: int):
    """A tiny SD1.5-style UNet and a motion adapter (two motion layers per block), one RNG stream."""
    import diffusers

    unet = _build("UNet2DConditionModel", ANIMATEDIFF_UNET, seed)
    return unet, diffusers.MotionAdapter(**MOTION_ADAPTER).eval()  # drawn after the UNet's weights


def _animatediff_denoiser(seed: int):
    import diffusers

    return diffusers.UNetMotionModel.from_unet2d(*_animatediff_parts(seed)).eval()


VIDEO_FAMILIES = ("animatediff", *VIDEO_DENOISERS)


def tiny_video_denoiser(family: str, seed: int = 0):
    """A random-weight video denoiser: AnimateDiff's ``UNetMotionModel`` (tiny SD1.5 UNet + motion
    adapter), ``CogVideoXTransformer3DModel``, ``WanTransformer3DModel`` (patch 1x2x2) or
    ``LTXVideoTransformer3DModel``."""
    builders = {"animatediff": _animatediff_denoiser}
    builders.update({f: partial(_build, *spec) for f, spec in VIDEO_DENOISERS.items()})
    return _pick(builders, family, "video ")(seed)


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over ASCII characters, built from an in-code vocabulary."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -2.5) for c in string.ascii_letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(umt5: bool, vocab_size: int, seed: int, d_model: int = TEXT["hidden_size"]):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kw = {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
    }
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def _animatediff_pipeline(seed: int):
    import diffusers

    unet, adapter = _animatediff_parts(seed + 2)
    return diffusers.AnimateDiffPipeline(
        vae=_vae(seed),
        text_encoder=_text_encoder(False, seed + 1),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        motion_adapter=adapter,
        scheduler=_scheduler(),
    )


def _cogvideox_pipeline(seed: int):
    import diffusers

    tok = tiny_t5_tokenizer()
    vae = _build("AutoencoderKLCogVideoX", COGVIDEOX_VAE, seed)
    return diffusers.CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=_t5(False, len(tok), seed + 1),
        vae=vae,
        transformer=tiny_video_denoiser("cogvideox", seed + 2),
        scheduler=diffusers.CogVideoXDDIMScheduler(),
    )


def _wan_pipeline(seed: int):
    import diffusers

    tok = tiny_t5_tokenizer()
    vae = _build("AutoencoderKLWan", WAN_VAE, seed)
    return diffusers.WanPipeline(
        tokenizer=tok,
        text_encoder=_t5(True, len(tok), seed + 1),
        transformer=tiny_video_denoiser("wan", seed + 2),
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _ltx_pipeline(seed: int):
    import diffusers

    tok = tiny_t5_tokenizer()
    return diffusers.LTXPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER),
        vae=_build("AutoencoderKLLTXVideo", LTX_VAE, seed),
        text_encoder=_t5(False, len(tok), seed + 1),
        tokenizer=tok,
        transformer=tiny_video_denoiser("ltx", seed + 2),
    )


_VIDEO_PIPELINES = {  # family -> builder(seed)
    "animatediff": _animatediff_pipeline,
    "cogvideox": _cogvideox_pipeline,
    "wan": _wan_pipeline,
    "ltx": _ltx_pipeline,
}


def tiny_video_pipeline(family: str = "animatediff", seed: int = 0):
    """A random-weight diffusers video pipeline: ``animatediff`` (CLIP text), ``cogvideox`` (T5 text,
    CogVideoX VAE, 4x temporal compression), ``wan`` (UMT5 text, Wan VAE, 4x temporal) or ``ltx``
    (T5 text, LTX-Video VAE, 8x temporal)."""
    return _pick(_VIDEO_PIPELINES, family, "video ")(seed)


def save_tiny_video_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_video_pipeline(family, seed)`` and save it (safetensors) to ``path``; loadable with ``--model``."""
    return _save(tiny_video_pipeline(family, seed), path)


def _flow_vae(seed: int, shift: float, scaling: float):
    """``_vae`` with the SD3 / Flux latent normalisation (``shift_factor``) and no quant convs."""
    return _vae(
        seed, shift_factor=shift, scaling_factor=scaling, use_quant_conv=False, use_post_quant_conv=False
    )


DIT_FAMILIES = tuple(DITS)


def tiny_dit(family: str, seed: int = 0):
    """A random-weight image DiT: ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` or
    ``QwenImageTransformer2DModel`` (``qwenimage``), configured as in ``DITS``."""
    return _build(*_pick(DITS, family, "DiT "), seed)


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
        "hidden_size": TEXT["hidden_size"],
        "intermediate_size": TEXT["intermediate_size"],
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
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "fullatt_block_indexes": [0],
    }
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwenimage_pipeline(seed: int):
    import diffusers

    tok = tiny_qwen_tokenizer()
    return diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=_build("AutoencoderKLQwenImage", QWEN_VAE, seed),
        text_encoder=_qwen_text_encoder(len(tok), seed + 1),
        tokenizer=tok,
        transformer=tiny_dit("qwenimage", seed + 2),
    )


def _sd3_pipeline(seed: int):
    import diffusers

    t5_tok = tiny_t5_tokenizer()
    return diffusers.StableDiffusion3Pipeline(
        transformer=tiny_dit("sd3", seed + 2),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(seed, 0.0609, 1.5305),
        text_encoder=_text_encoder(True, seed + 1),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_text_encoder(True, seed + 3),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(False, len(t5_tok), seed + 4, d_model=2 * TEXT["hidden_size"]),
        tokenizer_3=t5_tok,
    )


def _flux_pipeline(seed: int):
    import diffusers

    t5_tok = tiny_t5_tokenizer()
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=_flow_vae(seed, 0.1159, 0.3611),
        text_encoder=_text_encoder(False, seed + 1),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(False, len(t5_tok), seed + 4),
        tokenizer_2=t5_tok,
        transformer=tiny_dit("flux", seed + 2),
    )


_DIT_PIPELINES = {  # family -> builder(seed); the same families as DITS
    "sd3": _sd3_pipeline,
    "flux": _flux_pipeline,
    "qwenimage": _qwenimage_pipeline,
}


def tiny_dit_pipeline(family: str = "sd3", seed: int = 0):
    """A random-weight ``StableDiffusion3Pipeline`` (CLIP-L, CLIP-G and T5 text encoders, all tiny),
    ``FluxPipeline`` (CLIP + T5) or ``QwenImagePipeline`` (Qwen2.5-VL text encoder, Qwen-Image VAE),
    with the family's flow-matching scheduler and an 8x VAE."""
    return _pick(_DIT_PIPELINES, family, "DiT ")(seed)


def save_tiny_dit_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_dit_pipeline(family, seed)`` and save it (safetensors) to ``path``; loadable with ``--model``."""
    return _save(tiny_dit_pipeline(family, seed), path)


def _clip_vision(projection: bool, seed: int, image_size: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    config = CLIPVisionConfig(**{**CLIP_VISION, "image_size": image_size})
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).eval()
    side = {"height": image_size, "width": image_size}
    return model, CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=side)


def _cogvideox_i2v_pipeline(seed: int):
    import diffusers

    t2v = _cogvideox_pipeline(seed)
    name, config = VIDEO_DENOISERS["cogvideox"]
    transformer = _build(name, {**config, **I2V_DENOISERS["cogvideox"]}, seed + 2)
    return diffusers.CogVideoXImageToVideoPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=t2v.vae,
        transformer=transformer,
        scheduler=t2v.scheduler,
    )


def _wan_i2v_pipeline(seed: int):
    import diffusers

    t2v = _wan_pipeline(seed)
    name, config = VIDEO_DENOISERS["wan"]
    image_encoder, processor = _clip_vision(False, seed + 3, CLIP_VISION["image_size"])
    return diffusers.WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=t2v.vae,
        scheduler=t2v.scheduler,
        image_processor=processor,
        image_encoder=image_encoder,
        transformer=_build(name, {**config, **I2V_DENOISERS["wan"]}, seed + 2),
    )


def _ltx_i2v_pipeline(seed: int):
    import diffusers

    return diffusers.LTXImageToVideoPipeline(**_ltx_pipeline(seed).components)


def _svd_pipeline(seed: int):
    import diffusers

    # SVD's _encode_image resizes the still to 224 x 224 before its CLIP tower
    image_encoder, processor = _clip_vision(True, seed + 1, 224)
    return diffusers.StableVideoDiffusionPipeline(
        vae=_build("AutoencoderKLTemporalDecoder", SVD_VAE, seed),
        image_encoder=image_encoder,
        unet=_build("UNetSpatioTemporalConditionModel", SVD_UNET, seed + 2),
        scheduler=diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=processor,
    )


_I2V_PIPELINES = {  # family -> builder(seed)
    "cogvideox": _cogvideox_i2v_pipeline,
    "wan": _wan_i2v_pipeline,
    "ltx": _ltx_i2v_pipeline,
    "svd": _svd_pipeline,
}
I2V_FAMILIES = tuple(_I2V_PIPELINES)


def tiny_i2v_pipeline(family: str = "cogvideox", seed: int = 0):
    """A random-weight diffusers image-to-video pipeline: ``CogVideoXImageToVideoPipeline`` (transformer
    taking the still's latents), ``WanImageToVideoPipeline`` (Wan 2.1 I2V: first-frame mask channels,
    a tiny CLIP image encoder), ``LTXImageToVideoPipeline`` (the text-to-video parts) or
    ``StableVideoDiffusionPipeline`` (spatio-temporal UNet, temporal-decoder VAE, CLIP at 224 px)."""
    return _pick(_I2V_PIPELINES, family, "image-to-video ")(seed)


def save_tiny_i2v_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``tiny_i2v_pipeline(family, seed)`` and save it (safetensors) to ``path``."""
    return _save(tiny_i2v_pipeline(family, seed), path)
