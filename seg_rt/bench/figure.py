"""The one place a benchmark plot is made and written: ``with figure(path, ...) as (fig, axes)``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seg_rt.images import write_atomic
from seg_rt.optional import require

DPI = 100


@contextmanager
def figure(path: str | Path, purpose: str, *args: Any, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``matplotlib.pyplot.subplots(*args, **subplots)`` on the Agg backend; when the block ends
    without error the figure is laid out (``tight_layout``), rendered as PNG at ``DPI`` and written
    atomically to ``path`` (``seg_rt.images.write_atomic``). The figure is closed either way.
    ``purpose`` names the plot in the error when matplotlib is missing."""
    matplotlib = require("matplotlib", purpose)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **subplots)
    buf = io.BytesIO()
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
