"""What every benchmark shares: percentiles (against numpy) and the one figure writer."""

import math

import numpy as np
import pytest

from seg_rt.bench.figure import figure
from seg_rt.bench.timing import percentiles


@pytest.mark.parametrize("n", [2, 5, 24, 101])
def test_percentiles_match_numpy_linear(n):
    rng = np.random.default_rng(n)
    xs = list(rng.exponential(0.1, size=n))
    got = percentiles(xs, 50, 95, 1, 99)
    want = np.percentile(xs, [50, 95, 1, 99])  # linear interpolation, numpy's default
    scale = max(map(abs, xs))
    assert all(math.isclose(g, w, rel_tol=0, abs_tol=1e-12 * scale) for g, w in zip(got, want, strict=True))


def test_percentiles_differ_from_the_old_nearest_rank_pick():
    """bench_serve once took ``sorted(xs)[round(q * (n - 1))]`` (a sample, no interpolation): for 24
    latencies p50 sat at position 11.5 and the old pick returned sample 12, the interpolation their mean."""
    xs = [float(k) for k in range(24)]
    old = sorted(xs)[min(len(xs) - 1, round(0.5 * (len(xs) - 1)))]
    (p50,) = percentiles(xs, 50)
    assert (old, p50) == (12.0, 11.5)


def test_percentiles_refuse_bad_input():
    with pytest.raises(ValueError, match=r"whole numbers from 1 to 99, got 0\.5"):
        percentiles([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        percentiles([1.0], 50)


def test_figure_writes_a_png_atomically_and_closes_it(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    before = len(plt.get_fignums())
    out = tmp_path / "sub" / "plot.png"
    with figure(out, "the test plot", 1, 2, figsize=(4, 2)) as (_, axes):
        axes[0].plot([0, 1], [1, 0])
        assert len(axes) == 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["plot.png"]  # no temp file left behind
    with pytest.raises(RuntimeError, match="drawing failed"), figure(tmp_path / "bad.png", "x") as _:
        raise RuntimeError("drawing failed")
    assert not (tmp_path / "bad.png").exists()  # an error while drawing writes nothing
    assert len(plt.get_fignums()) == before
