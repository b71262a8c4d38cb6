"""The configs of seg-rt's tiny random-weight models (``seg_rt.tiny`` builds them): one table per
kind, family name -> (diffusers class, config) or a part's config. Edit a value here and every tiny
model built from it changes (the golden outputs and tests/test_tiny.py say so)."""

TEXT = {
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

VAE = {  # an 8x AutoencoderKL (4 levels: the latent factor of real SD models)
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 64,
}

ANIMATEDIFF_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TEXT["hidden_size"],
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}

MOTION_ADAPTER = {
    "block_out_channels": (32, 64),
    "motion_layers_per_block": 2,
    "motion_norm_num_groups": 8,
    "motion_num_attention_heads": 2,
    "motion_max_seq_length": 32,
}

VIDEO_DENOISERS = {  # family -> (diffusers class, config); AnimateDiff is built from a UNet
    "cogvideox": (
        "CogVideoXTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 4,
            "text_embed_dim": TEXT["hidden_size"],
            "num_layers": 2,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 9,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 16,
            "use_rotary_positional_embeddings": True,
        },
    ),
    "wan": (
        "WanTransformer3DModel",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": TEXT["hidden_size"],
            "freq_dim": 32,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
    ),
    "ltx": (
        "LTXVideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "cross_attention_dim": 32,
            "num_layers": 2,
            "caption_channels": TEXT["hidden_size"],
        },
    ),
}

COGVIDEOX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("CogVideoXDownBlock3D",) * 4,
    "up_block_types": ("CogVideoXUpBlock3D",) * 4,
    "block_out_channels": (8, 8, 8, 8),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "temporal_compression_ratio": 4,
}

WAN_VAE = {
    "base_dim": 3,
    "z_dim": 4,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.0] * 4,
    "latents_std": [1.0] * 4,
}

LTX_VAE = {  # 8x spatial and 8x temporal compression (three scaling blocks, patch 1)
    "latent_channels": 4,
    "block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "layers_per_block": (1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1, 1),
    "spatio_temporal_scaling": (True, True, True, False),
    "decoder_spatio_temporal_scaling": (True, True, True, False),
    "patch_size": 1,
    "patch_size_t": 1,
}

LTX_SCHEDULER = {
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
}

DITS = {  # family -> (diffusers class, config)
    # patch 2, 4 joint blocks (the last context_pre_only), qk RMS norm, block 1 with SD3.5's second
    # image attention
    "sd3": (
        "SD3Transformer2DModel",
        {
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 4,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": 2 * TEXT["hidden_size"],
            "caption_projection_dim": 32,
            "pooled_projection_dim": 2 * TEXT["projection_dim"],
            "pos_embed_max_size": 32,
            "qk_norm": "rms_norm",
            "dual_attention_layers": (1,),
        },
    ),
    # 2 double-stream + 2 single-stream blocks, guidance embedding
    "flux": (
        "FluxTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": TEXT["hidden_size"],
            "pooled_projection_dim": TEXT["hidden_size"],
            "guidance_embeds": True,
            "axes_dims_rope": (4, 6, 6),
        },
    ),
    # 2 double-stream blocks
    "qwenimage": (
        "QwenImageTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": TEXT["hidden_size"],
            "axes_dims_rope": (4, 6, 6),
        },
    ),
}

QWEN_VAE = {  # a Wan-style video VAE, 8x spatial, with 4 latent channels
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.1, -0.2, 0.0, 0.3],
    "latents_std": [1.5, 0.8, 1.2, 2.0],
}

QWEN_SCHEDULER = {
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

FLUX_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# image-to-video checkpoints (seg_rt.tiny.tiny_i2v_pipeline): what differs from the text-to-video
# denoisers above; LTX-Video animates a still with its text-to-video checkpoint
I2V_DENOISERS = {
    # the still's latents as extra channels (2 x 4)
    "cogvideox": {"in_channels": 8},
    # + the 4-channel first-frame mask and the still's latents (4 + 4 + 4); the CLIP image embedding
    # as extra cross-attention context (Wan 2.1 I2V)
    "wan": {"in_channels": 12, "image_dim": 32, "added_kv_proj_dim": 32},
}

CLIP_VISION = {  # a tiny CLIP vision tower (Wan 2.1 I2V's image_encoder, SVD's at 224 px)
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "patch_size": 8,
    "image_size": 32,
}

SVD_UNET = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    "block_out_channels": (32, 64),
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (2, 4),
    "num_frames": 4,
}

SVD_VAE = {  # AutoencoderKLTemporalDecoder: 32-group norms, 8x
    "block_out_channels": (32, 32, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "sample_size": 64,
}

SVD_SCHEDULER = {  # Stable Video Diffusion's EulerDiscreteScheduler (v-prediction, Karras sigmas)
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "use_karras_sigmas": True,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "steps_offset": 1,
}
