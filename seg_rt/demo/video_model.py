"""The demo video model: AnimateDiff-style motion modules on the demo image model (``model``).

``SEGDemoVideoPipeline`` is a diffusers ``AnimateDiffPipeline`` subclass holding a
``UNetMotionModel``: the demo image UNet (pixel space, 32x32) with a ``MotionAdapter``'s temporal
self-attention after each down / up / mid block, a CLIP text encoder whose word vocabulary adds the
motion words, and the image model's Euler scheduler. No VAE: the samples are the frames, in
[-1, 1]. Being an AnimateDiff pipeline, ``seg-rt video`` runs it through the AnimateDiff family
(spatial SEG on the frames' ``attn1``, temporal SEG on the motion modules). ``build`` starts from
the bundled image model with zero-output motion modules, so an untrained video model is the image
model frame by frame; ``seg_rt.demo.video_train`` trains it; ``seg_rt/demo/video_weights`` holds it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter, UNetMotionModel
from diffusers.video_processor import VideoProcessor

from . import data, video_data
from .model import SEGDemoPipeline, index_class, tokenizer, weights_dir
from .model import caption_words as image_words

MOTION_CONFIG = {
    "block_out_channels": (48, 96),
    "motion_layers_per_block": 1,
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 4,
    "motion_norm_num_groups": 16,
    "motion_max_seq_length": 16,
    "use_motion_mid_block": True,
}


def video_weights_dir() -> Path:
    """The bundled, trained demo video pipeline folder (inside the installed package)."""
    return Path(str(resources.files("seg_rt.demo") / "video_weights"))


def is_demo_video_folder(path: str | Path) -> bool:
    return index_class(path) == SEGDemoVideoPipeline.__name__


def video_tokenizer():
    return tokenizer(sorted(set(image_words()) | set(video_data.caption_words())))


def build(seed: int = 0, image_model: str | Path | None = None) -> SEGDemoVideoPipeline:
    """An untrained video pipeline: the demo image model (``image_model``, default the bundled one)
    plus zero-output motion modules (seeded by ``seed``); the text encoder's embedding table grows
    to the video vocabulary, words the image vocabulary has keep their rows."""
    image = SEGDemoPipeline.from_pretrained(str(image_model or weights_dir()))
    tok = video_tokenizer()
    text = image.text_encoder
    old = text.get_input_embeddings().weight.detach().clone()
    old_vocab = image.tokenizer.get_vocab()
    torch.manual_seed(seed)
    text.resize_token_embeddings(len(tok))
    with torch.no_grad():
        emb = text.get_input_embeddings().weight
        for token, i in tok.get_vocab().items():
            if token in old_vocab:
                emb[i] = old[old_vocab[token]]
    text.config.vocab_size = len(tok)
    unet = UNetMotionModel.from_unet2d(image.unet, MotionAdapter(**MOTION_CONFIG))
    with torch.no_grad():  # AnimateDiff's zero-initialised motion output: frames start independent
        for name, module in unet.named_modules():
            if "motion_modules." in name and name.endswith(".proj_out"):
                module.weight.zero_(), module.bias.zero_()
    return SEGDemoVideoPipeline(unet=unet, text_encoder=text, tokenizer=tok, scheduler=image.scheduler)


class SEGDemoVideoPipeline(AnimateDiffPipeline):
    """Pixel-space text-to-video pipeline of the demo video model (see the module docstring).

    Sample it with ``seg_rt.video.sampling.generate_video`` (``seg-rt video``); ``encode_prompt``
    is the demo image pipeline's (SD1.5's signature). AnimateDiff's own ``__call__`` needs a VAE and
    is not used."""

    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ()
    vae_scale_factor = 1
    default_size = data.SIZE  # the frame size seg-rt samples when none is given
    default_frames = video_data.FRAMES  # and the clip length it was trained on (a server's default)

    def __init__(self, unet, text_encoder, tokenizer, scheduler) -> None:
        DiffusionPipeline.__init__(self)
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.video_processor = VideoProcessor(do_resize=False, vae_scale_factor=1)

    tokenize = SEGDemoPipeline.tokenize
    embed = SEGDemoPipeline.embed
    encode_prompt = SEGDemoPipeline.encode_prompt

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        return latents  # pixel space: the samples are the frames
