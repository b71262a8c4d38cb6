"""SEG for video attention: spatial, temporal and spatio-temporal query blur (DESIGN §1 per axis).

Video models compute attention in their own diffusers processors (AnimateDiff: ``AttnProcessor2_0``
on frames and along time; CogVideoX: joint text+video attention with RoPE; Wan / LTX: ``norm_q`` and
RoPE, then ``dispatch_attention_fn``). The query SEG must blur is the one that enters attention, so
instead of copying each processor, ``VideoSEG`` wraps the attention *function* a processor calls
(``F.scaled_dot_product_attention`` or ``dispatch_attention_fn``). The wrapper acts only inside a
SEG call on the current thread (thread-local state): there it blurs the video tokens of the
perturbed rows of the final query and leaves text tokens alone; everywhere else it passes through.

Axes per layer kind (rows x tokens):
- ``spatial``: (B·F, H·W) — per-frame 2D blur with σ_space (AnimateDiff spatial attn1).
- ``temporal``: (B·H·W, F) — 1D blur over frames with σ_time (AnimateDiff motion modules).
- ``joint``: (B, [text +] F·H·W frame-major) — separable 3D blur, σ_time on frames, σ_space on
  H, W (video DiTs; σ_time = 0 keeps frames independent, σ_space = 0 blurs along time only).
The token grid comes from the model's input shape and patch sizes, never from the sequence length.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from seg_rt.blur import blur_matrix, separable_blur

MODES = ("spatial", "temporal", "spatiotemporal")
_local = threading.local()


@dataclass(frozen=True)
class VideoBlur:
    """σ per axis kind for a mode: spatial → (σ, 0), temporal → (0, σ_t), spatiotemporal → (σ, σ_t)."""

    mode: str = "spatiotemporal"
    sigma: float = math.inf
    sigma_time: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"seg mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, v in (("seg sigma", self.sigma), ("seg sigma time", self.sigma_time)):
            if math.isnan(v) or v < 0:
                raise ValueError(f"{name} must be >= 0 or inf, got {v:g}")
        if self.space == 0 and self.time == 0:
            raise ValueError(f"seg mode {self.mode!r} with these sigmas blurs nothing (sigma time 0?)")

    @property
    def space(self) -> float:
        return 0.0 if self.mode == "temporal" else self.sigma

    @property
    def time(self) -> float:
        return 0.0 if self.mode == "spatial" else self.sigma_time


class _AttentionFnHook:
    """Replaces ``module.name`` (an attention function taking query first); refcounted."""

    def __init__(self, module, name: str, layout: str) -> None:
        self.module, self.name, self.layout = module, name, layout
        self.original = getattr(module, name)
        self.users = 0

    def __call__(self, query: Tensor, *args, **kwargs):
        call = getattr(_local, "call", None)
        if call is not None and call.layout == self.layout:
            query = call.perturb(query)
        return self.original(query, *args, **kwargs)


_hooks: dict[tuple[int, str], _AttentionFnHook] = {}
_hooks_lock = threading.Lock()


def _acquire(module, name: str, layout: str) -> _AttentionFnHook:
    with _hooks_lock:
        key = (id(module), name)
        hook = _hooks.get(key)
        if hook is None:
            hook = _hooks[key] = _AttentionFnHook(module, name, layout)
            setattr(module, name, hook)
        hook.users += 1
        return hook


def _release(hook: _AttentionFnHook) -> None:
    with _hooks_lock:
        hook.users -= 1
        if hook.users == 0:
            setattr(hook.module, hook.name, hook.original)
            del _hooks[(id(hook.module), hook.name)]


@dataclass
class _Call:
    """One SEG'd attention call: which rows, which tokens, which axes."""

    layout: str  # "bhnd" (F.scaled_dot_product_attention) or "bnhd" (dispatch_attention_fn)
    mask: Tensor  # [rows] bool, already expanded to the attention batch
    text: int  # text tokens in front of the video tokens (joint attention)
    mats: tuple[Tensor | None, Tensor, Tensor]  # (M_t or None, M_h, M_w)

    def perturb(self, q: Tensor) -> Tensor:
        """Blur the video tokens of the masked rows of ``q``, one row at a time: cheaper than blurring
        every row, and a row's result cannot depend on how many rows share the batch."""
        # q: [B, h, N, d] ("bhnd") or [B, N, h, d] ("bnhd"); video tokens are q[..., text:, ...]
        m_t, m_h, m_w = self.mats
        tokens = (m_t.shape[0] if m_t is not None else 1) * m_h.shape[0] * m_w.shape[0]
        rows = self.mask.nonzero().flatten().tolist()
        if not rows:
            return q
        q = q.clone()
        for i in rows:
            if self.layout == "bhnd":
                video = q[i, :, self.text :]  # [h, T, d]
                q[i, :, self.text :] = separable_blur(
                    video.reshape(-1, tokens, video.shape[-1]), m_h, m_w, m_t
                )
            else:
                video = q[i, self.text :]  # [T, h, d]
                flat = video.reshape(1, tokens, -1)
                q[i, self.text :] = separable_blur(flat, m_h, m_w, m_t).view_as(video)
        return q


@dataclass(frozen=True)
class Family:
    """How a video model lays out attention: which layers, their kind, the grid, the attention fn."""

    name: str
    layers: Callable[[nn.Module], dict[str, str]]  # model -> {attn module name: kind}
    grid: Callable[[nn.Module, tuple, dict], tuple[int, int, int]]  # (model, args, kwargs) -> (F, H, W)
    joint_text: bool  # text tokens are concatenated in front of the video tokens
    attention: tuple[str, str, str]  # (module path, function name, layout)


def _attn1_layers(kind_of: Callable[[str], str | None]) -> Callable[[nn.Module], dict[str, str]]:
    def find(model: nn.Module) -> dict[str, str]:
        from diffusers.models.attention_processor import Attention

        out = {}
        for name, m in model.named_modules():
            if (
                isinstance(m, nn.Module)
                and name.endswith("attn1")
                and (isinstance(m, Attention) or hasattr(m, "processor"))
            ):
                kind = kind_of(name)
                if kind:
                    out[name] = kind
        return out

    return find


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """The first input of a forward: ``hidden_states`` (transformers) or ``sample`` (UNets)."""
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else kwargs["sample"]


def _cogvideox_grid(model, args, kwargs) -> tuple[int, int, int]:
    _, f, _, h, w = _hidden(args, kwargs).shape  # [B, F, C, H, W]
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1
    return (f + p_t - 1) // p_t, h // p, w // p


def _wan_grid(model, args, kwargs) -> tuple[int, int, int]:
    _, _, f, h, w = _hidden(args, kwargs).shape  # [B, C, F, H, W]
    p_t, p_h, p_w = model.config.patch_size
    return f // p_t, h // p_h, w // p_w


def _animatediff_grid(model, args, kwargs) -> tuple[int, int, int]:
    _, _, f, h, w = _hidden(args, kwargs).shape  # [B, C, F, H, W] latents; per-block sizes come from hooks
    return f, h, w


FAMILIES = {
    "cogvideox": Family(
        "cogvideox",
        _attn1_layers(lambda n: "joint" if n.startswith("transformer_blocks.") else None),
        _cogvideox_grid,
        joint_text=True,
        attention=("torch.nn.functional", "scaled_dot_product_attention", "bhnd"),
    ),
    "wan": Family(
        "wan",
        _attn1_layers(lambda n: "joint" if n.startswith("blocks.") else None),
        _wan_grid,
        joint_text=False,
        attention=("diffusers.models.transformers.transformer_wan", "dispatch_attention_fn", "bnhd"),
    ),
    "animatediff": Family(
        "animatediff",
        _attn1_layers(lambda n: "temporal" if ".motion_modules." in n else "spatial"),
        _animatediff_grid,
        joint_text=False,
        attention=("torch.nn.functional", "scaled_dot_product_attention", "bhnd"),
    ),
}


def family_of_model(model: nn.Module) -> str:
    names = {
        "CogVideoXTransformer3DModel": "cogvideox",
        "WanTransformer3DModel": "wan",
        "UNetMotionModel": "animatediff",
    }
    name = type(model).__name__
    if name not in names:
        raise ValueError(f"no video SEG support for {name}; supported: {', '.join(names)}")
    return names[name]


class VideoSEGProcessor:
    """Wraps a layer's own processor; inside its call, the attention function blurs the query.

    diffusers' attention modules drop keyword arguments that are not in the processor's
    ``__call__`` signature (RoPE embeddings among them), so ``wrap`` makes a subclass per
    processor type whose ``__call__`` carries the inner processor's signature.
    """

    def __init__(self, patch: VideoSEG, inner, name: str, kind: str) -> None:
        self.patch, self.inner, self.name, self.kind = patch, inner, name, kind
        self.block_hw: tuple[int, int] | None = None  # AnimateDiff: this block's spatial size

    def __getattr__(self, item):  # processors carry attributes callers read (e.g. _attention_backend)
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)

    def __call__(self, attn, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        encoder = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        call = self.patch.call_for(self, hidden, encoder)
        if call is None:
            return self.inner(attn, *args, **kwargs)
        prev, _local.call = getattr(_local, "call", None), call
        try:
            return self.inner(attn, *args, **kwargs)
        finally:
            _local.call = prev


_wrapper_types: dict[type, type] = {}


def wrap(patch: VideoSEG, inner, name: str, kind: str) -> VideoSEGProcessor:
    cls = _wrapper_types.get(type(inner))
    if cls is None:

        def __call__(self, attn, *args, **kwargs):
            return VideoSEGProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(type(inner).__call__)
        cls = _wrapper_types[type(inner)] = type(
            f"SEG{type(inner).__name__}", (VideoSEGProcessor,), {"__call__": __call__}
        )
    return cls(patch, inner, name, kind)


class VideoSEG:
    """Install video SEG on a video transformer / motion UNet; ``set_mask`` per forward; reversible."""

    def __init__(self, model: nn.Module, blur: VideoBlur, layers: Sequence[str] | None = None) -> None:
        self.model, self.blur = model, blur
        self.family = FAMILIES[family_of_model(model)]
        found = self.family.layers(model)
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
        self.kinds = found
        self.mask: Tensor | None = None
        self.grid: tuple[int, int, int] | None = None
        self._saved: dict[str, object] = {}
        self._handles: list = []
        self._fn_hook: _AttentionFnHook | None = None
        self._mats: dict[tuple, Tensor] = {}  # blur matrices by (n, sigma, device, dtype)

    def install(self) -> VideoSEG:
        mods = dict(self.model.named_modules())
        mod_path, fn, layout = self.family.attention
        self._fn_hook = _acquire(importlib.import_module(mod_path), fn, layout)
        for name, kind in self.kinds.items():
            attn = mods[name]
            self._saved[name] = attn.processor
            proc = wrap(self, attn.processor, name, kind)
            attn.processor = proc  # not set_processor: keep the model's own processor object inside
            if kind == "spatial":  # AnimateDiff: the owning Transformer2DModel sees [B·F, C, h, w]
                owner = mods[name.rpartition(".transformer_blocks.")[0]]
                self._handles.append(owner.register_forward_pre_hook(_block_hw_hook(proc), with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(self._grid_hook, with_kwargs=True))
        return self

    def _grid_hook(self, module, args, kwargs) -> None:
        self.grid = self.family.grid(module, args, kwargs)

    def set_mask(self, mask: Tensor | None) -> None:
        self.mask = mask

    def call_for(self, proc: VideoSEGProcessor, hidden: Tensor, encoder: Tensor | None) -> _Call | None:
        if self.mask is None or self.grid is None:
            return None
        f, h, w = self.grid
        b = self.mask.shape[0]
        rows = hidden.shape[0]
        if rows % b:
            raise ValueError(f"{proc.name}: {rows} attention rows are not a multiple of the {b}-row seg mask")
        mask = self.mask.to(hidden.device).repeat_interleave(rows // b)  # rows are sample-major
        mat = lambda n, s: self._matrix(n, s, hidden)  # noqa: E731
        if proc.kind == "spatial":
            bh, bw = proc.block_hw or (h, w)
            mats = (None, mat(bh, self.blur.space), mat(bw, self.blur.space))
        elif proc.kind == "temporal":
            mats = (None, mat(f, self.blur.time), mat(1, 0.0))
        else:
            mats = (mat(f, self.blur.time), mat(h, self.blur.space), mat(w, self.blur.space))
        text = encoder.shape[1] if self.family.joint_text and encoder is not None else 0
        layout = self.family.attention[2]
        return _Call(layout, mask, text, mats)

    def _matrix(self, n: int, sigma: float, probe: Tensor) -> Tensor:
        """``blur_matrix(n, sigma)`` on ``probe``'s device and dtype, built once per install (it is
        a Python loop, and every SEG attention call of every step needs it)."""
        key = (n, sigma, probe.device, probe.dtype)
        if key not in self._mats:
            self._mats[key] = blur_matrix(n, sigma).to(device=probe.device, dtype=probe.dtype)
        return self._mats[key]

    def remove(self) -> None:
        mods = dict(self.model.named_modules())
        for name, proc in self._saved.items():
            mods[name].processor = proc
        for h in self._handles:
            h.remove()
        if self._fn_hook is not None:
            _release(self._fn_hook)
        self._saved.clear()
        self._handles.clear()
        self._fn_hook = None
        self.mask = None

    def __enter__(self) -> VideoSEG:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def _block_hw_hook(proc: VideoSEGProcessor):
    def hook(module, args, kwargs) -> None:
        x = _hidden(args, kwargs)
        if x.ndim == 4:
            proc.block_hw = (int(x.shape[-2]), int(x.shape[-1]))

    return hook


@contextlib.contextmanager
def video_seg(model: nn.Module, blur: VideoBlur, layers: Sequence[str] | None = None):
    seg = VideoSEG(model, blur, layers).install()
    try:
        yield seg
    finally:
        seg.remove()
