"""SEG for video attention: spatial, temporal and spatio-temporal query blur (docs/design.md, "The blur").

Video SEG uses the same mechanism as images (``seg_rt.attention``): per family an ``Adapter`` and
SEG processors, faithful copies of the family's diffusers processors with the blur inserted on the
final query (after ``norm_q`` and RoPE), installed and removed as a pair by ``VideoSEG``:
- AnimateDiff (``UNetMotionModel``): ``AttnProcessor2_0`` on frames (spatial ``attn1``) and along
  time (motion modules) -> ``SEGAttnProcessor``;
- CogVideoX: joint text+video attention with RoPE on the video tokens -> ``SEGCogVideoXAttnProcessor``
  (text tokens in front, never blurred);
- Wan 2.1: ``norm_q``, then RoPE, then ``dispatch_attention_fn`` -> ``SEGWanAttnProcessor``;
- Stable Video Diffusion (``UNetSpatioTemporalConditionModel``): ``AttnProcessor2_0`` on frames
  (spatial ``transformer_blocks``' ``attn1``) and along time (``temporal_transformer_blocks``) ->
  ``SEGAttnProcessor``, laid out as AnimateDiff's;
- LTX-Video: pre-patchified tokens, ``norm_q`` then RoPE on ``[B, N, C]`` -> ``SEGLTXAttnProcessor``
  (grid from the forward's ``num_frames`` / ``height`` / ``width`` and the patch sizes).

Axes per layer kind (rows x tokens):
- ``spatial``: (B·F, H·W) — per-frame 2D blur with σ_space (AnimateDiff spatial attn1).
- ``temporal``: (B·H·W, F) — 1D blur over frames with σ_time (AnimateDiff motion modules).
- ``joint``: (B, [text +] F·H·W frame-major) — separable 3D blur, σ_time on frames, σ_space on
  H, W (video DiTs; σ_time = 0 keeps frames independent, σ_space = 0 blurs along time only).
The token grid comes from the model's input shape and patch sizes, never from the sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotary
from torch import Tensor, nn

from seg_rt.attention import (
    Adapter,
    Grid,
    SEGAttnProcessor,
    SEGPatch,
    SEGProcessor,
    attention_mask_heads,
    norm_qk,
    split_heads,
    tracing,
    unet_owner,
)
from seg_rt.blur import blur_matrix, separable_blur
from seg_rt.config import SEGConfig, check_sigma
from seg_rt.params import VIDEO_MODES, VideoParams
from seg_rt.perturbations import HOOK_KINDS

MODES = VIDEO_MODES


@dataclass(frozen=True)
class VideoBlur:
    """σ per axis kind for a mode: spatial → (σ, 0), temporal → (0, σ_t), spatiotemporal → (σ, σ_t).

    The rules (mode names, σ_time >= 0, temporal needs σ_time > 0) and defaults are the request
    type's (``seg_rt.params.VideoParams``); σ is SEG's (``seg_rt.config.check_sigma``)."""

    mode: str = VideoParams.mode
    sigma: float = SEGConfig.sigma
    sigma_time: float = VideoParams.sigma_time

    def __post_init__(self) -> None:
        video = VideoParams(mode=self.mode, sigma_time=self.sigma_time)
        object.__setattr__(self, "sigma", check_sigma(self.sigma))
        object.__setattr__(self, "sigma_time", video.sigma_time)

    @property
    def space(self) -> float:
        return 0.0 if self.mode == "temporal" else self.sigma

    @property
    def time(self) -> float:
        return 0.0 if self.mode == "spatial" else self.sigma_time


def blur_rows(
    q: Tensor, rows: Sequence[int], token_dim: int, text: int, mats: tuple[Tensor | None, Tensor, Tensor]
) -> Tensor:
    """A copy of ``q`` with the video tokens of ``rows`` blurred by ``mats = (M_t or None, M_h, M_w)``.

    ``q``: ``[B, h, N, d]`` (``token_dim=2``) or ``[B, N, h, d]`` (``token_dim=1``); the video tokens
    are ``N[text:]``, frame-major. One row at a time: cheaper than blurring every row, and a row's
    result cannot depend on how many rows share the batch.
    """
    m_t, m_h, m_w = mats
    tokens = (m_t.shape[0] if m_t is not None else 1) * m_h.shape[0] * m_w.shape[0]
    q = q.clone()
    for i in rows:
        if token_dim == 2:
            video = q[i, :, text:]  # [h, T, d]
            q[i, :, text:] = separable_blur(video.reshape(-1, tokens, video.shape[-1]), m_h, m_w, m_t)
        else:
            video = q[i, text:]  # [T, h, d]
            flat = video.reshape(1, tokens, -1)
            q[i, text:] = separable_blur(flat, m_h, m_w, m_t).view_as(video)
    return q


class SEGCogVideoXAttnProcessor(SEGProcessor):
    """diffusers' ``CogVideoXAttnProcessor2_0`` with the final query (after ``norm_q`` and RoPE)
    perturbed on the video tokens; the text tokens in front are left alone."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ) -> Tensor:
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, L + T, C]
        batch_size, sequence_length, _ = hidden_states.shape

        attention_mask = attention_mask_heads(attn, attention_mask, sequence_length, batch_size)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = split_heads(attn, query, key, value)  # [B, h, L + T, d]

        query, key = norm_qk(attn, query, key)

        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        query = self.patch.perturb(self, query, token_dim=2, text=text_seq_length)  # the final query
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _wan_rotary(hidden_states: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's interleaved RoPE, as in diffusers' ``WanAttnProcessor``."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class SEGWanAttnProcessor(SEGProcessor):
    """diffusers' ``WanAttnProcessor`` with the final query (after ``norm_q`` and RoPE) perturbed.

    Keeps the replaced processor's attention backend and parallel config, which
    ``dispatch_attention_fn`` reads.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ) -> Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # 512 is the context length of the text encoder (as in diffusers)
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _wan_qkv(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, N, h, d]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        query = self.patch.perturb(self, query, token_dim=1)  # the final query

        hidden_states_img = None
        if encoder_hidden_states_img is not None:  # I2V
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
            else:
                key_img = attn.add_k_proj(encoder_hidden_states_img)
                value_img = attn.add_v_proj(encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = self.attend(query, key_img, value_img, parallel=False)

        hidden_states = self.attend(query, key, value, attention_mask, parallel=encoder_hidden_states is None)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class SEGLTXAttnProcessor(SEGProcessor):
    """diffusers' ``LTXVideoAttnProcessor`` with the final self-attention query (after ``norm_q`` and
    RoPE, head split) perturbed. Keeps the replaced processor's attention backend / parallel config."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ) -> Tensor:
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attention_mask_heads(attn, attention_mask, sequence_length, batch_size)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)  # [B, N, C]
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = ltx_rotary(query, image_rotary_emb)
            key = ltx_rotary(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))  # [B, N, h, d]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = self.patch.perturb(self, query, token_dim=1)  # the final query

        hidden_states = self.attend(query, key, value, attention_mask)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _wan_qkv(attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None):
    """Wan's q, k, v projections (fused or not), as in diffusers' ``_get_qkv_projections``."""
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    if attn.fused_projections:
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(encoder_hidden_states).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


def _attn1_names(model: nn.Module) -> list[str]:
    """Self-attention modules (``attn1``, with a processor) in module order."""
    return [n for n, m in model.named_modules() if n.endswith("attn1") and hasattr(m, "processor")]


def animatediff_layers(model: nn.Module) -> dict[str, str]:
    return {n: "temporal" if ".motion_modules." in n else "spatial" for n in _attn1_names(model)}


def svd_layers(model: nn.Module) -> dict[str, str]:
    """Spatial ``transformer_blocks`` and temporal ``temporal_transformer_blocks`` self-attention."""
    return {n: "temporal" if ".temporal_transformer_blocks." in n else "spatial" for n in _attn1_names(model)}


def cogvideox_layers(model: nn.Module) -> dict[str, str]:
    return {n: "joint" for n in _attn1_names(model) if n.startswith("transformer_blocks.")}


def wan_layers(model: nn.Module) -> dict[str, str]:
    return {n: "joint" for n in _attn1_names(model) if n.startswith("blocks.")}


def ltx_layers(model: nn.Module) -> dict[str, str]:
    return {n: "joint" for n in _attn1_names(model) if n.startswith("transformer_blocks.")}


def animatediff_owner(layer_name: str) -> str | None:
    """Spatial layers: the ``Transformer2DModel`` that sees ``[B·F, C, h, w]``; motion modules: none."""
    return None if ".motion_modules." in layer_name else unet_owner(layer_name)


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """The first input of a forward: ``hidden_states`` (transformers) or ``sample`` (UNets)."""
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else kwargs["sample"]


def cogvideox_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    _, f, _, h, w = _hidden(args, kwargs).shape  # [B, F, C, H, W]
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1
    return (f + p_t - 1) // p_t, h // p, w // p


def wan_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    _, _, f, h, w = _hidden(args, kwargs).shape  # [B, C, F, H, W]
    p_t, p_h, p_w = model.config.patch_size
    return f // p_t, h // p_h, w // p_w


def ltx_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    """LTX takes packed tokens plus the latent ``num_frames``, ``height``, ``width``; its tokens are
    frame-major over (F/p_t, H/p, W/p) (``LTXPipeline._pack_latents``)."""
    p, p_t = model.config.patch_size, model.config.patch_size_t
    return kwargs["num_frames"] // p_t, kwargs["height"] // p, kwargs["width"] // p


def svd_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    _, f, _, h, w = _hidden(args, kwargs).shape  # [B, F, C, H, W] latents; per-block (h, w) from hooks
    return f, h, w


def animatediff_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    _, _, f, h, w = _hidden(args, kwargs).shape  # [B, C, F, H, W] latents; per-block (h, w) from hooks
    return f, h, w


ANIMATEDIFF = Adapter(
    "animatediff", SEGAttnProcessor, animatediff_layers, owner=animatediff_owner, grid=animatediff_grid
)
# spatial layers' owner: the TransformerSpatioTemporalModel (``X.attentions.i``) that sees [B·F, C, h, w]
SVD = Adapter("svd", SEGAttnProcessor, svd_layers, owner=unet_owner, grid=svd_grid)
COGVIDEOX = Adapter(
    "cogvideox", SEGCogVideoXAttnProcessor, cogvideox_layers, grid=cogvideox_grid, text_tokens=True
)
WAN = Adapter("wan", SEGWanAttnProcessor, wan_layers, grid=wan_grid)
LTX = Adapter("ltx", SEGLTXAttnProcessor, ltx_layers, grid=ltx_grid)


class VideoSEG(SEGPatch):
    """Install video SEG on a video transformer / motion UNet; ``set_mask`` per forward; reversible.

    ``layers``: module names or dotted prefixes (default: every self-attention layer the mode uses).
    ``perturbation="identity"``: instead of the blur, the perturbed samples' attention in those layers
    gets an identity map (output = V): PAG's perturbation, the attention-skip of STG (Hyung et al.
    2024, STG-A), on the same layers the mode selects (σ unused). AnimateDiff only (its processor is
    the UNet one, which has the output hook). ``"skip"`` (SLG / STG: attention output zero) and
    ``"shuffle"`` (TPG) are module hooks (``seg_rt.perturbations``), for every video family.
    """

    PERTURBATIONS = ("blur", "identity", *HOOK_KINDS)

    def __init__(
        self,
        model: nn.Module,
        blur: VideoBlur,
        layers: Sequence[str] | None = None,
        perturbation: str = "blur",
    ) -> None:
        if perturbation not in self.PERTURBATIONS:
            raise ValueError(
                f"perturbation must be one of {', '.join(self.PERTURBATIONS)}, got {perturbation!r}"
            )
        from .families import video_family_of_model  # the families import this module's adapters

        family = video_family_of_model(model)
        if perturbation == "identity" and not family.identity_perturbation:
            raise ValueError(f"perturbation 'identity' is not implemented for {family.name}")
        adapter = family.adapter()
        found = adapter.layers(model)
        if layers:
            chosen = {n: k for n, k in found.items() if any(n == s or n.startswith(s + ".") for s in layers)}
            if not chosen:
                raise ValueError(
                    f"seg layers {', '.join(layers)} match no video self-attention layer; e.g. {next(iter(found))!r}"
                )
            found = chosen
        if blur.mode == "spatial":
            found = {n: k for n, k in found.items() if k != "temporal"}
        if blur.mode == "temporal":
            found = {n: k for n, k in found.items() if k != "spatial"}
        if not found:
            raise ValueError(
                f"seg mode {blur.mode!r} uses none of the chosen layers {', '.join(layers or ())}"
            )
        super().__init__(model, adapter, found)
        self.blur = blur
        self.perturbation = perturbation
        self.rows: list[int] = []  # perturbed samples of the next forward (host-side)
        self._mats: dict[tuple, Tensor] = {}  # blur matrices by (n, sigma, device, dtype)

    @contextmanager
    def runtime_blur(self, matrices) -> Iterator[None]:
        """The export code's runtime-σ scope (``seg_rt.export.onnx.SEGGraph``): video exports bake σ."""
        if matrices:
            raise ValueError("video SEG exports bake sigma and sigma_time; no runtime blur matrices")
        yield

    def set_mask(self, mask: Tensor | None, rows: slice | None = None) -> None:
        """Select the perturbed samples (``Tensor[B]`` of bool, or None). ``rows``: the perturbed samples
        as host data (the sampler's ``RowLayout.seg_rows``, no device read); else the mask is read
        on the host once per forward."""
        self.perturbed = 0
        if mask is not None and tracing(mask):  # exported (seg_rt.video.export): the mask stays data
            self.rows, self.mask = None, mask
            return
        if mask is not None and rows is not None:
            self.rows = list(range(rows.start, rows.stop))
        else:
            self.rows = [] if mask is None else mask.nonzero().flatten().tolist()
        self.mask = mask if self.rows else None

    def perturb(self, proc, q: Tensor, token_dim: int, text: int = 0) -> Tensor:
        """Blur the video tokens of the perturbed samples' rows of the final query ``q``.

        The attention batch is sample-major: sample i owns rows ``[i·r, (i+1)·r)`` (r = frames for
        AnimateDiff's spatial layers, H·W for its motion modules, 1 for DiTs).
        """
        if self.mask is None or self.perturbation != "blur":
            return q
        if self.grid is None:
            raise RuntimeError(f"{proc.name}: token grid unknown (the model's input hook did not run)")
        text = text if self.adapter.text_tokens else 0
        mats = self._layer_mats(proc, q)
        if self.rows is None:  # traced: blur every row, keep the masked ones (one graph, every layout)
            blurred = blur_rows(q, range(q.shape[0]), token_dim, text, mats)
            keep = self.mask.repeat_interleave(q.shape[0] // self.mask.shape[0]).to(q.device)
            out = torch.where(keep.view(-1, *[1] * (q.ndim - 1)), blurred, q)
        else:
            out = blur_rows(q, self._attention_rows(proc, q.shape[0]), token_dim, text, mats)
        self.count()
        return out

    def perturb_output(self, proc, out: Tensor, value: Tensor) -> Tensor:
        """``perturbation="identity"``: the perturbed samples' rows of the attention output become V."""
        if self.mask is None or self.perturbation != "identity":
            return out
        rows = self._attention_rows(proc, out.shape[0])
        out = out.clone()
        out[rows] = value[rows]
        self.count()
        return out

    def _attention_rows(self, proc, n: int) -> list[int]:
        """The attention-batch rows of the perturbed samples (``n`` rows, sample-major)."""
        b = self.mask.shape[0]
        if n % b:
            raise ValueError(f"{proc.name}: {n} attention rows are not a multiple of the {b}-row seg mask")
        r = n // b
        return [i for s in self.rows for i in range(s * r, (s + 1) * r)]

    def _layer_mats(self, proc, probe: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(M_t or None, M_h, M_w)`` for the layer's kind and grid."""
        f, h, w = self.grid
        mat = lambda n, s: self._matrix(n, s, probe)  # noqa: E731
        if proc.kind == "spatial":
            bh, bw = proc.grid or (h, w)  # the block's (h, w), from its hook
            return None, mat(bh, self.blur.space), mat(bw, self.blur.space)
        if proc.kind == "temporal":
            return None, mat(f, self.blur.time), mat(1, 0.0)
        return mat(f, self.blur.time), mat(h, self.blur.space), mat(w, self.blur.space)

    def _matrix(self, n: int, sigma: float, probe: Tensor) -> Tensor:
        """``blur_matrix(n, sigma)`` on ``probe``'s device and dtype, built once per install (it is
        a Python loop, and every SEG attention call of every step needs it)."""
        key = (n, sigma, probe.device, probe.dtype)
        if tracing(probe):  # tensors made under export are graph constants: never cache them
            return blur_matrix(n, sigma).to(device=probe.device, dtype=probe.dtype)
        if key not in self._mats:
            self._mats[key] = blur_matrix(n, sigma).to(device=probe.device, dtype=probe.dtype)
        return self._mats[key]
