"""The demo model: a small pixel-space text-to-image diffusion model built from diffusers parts.

``SEGDemoPipeline`` is a diffusers ``DiffusionPipeline`` with a ``UNet2DConditionModel`` (cross-
attention to a CLIP text encoder, self-attention in the down/up blocks at 16x16 and in the middle
block, which SEG perturbs by default), a word-level ``CLIPTokenizer`` and an Euler scheduler. It
works on 32x32 RGB pixels directly (no VAE: ``vae_scale_factor`` 1), so ``seg_rt.generate`` and
every engine run it like any SD pipeline. ``seg_rt/demo/weights`` holds the trained model.
"""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor

from seg_rt.tokenizers import byte_unicode

from . import data

MAX_TOKENS = 16
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": 128,
}
UNET_CONFIG = {
    "sample_size": data.SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (48, 96),
    "layers_per_block": 1,
    "attention_head_dim": 4,  # diffusers' name for the number of heads (head dim 24)
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "norm_num_groups": 16,
}
# DDPM's linear β schedule (the usual one for 32x32 pixel models); "trailing" so the first of
# few sampling steps starts from (almost) pure noise. v-prediction: with ε-prediction the first
# steps (σ up to ~157) turn small ε errors into large image errors, which a briefly trained model
# cannot avoid (seen: saturated, noisy samples after 600 steps)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}


def weights_dir() -> Path:
    """The bundled, trained demo pipeline folder (inside the installed package)."""
    return Path(str(resources.files("seg_rt.demo") / "weights"))


def index_class(path: str | Path) -> str | None:
    """The pipeline class name a folder's ``model_index.json`` names; None when there is none (no
    file, not JSON, not an object: ``seg_rt.pipeline.check_model_index`` says so when it loads)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    from seg_rt.safe_load import loads_json

    try:
        data = loads_json(index.read_text(), str(index))
    except ValueError:
        return None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def is_demo_folder(path: str | Path) -> bool:
    """A folder of the demo image model (``SEGDemoPipeline``)."""
    return index_class(path) == SEGDemoPipeline.__name__


def caption_words() -> list[str]:
    words = {"a", "on", *data.COLORS, *data.TEXTURES}
    for shape in data.SHAPES:
        words.update(data.shape_word(shape).lower().split())
    return sorted(words)


def tokenizer(words: list[str] | None = None):
    """A CLIP tokenizer whose vocabulary has one token per caption word (``words``, default the image
    captions' ``caption_words()``), plus every single byte (so any prompt still tokenizes). Built in
    code: transformers 5 takes ``vocab=`` / ``merges=``."""
    from transformers import CLIPTokenizer

    chars = byte_unicode()
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    # BPE "training" on the caption words (why not tokenizers' trainer: CLIP's byte alphabet and
    # </w> suffix make a hand-off awkward, and the word list is tiny): merge the most frequent
    # adjacent pair until every word is one symbol, so the merge ranks are consistent by construction
    words = [(*w[:-1], w[-1] + "</w>") for w in (caption_words() if words is None else words)]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in itertools.pairwise(w):
                counts[pair] = counts.get(pair, 0) + 1
        pair = max(sorted(counts), key=lambda p: counts[p])
        merges.append(pair)
        tokens.append("".join(pair))
        words = [_merge(w, pair) for w in words]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build(seed: int = 0, *, words: list[str] | None = None, text_config=None, unet_config=None):
    """A freshly initialised (untrained) demo pipeline, deterministic in ``seed``; ``words``,
    ``text_config`` and ``unet_config`` (default: this model's) build another model of the same
    family (``seg_rt.demo.digits``: the MNIST digits model)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = TEXT_CONFIG if text_config is None else text_config
    tok = tokenizer(words)
    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **text_config,
        )
    )
    unet = UNet2DConditionModel(**(UNET_CONFIG if unet_config is None else unet_config))
    return SEGDemoPipeline(
        unet=unet, text_encoder=text, tokenizer=tok, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    )


class SEGDemoPipeline(DiffusionPipeline):
    """Pixel-space text-to-image pipeline of the demo model (see the module docstring).

    Sample it with ``seg_rt.generate(pipe, prompt, ...)``; ``encode_prompt`` has
    ``StableDiffusionPipeline``'s signature, so seg-rt treats it as an SD1.5-style model. The model
    module imports nothing from the sampling code (``seg_rt.pipeline`` loads this class, and
    ``seg_rt.families`` maps it to the ``demo`` family), so there is no import cycle.
    """

    model_cpu_offload_seq = "text_encoder->unet"
    vae_scale_factor = 1

    def __init__(self, unet, text_encoder, tokenizer, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return ids.to(self.text_encoder.device)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts))[0]

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt=None,
    ):
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        pe = self.embed(prompt).to(device).repeat_interleave(num_images_per_prompt, 0)
        if not do_classifier_free_guidance:
            return pe, None
        neg = negative_prompt or ""
        neg = [neg] * len(prompt) if isinstance(neg, str) else list(neg)
        ne = self.embed(neg).to(device).repeat_interleave(num_images_per_prompt, 0)
        return pe, ne
