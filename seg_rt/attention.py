"""SEG self-attention processor for diffusers ``Attention`` and its reversible installer.

``SEGAttnProcessor`` computes exactly what diffusers' ``AttnProcessor2_0`` computes, except that the
final query of the rows selected by a per-row mask (DESIGN §1 "Batching") is replaced by its
Gaussian-blurred version (SEG, arXiv 2408.00760 eq. 9). ``SEGAttention`` installs it on the chosen
layers and removes it again, as a pair (context manager).

The token grid (H, W) is read from the actual input: a forward pre-hook on the block that owns
each layer (diffusers' ``Transformer2DModel``, input ``[B, C, H, W]``) records its spatial shape, so
non-square sizes work; nothing is inferred from the sequence length.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blur import blur_matrix, separable_blur
from .layers import select_layers

logger = logging.getLogger(__name__)


class SEGAttnProcessor:
    """``AttnProcessor2_0`` with the final query blurred on the rows ``patch.mask`` selects.

    The blur runs in the ``[B, N, C]`` layout right after ``to_q`` when the layer has no ``norm_q``
    (blur and head split commute: the blur is per channel), else after ``norm_q`` on ``[B·heads, N, d]``.
    """

    def __init__(self, patch: SEGAttention, name: str) -> None:
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("SEGAttnProcessor needs torch.nn.functional.scaled_dot_product_attention")
        self.patch = patch
        self.name = name
        self.grid: tuple[int, int] | None = None  # set by the owning block's pre-hook

    def _blur(self, q: Tensor, grid: tuple[int, int]) -> Tensor:
        # q: [b, ..., N, c] with N = H·W row-major; the blur runs over N for every leading index
        if q.shape[-2] != grid[0] * grid[1]:
            raise ValueError(
                f"{self.name}: {q.shape[-2]} query tokens do not fit the {grid[0]}x{grid[1]} grid"
            )
        m_h, m_w = self.patch.matrices(grid, q)
        return separable_blur(q.reshape(-1, q.shape[-2], q.shape[-1]), m_h, m_w).view(q.shape)

    def _perturb(self, q: Tensor, grid: tuple[int, int]) -> Tensor:
        """Blur the rows of ``q: [B, ..., N, c]`` that the patch's mask selects."""
        mask, rows = self.patch.mask, self.patch.rows
        if mask is None or self.patch.perturbation != "blur":
            return q
        if mask.shape[0] != q.shape[0]:
            raise ValueError(f"seg mask has {mask.shape[0]} rows but the batch has {q.shape[0]}")
        if rows is not None:  # eager: blur just the perturbed rows, in place (q is to_q's fresh output)
            if rows == slice(0, q.shape[0]):
                return self._blur(q, grid)
            q[rows] = self._blur(q[rows], grid)
            return q
        # traced / exported: the mask stays data, one graph serves every branch layout
        return torch.where(mask.view(-1, *[1] * (q.ndim - 1)).to(q.device), self._blur(q, grid), q)

    def _identity(self, out: Tensor, value: Tensor) -> Tensor:
        """PAG (arXiv 2403.17377): the selected rows get an identity attention map, output = V."""
        mask, rows = self.patch.mask, self.patch.rows
        if mask is None:
            return out
        if rows is not None:
            out[rows] = value[rows]
            return out
        return torch.where(mask.view(-1, 1, 1, 1).to(out.device), value, out)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        grid = self.grid
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if grid is None:
            raise RuntimeError(f"{self.name}: token grid unknown (the owning block's hook did not run)")

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # [B, N, C]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        if attn.norm_q is None:
            query = self._perturb(query, grid)
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, h, N, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = self._perturb(attn.norm_q(query), grid)  # [B, h, N, d]
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        if self.patch.perturbation == "identity":
            hidden_states = self._identity(hidden_states, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def tracing(t: Tensor | None = None) -> bool:
    """True while torch.compile / torch.export / the ONNX exporter trace the model. Non-strict
    ``torch.export`` (the ONNX exporter's default) sets no flag: its tensors are fake subclasses."""
    if t is not None and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        return True
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _owner_name(layer_name: str) -> str | None:
    """The block whose 4D input gives the layer's grid: ``X.attentions.i`` for ``X.attentions.i.transformer_blocks.j.attn1``."""
    head, sep, _ = layer_name.rpartition(".transformer_blocks.")
    return head if sep else None


class SEGAttention:
    """Install SEG processors on the selected self-attention layers of a UNet; reversible.

    ``set_mask(mask)`` (``Tensor[B]`` of bool, or None for no perturbed row) selects the rows whose
    queries are blurred in the next forwards; the denoiser sets it per call. ``sigma`` can be changed
    between calls. Use as a context manager or call ``install()`` / ``remove()``.

    ``perturbation="identity"`` replaces the blur by PAG's identity attention map (the selected
    rows' attention output is V), the baseline the SEG paper compares against; σ is then unused.
    """

    PERTURBATIONS = ("blur", "identity")

    def __init__(
        self, model: nn.Module, sigma: float, layers: Sequence[str] = ("mid",), perturbation: str = "blur"
    ) -> None:
        if math.isnan(sigma) or sigma <= 0:
            raise ValueError(f"seg sigma must be > 0 or inf, got {sigma:g}")
        if perturbation not in self.PERTURBATIONS:
            raise ValueError(
                f"perturbation must be one of {', '.join(self.PERTURBATIONS)}, got {perturbation!r}"
            )
        self.perturbation = perturbation
        self.model = model
        self.sigma = float(sigma)
        self.layer_names = select_layers(model, layers)
        self.mask: Tensor | None = None
        self.rows: slice | None = None  # eager only: the perturbed rows when they are contiguous
        self.processors: dict[str, SEGAttnProcessor] = {}
        self._saved: dict[str, object] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        # axis length -> blur matrix, set by an exported graph whose σ is a runtime input
        self.runtime_matrices: dict[int, Tensor] | None = None

    def matrices(self, grid: tuple[int, int], probe: Tensor) -> tuple[Tensor, Tensor]:
        """``(M_h, M_w)`` for ``grid`` in ``probe``'s dtype and device: the runtime inputs of a graph
        exported with dynamic σ, else built from σ (cached, except while tracing)."""
        if self.runtime_matrices is not None:
            return tuple(self.runtime_matrices[n].to(probe.dtype) for n in grid)
        key = (grid, self.sigma, probe.dtype, probe.device)
        if key in self._cache:
            return self._cache[key]
        mats = tuple(blur_matrix(n, self.sigma).to(device=probe.device, dtype=probe.dtype) for n in grid)
        if not tracing(probe):  # tensors made under export are fake / graph constants: never cache them
            self._cache[key] = mats
        return mats

    def set_mask(self, mask: Tensor | None) -> None:
        """Select the perturbed rows. Eager calls look at the mask on the host once (skip the blur
        when no row is perturbed, blur a contiguous run of rows in place); traced calls keep it as data."""
        self.mask, self.rows = mask, None
        if mask is None or tracing(mask):
            return
        idx = mask.nonzero().flatten().tolist()
        if not idx:
            self.mask = None
        elif idx == list(range(idx[0], idx[-1] + 1)):
            self.rows = slice(idx[0], idx[-1] + 1)

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def install(self) -> SEGAttention:
        if self.installed:
            return self
        modules = dict(self.model.named_modules())
        owners: dict[str, list[SEGAttnProcessor]] = {}
        for name in self.layer_names:
            attn = modules[name]
            proc = SEGAttnProcessor(self, name)
            self._saved[name] = attn.processor
            attn.set_processor(proc)
            self.processors[name] = proc
            owner = _owner_name(name)
            if owner is not None and owner in modules:
                owners.setdefault(owner, []).append(proc)
        for owner, procs in owners.items():
            self._hooks.append(modules[owner].register_forward_pre_hook(_grid_hook(procs), with_kwargs=True))
        logger.debug("SEG installed on %d layers: %s", len(self.layer_names), self.layer_names)
        return self

    def remove(self) -> None:
        modules = dict(self.model.named_modules())
        for name, proc in self._saved.items():
            modules[name].set_processor(proc)
        for hook in self._hooks:
            hook.remove()
        self._saved.clear()
        self._hooks.clear()
        self.processors.clear()
        self.set_mask(None)

    def __enter__(self) -> SEGAttention:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def _grid_hook(procs: list[SEGAttnProcessor]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None and hidden.ndim == 4:  # [B, C, H, W]
            grid = (int(hidden.shape[-2]), int(hidden.shape[-1]))
            for proc in procs:
                proc.grid = grid

    return hook
