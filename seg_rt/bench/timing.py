"""Timing as ratios of alternating pairs, and percentiles of measured latencies."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternating_ratio(
    baseline: Callable[[], object], candidate: Callable[[], object], pairs: int, calls: int = 3
) -> dict:
    """Median of ``t(candidate) / t(baseline)`` over ``pairs`` alternating pairs (order swapped every
    pair), each timing ``calls`` calls (after one warm-up each); also the median per-pair difference in ms."""
    baseline(), candidate()
    ratios, base_times, diffs = [], [], []
    for i in range(pairs):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[fn] = (time.perf_counter() - t0) / calls
        ratios.append(times[candidate] / times[baseline])
        base_times.append(times[baseline])
        diffs.append(times[candidate] - times[baseline])
    return {
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_p25": round(statistics.quantiles(ratios, n=4)[0], 4),
        "ratio_p75": round(statistics.quantiles(ratios, n=4)[2], 4),
        "baseline_ms_median": round(1000 * statistics.median(base_times), 3),
        "diff_ms_median": round(1000 * statistics.median(diffs), 3),  # t(candidate) - t(baseline), per pair
    }


def percentiles(values: Sequence[float], *percents: int) -> list[float]:
    """The whole ``percents`` (1 to 99) of ``values``: each linearly interpolated between the two
    samples around position ``p/100 · (n - 1)`` of the sorted values
    (``statistics.quantiles(method="inclusive")``, the same as numpy's default ``percentile``)."""
    bad = [p for p in percents if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 99]
    if bad:
        raise ValueError(f"percentiles must be whole numbers from 1 to 99, got {bad[0]!r}")
    if len(values) < 2:
        raise ValueError(f"percentiles need at least 2 values, got {len(values)}")
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # cuts[p - 1]: the p-th percentile
    return [cuts[p - 1] for p in percents]
