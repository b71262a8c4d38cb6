"""SEG on image DiTs (SD3 / SD3.5, Flux.1, Qwen-Image): adapters and processors of the one patch mechanism.

Same mechanism as the UNets (``seg_rt.attention``): ``SEGAttention`` with a DiT ``Adapter`` installs
these processors, faithful copies of diffusers' processors with the SEG blur on the final query of
the image tokens only (docs/design.md, "Which query, where"):

- SD3 (``SD3Transformer2DModel``, ``JointAttnProcessor2_0``): the image stream's query after
  ``norm_q``, before it is concatenated with the context stream (never blurred).
- Flux.1 (``FluxTransformer2DModel``, ``FluxAttnProcessor``): the query after RoPE; double-stream
  blocks put the text tokens in front, single-stream blocks see ``[text, image]`` concatenated; in
  both the image tokens are the last H·W and only they are blurred.
- Qwen-Image (``QwenImageTransformer2DModel``, ``QwenDoubleStreamAttnProcessor2_0``): the image
  stream's query after ``norm_q`` and its RoPE, before ``[text, image]`` are joined. Chosen over Sana
  because Sana's self-attention is linear (ReLU-kernel) attention: it has no softmax logits whose
  blur the query blur equals, so "exact SEG" is not defined there; Qwen-Image's is softmax attention.
  Sampled end to end like the others (``seg_rt.families``).

The token grid comes from the model input: SD3 ``hidden_states [B, C, h, w]`` with patch size p
gives (h/p, w/p); Flux's packed tokens carry their positions in ``img_ids [H·W, 3]`` (row, column).

Layer selectors (``--seg-layers``), any mix of: a block kind (``joint``, ``dual`` for SD3.5's second
image-only attention, ``double``, ``single``), one block ``joint.12``, an inclusive range
``single.2-5``, a module name or prefix, and ``mid``: the family's default set, the middle block
(``joint.{n//2}`` for SD3, ``double.{n//2}`` for Flux), the analogue of the UNet mid block that the
paper and the reference code perturb by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import Tensor, nn

from .attention import Adapter, Grid, SEGPatch, SEGProcessor, norm_qk, split_heads
from .layers import resolve

# block kind -> (container of blocks, attention module inside a block)
SD3_KINDS = {"joint": ("transformer_blocks", "attn"), "dual": ("transformer_blocks", "attn2")}
FLUX_KINDS = {"double": ("transformer_blocks", "attn"), "single": ("single_transformer_blocks", "attn")}
QWEN_KINDS = {"joint": ("transformer_blocks", "attn")}


def perturb_image_tokens(patch: SEGPatch, proc, q: Tensor, token_dim: int) -> Tensor:
    """``q`` with the image tokens (the last H·W along ``token_dim``) of the perturbed rows blurred.

    ``q``: ``[B, h, N, d]`` (``token_dim=2``) or ``[B, N, h, d]`` (``token_dim=1``); any tokens in
    front of the image tokens (text) are returned untouched.
    """
    if patch.mask is None:  # no perturbed row in this forward (eager); traced masks are data
        return q
    _, h, w = patch.grid
    proc.grid = (h, w)
    n = q.shape[token_dim]
    text = n - h * w
    if text < 0:
        raise ValueError(f"{proc.name}: {n} query tokens cannot hold the {h}x{w} image grid")
    image = q.narrow(token_dim, text, h * w)
    if token_dim == 1:
        image = image.transpose(1, 2)  # [B, h, H·W, d]
    image = patch.perturb(proc, image, token_dim=2)
    if token_dim == 1:
        image = image.transpose(1, 2)
    return torch.cat([q.narrow(token_dim, 0, text), image], dim=token_dim) if text else image


class SEGJointAttnProcessor(SEGProcessor):
    """diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5) with the image stream's final query
    (after ``norm_q``) perturbed; the context stream's query is left alone."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ) -> Tensor | tuple[Tensor, Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)  # [B, H·W, C]
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = split_heads(attn, query, key, value)  # [B, h, H·W, d]

        query, key = norm_qk(attn, query, key)
        query = perturb_image_tokens(self.patch, self, query, token_dim=2)  # the image tokens' final query

        if encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)
            encoder_query, encoder_key, encoder_value = split_heads(
                attn, encoder_query, encoder_key, encoder_value
            )
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=2)  # [B, h, H·W + L, d]
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _flux_qkv(attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None):
    """Flux's q, k, v (and the context's), fused or not, as diffusers' ``_get_qkv_projections``."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        context = (None, None, None)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            context = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, *context
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    context = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        context = (
            attn.add_q_proj(encoder_hidden_states),
            attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states),
        )
    return query, key, value, *context


class SEGFluxAttnProcessor(SEGProcessor):
    """diffusers' ``FluxAttnProcessor`` with the final query (after ``norm_q`` and RoPE) perturbed on
    the image tokens; text tokens (in front, in both block kinds) are left alone.

    Keeps the replaced processor's attention backend and parallel config (``dispatch_attention_fn``).
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ) -> Tensor | tuple[Tensor, Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = _flux_qkv(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))  # [B, N, h, d]
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)  # [B, L + H·W, h, d]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query = perturb_image_tokens(self.patch, self, query, token_dim=1)  # the final query

        hidden_states = self.attend(query, key, value, attention_mask)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class SEGQwenDoubleStreamAttnProcessor(SEGProcessor):
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` with the image stream's final query (after
    ``norm_q`` and RoPE) perturbed; the text stream is left alone."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ) -> tuple[Tensor, Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("SEGQwenDoubleStreamAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "SEGQwenDoubleStreamAttnProcessor takes encoder_hidden_states_mask, not attention_mask"
            )
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        img_query = attn.to_q(hidden_states)  # [B, H·W, C]
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)
        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))  # [B, H·W, h, d]
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))
        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        img_query = perturb_image_tokens(self.patch, self, img_query, token_dim=1)  # the final query

        joint_query = torch.cat([txt_query, img_query], dim=1)  # [B, L + H·W, h, d]
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        joint_hidden_states = self.attend(joint_query, joint_key, joint_value, attention_mask)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output


def _kind_layers(model: nn.Module, kinds: dict[str, tuple[str, str]]) -> dict[str, str]:
    """``{module name: kind}`` of every ``container.i.attn`` named in ``kinds``, in module order."""
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    for kind, (container, attr) in kinds.items():
        for i in range(len(getattr(model, container, ()))):
            name = f"{container}.{i}.{attr}"
            if name in modules and hasattr(modules[name], "processor"):
                found[name] = kind
    return dict(sorted(found.items(), key=lambda kv: list(modules).index(kv[0])))


def sd3_layers(model: nn.Module) -> dict[str, str]:
    return _kind_layers(model, SD3_KINDS)


def flux_layers(model: nn.Module) -> dict[str, str]:
    return _kind_layers(model, FLUX_KINDS)


def qwenimage_layers(model: nn.Module) -> dict[str, str]:
    return _kind_layers(model, QWEN_KINDS)


def _by_kind(found: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, kind in found.items():
        groups.setdefault(kind, []).append(name)
    return groups


def _block_index(name: str) -> int:
    return int(name.split(".")[1])


def _match(sel: str, found: dict[str, str], default_kind: str) -> list[str]:
    groups = _by_kind(found)
    if sel == "mid":  # the family default: the middle block of the default kind
        blocks = groups.get(default_kind, [])
        return [blocks[len(blocks) // 2]] if blocks else []
    if sel in groups:
        return groups[sel]
    kind, _, index = sel.partition(".")
    if kind in groups:
        lo, dash, hi = index.partition("-")
        if lo.isdigit() and (not dash or hi.isdigit()):
            wanted = range(int(lo), int(hi if dash else lo) + 1)
            return [n for n in groups[kind] if _block_index(n) in wanted]
        return []
    return [n for n in found if n == sel or n.startswith(sel + ".")]


def describe_dit(found: dict[str, str]) -> str:
    parts = [f"{k} ({len(v)}: {k}.0-{k}.{len(v) - 1})" for k, v in _by_kind(found).items()]
    return f"available: mid, {', '.join(parts)}, ranges such as {next(iter(_by_kind(found)))}.0-1"


def _selector(layers: Callable[[nn.Module], dict[str, str]], default_kind: str):
    def select(model: nn.Module, selectors: Sequence[str]) -> list[str]:
        found = layers(model)
        return resolve(
            selectors,
            list(found),
            lambda sel: _match(sel, found, default_kind),
            "attention",
            lambda: describe_dit(found),
        )

    return select


def _dit_adapter(
    name: str,
    processor: type,
    layers: Callable[[nn.Module], dict[str, str]],
    grid: Callable[[nn.Module, tuple, dict], Grid],
    default_kind: str,
) -> Adapter:
    """An image DiT: joint attention with the text tokens in front, layers picked by block kind
    (``default_kind`` for ``mid`` and bare indices: ``mid`` = the middle block of that kind)."""
    return Adapter(
        name, processor, layers, grid=grid, text_tokens=True, select=_selector(layers, default_kind)
    )


def sd3_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    hidden = args[0] if args else kwargs["hidden_states"]  # [B, C, h, w] latents
    p = model.config.patch_size
    return 1, hidden.shape[-2] // p, hidden.shape[-1] // p


def flux_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    """(1, H, W) from ``img_ids [H·W, 3]`` (0, row, column), row-major as diffusers builds them.

    The values are read on the host, and the grid is kept on the ids tensor (``_seg_grid``, with the
    tensor's version) for the next call: an exporter's trace cannot read tensor values, so it reuses
    the grid an eager call found for the same tensor (``seg_rt.families.segdit.SEGDiT`` makes one per shape)."""
    ids = kwargs["img_ids"]
    memo = getattr(ids, "_seg_grid", None)
    if memo is not None and memo[0] == ids._version:
        return memo[1]
    flat = ids[0] if ids.ndim == 3 else ids  # deprecated batched ids
    w = int(flat[:, 2].max().item()) + 1
    grid = (1, flat.shape[0] // w, w)
    ids._seg_grid = (ids._version, grid)
    return grid


SD3 = _dit_adapter("sd3", SEGJointAttnProcessor, sd3_layers, sd3_grid, "joint")
FLUX = _dit_adapter("flux", SEGFluxAttnProcessor, flux_layers, flux_grid, "double")


def qwenimage_grid(model: nn.Module, args: tuple, kwargs: dict) -> Grid:
    """(1, H, W) from ``img_shapes`` (per sample a list of (frames, H, W) in packed tokens); one
    image per sample, the same size for every row of a batch."""
    shapes = kwargs["img_shapes"][0]
    if len(shapes) != 1 or shapes[0][0] != 1:
        raise ValueError(
            f"SEG on Qwen-Image takes one single-frame image per sample, got img_shapes {shapes}"
        )
    _, h, w = shapes[0]
    return 1, int(h), int(w)


QWENIMAGE = _dit_adapter(
    "qwenimage", SEGQwenDoubleStreamAttnProcessor, qwenimage_layers, qwenimage_grid, "joint"
)
