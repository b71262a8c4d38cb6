"""SEG at the attention processor: one mechanism for every model family.

SEG (arXiv 2408.00760 eq. 9) blurs the final self-attention query of the perturbed rows. It is
installed the way diffusers installs PAG (``PAGCFGIdentitySelfAttnProcessor2_0``): each selected
layer gets a SEG processor, a faithful copy of the family's diffusers processor ``__call__`` with the
blur inserted on the final query (after ``to_q``, head split, ``norm_q`` and RoPE). No torch or
diffusers function is replaced, no thread-local switch is read (docs/design.md, "One patch mechanism").

- ``Adapter``: what differs between families (which modules are self-attention, the token grid,
  text tokens in front of joint attention, where the final query is formed, which processor).
  Adding a family means adding an adapter (and a processor only if its diffusers processor differs).
- ``SEGPatch``: installs an adapter's processors on chosen layers and restores the originals, as a
  pair (context manager). Every processor that perturbs a query bumps ``SEGPatch.perturbed``;
  ``check()`` after a forward raises ``SEGNotApplied`` when rows were perturbed-to-be but no query was
  (SEG is provably on, never a silent CFG result).
- ``SEGAttnProcessor``: diffusers' ``AttnProcessor2_0`` with the blur (UNets: SD1.5, SDXL,
  ControlNet, the demo model; AnimateDiff's spatial and motion attention).
- ``SEGAttention``: the image installer. The token grid (H, W) is read from the actual input: a
  forward pre-hook on the block that owns each layer (diffusers' ``Transformer2DModel``, input
  ``[B, C, H, W]``) records its spatial shape, so non-square sizes work; nothing is inferred from the
  sequence length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor, nn

from .blur import blur_matrix, separable_blur
from .config import check_sigma
from .errors import SEGAlreadyInstalled, SEGNotApplied
from .layers import select_layers, self_attention_layers
from .perturbations import HOOK_KINDS, PerturbationHooks

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]  # (frames, height, width) of the token grid; frames = 1 for images


def no_owner(layer_name: str) -> str | None:
    """Adapters whose layers' grid comes from the model input (DiTs) have no owning block."""
    return None


def unet_owner(layer_name: str) -> str | None:
    """The block whose 4D input gives the layer's grid: ``X.attentions.i`` for ``X.attentions.i.transformer_blocks.j.attn1``."""
    head, sep, _ = layer_name.rpartition(".transformer_blocks.")
    return head if sep else None


@dataclass(frozen=True)
class Adapter:
    """What SEG needs to know about one model family; the processors and ``SEGPatch`` do the rest.

    - ``processor``: the SEG processor class, built as ``processor(patch, name, kind, original)``; a
      copy of the family's diffusers processor with the blur on the final query.
    - ``layers``: model -> ``{self-attention module name: kind}`` in module order; the kind
      (``spatial``, ``temporal``, ``joint``) says which axes the layer's tokens span.
    - ``owner``: layer name -> the block whose 4D input ``[.., C, h, w]`` gives the layer's (h, w)
      grid (UNets downsample per block), or None.
    - ``grid``: (model, forward args, kwargs) -> the model's token grid (F, H, W) from its input
      shape and patch size (DiTs, video UNets), or None.
    - ``text_tokens``: joint attention: text tokens sit in front of the image/video tokens and are
      never blurred.
    - ``blur_projection``: the final query is ``to_q``'s output up to the head split (no ``norm_q``,
      no RoPE), so the blur may run on ``[B, N, C]`` before the split (it commutes: per channel).
    - ``select``: (model, selectors) -> chosen layer names, for families whose layers are not
      picked by ``seg_rt.layers.select_layers`` (the UNet parts); image DiTs (``seg_rt.dit_attention``).
    """

    name: str
    processor: type
    layers: Callable[[nn.Module], dict[str, str]]
    owner: Callable[[str], str | None] = no_owner
    grid: Callable[[nn.Module, tuple, dict], Grid] | None = None
    text_tokens: bool = False
    blur_projection: bool = False
    select: Callable[[nn.Module, Sequence[str]], list[str]] | None = None


def model_family(model: nn.Module, families: dict[str, str], what: str) -> str:
    """The family name of ``model`` by its diffusers class (``families``: class name -> family); a
    clear error naming the supported classes otherwise."""
    name = type(model).__name__
    if name not in families:
        raise ValueError(f"no {what} SEG support for {name}; supported: {', '.join(families)}")
    return families[name]


class SEGPatch:
    """Installs ``adapter.processor`` on ``layer_names`` of ``model`` and restores the originals.

    Subclasses say how a query is perturbed (``perturb``) and which rows (``set_mask``). Processors
    call ``perturb`` on their final query and count themselves in ``perturbed``; ``check()`` after the
    forward turns "SEG active but nothing perturbed" into ``SEGNotApplied``. Host-side only: whether
    rows are perturbed is decided in ``set_mask`` (``self.mask`` is None when none is).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, kinds: dict[str, str]) -> None:
        self.model = model
        self.adapter = adapter
        self.kinds = dict(kinds)  # layer name -> kind, module order
        self.layer_names = list(kinds)
        self.mask: Tensor | None = None  # perturbed rows of the next forward; None: no row perturbed
        self.perturbed = 0  # queries (layer calls) perturbed since the last set_mask
        self.grid: Grid | None = None  # the model input's token grid, when the adapter reads it
        self.processors: dict[str, object] = {}
        self._saved: dict[str, object] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._kind_hooks: PerturbationHooks | None = None  # shuffle / skip (seg_rt.perturbations)

    def perturb(self, proc, q: Tensor, token_dim: int, text: int = 0) -> Tensor:
        """The final query ``q`` (tokens along ``token_dim``, ``text`` text tokens first) with the
        perturbed rows' image/video tokens blurred; counts the call in ``perturbed`` if it blurred."""
        raise NotImplementedError

    def perturb_output(self, proc, out: Tensor, value: Tensor) -> Tensor:
        """Hook on the attention output ``[B, h, N, d]``; SEG leaves it alone."""
        return out

    def count(self) -> None:
        """Called by a processor each time it perturbs a query."""
        self.perturbed += 1

    def check(self, served=None) -> None:
        """After a forward: raise ``SEGNotApplied`` if rows were to be perturbed but no query was.

        ``served`` (``seg_rt.step_cache.Served``): what a step cache did to the perturbed rows. A row
        served from the cache counts as perturbed only when its entry was filled by a forward that
        perturbed it; rows that ran need a perturbed query in this forward, as without a cache."""
        if self.mask is None:
            return
        if served is not None:
            if served.unproven:
                raise SEGNotApplied(
                    f"SEG was active but {served.unproven} perturbed row(s) were served from a step cache "
                    "that no perturbed forward filled (a cache shared with an unperturbed row?)"
                )
            if not served.ran:
                return  # every perturbed row was served from its own perturbed entry
        if self.perturbed == 0:
            raise SEGNotApplied(
                f"SEG was active but no query was perturbed in this forward: none of the "
                f"{len(self.layer_names)} SEG layers ran a SEG processor (installed: {self.installed}; "
                f"were the model's attention processors replaced after install?)"
            )

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def install(self) -> SEGPatch:
        """SEG processors on every layer, saving the ones they replace; a layer already running one
        (another live patch) is ``SEGAlreadyInstalled`` before any is touched: patches never stack."""
        if self.installed:
            return self
        modules = dict(self.model.named_modules())
        for name in self.kinds:
            if isinstance(modules[name].processor, SEGProcessor):
                raise SEGAlreadyInstalled(
                    f"SEG is already installed on layer {name} by another live SEG patch; "
                    "remove (close) that patch or denoiser first"
                )
        owners: dict[str, list] = {}
        for name, kind in self.kinds.items():
            attn = modules[name]
            proc = self.adapter.processor(self, name, kind, attn.processor)
            self._saved[name] = attn.processor
            attn.set_processor(proc)
            self.processors[name] = proc
            owner = self.adapter.owner(name)
            if owner is not None and owner in modules:
                owners.setdefault(owner, []).append(proc)
        for owner, procs in owners.items():
            self._hooks.append(modules[owner].register_forward_pre_hook(_grid_hook(procs), with_kwargs=True))
        if self.adapter.grid is not None:
            self._hooks.append(self.model.register_forward_pre_hook(self._model_grid_hook, with_kwargs=True))
        self._set_kind_hooks()
        logger.debug(
            "SEG (%s) installed on %d layers: %s", self.adapter.name, len(self.kinds), self.layer_names
        )
        return self

    PERTURBATIONS: tuple[str, ...] = ("blur",)
    perturbation = "blur"

    def _set_kind_hooks(self) -> None:
        if self._kind_hooks is not None:
            self._kind_hooks.remove()
            self._kind_hooks = None
        if self.perturbation in HOOK_KINDS and self.installed:
            self._kind_hooks = PerturbationHooks(self, self.model, self.layer_names, self.perturbation)

    def set_perturbation(self, perturbation: str) -> None:
        """Perturb the masked rows the ``perturbation`` way (one of ``PERTURBATIONS``) from the next
        forward on; the hook kinds' hooks (``seg_rt.perturbations``) are installed or removed."""
        if perturbation not in self.PERTURBATIONS:
            raise ValueError(
                f"perturbation must be one of {', '.join(self.PERTURBATIONS)}, got {perturbation!r}"
            )
        if perturbation != self.perturbation:
            self.perturbation = perturbation
            self._set_kind_hooks()

    def _model_grid_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.grid = self.adapter.grid(module, args, kwargs)

    def remove(self) -> None:
        """Restore every layer's original processor and remove the hooks."""
        modules = dict(self.model.named_modules())
        for name, proc in self._saved.items():
            modules[name].set_processor(proc)
        for hook in self._hooks:
            hook.remove()
        if self._kind_hooks is not None:
            self._kind_hooks.remove()
            self._kind_hooks = None
        self._saved.clear()
        self._hooks.clear()
        self.processors.clear()
        self.set_mask(None)

    def set_mask(self, mask: Tensor | None) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def _grid_hook(procs: list):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None and hidden.ndim == 4:  # [B, C, H, W]
            grid = (int(hidden.shape[-2]), int(hidden.shape[-1]))
            for proc in procs:
                proc.grid = grid

    return hook


class SEGProcessor:
    """What every SEG processor shares: built as ``cls(patch, name, kind, original)`` by
    ``SEGPatch.install``; holds its layer's name and kind and the token grid it last saw, and keeps the
    replaced processor's attention backend and parallel config (the processors of diffusers' newer
    models call ``dispatch_attention_fn`` with them), which ``attend`` passes on.

    A subclass's ``__call__`` takes the parameters of the diffusers processor it copies, by the same
    names and unannotated: diffusers passes extra keyword arguments only where a processor's
    signature names them, so the names are the interface (their types are diffusers')."""

    def __init__(self, patch: SEGPatch, name: str, kind: str, original: object = None) -> None:
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError(f"{type(self).__name__} needs torch.nn.functional.scaled_dot_product_attention")
        self.patch, self.name, self.kind = patch, name, kind
        self.grid: tuple[int, int] | None = None  # (h, w) of the image tokens, set per call or by a hook
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        *,
        parallel: bool = True,
    ) -> Tensor:
        """diffusers' ``dispatch_attention_fn`` on ``[B, N, h, d]`` with the replaced processor's
        backend (and parallel config unless ``parallel`` is false) → ``[B, N, h·d]`` in the query's
        dtype, as diffusers' processors do after it."""
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config if parallel else None,
        )
        return out.flatten(2, 3).to(query.dtype)


def split_heads(attn: nn.Module, *tensors: Tensor) -> list[Tensor]:
    """``[B, N, h·d]`` -> ``[B, h, N, d]`` for each tensor, as diffusers' processors split heads."""
    return [t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in tensors]


def attention_mask_heads(attn: nn.Module, mask: Tensor | None, sequence_length: int, batch_size: int):
    """diffusers' mask preparation: ``None`` stays ``None``, else ``[B, h, N, S]``."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, sequence_length, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def norm_qk(attn: nn.Module, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's ``norm_q`` / ``norm_k`` where it has them."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


class SEGAttnProcessor(SEGProcessor):
    """diffusers' ``AttnProcessor2_0`` with the final query perturbed by ``patch.perturb``.

    The query is handed over where the adapter says the final query is formed: ``[B, N, C]`` right
    after ``to_q`` when ``blur_projection`` and the layer has no ``norm_q`` (blur and head split
    commute: the blur is per channel), else ``[B, h, N, d]`` after ``norm_q``, entering attention.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            self.grid = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attention_mask_heads(attn, attention_mask, sequence_length, batch_size)

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
        early = self.patch.adapter.blur_projection and attn.norm_q is None
        if early:
            query = self.patch.perturb(self, query, token_dim=1)  # [B, N, C]
        query, key, value = split_heads(attn, query, key, value)  # [B, h, N, d]

        query, key = norm_qk(attn, query, key)
        if not early:
            query = self.patch.perturb(self, query, token_dim=2)  # [B, h, N, d]

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = self.patch.perturb_output(self, hidden_states, value)
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


def unet_layers(model: nn.Module) -> dict[str, str]:
    """Every self-attention (``attn1``) layer of an image UNet; each spans the (H, W) grid."""
    return {name: "spatial" for name in self_attention_layers(model)}


UNET = Adapter("unet", SEGAttnProcessor, unet_layers, owner=unet_owner, blur_projection=True)


class SEGAttention(SEGPatch):
    """Install SEG processors on the selected self-attention layers of an image UNet; reversible.

    ``set_mask(mask)`` (``Tensor[B]`` of bool, or None for no perturbed row) selects the rows whose
    queries are blurred in the next forwards; the denoiser sets it per call. ``sigma`` can be changed
    between calls. Use as a context manager or call ``install()`` / ``remove()``.

    ``perturbation="identity"`` replaces the blur by PAG's identity attention map (the selected
    rows' attention output is V), the baseline the SEG paper compares against; σ is then unused.
    ``"shuffle"`` (TPG) and ``"skip"`` (SLG) are module hooks (``seg_rt.perturbations``) on the same
    layers and rows. ``set_perturbation`` switches the kind between forwards.

    ``adapter`` (default the UNet one) installs the same perturbation on another image family
    (the image DiTs of ``seg_rt.dit_attention``), whose processors set ``grid`` from ``self.grid``.
    """

    PERTURBATIONS = ("blur", "identity", *HOOK_KINDS)

    def __init__(
        self,
        model: nn.Module,
        sigma: float,
        layers: Sequence[str] = ("mid",),
        perturbation: str = "blur",
        adapter: Adapter = UNET,
    ) -> None:
        check_sigma(sigma)
        if perturbation not in self.PERTURBATIONS:
            raise ValueError(
                f"perturbation must be one of {', '.join(self.PERTURBATIONS)}, got {perturbation!r}"
            )
        kinds = adapter.layers(model)
        chosen = adapter.select(model, layers) if adapter.select is not None else select_layers(model, layers)
        super().__init__(model, adapter, {name: kinds[name] for name in chosen})
        self.perturbation = perturbation
        self.sigma = check_sigma(sigma)
        self.rows: slice | None = None  # eager only: the perturbed rows when they are contiguous
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        # axis length -> blur matrix [n, n]: a graph's runtime inputs in place of σ (runtime_blur)
        self._runtime_matrices: dict[int, Tensor] | None = None

    def set_sigma(self, sigma: float) -> None:
        """Blur with ``sigma`` from the next forward on (``config.check_sigma``'s rule)."""
        self.sigma = check_sigma(sigma)

    @property
    def runtime_matrices(self) -> dict[int, Tensor] | None:
        """The blur matrices in use instead of σ (axis length -> ``[n, n]``), or None: built from σ."""
        return self._runtime_matrices

    def set_runtime_blur(self, matrices: Mapping[int, Tensor] | None) -> None:
        """Blur with ``matrices`` (axis length ``n`` -> ``[n, n]``) instead of σ's from the next forward
        on, until ``clear_runtime_blur``; for holders that keep them (a compiled denoiser refills them
        in place). Scoped use: ``runtime_blur``."""
        if matrices is None:
            self._runtime_matrices = None
            return
        for n, m in matrices.items():
            if tuple(m.shape) != (n, n):
                raise ValueError(
                    f"runtime blur matrix for axis length {n} must be {n}x{n}, got {list(m.shape)}"
                )
        self._runtime_matrices = dict(matrices)

    def clear_runtime_blur(self) -> None:
        self._runtime_matrices = None  # blur with σ's own matrices again

    @contextmanager
    def runtime_blur(self, matrices: Mapping[int, Tensor] | None) -> Iterator[SEGAttention]:
        """``with seg.runtime_blur({n: M_n}):`` the forwards inside blur with these matrices (an export's
        ``seg_blur_<n>`` inputs; None: σ's); the matrices in use before are restored on exit, always."""
        previous = self._runtime_matrices
        self.set_runtime_blur(matrices)
        try:
            yield self
        finally:
            self._runtime_matrices = previous

    def matrices(self, grid: tuple[int, int], probe: Tensor) -> tuple[Tensor, Tensor]:
        """``(M_h, M_w)`` for ``grid`` in ``probe``'s dtype and device: the runtime inputs of a graph
        exported with dynamic σ, else built from σ (cached, except while tracing)."""
        if self._runtime_matrices is not None:
            return tuple(self._runtime_matrices[n].to(probe.dtype) for n in grid)
        key = (grid, self.sigma, probe.dtype, probe.device)
        if key in self._cache:
            return self._cache[key]
        mats = tuple(blur_matrix(n, self.sigma).to(device=probe.device, dtype=probe.dtype) for n in grid)
        if not tracing(probe):  # tensors made under export are fake / graph constants: never cache them
            self._cache[key] = mats
        return mats

    def set_mask(self, mask: Tensor | None, rows: slice | None = None) -> None:
        """Select the perturbed rows. ``rows``: the perturbed rows as host data when the caller knows
        them (the sampler's ``RowLayout.seg_rows``): no device read, so no host sync per forward.
        Otherwise eager calls read the mask back once (skip the blur when no row is perturbed, blur a
        contiguous run of rows in place); traced calls keep it as data."""
        self.mask, self.rows, self.perturbed = mask, None, 0
        if mask is None or tracing(mask):
            return
        if rows is not None:
            self.mask, self.rows = (mask, rows) if rows.stop > rows.start else (None, None)
            return
        idx = mask.nonzero().flatten().tolist()
        if not idx:
            self.mask = None
        elif idx == list(range(idx[0], idx[-1] + 1)):
            self.rows = slice(idx[0], idx[-1] + 1)

    def _blur(self, proc: SEGAttnProcessor, q: Tensor) -> Tensor:
        # q: [b, ..., N, c] with N = H·W row-major; the blur runs over N for every leading index
        grid = proc.grid
        if grid is None:
            raise RuntimeError(f"{proc.name}: token grid unknown (the owning block's hook did not run)")
        if q.shape[-2] != grid[0] * grid[1]:
            raise ValueError(
                f"{proc.name}: {q.shape[-2]} query tokens do not fit the {grid[0]}x{grid[1]} grid"
            )
        m_h, m_w = self.matrices(grid, q)
        return separable_blur(q.reshape(-1, q.shape[-2], q.shape[-1]), m_h, m_w).view(q.shape)

    def perturb(self, proc: SEGAttnProcessor, q: Tensor, token_dim: int, text: int = 0) -> Tensor:
        """Blur the rows of ``q: [B, ..., N, c]`` that the mask selects (tokens on dim -2)."""
        mask, rows = self.mask, self.rows
        if mask is None or self.perturbation != "blur":
            return q
        if mask.shape[0] != q.shape[0]:
            raise ValueError(f"seg mask has {mask.shape[0]} rows but the batch has {q.shape[0]}")
        self.count()
        if rows is not None:  # eager: blur just the perturbed rows, in place (q is to_q's fresh output)
            if rows == slice(0, q.shape[0]):
                return self._blur(proc, q)
            q[rows] = self._blur(proc, q[rows])
            return q
        # traced / exported: the mask stays data, one graph serves every branch layout
        return torch.where(mask.view(-1, *[1] * (q.ndim - 1)).to(q.device), self._blur(proc, q), q)

    def perturb_output(self, proc: SEGAttnProcessor, out: Tensor, value: Tensor) -> Tensor:
        """PAG (arXiv 2403.17377): the selected rows get an identity attention map, output = V."""
        mask, rows = self.mask, self.rows
        if mask is None or self.perturbation != "identity":
            return out
        self.count()
        if rows is not None:
            out[rows] = value[rows]
            return out
        return torch.where(mask.view(-1, 1, 1, 1).to(out.device), value, out)
