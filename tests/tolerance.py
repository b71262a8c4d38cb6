"""Float comparisons between two different code paths, bounded relative to the values' scale.

Two code paths (ours vs an independent reference, torch vs ONNX Runtime, seg-rt vs diffusers) run
different kernels, and on another CPU (CI runs on AMD AVX2 and AVX-512 machines) those kernels round
differently: an absolute bound that holds here by a hair fails there. So the bound scales with the
magnitude of the values compared. Bit-equality is demanded only of the same code path on the same
machine (batch vs solo, rerun, resume), with ``torch.equal`` / ``np.array_equal``.
"""

from __future__ import annotations

import numpy as np
import torch


def max_rel_error(actual, expected) -> float:
    """max|actual - expected| / max(1, max|expected|)."""
    a = (
        actual.detach().double().cpu()
        if isinstance(actual, torch.Tensor)
        else torch.as_tensor(np.asarray(actual, dtype=np.float64))
    )
    e = (
        expected.detach().double().cpu()
        if isinstance(expected, torch.Tensor)
        else torch.as_tensor(np.asarray(expected, dtype=np.float64))
    )
    return float((a - e).abs().max() / max(1.0, float(e.abs().max())))


def assert_close(actual, expected, rel: float, what: str = "values") -> None:
    """Assert max|actual - expected| <= rel * max(1, max|expected|)."""
    err = max_rel_error(actual, expected)
    assert err <= rel, f"{what}: max error {err:.3g} of the values' scale exceeds {rel:g}"
