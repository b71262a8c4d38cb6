"""The one registry of model families: resolved by class (``isinstance``), never by name.

Families are kept most specific first and the first whose ``pipeline_classes()`` the pipeline is an
instance of wins (a subclass of a diffusers pipeline belongs to its family). Each family imports its
classes only when asked, so resolving the demo model never imports diffusers' SD pipelines (and
transformers' image processors). Video families (``seg_rt.video.families``) register themselves into
the same registry when that package is imported.
"""

from __future__ import annotations

from pathlib import Path

from .base import Family


class Registry:
    def __init__(self) -> None:
        self._families: list[Family] = []
        self._extended = False

    def _extend(self) -> bool:
        """Register the video families once; True when that may have added families. They live in
        ``seg_rt.video`` (which builds on this core), so the registry imports them on the first
        lookup the image families do not answer: the core's one lazy import of ``seg_rt.video``
        (allowed in tests/test_boundaries.py)."""
        if self._extended:
            return False
        self._extended = True
        import seg_rt.video.families  # noqa: F401  (registers AnimateDiff, CogVideoX, Wan, LTX-Video)

        return True

    def register(self, family: Family, *, first: bool = False) -> Family:
        """Add ``family`` (last, or ``first``: before every other, for a more specific class).
        A family name is registered once."""
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"a model family named {family.name!r} is registered already")
        if first:
            self._families.insert(0, family)
        else:
            self._families.append(family)
        return family

    def unregister(self, family: Family) -> None:
        self._families.remove(family)

    def families(self, kind: str | None = None) -> tuple[Family, ...]:
        """The registered families (of ``kind``), most specific first."""
        return tuple(f for f in self._families if kind is None or f.kind == kind)

    def names(self, kind: str | None = None) -> tuple[str, ...]:
        return tuple(f.name for f in self.families(kind))

    def of(self, pipe, kind: str | None = None) -> Family:
        """The family of a loaded pipeline; ``ValueError`` naming what is supported otherwise."""
        for family in self._families:
            if (kind is None or family.kind == kind) and isinstance(pipe, family.pipeline_classes()):
                return family
        if self._extend():
            return self.of(pipe, kind)
        raise ValueError(
            f"unsupported {kind + ' ' if kind else ''}pipeline {type(pipe).__name__}; seg-rt supports the "
            f"families {', '.join(self.names(kind))}"
        )

    def for_class(self, cls: type, kind: str | None = None) -> Family | None:
        """The family of a pipeline class (before loading it), or None."""
        for family in self._families:
            if (kind is None or family.kind == kind) and issubclass(cls, family.pipeline_classes()):
                return family
        return self.for_class(cls, kind) if self._extend() else None

    def for_model(self, model, kind: str | None = None) -> Family:
        """The family whose denoiser network ``model`` is (its adapter patches it)."""
        for family in self._families:
            classes = family.model_classes()
            if (kind is None or family.kind == kind) and classes and isinstance(model, classes):
                return family
        if self._extend():
            return self.for_model(model, kind)
        names = [
            c.__name__ for f in self._families if kind is None or f.kind == kind for c in f.model_classes()
        ]
        raise ValueError(
            f"no {kind or ''} SEG support for {type(model).__name__}; supported: {', '.join(names)}"
        )

    def for_folder(self, folder: Path) -> Family | None:
        """The family of a local diffusers folder by the pipeline class its ``model_index.json`` names
        (looked up in diffusers, never imported from the folder), or None."""
        from seg_rt.demo.folders import demo_pipeline_class
        from seg_rt.demo.model import index_class

        cls = demo_pipeline_class(folder)
        if cls is None and (name := index_class(folder)) is not None:
            import diffusers

            cls = getattr(diffusers, name, None)
        return self.for_class(cls) if isinstance(cls, type) else None


REGISTRY = Registry()
