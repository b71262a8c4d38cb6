"""The denoiser protocol every engine implements, and the shared fixed-shape engine logic.

A denoiser is called with the model inputs for one batch, by the ONNX / TensorRT-demo names
(``sample``, ``timestep``, ``encoder_hidden_states``, ``text_embeds``, ``time_ids``,
``controlnet_cond``, ``conditioning_scale``) plus ``seg_mask`` (``[B]`` bool: which rows get the
blurred query), and returns the model's prediction for the batch as a torch tensor
(docs/design.md, "The contracts other parts rely on"). It states which shapes it accepts; a
request outside them is a ``ValueError`` naming both.

``Denoiser`` is an abstract base class rather than a ``typing.Protocol``: an engine that forgets
a method cannot be instantiated, so callers never need ``hasattr``. ``FixedShapeDenoiser`` holds
what ONNX Runtime and TensorRT engines share: the ``seg_rt.json`` sidecar, the shape check,
padding a request to the engine's batch, and the blur-matrix inputs of runtime-σ exports.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from seg_rt.artifacts import FORK_SOURCE, ArtifactInfo, read_info
from seg_rt.blur import blur_matrix, is_infinite
from seg_rt.config import check_sigma
from seg_rt.sampler import row_layout

BLUR_INPUT_PREFIX = "seg_blur_"  # runtime-σ exports take one blur matrix per axis length


@dataclass(frozen=True)
class ShapeSpec:
    """Shapes an engine accepts; ``None`` means any. ``batch`` counts rows of one forward."""

    batch: int | None = None
    height: int | None = None  # latent height
    width: int | None = None  # latent width

    def check(self, batch: int, height: int, width: int) -> None:
        want = (self.batch, self.height, self.width)
        got = (batch, height, width)
        if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise ValueError(f"engine accepts batch x latent height x width = {_fmt(want)}, got {_fmt(got)}")

    def __str__(self) -> str:
        return _fmt((self.batch, self.height, self.width))


def _fmt(dims: tuple[int | None, ...]) -> str:
    return "x".join("any" if v is None else str(v) for v in dims)


class Denoiser(ABC):
    """One SEG denoiser: ``configure`` σ and layers, call it per step, ``close`` it (or ``with``).

    ``shapes`` says which shapes it accepts; ``images_per_run`` how many images (per branch) one
    call can hold, ``None`` for any. Calling a closed denoiser is an error.
    """

    shapes: ShapeSpec = ShapeSpec()
    closed: bool = False

    @property
    def images_per_run(self) -> int | None:
        return None

    @abstractmethod
    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use SEG σ ``sigma`` on ``layers`` (``None``: the current ones) from the next call on."""

    def set_perturbation(self, perturbation: str) -> str:
        """Perturb the ``seg_mask`` rows the ``perturbation`` way (``seg_rt.guidance``'s perturbed
        terms: ``blur`` SEG, ``identity`` PAG, ``shuffle`` TPG, ``skip`` SLG) from the next call on;
        returns the kind it used before. An engine that runs only SEG's blur (an exported graph)
        refuses the others in one line."""
        if perturbation != "blur":
            raise ValueError(
                f"{type(self).__name__} runs SEG's blur only, not the {perturbation!r} perturbation; "
                "use the torch engine"
            )
        return "blur"

    @abstractmethod
    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The model's prediction for the batch in ``inputs`` (``seg_mask`` marks perturbed rows)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the denoiser holds (sessions, GPU buffers, installed SEG processors).
        Closing twice is allowed."""

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed; load the engine again")

    def __enter__(self) -> Denoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PatchedDenoiser(Denoiser):
    """A PyTorch denoiser over a diffusers model with SEG processors installed for its lifetime;
    any shape. ``configure`` with other layers removes the processors and installs new ones;
    ``close()`` (or ``with``) restores the model.

    Subclasses implement ``_install`` (SEG on ``layers`` of their model: sets ``self.model``, whose
    ``seg`` holds σ) and ``_remove``; ``self.layers`` is kept here.
    """

    shapes = ShapeSpec()
    layers: tuple[str, ...] = ()

    @abstractmethod
    def _install(self, sigma: float, layers: tuple[str, ...]) -> None:
        """Install SEG with ``sigma`` on ``layers`` of the model."""

    @abstractmethod
    def _remove(self) -> None:
        """Remove the installed SEG processors (and hooks) from the model."""

    def _patch(self, sigma: float, layers: Sequence[str]) -> None:
        self.layers = tuple(layers)
        self._install(float(sigma), self.layers)
        kind = getattr(self, "_perturbation_kind", None)
        if kind is not None:  # set_perturbation's kind survives new layers
            self.model.seg.set_perturbation(kind)

    def set_perturbation(self, perturbation: str) -> str:
        self._check_open()
        previous = self.model.seg.perturbation
        if getattr(self, "compile", False) and perturbation != previous:
            raise ValueError(
                f"the {perturbation!r} perturbation does not run under torch-compile; drop compile"
            )
        self.model.seg.set_perturbation(perturbation)
        self._perturbation_kind = perturbation
        return previous

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Use ``sigma`` and ``layers`` (``None``: the current ones) from the next call on; a bad σ is
        refused before anything changes, and layers that cannot be installed leave the current ones
        installed (a long-lived denoiser survives one bad request)."""
        self._check_open()
        check_sigma(sigma)
        if layers is not None and tuple(layers) != self.layers:
            old_sigma, old_layers = self.model.seg.sigma, self.layers
            self._remove()
            try:
                self._patch(sigma, layers)
            except Exception:
                self._patch(old_sigma, old_layers)
                raise
        self.model.seg.set_sigma(sigma)

    def close(self) -> None:
        if not self.closed:
            self._remove()
        self.closed = True


def check_artifact_config(info: ArtifactInfo, sigma: float, layers: Sequence[str] | None) -> None:
    """An exported artifact serves the SEG layers it was exported for, and its baked σ only."""
    if layers is not None and tuple(layers) not in (info.layers, info.layer_names):
        raise ValueError(
            f"engine was exported for seg layers {','.join(info.layers)}, got {','.join(layers)}; "
            "re-export with --seg-layers"
        )
    if not info.dynamic_sigma:
        baked = float(info.sigma)
        if not (sigma == baked or (is_infinite(sigma) and is_infinite(baked))):
            raise ValueError(
                f"engine was exported with seg sigma {baked:g} baked in, got {sigma:g}; "
                "re-export with --dynamic-sigma to change sigma at run time"
            )


def blur_inputs(info: ArtifactInfo, sigma: float) -> dict[str, Tensor]:
    """The ``seg_blur_<n>`` inputs of a runtime-σ artifact for ``sigma`` (float32); ``{}`` if baked."""
    if not info.dynamic_sigma:
        return {}
    return {f"{BLUR_INPUT_PREFIX}{n}": blur_matrix(n, sigma) for n in info.blur_lengths}


def pad_rows(inputs: Mapping[str, Tensor], rows: int) -> dict[str, Tensor]:
    """Pad a request to a fixed engine batch: copies of the last row, never perturbed."""
    have = inputs["sample"].shape[0]
    if have >= rows:
        return dict(inputs)
    out = {k: torch.cat([v, v[-1:].expand(rows - have, *v.shape[1:])]) for k, v in inputs.items()}
    mask = inputs["seg_mask"]
    out["seg_mask"] = torch.cat([mask, torch.zeros(rows - have, dtype=torch.bool, device=mask.device)])
    return out


def fork_feed(
    inputs: Mapping[str, Tensor], prefix: int, forked: int
) -> tuple[dict[str, Tensor], Tensor, int]:
    """A request → the feed of a fork engine (``seg_rt.export.fork``: ``prefix`` rows in, ``forked``
    rows gathered by ``fork_source``), the engine output rows that answer it, in request order, and
    how many of the fork rows it uses (0: the fork rows are all padding).

    The request's host layout (``seg_rt.sampler.RowLayout``) decides: perturbed rows last whose source
    rows come before them (batched SEG: CFG+SEG, SEG without CFG, PAG rows) fork off those rows; any
    other batch (outside the SEG window, uncond placement, a sequential branch, a plain mapping) is all
    prefix rows, its perturbed rows marked in ``seg_mask``. Unused rows are unperturbed padding (copies
    of the last prefix row; fork rows copying row 0). A batch that does not fit is a ``ValueError``."""
    rows = inputs["sample"].shape[0]
    layout = row_layout(inputs)
    seg, src = layout.seg_rows, layout.seg_source
    if (
        seg is not None
        and src is not None
        and seg.stop == rows
        and src.stop <= seg.start
        and seg.stop - seg.start == src.stop - src.start
    ):
        p, source = seg.start, list(range(src.start, src.stop))
    else:
        p, source = rows, []
    k = len(source)
    if p > prefix or k > forked:
        raise ValueError(
            f"fork engine serves <= {prefix} unperturbed rows + <= {forked} forked rows per call, got "
            f"{p} + {k} (of {rows} rows); export with a larger --batch"
        )
    mask = inputs["seg_mask"]
    feed = {}
    for name, v in inputs.items():
        if name == "seg_mask":
            continue
        head = v[:p]
        feed[name] = torch.cat([head, head[-1:].expand(prefix - p, *v.shape[1:])]) if p < prefix else head
    dev = mask.device
    feed["seg_mask"] = torch.cat(
        [
            mask[:p],
            torch.zeros(prefix - p, dtype=torch.bool, device=dev),
            mask[p:],
            torch.zeros(forked - k, dtype=torch.bool, device=dev),
        ]
    )
    feed[FORK_SOURCE] = torch.tensor(source + [0] * (forked - k), dtype=torch.int64)
    pick = torch.tensor(list(range(p)) + list(range(prefix, prefix + k)), dtype=torch.int64)
    return feed, pick, k


class FixedShapeDenoiser(Denoiser):
    """An engine over a seg-rt export folder (``seg_rt.json`` + model file) with fixed shapes.

    Subclasses load ``self.path`` after ``super().__init__``, end their ``__init__`` with
    ``self._open_twin(...)`` and ``self.configure(self.sigma)``, and implement ``_set_blur`` (take the
    runtime blur matrices), ``_run`` (one forward on exactly the engine's shapes) and ``_release``.
    Requests with fewer rows than the engine batch are padded (extra rows unperturbed) and the padding
    is cut off the result. A fork export's unforked twin (``ArtifactInfo.twin_file``) is a second
    engine of the same class (``self.twin``) that runs the steps without perturbed rows, so they do
    not pay for the fork graph's padded fork rows.
    """

    kind: ClassVar[str]  # the sidecar kind this engine runs ("onnx", "tensorrt")
    file_label: ClassVar[str]  # what the model file is called in errors ("ONNX model", ...)
    twin: FixedShapeDenoiser | None = None

    def __init__(self, folder: str | Path, info: ArtifactInfo | None = None) -> None:
        """``info``: the description to load instead of the folder's sidecar (a fork export's twin)."""
        self.folder = Path(folder)
        self.info: ArtifactInfo = read_info(self.folder) if info is None else info
        if self.info.kind != self.kind:
            raise ValueError(
                f"{str(self.folder)!r} holds a {self.info.kind} artifact; this engine runs {self.kind} artifacts"
            )
        self.path = self.folder / self.info.file
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.file_label} {str(self.path)!r} is missing")
        self.shapes = ShapeSpec(self.info.rows, self.info.latent_height, self.info.latent_width)
        self.sigma = math.inf if self.info.dynamic_sigma else float(self.info.sigma)

    @property
    def images_per_run(self) -> int:
        return self.info.batch

    def _open_twin(self, **options) -> None:
        """Load the twin of a fork export with this engine's ``options`` (none for other exports)."""
        if self.info.twin_file is not None:
            self.twin = type(self)(self.folder, info=self.info.twin(), **options)

    def configure(self, sigma: float, layers: Sequence[str] | None = None) -> None:
        """Check σ and the SEG layers against the export; feed σ's blur matrices (runtime-σ exports)."""
        self._check_open()
        check_artifact_config(self.info, sigma, layers)
        self._set_blur(blur_inputs(self.info, sigma))
        if self.twin is not None:
            self.twin.configure(sigma, layers)
        self.sigma = float(sigma)

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        self._check_open()
        if getattr(inputs, "cache", None) is not None:
            raise ValueError(f"a step cache runs on the torch engine only, not {type(self).__name__}")
        sample = inputs["sample"]  # [B, C, h, w]; a video export's [B, C, F, h, w] ([B, F, C, h, w])
        video = self.info.frames is not None
        if sample.ndim != (5 if video else 4):
            what = "video latents (a 5-d sample)" if video else "image latents (a 4-d sample)"
            raise ValueError(f"engine {str(self.folder)!r} takes {what}, got a {sample.ndim}-d sample")
        rows, want = sample.shape[0], self.info.rows
        self.shapes.check(max(rows, want), sample.shape[-2], sample.shape[-1])
        missing = [
            n
            for n in self.info.input_names
            if not n.startswith(BLUR_INPUT_PREFIX) and n != FORK_SOURCE and n not in inputs
        ]
        if missing:
            raise ValueError(f"engine input(s) {', '.join(missing)} missing from the request")
        if self.info.fork_rows is not None:  # in-graph fork: the layout is data (fork_feed)
            feed, pick, forked = fork_feed(inputs, self.info.prefix_rows, self.info.fork_rows)
            if forked == 0 and self.twin is not None:  # no perturbed row to fork: the unforked twin
                out = self.twin._run(pad_rows(inputs, self.twin.info.rows))[:rows]
            else:
                out = self._run(feed)
                out = out.index_select(0, pick.to(out.device))
        else:
            out = self._run(pad_rows(inputs, want))[:rows]  # fixed shape: pad, then cut the padding off
        return out.to(device=sample.device, dtype=sample.dtype)

    def close(self) -> None:
        if self.twin is not None:
            self.twin.close()
        self._release()
        self.closed = True

    @abstractmethod
    def _release(self) -> None:
        """Drop what this engine holds (sessions, GPU buffers); the twin is closed by ``close``."""

    @abstractmethod
    def _set_blur(self, matrices: Mapping[str, Tensor]) -> None:
        """Use these ``seg_blur_<n>`` inputs (float32 ``[n, n]``) from the next run on."""

    @abstractmethod
    def _run(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """One forward on exactly ``info.rows`` rows; a tensor the next run does not overwrite."""
